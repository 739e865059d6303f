"""Kaur et al. 2023 on a tiny configuration: six claims with verdicts from batchscope.stats, the figures,
a report that rebuilds without training or measuring, exclusion of runs that never fit, and the
batch-norm 8-point maximum of lambda_max."""

import copy
import json
import math

import pytest
import torch

import tiny_configs
from batchscope import reproduce as rp
from batchscope.store import Store
from batchscope.studies import STUDIES, Options
from batchscope.studies.kaur import Kaur, one_sgd_step
from tiny_configs import KAUR_DATA as TINY_DATA

CLAIMS = {"lr_batch", "lr_benefit", "scaled", "sam", "dropout", "batch_norm", "gd_vs_sgd", "gd_edge_of_stability"}
FIGURES = {"lambda_vs_acc_lr_batch", "lambda_vs_acc_scaled", "lambda_vs_acc_sam", "lambda_vs_acc_dropout",
           "lambda_vs_acc_bn", "lambda_vs_acc_gd", "lambda_vs_2_over_eta"}
STATS_TESTS = {"paired t-interval", "TOST, paired t-interval", "not all of (negated intersection-union)"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny reproduction shared by the tests below (3 seeds, 11 distinct cells, 33 runs)."""
    tmp = tmp_path_factory.mktemp("kaur")
    with pytest.MonkeyPatch.context() as mp:
        tiny_configs.use(mp, Kaur)
        mp.setenv("BATCHSCOPE_CACHE", str(tmp / "cache"))
        opts = Options(scale="quick", seeds=3)
        rp.reproduce("kaur", opts, tmp / "s.db", tmp / "report", executor="serial", log=lambda s: None)
    doc = json.loads((tmp / "report" / "claims.json").read_text())
    return tmp, opts, doc


@pytest.fixture
def tiny(tiny_kaur):  # conftest.py: Kaur's config is tiny_configs.KAUR
    pass


def _verdicts(doc):
    return {c["id"]: c["verdict"]["verdict"] for c in doc["claims"]}


def test_registered():
    assert STUDIES["kaur"] is Kaur


def test_grids_share_runs_by_spec(tiny):
    """The scaled grid is the diagonal of the lr x batch grid and the p = 0 dropout cell is one of its
    cells: those runs are planned by several sweeps but are one stored spec each."""
    opts = Options(scale="quick", seeds=3)
    planned = [r for _, runs in rp.study_runs(Kaur(), opts) for r in runs]
    distinct = {r.run_id() for r in planned}
    assert len(planned) == 3 * (4 + 2 + 4 + 2 + 4 + 2)
    assert len(distinct) == 3 * (4 + 2 + 1 + 2 + 2)  # lr x batch, SAM rho > 0, dropout p > 0, BN, GD
    assert all(r.optim.name == "sgd" and r.optim.momentum == 0 and r.schedule.name == "constant" for r in planned)
    assert all(r.train.stop.metric == "train_acc" and r.train.stop.threshold == 0.9 for r in planned)
    assert {r.run_id() for r in planned if r.train.full_batch} and all(
        r.train.batch_size == 200 for r in planned if r.train.full_batch)


def test_claims_with_verdicts_from_stats_regime_checks_and_magnitudes(built):
    _, _, doc = built
    claims = {c["id"]: c for c in doc["claims"]}
    assert doc["study"] == "kaur" and set(claims) == CLAIMS
    assert [cid for cid, c in claims.items() if c["own"]] == ["gd_edge_of_stability"]
    for c in claims.values():
        v = c["verdict"]
        assert v["verdict"] in ("holds", "fails", "inconclusive", "untested") and v["rule"]
        assert v["test"] == "all of (intersection-union)"
        parts = v["details"]["parts"]
        assert parts and all(p["test"] in STATS_TESTS and p["rule"] for p in parts.values())
        assert c["regime"] and c["magnitude"]
    # "vanishes" and "without changing" are equivalence tests with the stated margin
    for cid, k in (("scaled", "acc_unchanged_B100_vs_B25"), ("sam", "benefit_vanishes_rho0.05_B100")):
        part = claims[cid]["verdict"]["details"]["parts"][k]
        assert part["test"].startswith("TOST") and part["details"]["margin"] == 0.05
    # "at every batch size": one part per batch size, each with the minimal ratio stated in advance
    parts = claims["lr_batch"]["verdict"]["details"]["parts"]
    assert set(parts) == {"lambda_lower_B25", "lambda_lower_B100"}
    assert all(p["details"]["min_effect"] == pytest.approx(math.log(1.25)) for p in parts.values())
    # the unfittable GD learning rate is excluded and counted with its reason; GD's claims are then untested
    gd = claims["gd_vs_sgd"]["verdict"]
    assert gd["details"]["excluded_reasons"] == {"missed the fitting criterion": 3} and gd["n_excluded"] == 3
    assert gd["verdict"] == "untested" and claims["gd_edge_of_stability"]["verdict"]["verdict"] == "untested"
    fit_gd = {r["id"]: r for r in doc["regime"]}["fit_gd"]
    assert not fit_gd["passed"] and fit_gd["measured"]["fitted"] == 3 and fit_gd["measured"]["runs"] == 6


def test_figures(built):
    tmp, _, _ = built
    assert {p.stem for p in (tmp / "report" / "figures").glob("*.png")} == FIGURES
    assert "data:image/png;base64," in (tmp / "report" / "index.html").read_text()


def test_lambda_cached_interp_max_and_unfitted_runs_not_measured(built):
    tmp, opts, _ = built
    c = tiny_configs.KAUR
    with Store(tmp / "s.db") as store:
        recs = {r.run_id: r for r in store.runs()}
        interp_runs = 0
        for rec in recs.values():
            spec = rec.spec
            m = store.metrics(rec.run_id, ["lambda_max", "lambda_max_interp"])
            fitted = rec.status == "done" and rec.final.get("train_acc", 0) >= c.fit_acc
            if not fitted:
                assert not m.get("lambda_max")  # never measured
                continue
            assert len(m["lambda_max"]) == 1 and m["lambda_max"][0][1] > 0
            bn_small_lr = spec["model"]["norm"] == "batch" and spec["optim"]["lr"] <= c.interp_lr_max
            if bn_small_lr:
                interp_runs += 1
                assert m["lambda_max_interp"][0][1] >= m["lambda_max"][0][1]
            else:
                assert not m.get("lambda_max_interp")
        assert interp_runs >= 2
        assert sum(1 for r in recs.values() if r.spec["optim"]["lr"] == 0.0005 and r.status == "done"
                   and r.final["train_acc"] < c.fit_acc) == 3


def test_report_rebuilds_without_training_or_measuring(built, monkeypatch):
    tmp, opts, doc = built

    def forbidden(*a, **k):
        raise AssertionError("rebuilding the report must not train or measure")

    tiny_configs.use(monkeypatch, Kaur)
    monkeypatch.setattr("batchscope.runs.train_run", forbidden)
    monkeypatch.setattr("batchscope.studies.kaur.hessian_eigenvalues", forbidden)
    out = tmp / "rebuilt"
    rp.build_report("kaur", opts, tmp / "s.db", out, log=lambda s: None)
    again = json.loads((out / "claims.json").read_text())
    assert _verdicts(again) == _verdicts(doc)
    assert {p.stem for p in (out / "figures").glob("*.png")} == FIGURES


def test_one_sgd_step_leaves_the_model_and_moves_along_the_gradient():
    from batchscope.factories import dataset_for, model_for
    from batchscope.spec import validate_run

    spec = validate_run({"data": TINY_DATA, "model": {"name": "mlp", "width": 0.1, "depth": 2, "norm": "batch"},
                         "optim": {"lr": 0.1}, "train": {"batch_size": 25, "device": "cpu"}})
    ds = dataset_for(spec, torch.device("cpu"))
    model = model_for(spec, ds, torch.device("cpu"))
    before = copy.deepcopy(model.state_dict())
    stepped = one_sgd_step(model, ds, spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(stepped) == len(params)
    moved = math.sqrt(sum(float((a - p.detach()).pow(2).sum()) for a, p in zip(stepped, params)))
    assert moved > 0
    assert all(torch.equal(a, b) for a, b in zip(stepped, one_sgd_step(model, ds, spec)))  # deterministic


def test_paper_scale_config_has_every_choice_and_checks_data():
    from batchscope.errors import BatchscopeError

    quick = Kaur().config(Options(scale="quick"))
    paper = Kaur().config(Options(scale="paper", data=["cifar10=/nowhere"]))
    assert type(quick) is type(paper)
    assert paper.model["name"] == "vgg11" and paper.data["n_train"] == 1000 and paper.dropout_data is None
    with pytest.raises(BatchscopeError, match="--data"):
        Kaur().config(Options(scale="paper", data=["imagenet"]))
