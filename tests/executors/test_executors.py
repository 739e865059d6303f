"""Executors: fused (vmapped) and process-pool training store what the serial loop stores; the choice of executor."""

import functools
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from batchscope.errors import BatchscopeError
from batchscope.executors import FusedExecutor, ProcessExecutor, SerialExecutor, choose_executor
from batchscope.runs import register
from batchscope.spec import RunSpec, SweepSpec
from batchscope.store import Store
from batchscope.sweep import run_sweep
from batchscope.train import train_run
from batchscope.train.fused import _RunDropout, group_key, train_group
from helpers import SWEEP_SPEC, TINY_F64, alive, cli, tiny_spec

tiny = functools.partial(tiny_spec, base=TINY_F64)  # float64: fused and serial runs agree to 1e-9


def close(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rel * (1 + abs(b))


def assert_same_run(fused, serial, rel=1e-9):
    """Same outcome, same steps and epochs, metrics equal to `rel` (NaN equals NaN)."""
    assert (fused.status, fused.steps, fused.stop_reason, fused.diverged_step) == (
        serial.status, serial.steps, serial.stop_reason, serial.diverged_step
    )
    assert [(s, e) for s, e, _ in fused.metrics] == [(s, e) for s, e, _ in serial.metrics]
    for (step, _, a), (_, _, b) in zip(fused.metrics, serial.metrics):
        assert a.keys() == b.keys()
        for k in a:
            assert close(a[k], b[k], rel), (step, k, a[k], b[k])
    for k in fused.final.keys() - {"probe_seconds"}:  # probe_seconds is a timing
        assert close(fused.final[k], serial.final[k], rel), (k, fused.final[k], serial.final[k])


# -- fused equals serial ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shared",
    [
        {},  # SGD with momentum; one run with SAM, one with weight decay
        {"model__norm": "batch"},
        {"model__norm": "ghost", "model__ghost_size": 8},  # 4 ghost chunks per batch of 32
        {"optim__grad_clip": 0.3},
        {"train__adversarial": {"eps": 0.1, "mix": 0.5}, "model__norm": "batch"},  # FGSM passes, SAM's second too
    ],
    ids=["sgd-sam-wd", "batchnorm", "ghostbn", "clip", "adversarial"],
)
def test_fused_group_equals_serial_runs(shared):
    specs = [
        tiny(optim__lr=0.1, **shared),
        tiny(optim__lr=0.05, optim__sam_rho=0.05, seeds__init=1, seeds__data=1, **shared),
        tiny(optim__lr=0.2, optim__momentum=0.5, optim__weight_decay=1e-3, seeds__init=2, seeds__data=3, **shared),
    ]
    assert len({group_key(s) for s in specs}) == 1
    for fused, spec in zip(train_group(specs), specs):
        assert_same_run(fused, train_run(spec))


def test_fused_adam_with_per_run_hyperparameters_equals_serial():
    specs = [
        tiny(optim__name="adam", optim__momentum=0.0, optim__lr=1e-2),
        tiny(optim__name="adam", optim__momentum=0.0, optim__lr=3e-3, optim__weight_decay=1e-2, seeds__data=1),
        tiny(optim__name="adam", optim__momentum=0.0, optim__lr=1e-2, optim__betas=(0.8, 0.99), seeds__init=4),
    ]
    for fused, spec in zip(train_group(specs), specs):
        assert_same_run(fused, train_run(spec))


@pytest.mark.parametrize(
    "name,shared,runs",
    [
        ("adamw", {}, [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.1), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)]),
        # batch norm: 1-D scales and shifts beside the biases, which LARS leaves out of its trust ratio
        ("lars", {"model__norm": "batch"}, [dict(lr=1.0, trust_coefficient=0.02), dict(lr=0.5, momentum=0.5, weight_decay=1e-3),
                                            dict(lr=1.0, weight_decay=5e-4, trust_coefficient=0.05)]),
        ("lamb", {}, [dict(lr=1e-2), dict(lr=3e-3, weight_decay=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)]),
    ],
)
def test_fused_adamw_lars_lamb_with_per_run_hyperparameters_equal_serial(name, shared, runs):
    specs = [tiny(optim__name=name, seeds__init=i, seeds__data=i % 2, **shared, **{f"optim__{k}": v for k, v in kw.items()})
             for i, kw in enumerate(runs)]  # fmt: skip
    assert len({group_key(s) for s in specs}) == 1
    for fused, spec in zip(train_group(specs), specs):
        serial = train_run(spec)
        assert_same_run(fused, serial)
        assert serial.status == "done" and serial.final["train_loss"] < serial.metrics[0][2]["train_loss"]  # it trained


