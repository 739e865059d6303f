"""The Ray executor: the relay and snapshot it rests on (default suite), and sweeps on a real local Ray
cluster started with `ray start` on this machine, with workers and the driver killed mid-run (slow). The tests
that need the ray package (the extra batchscope[ray]) skip without it."""

import contextlib
import functools
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from batchscope.errors import BatchscopeError
from batchscope.executors import RayExecutor, RaySettings, choose_executor
from batchscope.executors.relay import Relay, Snapshot, apply_write, train_relayed
from batchscope.runs import record_result, register
from batchscope.spec import SweepSpec, load_spec
from batchscope.store import Store
from batchscope.sweep import run_sweep
from helpers import SWEEP_SPEC, TINY_F64, alive, cli, tiny_spec, write_user_module

GRID = {"optim.lr": [0.05, 0.1], "train.batch_size": [16, 64]}
tiny = functools.partial(tiny_spec, base=TINY_F64)  # the executors' tiny run, as in test_executors.py
# Looked up, not imported: ray reads its authentication token when it is first imported (see token_auth).
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray: pip install 'batchscope[ray]'")


def sweep_of(epochs: int = 2, **grid) -> SweepSpec:
    return SweepSpec.model_validate({
        **TINY_F64,
        "train": {**TINY_F64["train"], "dtype": "float32", "epochs": epochs},
        "log": {"log_points": 5, "resume_every_s": 0},
        "grid": grid or GRID,
    })  # fmt: skip


def stored(path, run_ids=None) -> dict:
    """Per run: status, final metrics (timing left out) and every metric row."""
    with Store(path) as st:
        ids = run_ids or [r.run_id for r in st.runs()]
        out = {}
        for rid in ids:
            rec = st.get_run(rid)
            final = {k: v for k, v in rec.final.items() if k != "probe_seconds"}
            out[rid] = (rec.status, final, st.metrics(rid))
        return out


