"""Studies end to end on tiny configurations: reproduce -> store -> report; report rebuilds without training."""

import json

import pytest

from batchscope import reproduce as rp
from batchscope.studies import Options
from batchscope.studies.hoffer import Hoffer
from batchscope.studies.keskar import Keskar

TINY_DATA = {"name": "gaussian_mixture", "n_train": 200, "n_test": 100, "options": {"dim": 8, "num_classes": 3, "separation": 2.0}}


@pytest.fixture
def tiny_keskar(monkeypatch):
    monkeypatch.setattr(
        Keskar,
        "config",
        lambda self, opts: dict(
            data=TINY_DATA, model={"name": "mlp", "width": 0.05, "depth": 2, "norm": "batch"}, sb=10, lb_fraction=0.1,
            grid=[10, 50], epochs=8, measure_examples=100, measure_batch=50, subspace_dim=5, fit_acc=0.6,
        ),
    )


@pytest.fixture
def tiny_hoffer(monkeypatch):
    monkeypatch.setattr(
        Hoffer,
        "config",
        lambda self, opts: dict(
            data=TINY_DATA, model={"name": "mlp", "width": 0.05, "depth": 2, "norm": "batch"}, sb=10, lb=100,
            epochs=4, milestones=[3.0], lr=0.1, margin=0.05,
        ),
    )


def _claims(out):
    doc = json.loads((out / "claims.json").read_text())
    return doc, {c["id"]: c for c in doc["claims"]}


def test_keskar_reproduce_writes_report_with_computed_verdicts(tmp_path, tiny_keskar, monkeypatch):
    opts = Options(scale="quick", seeds=3)
    out = tmp_path / "report"
    index = rp.reproduce("keskar", opts, tmp_path / "s.db", out, log=lambda s: None)
    assert index.exists() and "data:image/png;base64," in index.read_text()
    doc, claims = _claims(out)
    assert doc["study"] == "keskar" and doc["scale"] == "quick"
    assert {"gap", "sharper_eps0.001", "distance", "acc_trend", "sharp_trend"} <= set(claims)
    for c in claims.values():
        assert c["verdict"]["verdict"] in ("holds", "fails", "inconclusive") and c["verdict"]["rule"]
    assert (out / "figures" / "sharpness_vs_batch.png").exists()

    # the report rebuilds from the store alone: no training, cached measurements, same verdicts
    def no_training(*a, **k):
        raise AssertionError("report must not train")

    monkeypatch.setattr("batchscope.sweep.train_run", no_training)
    monkeypatch.setattr("batchscope.studies.keskar.epsilon_sharpness", no_training)
    rp.build_report("keskar", opts, tmp_path / "s.db", out, log=lambda s: None)
    _, again = _claims(out)
    assert {k: v["verdict"]["verdict"] for k, v in again.items()} == {k: v["verdict"]["verdict"] for k, v in claims.items()}


def test_too_few_seeds_is_inconclusive_never_holds(tmp_path, tiny_keskar):
    rp.reproduce("keskar", Options(scale="quick", seeds=2), tmp_path / "s.db", tmp_path / "r", log=lambda s: None)
    _, claims = _claims(tmp_path / "r")
    assert all(c["verdict"]["verdict"] != "holds" for c in claims.values())


def test_hoffer_ladder_and_diffusion_claims(tmp_path, tiny_hoffer):
    rp.reproduce("hoffer", Options(scale="quick", seeds=3), tmp_path / "s.db", tmp_path / "r", log=lambda s: None)
    _, claims = _claims(tmp_path / "r")
    assert {"ladder_LB", "ladder_LR", "ladder_GBN", "ladder_RA", "gap_closed", "log_diffusion"} <= set(claims)
    assert claims["gap_closed"]["verdict"]["test"].lower().startswith(("tost", "equivalence", "two one-sided"))


def test_unknown_study_and_bad_data_are_clear_errors(tmp_path):
    from batchscope.errors import BatchscopeError

    with pytest.raises(BatchscopeError, match="unknown study 'nope'"):
        rp.get_study("nope")
    with pytest.raises(BatchscopeError, match="--data"):
        Keskar().sweeps(Options(scale="paper", data=["imagenet"]))


@pytest.fixture
def tiny_breakeven(monkeypatch):
    from batchscope.studies.breakeven import Breakeven

    monkeypatch.setattr(
        Breakeven,
        "config",
        lambda self, opts: dict(
            data=TINY_DATA,
            models={"plain": {"name": "mlp", "width": 0.05, "depth": 2}, "bn": {"name": "mlp", "width": 0.05, "depth": 2, "norm": "batch"}},
            lrs=[0.05, 0.5], batch=20, lr_for_batches=0.05, batches=[10, 20], bn_lr_factor=1.0, epochs=2, points=5,
            subset=60, measure_batch=20, k=3, separation_margin=0.4,
        ),
    )


def test_breakeven_probes_reach_the_store_and_claims(tmp_path, tiny_breakeven):
    from batchscope.store import Store

    rp.reproduce("breakeven", Options(scale="quick", seeds=3), tmp_path / "s.db", tmp_path / "r", log=lambda s: None)
    _, claims = _claims(tmp_path / "r")
    assert {"plain_lower_hessian_lambda_1", "plain_conditioning", "plain_breakeven_reached", "bn_lower_K_lambda_1"} <= set(claims)
    with Store(tmp_path / "s.db") as st:
        run = st.runs()[0]
        m = st.metrics(run.run_id)
        assert len(m["hessian_lambda_1"]) >= 5 and len(m["K_condition_k"]) >= 5
