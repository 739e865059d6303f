"""Li & Li end to end on a tiny configuration: simulations and training runs -> store -> report; the
report rebuilds from the store without simulating or training again."""

import pytest

from batchscope import diffusion as dif
from batchscope import reproduce as rp
from batchscope.errors import BatchscopeError
from batchscope.factories import epoch_plan
from batchscope.store import Store
from batchscope.studies import STUDIES, Options
from batchscope.studies.lili import LiLi, raised_updates
from helpers import read_claims

CLAIMS = {"minimum_exponential", "saddle_linear", "minimum_vs_saddle", "batch_sharp", "sharp_vs_flat", "batch_saddle",
          "weak_approximation", "raise_settles", "raise_generalizes", "raise_beats_large"}
@pytest.fixture
def tiny(tiny_lili):
    pass


def test_lili_reproduce_then_rebuild_without_simulating_or_training(tmp_path, tiny, monkeypatch):
    assert STUDIES["lili"] is LiLi
    real, calls = dif.simulate, []
    monkeypatch.setattr(dif, "simulate", lambda settings, chunk=256: calls.append(list(settings)) or real(settings, chunk))
    real_sde, sde_calls = dif.simulate_sde, []
    monkeypatch.setattr(dif, "simulate_sde", lambda settings, substeps=10, chunk=32: sde_calls.append(list(settings))
                        or real_sde(settings, substeps, chunk))
    opts = Options(scale="quick", seeds=3)
    out, db = tmp_path / "report", tmp_path / "s.db"
    index = rp.reproduce("lili", opts, db, out, executor="serial", log=lambda s: None)
    assert index.exists() and "data:image/png;base64," in index.read_text()
    assert len(calls) == 1  # every missing setting in one vectorized call
    assert len(sde_calls) == 1 and len(sde_calls[0]) == 2 * 3  # the SDE of E's two settings, one group per seed
    doc, claims = read_claims(out)
    assert doc["study"] == "lili" and set(claims) == CLAIMS
    for c in claims.values():
        v = c["verdict"]
        assert v["verdict"] in ("holds", "fails", "inconclusive", "untested") and v["rule"] and v["test"]
        # one value per seed (a group of trajectories, or a training run); E compares the trajectories themselves
        assert v["n"] == (3 * 48 if c["id"] == "weak_approximation" else 3)
        assert c["regime"] and c["magnitude"] and not c["own"]
    assert claims["saddle_linear"]["verdict"]["test"].startswith("TOST")
    assert claims["batch_sharp"]["verdict"]["test"].startswith("TOST")
    assert claims["minimum_exponential"]["verdict"]["test"].startswith("all of")
    # the simulator reproduces its physics even this small: these verdicts are not left to chance
    for cid in ("batch_sharp", "sharp_vs_flat", "minimum_vs_saddle"):
        assert claims[cid]["verdict"]["verdict"] == "holds", cid
    m = claims["minimum_exponential"]["measured"]
    assert m["sde_slope_2dVm_over_sigma2"] == pytest.approx(0.32)
    assert 0.7 < m["ratio_slope_over_sde"]["mean"] < 1.3
    assert {r["id"] for r in doc["regime"]} >= {"minimum_escaped", "minimum_diffusion", "minimum_grid_resolves_exponential",
                                                "small_batch_noise_limited", "large_arm_equal_updates", "large_arm_fits",
                                                "weak_escaped", "weak_diffusion"}
    weak = claims["weak_approximation"]
    assert weak["verdict"]["test"] == "all of (intersection-union)" and len(weak["magnitude"]) == 4
    assert set(weak["measured"]) == {"saddle", "well"}
    for m in weak["measured"].values():
        assert m["trajectories"] == {"SGD": 3 * 48, "SDE": 3 * 48} and 0 <= m["ks_distance"] <= 1
    for name in ("minimum_escape", "saddle_escape", "escape_vs_batch", "weak_approximation", "batch_raise"):
        assert (out / "figures" / f"{name}.png").exists()

    # simulations are pseudo-runs of the store: one per (setting, seed), every trajectory's escape step
    with Store(db) as st:
        sims = [r for r in st.runs(group="lili") if r.spec.get("kind") == "simulation"]
        assert sims and all(r.status == "done" for r in sims)
        assert len([r for r in sims if r.spec.get("substeps") == 10]) == 2 * 3  # the SDE's groups, stored alike
        assert {r.spec["seed"] for r in sims} == {0, 1, 2}
        steps = st.metrics(sims[0].run_id, ["escape_step"])["escape_step"]
        assert len(steps) == sims[0].spec["n_traj"] == 48
        n_sims = len(sims)

    def no_training(*a, **k):
        raise AssertionError("the report must not train")

    with monkeypatch.context() as mp:
        mp.setattr("batchscope.runs.train_run", no_training)
        rp.build_report("lili", opts, db, out, log=lambda s: None)
    assert len(calls) == 1 and len(sde_calls) == 1  # nothing simulated again
    _, again = read_claims(out)
    assert {k: v["verdict"] for k, v in again.items()} == {k: v["verdict"] for k, v in claims.items()}
    assert {k: v["measured"] for k, v in again.items()} == {k: v["measured"] for k, v in claims.items()}

    # one more seed: only its settings are simulated
    rp.reproduce("lili", Options(scale="quick", seeds=4), db, out, executor="serial", log=lambda s: None)
    assert len(calls) == 2 and {s.seed for s in calls[1]} == {3}
    assert len(sde_calls) == 2 and {s.seed for s in sde_calls[1]} == {3}
    with Store(db) as st:
        assert len([r for r in st.runs(group="lili") if r.spec.get("kind") == "simulation"]) == n_sims * 4 // 3


def test_too_few_seeds_never_holds(tmp_path, tiny):
    rp.reproduce("lili", Options(scale="quick", seeds=2), tmp_path / "s.db", tmp_path / "r", executor="serial",
                 log=lambda s: None)
    _, claims = read_claims(tmp_path / "r")
    assert set(claims) == CLAIMS
    assert all(c["verdict"]["verdict"] in ("inconclusive", "untested") for c in claims.values())


def test_configs_and_sweeps():
    study = LiLi()
    for scale in ("quick", "paper"):
        c = study.config(Options(scale=scale))
        (sweep,) = study.sweeps(Options(scale=scale, seeds=2))
        runs = sweep.expand()
        assert len(runs) == 8
        cond = {r.tags["condition"]: r for r in runs if r.seeds.init == 0}
        t = c.train
        assert cond["small"].train.batch_size == cond["raised"].train.batch_size == t.sb
        assert cond["large"].train.batch_size == t.lb and not cond["large"].train.batch_schedule
        assert cond["raised"].train.batch_schedule == [(t.raise_at, t.lb)]
        assert {cond[k].train.epochs for k in ("small", "raised", "large")} == {t.epochs}
        # the large batch also for the raised run's number of updates (equal updates, not only equal examples)
        n_train = 4000  # MNIST-1D's training split
        plan = lambda r, n=n_train: sum(k for _, k in epoch_plan(r, n))  # noqa: E731
        assert cond["large_updates"].train.epochs is None and cond["large_updates"].train.batch_size == t.lb
        assert plan(cond["large_updates"]) == plan(cond["raised"]) == raised_updates(t, n_train)
    paper = study.config(Options(scale="paper", data=["mnist=/data/mnist"]))
    assert paper.train.data == {"name": "mnist", "path": "/data/mnist"}
    with pytest.raises(BatchscopeError, match="--data"):
        study.config(Options(scale="paper", data=["imagenet"]))