def test_fused_float32_matches_serial_to_float_tolerance():
    specs = [tiny(train__dtype="float32", optim__lr=lr, seeds__data=s) for lr, s in ((0.1, 0), (0.03, 1))]
    for fused, spec in zip(train_group(specs), specs):
        assert_same_run(fused, train_run(spec), rel=1e-4)


def test_fused_full_batch_batch_schedule_and_augmented_cnn_equal_serial():
    groups = [
        [tiny(train__full_batch=True, train__epochs=3, model__norm="batch", optim__lr=lr) for lr in (0.1, 0.3)],
        [tiny(train__batch_schedule=[(1, 64)], schedule__name="cosine", schedule__warmup_epochs=0.5, optim__lr=lr, seeds__data=d)
         for lr, d in ((0.1, 0), (0.3, 1))],
    ]  # fmt: skip
    img = {"data": {"name": "digits", "n_train": 128, "n_test": 64, "augment": True},
           "model": {"name": "simple_cnn", "width": 0.25, "norm": "batch"},
           "train": {"batch_size": 32, "epochs": 1, "dtype": "float64"}}  # fmt: skip
    groups.append([RunSpec.model_validate({**img, "seeds": {"noise": n, "data": n}}) for n in (0, 1)])  # own crops
    for specs in groups:
        for fused, spec in zip(train_group(specs), specs):
            assert_same_run(fused, train_run(spec))


def test_fused_lstm_on_sequences_equals_serial():
    """The LSTM's step loop vmaps over runs (the fused executor on a GPU) as it does over examples (the probes)."""
    seq = {"data": {"name": "first_marker", "n_train": 128, "n_test": 64,  # accuracies exact in float32 (k / 64)
                    "options": {"markers": 3, "distractors": 3, "length": 6}},
           "model": {"name": "lstm", "width": 0.1}, "train": {"batch_size": 16, "epochs": 2, "dtype": "float64"}}
    specs = [RunSpec.model_validate({**seq, "optim": {"lr": lr}, "seeds": {"init": i, "data": i}})
             for lr, i in ((0.1, 0), (0.5, 1))]
    assert len({group_key(s) for s in specs}) == 1
    for fused, spec in zip(train_group(specs), specs):
        assert_same_run(fused, train_run(spec))


def test_stopping_rule_is_per_run_in_a_fused_group():
    stop = {"metric": "train_acc", "threshold": 0.6}
    specs = [tiny(train__epochs=12, train__stop=stop, optim__lr=lr) for lr in (0.003, 0.1, 0.3)]
    fused = train_group(specs)
    assert len({r.steps for r in fused}) > 1  # they stopped at different steps
    for f, spec in zip(fused, specs):
        assert_same_run(f, train_run(spec))


def test_diverging_run_is_frozen_and_stored_as_diverged_the_others_as_serial(tmp_path):
    f32 = dict(train__dtype="float32")
    specs = [tiny(**f32), tiny(optim__lr=1e6, optim__momentum=0.0, seeds__data=1, **f32),
             tiny(optim__lr=0.05, seeds__init=2, **f32)]
    stores = {}
    for name, ex in (("fused", FusedExecutor()), ("serial", SerialExecutor())):
        st = stores[name] = Store(tmp_path / f"{name}.db")
        register(st, specs, "g")
        summary = ex.run(st, specs)
        assert summary.diverged == [specs[1].run_id()] and len(summary.trained) == 2
    fused, serial = stores["fused"], stores["serial"]
    for spec in specs:
        a, b = fused.get_run(spec.run_id()), serial.get_run(spec.run_id())
        assert (a.status, a.diverged_step, a.final["steps"], a.final["stop_reason"]) == (
            b.status, b.diverged_step, b.final["steps"], b.final["stop_reason"]
        )
        ma, mb = fused.metrics(spec.run_id()), serial.metrics(spec.run_id())
        assert ma.keys() == mb.keys()
        for name in ma:
            assert [s for s, _ in ma[name]] == [s for s, _ in mb[name]]
            assert all(close(x, y, 1e-4) for (_, x), (_, y) in zip(ma[name], mb[name])), name
        tags = {t for t, _ in fused.checkpoints(spec.run_id())}
        assert tags == {t for t, _ in serial.checkpoints(spec.run_id())}
        assert ("final" in tags) == (a.status == "done")
        init = fused.load_checkpoint(spec.run_id(), "init")["model"]
        assert all(torch.equal(v, serial.load_checkpoint(spec.run_id(), "init")["model"][k]) for k, v in init.items())
    assert fused.get_run(specs[1].run_id()).provenance["executor"] == "fused"
    for st in stores.values():
        st.close()