def serial_reference(tmp_path, sweep: SweepSpec) -> dict:
    """The same sweep trained serially with one thread, as each Ray worker (1 CPU) trains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Store(tmp_path / "serial.db") as st:
            run_sweep(st, sweep, executor="serial")
    finally:
        torch.set_num_threads(threads)
    return stored(tmp_path / "serial.db")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- without a cluster -------------------------------------------------------------------------------


def test_relayed_training_from_a_snapshot_stores_what_serial_stores(tmp_path):
    """The worker's side of the ray executor, in this process: a resumed run and a warm start read
    what the snapshot carries, and the relayed writes rebuild what the serial path stores."""
    warm = tiny(log__checkpoint_epochs=[1], train__warm_start={"source": {"optim.lr": 0.1}, "epoch": 1}, optim__lr=0.05)
    source = warm.source_spec()
    with Store(tmp_path / "serial.db") as st:
        run_sweep(st, SweepSpec.model_validate(warm.model_dump(mode="json")), executor="serial")
    expected = stored(tmp_path / "serial.db", [source.run_id(), warm.run_id()])

    with Store(tmp_path / "relay.db") as st:
        register(st, [source, warm], None)
        for spec in (source, warm):
            messages = []
            assert st.claim(spec.run_id(), {"executor": "test"})
            train_relayed([spec], [spec.run_id()], Relay(Snapshot.of(st, [spec]), messages.append))
            kinds = [m[0] for m in messages]
            assert kinds[-1] == "result" and "checkpoint" in kinds and "metrics" in kinds
            for m in messages:
                if not apply_write(st, m) and m[0] == "result":
                    record_result(st, m[1], m[2])
    assert stored(tmp_path / "relay.db", [source.run_id(), warm.run_id()]) == expected


def test_snapshot_carries_the_latest_resume_point_and_what_a_warm_start_needs(tmp_path):
    warm = tiny(log__checkpoint_epochs=[1], train__warm_start={"source": {"optim.lr": 0.2}, "epoch": 1})
    source = warm.source_spec()
    with Store(tmp_path / "s.db") as st:
        register(st, [source, warm], None)
        rid, sid = warm.run_id(), source.run_id()
        st.save_checkpoint(rid, "init", {"w": torch.zeros(2)}, 0)
        st.save_checkpoint(rid, "resume_a", {"w": torch.ones(2)}, 5)
        st.save_checkpoint(rid, "resume_b", {"w": torch.full((2,), 2.0)}, 9)
        st.save_checkpoint(sid, "epoch_1", {"w": torch.full((2,), 3.0)}, 8)
        st.save_checkpoint(sid, "final", {"w": torch.full((2,), 4.0)}, 16)
        snap = Snapshot.of(st, [warm])
        assert snap.latest_checkpoint(rid) == st.latest_checkpoint(rid) == ("resume_b", 9)
        assert torch.equal(snap.load_checkpoint(rid, "resume_b")["w"], torch.full((2,), 2.0))
        assert torch.equal(snap.load_checkpoint(rid, "init")["w"], torch.zeros(2))
        assert snap.checkpoints(sid) == st.checkpoints(sid) and snap.get_run(sid).run_id == sid
        assert torch.equal(snap.load_checkpoint(sid, "epoch_1")["w"], torch.full((2,), 3.0))
        with pytest.raises(KeyError, match="'final' was not sent"):
            snap.load_checkpoint(sid, "final")  # only what the run reads travels


def test_choosing_ray_and_its_errors(monkeypatch, tmp_path):
    runs = [tiny(train__device="cuda"), tiny(train__device="cuda", optim__lr=0.2)]
    chosen = choose_executor(runs, None, "ray")  # the driver's own (GPU-less) device does not matter
    assert isinstance(chosen, RayExecutor) and chosen.remote and "2 retries" in chosen.reason
    assert choose_executor(runs, None, None, RaySettings(address="10.0.0.1:6379")).name == "ray"
    with pytest.raises(BatchscopeError, match="only with --executor ray, not processes"):
        choose_executor(runs, None, "processes", RaySettings(retries=3))
    for bad, match in [({"retries": -1}, "--retries -1"), ({"cpus_per_run": 0}, "--cpus-per-run 0"),
                       ({"gpus_per_run": -0.5}, "--gpus-per-run -0.5")]:  # fmt: skip
        with pytest.raises(BatchscopeError, match=match):
            RaySettings(**bad)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with Store(tmp_path / "s.db") as st, pytest.raises(BatchscopeError, match=r"pip install 'batchscope\[ray\]'"):
        run_sweep(st, sweep_of(), executor="ray")


def test_cli_rejects_ray_options_without_ray(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP_SPEC.format(epochs=1))
    r = cli("sweep", str(spec), "--store", "s.db", "--executor", "serial", "--retries", "3",
            cwd=tmp_path, threads=None, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "only with --executor ray" in r.stderr
    assert not (tmp_path / "s.db").exists()


@needs_ray
def test_cli_address_where_no_cluster_answers_fails_at_once(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP_SPEC.format(epochs=1))
    nobody = f"127.0.0.1:{_free_port()}"  # no cluster there: fails at once, before the store is created
    r = cli("sweep", str(spec), "--store", "s.db", "--address", nobody, cwd=tmp_path, threads=None, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"executor ray: nothing answers at {nobody}" in r.stderr
    assert not (tmp_path / "s.db").exists()


# -- on a local Ray cluster --------------------------------------------------------------------------

RAY = str(Path(sys.executable).parent / "ray")
TEST_TOKEN = secrets.token_hex(32)


@contextlib.contextmanager
def token_auth():
    """Token authentication, as the README sets it up, with a token of the tests' own (not ~/.ray's):
    read when ray is imported (and kept by it for the process: one token for every test), and inherited
    by `ray start`, its workers and CLI drivers."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TEST_TOKEN}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster of one node with 2 CPUs (`ray start --head`), this process its driver."""
    with token_auth():
        import ray

        port = _free_port()
        start = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                 "--num-gpus=0", "--include-dashboard=false", "--object-store-memory=200000000",
                 "--disable-usage-stats"]  # fmt: skip
        subprocess.run(start, check=True, capture_output=True, timeout=180)
        address = f"127.0.0.1:{port}"  # the head listens on every interface
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            yield address
        finally:
            ray.shutdown()
            subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def kill_worker(rec) -> int:
    pid = rec.provenance["pid"]
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    return pid


