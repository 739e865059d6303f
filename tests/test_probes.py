"""Probes along a trajectory: schedules, stored values, warm starts, cost, user loops, validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchscope.curvature.hessian import hessian_eigenvalues
from batchscope.errors import SpecError
from batchscope.factories import dataset_for, model_for
from batchscope.probes import Probe, TrajectoryProbes, available_probes, probe_metrics, probes_for
from batchscope.spec import ProbeSpec, RunSpec
from batchscope.store import Store
from batchscope.train import train_run

TINY = {
    "data": {"name": "gaussian_mixture", "n_train": 256, "n_test": 128, "options": {"dim": 8, "num_classes": 4}},
    "model": {"name": "mlp", "width": 0.05, "depth": 2},
    "optim": {"lr": 0.01, "momentum": 0.9},
    "train": {"batch_size": 32, "epochs": 3},  # 24 steps, epochs end at 8, 16, 24
    "log": {"log_points": 5},
}
# double_backward: no timing of both HVP methods at every point, so a faster test
HESSIAN = {"instrument": "hessian_top", "schedule": "every", "every": 6, "subset": 96,
           "options": {"hvp_method": "double_backward"}}
COLD = {**HESSIAN, "options": {**HESSIAN["options"], "warm_start": False, "label": "cold"}}


def spec_with(*probes: dict) -> RunSpec:
    return RunSpec.model_validate({**TINY, "probes": list(probes)})


_RUNS: dict[str, tuple] = {}


def run(kind: str, tmp_path_factory) -> tuple:
    """(spec, result, probes, store) of the tiny run: 'plain', or 'probed' with warm and cold hessian_top probes."""
    if kind not in _RUNS:
        spec = spec_with(*({"plain": [], "probed": [HESSIAN, COLD]}[kind]))
        store = Store(tmp_path_factory.mktemp(kind) / "runs.db")
        store.add_run(spec.run_id(), spec.model_dump(mode="json"))
        cbs = probes_for(spec)
        _RUNS[kind] = (spec, train_run(spec, store, callbacks=cbs), cbs, store)
    return _RUNS[kind]


def subset_batches(spec: RunSpec, n: int = 96, b: int = 32) -> list:
    ds = dataset_for(spec, torch.device("cpu"))
    return list(zip(ds.x_train[:n].split(b), ds.y_train[:n].split(b)))


def test_schedules_give_the_right_steps():
    log = Probe(ProbeSpec(instrument="grad_norm", schedule="log", points=5))
    assert log.steps(100, [50, 100]) == {0, 1, 3, 10, 32, 100}
    every = Probe(ProbeSpec(instrument="grad_norm", schedule="every", every=7))
    assert every.steps(20, [10, 20]) == {0, 7, 14}
    epoch = Probe(ProbeSpec(instrument="grad_norm", schedule="epoch"))
    assert epoch.steps(24, [8, 16, 24]) == {0, 8, 16, 24}


def test_hessian_probe_stores_values_of_a_direct_call_at_its_steps(tmp_path_factory):
    spec, result, (warm, cold), store = run("probed", tmp_path_factory)
    stored = store.metrics(spec.run_id())
    assert [s for s, _ in stored["hessian_lambda_1"]] == [0, 6, 12, 18, 24]
    # the same weights and subset, measured directly (cold start): same top eigenvalue
    ds = dataset_for(spec, torch.device("cpu"))
    model = model_for(spec, ds, torch.device("cpu"))
    for step, tag in ((0, "init"), (24, "final")):
        model.load_state_dict(store.load_checkpoint(spec.run_id(), tag)["model"])
        direct = hessian_eigenvalues(model, F.cross_entropy, subset_batches(spec), hvp_method="double_backward")
        assert dict(stored["hessian_lambda_1"])[step] == pytest.approx(direct.eigenvalues[0], rel=1e-4)
    # cost is reported apart: per point, per probe, and as the run's probe time
    assert warm.matvecs == sum(v for _, v in stored["hessian_matvecs"]) and warm.measurements == 5
    per_point = sum(v for _, v in stored["probe_seconds_hessian_top"])
    assert warm.seconds == pytest.approx(per_point) and 0 < warm.seconds + cold.seconds <= result.final["probe_seconds"]


def test_warm_start_spends_fewer_products_for_the_same_values(tmp_path_factory):
    spec, _, (warm, cold), store = run("probed", tmp_path_factory)
    m = store.metrics(spec.run_id())
    assert m["hessian_matvecs"][0] == m["hessian_matvecs_cold"][0]  # the first point has nothing to start from
    assert warm.matvecs < cold.matvecs
    for (s, a), (t, b) in zip(m["hessian_lambda_1"], m["hessian_lambda_1_cold"], strict=True):
        assert s == t and a == pytest.approx(b, rel=1e-4)


def test_probes_do_not_change_training(tmp_path_factory):
    _, plain, _, _ = run("plain", tmp_path_factory)
    _, probed, _, _ = run("probed", tmp_path_factory)
    loss = {s: m["train_loss"] for s, _, m in plain.metrics}
    common = [(s, m["train_loss"]) for s, _, m in probed.metrics if s in loss]
    assert len(common) == len(loss) and all(loss[s] == v for s, v in common)
    assert plain.final["train_loss"] == probed.final["train_loss"]


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))


def test_user_loop_records_to_store_and_memory_and_keeps_the_model(tmp_path):
    torch.manual_seed(1)
    x, y = torch.randn(100, 8), torch.randint(0, 4, (100,))
    model = _bn_model()
    probes = ["hessian_top", "grad_norm", {"instrument": "hessian_trace", "options": {"samples": 9}},
              {"instrument": "gradient_covariance", "options": {"k": 3}}, "noise_scale", "sharpness"]
    store = Store(tmp_path / "s.db")
    rec = TrajectoryProbes(probes, schedule=2, subset=64, batch_size=32, store=store, run_id="my-run")
    mem = TrajectoryProbes(["hessian_top"], schedule="log", points=3, total_steps=2, subset=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        # the recorder must leave weights, buffers, flags, .grad and the caller's random stream as they were
        state = {k: v.clone() for k, v in model.state_dict().items()}
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        rng = torch.get_rng_state()
        got = rec.step(step, model, F.cross_entropy, (x, y))
        mem.step(step, model, F.cross_entropy, (x, y))
        assert model.training and torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        if step % 2:
            assert got == {}
        else:
            assert set(got) == {n for p in rec.probes for n in p.metric_names}
            assert all(math.isfinite(v) for v in got.values())
            if step == 2:  # grad_norm is |grad f| on the first 64 examples, dropout off, running statistics
                model.eval()
                g = torch.autograd.grad(F.cross_entropy(model(x[:64]), y[:64]), list(model.parameters()))
                model.train()
                assert got["grad_norm"] == pytest.approx(float(torch.cat([t.flatten() for t in g]).norm()), rel=1e-5)
        opt.zero_grad()
        F.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step()
    stored = store.metrics("my-run")
    assert [s for s, _ in stored["hessian_lambda_1"]] == [0, 2]
    assert stored["B_simple"] == rec.series("B_simple") and store.get_run("my-run").spec["kind"] == "trajectory_probes"
    assert [s for s, _ in mem.series("hessian_lambda_1")] == [0, 1, 2] and mem.store is None


def test_bn_mode_train_and_eval_measure_different_things():
    torch.manual_seed(2)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DB = {"hvp_method": "double_backward"}
    lam = {mode: Probe(ProbeSpec(instrument="hessian_top", bn_mode=mode, batch_size=32, options=DB)).measure(model, x, y)
           for mode in ("eval", "train")}
    assert abs(lam["eval"]["hessian_lambda_1"] / lam["train"]["hessian_lambda_1"] - 1) > 0.01
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no running-stat update


def test_bad_probes_are_one_line_spec_errors():
    assert {"hessian_top", "hessian_trace", "gradient_covariance", "noise_scale", "sharpness", "grad_norm"} <= set(
        available_probes()
    )
    assert probe_metrics("hessian_top", {"k": 2}) == [
        "hessian_lambda_1", "hessian_lambda_2", "hessian_matvecs", "hessian_converged", "probe_seconds_hessian_top"
    ]
    cases = [
        ({"instrument": "hessian"}, "available: grad_norm"),
        ({"instrument": "hessian_top", "options": {"kk": 2}}, "accepted options: label, k"),
        ({"instrument": "sharpness", "options": {"eps": -1}}, "options.eps"),
        ({"instrument": "grad_norm", "schedule": "every"}, "needs every"),
        ({"instrument": "gradient_covariance", "subset": 5}, "exceeds subset"),
    ]
    for probe, words in cases:
        with pytest.raises(SpecError, match=r"^probes\[0\] .*" + words) as err:
            probes_for(spec_with(probe))
        assert "\n" not in str(err.value)
    with pytest.raises(SpecError, match="set options.label"):
        probes_for(spec_with(HESSIAN, {**HESSIAN, "bn_mode": "train"}))
    labelled = probes_for(spec_with(HESSIAN, {**HESSIAN, "bn_mode": "train", "options": {"label": "bntrain"}}))
    assert "hessian_lambda_1_bntrain" in labelled[1].metric_names
    unplanned = TrajectoryProbes(["grad_norm"], schedule="log")  # a Trainer's callback plans it when training starts
    with pytest.raises(SpecError, match="needs total_steps"):
        unplanned.step(0, nn.Linear(2, 2), F.cross_entropy, (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(SpecError, match="needs steps_per_epoch"):
        TrajectoryProbes(["grad_norm"], schedule="epoch").due(0)


class _Counted(torch.utils.data.Dataset):
    """A map-style data set that counts the examples read from it."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def test_user_loop_takes_a_dataloader_and_reads_only_a_fixed_subset_of_it():
    torch.manual_seed(3)
    data = _Counted(torch.randn(10_000, 8), torch.randint(0, 4, (10_000,)))
    loader = torch.utils.data.DataLoader(data, batch_size=25, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    probes = TrajectoryProbes(["grad_norm", {"instrument": "hessian_top", "options": {"hvp_method": "double_backward"}}],
                              schedule=1, subset=60)
    rng = torch.get_rng_state()
    first = probes.step(0, model, F.cross_entropy, loader)
    assert torch.equal(torch.get_rng_state(), rng)  # the shuffle drew from a fork: the caller's stream is untouched
    assert data.reads == 75  # three batches of 25 hold the 60 examples: the rest of the loader is never read
    x, y = probes.subset(loader)
    assert x.shape == (60, 8) and probes.probes[0].batch_size == 25  # measured in the loader's batches
    again = probes.step(1, model, F.cross_entropy, loader)
    assert data.reads == 75 and again["grad_norm"] == first["grad_norm"]  # the same examples, though it shuffles
    # the values are those of the instruments called directly on those examples, in batches of 25
    batches = list(zip(x.split(25), y.split(25)))
    top = hessian_eigenvalues(model, F.cross_entropy, batches, k=1, hvp_method="double_backward")
    assert again["hessian_lambda_1"] == pytest.approx(float(top.eigenvalues[0]), rel=1e-4)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert again["grad_norm"] == pytest.approx(float(torch.cat([t.flatten() for t in g]).norm()), rel=1e-5)
    with pytest.raises(TypeError, match="batch 0 is a dict"):
        TrajectoryProbes(["grad_norm"], schedule=1).step(0, model, F.cross_entropy, [{"x": x}])