def test_fused_executor_skips_done_runs_and_trains_the_rest(tmp_path):
    sweep = SweepSpec.model_validate(
        {**TINY_F64, "grid": {"optim.lr": [0.05, 0.1, 0.2]}, "train": {**TINY_F64["train"], "epochs": 1}}
    )
    runs = sweep.expand()
    with Store(tmp_path / "s.db") as st:
        register(st, runs, "g")
        SerialExecutor().run(st, runs[:1])
        summary = run_sweep(st, sweep, executor="fused")
        assert summary.executor == "fused" and summary.skipped == [runs[0].run_id()] and len(summary.trained) == 2
        assert run_sweep(st, sweep, executor="fused").skipped == [r.run_id() for r in runs]


# -- dropout: per-run masks, statistically like the serial stream ------------------------------------


def test_run_dropout_keeps_each_runs_rate_and_seed():
    d = _RunDropout(0).train()
    d.step = 3
    x = torch.ones(2000, 50, dtype=torch.float64)
    p = torch.tensor([0.0, 0.3, 0.3, 0.6], dtype=torch.float64)
    seed = torch.tensor([0, 0, 1, 0])

    def apply(p, seed, x):
        return torch.func.functional_call(d, {"p": p, "seed": seed}, (x,))

    out = torch.vmap(apply, in_dims=(0, 0, None))(p, seed, x)
    kept = (out != 0).double().mean(dim=(1, 2))
    assert torch.equal(out[0], x)  # rate 0 is the identity, exactly
    assert torch.allclose(kept, 1 - p, atol=0.005)
    assert torch.allclose(out.mean(dim=(1, 2)), torch.ones(4, dtype=torch.float64), atol=0.02)  # inverted scaling
    assert not torch.equal(out[1], out[2])  # seeds give different masks
    assert torch.equal(out[1], torch.vmap(apply, in_dims=(0, 0, None))(p, seed, x)[1])  # and the same ones again


def test_dropout_runs_agree_with_serial_in_distribution():
    seeds = range(6)
    specs = [
        tiny(model__dropout=0.3, model__width=0.2, train__epochs=3, seeds__init=s, seeds__data=s, seeds__noise=s)
        for s in seeds
    ]
    fused = [r.final for r in train_group(specs)]
    serial = [train_run(s).final for s in specs]
    for metric in ("train_loss", "test_acc"):
        a = torch.tensor([f[metric] for f in fused], dtype=torch.float64)
        b = torch.tensor([f[metric] for f in serial], dtype=torch.float64)
        assert not torch.equal(a, b)  # masks differ from the serial stream...
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(float(a.mean() - b.mean())) < 3 * se + 1e-3, (metric, a, b)  # ...not in distribution
    # the same spec gives the same fused run, whatever else is in its group
    again = train_group([specs[2], tiny(model__dropout=0.5, model__width=0.2, train__epochs=3)])[0]
    assert again.final["train_loss"] == fused[2]["train_loss"]


# -- processes ---------------------------------------------------------------------------------------


def _stored(st: Store, run_ids):
    return {rid: (st.get_run(rid).status, st.get_run(rid).final, st.metrics(rid)) for rid in run_ids}