class Killer:
    """Kills (SIGKILL) the Ray worker that trains `run_id`, read from the run's stored provenance: once,
    after its first attempt has stored a resume checkpoint; or, with `every_attempt`, each attempt.
    `kill(record)` does the killing and returns what it killed (default: the worker process)."""

    def __init__(self, path, run_id: str, every_attempt: bool = False, kill=kill_worker) -> None:
        self.path, self.run_id, self.every, self.kill = path, run_id, every_attempt, kill
        self.killed: list[tuple[int, object]] = []  # (attempt, what was killed)
        self.at: list[float] = []  # when
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "Killer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        with Store(self.path) as st:
            while not self.stop.is_set() and (self.every or not self.killed):
                time.sleep(0.05)
                rec = st.get_run(self.run_id) if st.path.exists() else None
                attempt = rec.provenance.get("ray_attempts") if rec is not None else None
                if rec is None or rec.status != "running" or attempt is None or attempt <= len(self.killed):
                    continue
                if not self.every and st.latest_checkpoint(self.run_id) is None:
                    continue  # mid-run: after a resume checkpoint, so the retry has one to resume from
                self.at.append(time.time())
                self.killed.append((attempt, self.kill(rec)))


def sweep_with_a_killer(st: Store, address: str, retries: int = 2, **killer):
    """A 4-run sweep (40 epochs each) on the cluster at `address`, registered in `st`, while a Killer (with
    `killer` as its options) watches its first run: batch 16, the longest, 40 resume checkpoints.
    Returns (the sweep, that run's id, the sweep's summary, the killer)."""
    sweep = sweep_of(epochs=40)
    runs = sweep.expand()
    target = runs[0].run_id()
    register(st, runs, sweep.name)
    with Killer(st.path, target, **killer) as k:
        summary = run_sweep(st, sweep, executor=RayExecutor(RaySettings(address=address, retries=retries)))
    return sweep, target, summary, k


@pytest.mark.slow
@needs_ray
def test_a_killed_worker_is_retried_from_its_checkpoint_and_stored_once(cluster, tmp_path):
    path = tmp_path / "ray.db"
    with Store(path) as st:
        sweep, target, summary, killer = sweep_with_a_killer(st, cluster, retries=2)
        assert [a for a, _ in killer.killed] == [1], "the worker was not killed mid-run"
        assert sorted(summary.trained) == sorted(r.run_id() for r in sweep.expand()) and not summary.failed
        rec = st.get_run(target)
        assert rec.provenance["ray_attempts"] == 2 and rec.provenance["pid"] != killer.killed[0][1]
        assert rec.attempts == 1  # one claim: the retry is the driver's, not a new sweep's
        # resumed, not restarted: a fresh start would have saved its initial weights again
        assert (st.artifacts / target / "init.pt").stat().st_mtime < killer.at[0]
        assert {r.provenance["executor"] for r in st.runs()} == {"ray"}
    # exactly once, and the resumed run is the run: every stored row equals the serial reference
    assert stored(path) == serial_reference(tmp_path, sweep)


@pytest.mark.slow
@needs_ray
def test_a_run_whose_worker_dies_every_time_is_stored_as_failed(cluster, tmp_path):
    with Store(tmp_path / "ray.db") as st:
        _, target, summary, killer = sweep_with_a_killer(st, cluster, retries=1, every_attempt=True)
        assert [a for a, _ in killer.killed] == [1, 2]
        assert summary.failed == [target] and len(summary.trained) == 3
        rec = st.get_run(target)
        assert rec.status == "failed" and rec.error.startswith("Ray worker died on each of 2 attempts: ")
        assert [r.status for r in st.runs() if r.run_id != target] == ["done"] * 3