def test_process_executor_stores_what_serial_stores(tmp_path):
    sweep = SweepSpec.model_validate({
        **TINY_F64, "train": {**TINY_F64["train"], "dtype": "float32"},
        "grid": {"optim.lr": [0.05, 0.1], "train.batch_size": [16, 64]},
    })  # fmt: skip
    runs = sweep.expand()
    ids = [r.run_id() for r in runs]
    with Store(tmp_path / "p.db") as st:
        summary = run_sweep(st, sweep, executor=ProcessExecutor(2))
        assert summary.executor == "processes" and sorted(summary.trained) == sorted(ids)
        procs = _stored(st, ids)
        assert st.get_run(ids[0]).provenance["executor"] == "processes"
        assert {t for t, _ in st.checkpoints(ids[0])} == {"init", "final"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker (2 cores / 2 workers): same reduction order
    try:
        with Store(tmp_path / "s.db") as st:
            run_sweep(st, sweep, executor="serial")
            serial = _stored(st, ids)
    finally:
        torch.set_num_threads(threads)
    for rid in ids:
        (s1, f1, m1), (s2, f2, m2) = procs[rid], serial[rid]
        assert s1 == s2 == "done" and m1 == m2
        assert {k: v for k, v in f1.items() if k != "probe_seconds"} == {k: v for k, v in f2.items() if k != "probe_seconds"}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _start_sweep(spec, cwd):
    # SIGINT back to its default in the child: a shell's background job (`cmd &` without job control) passes
    # it on as ignored, Python then never raises KeyboardInterrupt, and Ctrl-C could not be tested (seen here)
    return subprocess.Popen(
        [sys.executable, "-m", "batchscope.cli", "sweep", str(spec), "--store", "s.db", "--executor", "processes"],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _wait_for_checkpoint(folder, after: float) -> None:
    """Until a checkpoint written after `after` is stored: the sweep is mid-run."""
    deadline = time.time() + 180
    while time.time() < deadline:
        if any(p.suffix == ".pt" and p.stat().st_mtime > after for p in folder.rglob("resume*.pt")):
            return
        time.sleep(0.1)


def _statuses(path):
    with Store(path) as st:
        return [r.status for r in st.runs()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_interrupted_and_killed_process_sweeps_complete_on_restart_with_each_run_once(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP_SPEC.format(epochs=30))
    # Ctrl-C: the runs in flight go back to pending, the workers go away
    t = time.time()
    proc = _start_sweep(spec, tmp_path)
    _wait_for_checkpoint(tmp_path / "s_artifacts", t)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    statuses = _statuses(tmp_path / "s.db")
    assert "running" not in statuses and statuses.count("done") < 4
    # kill -9 of the parent, resumed mid-run: its workers follow it, its claims are taken over
    t = time.time()
    proc = _start_sweep(spec, tmp_path)
    _wait_for_checkpoint(tmp_path / "s_artifacts", t)
    workers += _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert workers and not any(alive(w) for w in workers), "workers outlived their parent"
    statuses = _statuses(tmp_path / "s.db")
    assert "running" in statuses and statuses.count("done") < 4
    out = cli("sweep", str(spec), "--store", "s.db", "--executor", "processes", cwd=tmp_path, threads=None).stdout
    assert "executor: processes (asked for" in out
    with Store(tmp_path / "s.db") as st:
        runs = st.runs()
        assert [r.status for r in runs] == ["done"] * 4
        for r in runs:
            steps = [s for s, _ in st.metrics(r.run_id)["train_loss"]]
            assert steps == sorted(set(steps)) and steps[0] == 0
            assert r.final["steps"] == 30 * (512 // r.spec["train"]["batch_size"])


# -- choosing ----------------------------------------------------------------------------------------


def test_choose_executor_fits_device_and_grid(monkeypatch):
    import batchscope.executors as ex

    grid = [tiny(optim__lr=lr) for lr in (0.1, 0.2, 0.3)]
    monkeypatch.setattr(ex, "usable_cores", lambda: 4)
    chosen = choose_executor(grid, "cpu")
    assert chosen.name == "processes" and chosen.workers == 3 and "3 worker processes" in chosen.reason
    assert choose_executor(grid[:1], "cpu").name == "serial"
    assert choose_executor(grid, torch.device("cuda")).name == "fused"
    # runs that share nothing (different batch sizes) gain nothing from fusing
    apart = [tiny(train__batch_size=b) for b in (16, 32)]
    assert choose_executor(apart, "cuda").name == "serial"
    assert choose_executor(grid, "cpu", "fused").name == "fused"
    assert choose_executor(grid, "cuda", "serial").reason == "asked for"
    monkeypatch.setattr(ex, "usable_cores", lambda: 1)
    assert choose_executor(grid, "cpu").name == "serial"
    with pytest.raises(BatchscopeError, match="expected one of serial, fused, processes"):
        choose_executor(grid, "cpu", "threads")


def test_cli_executor_override(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP_SPEC.format(epochs=1).replace('"train.batch_size" = [16, 64]', ""))
    r = cli("sweep", str(spec), "--store", "s.db", "--executor", "fused", cwd=tmp_path, threads=None)
    assert r.stdout.splitlines()[0] == "executor: fused (asked for)" and "2 runs: 2 trained" in r.stdout
    with Store(tmp_path / "s.db") as st:
        assert {x.provenance["executor"] for x in st.runs()} == {"fused"}
    bad = cli("sweep", str(spec), "--store", "s.db", "--executor", "threads", cwd=tmp_path, check=False, threads=None)
    # a choice typer checks: its usage error (exit code 2) names the value and the choices
    assert bad.returncode == 2 and all(w in bad.stderr for w in ("'threads'", "serial", "fused", "processes", "ray"))


def test_reduce_on_plateau_is_per_run_in_a_fused_group_and_equals_serial():
    stop = {"metric": "train_loss", "patience": 2, "min_delta": 0.02, "reduce_lr": 0.3, "reductions": 2}
    specs = [tiny(train__epochs=16, train__stop=stop, optim__lr=lr, log__log_points=9) for lr in (0.01, 0.1, 0.3)]
    fused = train_group(specs)
    assert any("reduction" in r.stop_reason for r in fused)
    for f, spec in zip(fused, specs):
        assert_same_run(f, train_run(spec))