@pytest.mark.slow
@needs_ray
def test_a_killed_driver_resumes_on_restart_without_retraining_what_is_done(cluster, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP_SPEC.format(epochs=40))
    path = tmp_path / "s.db"
    args = [sys.executable, "-m", "batchscope.cli", "sweep", str(spec), "--store", "s.db", "--address", cluster]
    driver = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done: dict[str, float] = {}
    while time.time() < deadline and driver.poll() is None:  # until a run is done and another mid-run
        time.sleep(0.1)
        if not path.exists():
            continue
        with Store(path) as st:
            recs = st.runs()
            done = {r.run_id: r.finished for r in recs if r.status == "done"}
            if done and any(r.status == "running" and st.latest_checkpoint(r.run_id) for r in recs):
                break
    driver.kill()
    driver.wait()
    with Store(path) as st:  # what was done when it died (a run may have ended since the last look)
        done = {r.run_id: r.finished for r in st.runs() if r.status == "done"}
        workers = [r.provenance["pid"] for r in st.runs() if r.status == "running" and "ray_attempts" in r.provenance]
    assert done and len(done) < 4, "the driver was not killed mid-sweep"
    assert workers and workers[0] != driver.pid
    deadline = time.time() + 60  # Ray ends a dead driver's tasks: no orphan keeps training
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "a dead driver's task outlived it"
    out = cli("sweep", str(spec), "--store", "s.db", "--address", cluster, cwd=tmp_path, threads=None).stdout
    assert out.splitlines()[0].startswith("executor: ray (cluster at ")
    assert f"4 runs: {4 - len(done)} trained, {len(done)} already done" in out
    with Store(path) as st:
        assert all(st.get_run(rid).finished == t for rid, t in done.items())  # not retrained
        assert [r.status for r in st.runs()] == ["done"] * 4
    assert stored(path) == serial_reference(tmp_path, load_spec(spec))


@pytest.mark.slow
@needs_ray
def test_fused_groups_as_ray_tasks_and_a_request_no_node_can_meet(cluster, tmp_path):
    sweep = sweep_of(epochs=2, **{"optim.lr": [0.05, 0.1, 0.2]})
    with Store(tmp_path / "ray.db") as st:
        summary = run_sweep(st, sweep, executor=RayExecutor(RaySettings(address=cluster, fuse=True)))
        assert len(summary.trained) == 3
        assert {r.provenance.get("fused_runs") for r in st.runs()} == {3}
    with Store(tmp_path / "fused.db") as st:
        run_sweep(st, sweep, executor="fused")
    got, want = stored(tmp_path / "ray.db"), stored(tmp_path / "fused.db")
    assert got.keys() == want.keys()
    for rid in got:
        assert got[rid][0] == want[rid][0] == "done"
        for name, rows in want[rid][2].items():
            assert [s for s, _ in got[rid][2][name]] == [s for s, _ in rows]
            assert [v for _, v in got[rid][2][name]] == pytest.approx([v for _, v in rows], rel=1e-5, abs=1e-6)
    with Store(tmp_path / "gpu.db") as st:
        with pytest.raises(BatchscopeError, match="asks for 1 CPU and 1 GPU, but no node of the cluster has that"):
            run_sweep(st, sweep, executor=RayExecutor(RaySettings(address=cluster, gpus_per_run=1)))
        assert {r.status for r in st.runs()} == {"pending"}


@pytest.mark.slow
def test_a_users_factories_travel_to_the_workers(cluster, tmp_path, monkeypatch):
    # the module is on the driver's sys.path only: the cluster's workers, started before it existed, get its files
    # from the executor, or every run fails with "no module named" (as it did with the shipping left out)
    folder = tmp_path / "user"
    folder.mkdir()
    name = write_user_module(folder)
    monkeypatch.syspath_prepend(str(folder))
    sweep = SweepSpec.model_validate({
        "name": "own", "data": {"name": f"{name}:teacher"}, "model": f"{name}:mlp", "loss": f"{name}:mse",
        "train": {"batch_size": 32, "epochs": 2}, "log": {"log_points": 3},
        "grid": {"model.options.hidden": [4, 16]},
    })  # fmt: skip
    with Store(tmp_path / "ray.db") as st:
        summary = run_sweep(st, sweep, executor=RayExecutor(RaySettings(address=cluster)))
        assert len(summary.trained) == 2, [r.error for r in st.runs()]
        assert {r.provenance["executor"] for r in st.runs()} == {"ray"}
        params = {s.model.options["hidden"]: sum(w.numel() for w in st.load_checkpoint(s.run_id(), "final")["model"].values())
                  for s in sweep.expand()}
    assert params == {4: 8 * 4 + 4 + 4 + 1, 16: 8 * 16 + 16 + 16 + 1}
