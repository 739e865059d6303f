"""Data-parallel runs (gloo, 2 processes on CPU): equal to the single-process run, rank 0 alone writes to the
store, a dead or hung process stops the run quickly with one line, and the run resumes where it stopped."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from batchscope.cli import app
from batchscope.errors import BatchscopeError
from batchscope.spec import load_spec
from batchscope.store import Store
from batchscope.train import train_run
from batchscope.train.distributed import check_run
from helpers import cli

SPEC = """
name = "ddp"
[data]
name = "gaussian_mixture"
n_train = {n_train}
n_test = 128
options = {{dim = 8, num_classes = 4}}
[model]
name = "mlp"
width = 0.05
depth = 2
norm = "{norm}"
ghost_size = {ghost}
[optim]
lr = 0.1
momentum = 0.9
[train]
batch_size = 32
epochs = {epochs}
[log]
log_points = 5
resume_every_s = 0
"""

# Runs the CLI as torchrun would start it, recording every store call that writes (or opens a store).
SPY = """
import os, sys
from batchscope import store
for name in ("__init__", "add_run", "claim", "release", "finish", "reset", "log_metrics_many",
             "truncate_metrics", "save_checkpoint", "delete_checkpoint"):
    def spy(self, *a, _orig=getattr(store.Store, name), _name=name, **k):
        with open(os.environ["WRITES_LOG"], "a") as f:
            f.write(os.environ["RANK"] + " " + _name + "\\n")
        return _orig(self, *a, **k)
    setattr(store.Store, name, spy)
from batchscope.cli import main
sys.argv = ["batchscope", *sys.argv[1:]]
main()
"""


def write_spec(tmp_path, *, norm="ghost", ghost=8, epochs=3, n_train=256) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(SPEC.format(norm=norm, ghost=ghost, epochs=epochs, n_train=n_train))
    return p


def env(tmp_path: Path) -> dict:
    # One thread per process: two processes share the two cores. TMPDIR: the launcher's process logs.
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}


def assert_matches_single_process(spec_path: Path, store_path: Path) -> None:
    """Every stored metric equals the single-process run's at every step, within float tolerance."""
    spec = load_spec(spec_path).base()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: two threads on two busy cores only spin
    try:
        single = {(s, k): v for s, _, m in train_run(spec).metrics for k, v in m.items()}
    finally:
        torch.set_num_threads(threads)
    with Store(store_path) as st:
        stored = st.metrics(spec.run_id())
    got = {(s, k): v for k, series in stored.items() for s, v in series}
    assert got.keys() == single.keys()
    for key, v in single.items():
        assert got[key] == pytest.approx(v, rel=1e-4, abs=1e-5), key
    steps = [s for s, _ in stored["train_loss"]]
    assert steps == sorted(set(steps)), "a step was stored twice"


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker with this rank (Linux /proc)."""
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def start_and_wait_for_resume_checkpoint(tmp_path, spec, timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchscope.cli", "train", str(spec), "--store", "s.db", "--nproc", "2",
         "--dist-timeout", str(timeout)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path),
    )
    deadline = time.monotonic() + 180
    while not list((tmp_path / "s_artifacts").glob("*/resume.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_ghost_run_equals_single_process_run_and_only_rank_zero_writes(tmp_path):
    # 250 examples: the last batch of each epoch (26 = 8 + 8 | 8 + 2) splits at ghost-batch boundaries, unevenly.
    spec = write_spec(tmp_path, n_train=250)
    (tmp_path / "spy.py").write_text(SPY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "writes.log"
    workers = [
        subprocess.Popen(
            [sys.executable, "spy.py", "train", str(spec), "--store", "s.db"], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**env(tmp_path), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "WRITES_LOG": str(log)},
        )
        for r in range(2)
    ]
    results = [w.communicate(timeout=180) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], results
    assert ": done" in results[0][0] and results[1][0] == ""
    writers = {line.split()[0] for line in log.read_text().splitlines()}
    assert writers == {"0"}, "a process other than rank 0 opened or wrote the store"
    assert_matches_single_process(spec, tmp_path / "s.db")
    run_id = load_spec(spec).base().run_id()
    with Store(tmp_path / "s.db") as st:
        rec = st.get_run(run_id)
        assert rec.status == "done"
        assert (rec.provenance["nproc"], rec.provenance["norm_statistics"]) == (2, "ghost batches of 8")
        assert {t for t, _ in st.checkpoints(run_id)} == {"init", "resume", "final"}


def test_global_batch_norm_with_uneven_slices_equals_single_process_run(tmp_path):
    # 249 examples: the last batch of each epoch (25) splits 13 + 12, so the shares are weighted.
    spec = write_spec(tmp_path, norm="batch", n_train=249)
    r = cli("train", str(spec), "--store", "s.db", "--nproc", "2", cwd=tmp_path, check=False, env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": done" in r.stdout and "test_acc=" in r.stdout
    assert_matches_single_process(spec, tmp_path / "s.db")
    with Store(tmp_path / "s.db") as st:
        prov = st.get_run(load_spec(spec).base().run_id()).provenance
    assert (prov["nproc"], prov["dist_backend"], prov["norm_statistics"]) == (2, "gloo", "global batch")


def test_killed_rank_stops_the_run_at_once_and_it_resumes(tmp_path):
    spec = write_spec(tmp_path, epochs=20)
    proc = start_and_wait_for_resume_checkpoint(tmp_path, spec, timeout=60)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    t = time.monotonic()
    _, err = proc.communicate(timeout=60)
    # gloo sees the closed connection: no need to wait for the 60 s timeout
    assert time.monotonic() - t < 30 and proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "rank 1 died (SIGKILL)" in lines[0] and "stopped at step" in lines[0] and "resume from step" in lines[0]
    r = cli("train", str(spec), "--store", "s.db", "--nproc", "2", cwd=tmp_path, check=False, env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0 and ": done" in r.stdout, r.stdout + r.stderr
    assert_matches_single_process(spec, tmp_path / "s.db")
    with Store(tmp_path / "s.db") as st:
        rec = st.get_run(load_spec(spec).base().run_id())
    assert rec.attempts == 2 and rec.final["steps"] == 20 * 8


def test_hung_rank_stops_the_run_within_the_timeout(tmp_path):
    spec = write_spec(tmp_path, epochs=40)
    proc = start_and_wait_for_resume_checkpoint(tmp_path, spec, timeout=3)
    pid = rank_pid(proc.pid, 1)
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the timeout can tell
    t = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the launcher has ended it already
    assert time.monotonic() - t < 3 + 20 and proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "did not answer within 3 s" in lines[0] and "resume from step" in lines[0], err
    with Store(tmp_path / "s.db") as st:
        assert st.get_run(load_spec(spec).base().run_id()).status == "failed"


@pytest.mark.parametrize(
    "norm, ghost, n_train, fragment",
    [
        ("ghost", 32, 256, "a batch of 32 examples holds 1 ghost batch(es) of 32, fewer than the 2 processes"),
        ("ghost", 8, 264, "the last batch of an epoch (8 examples) holds 1 ghost batch(es) of 8, fewer than the 2 "
                          "processes; set train.drop_last = true"),
        ("none", 8, 257, "the last batch of an epoch (1 examples) is smaller than the 2 processes"),
    ],
)
def test_batches_that_cannot_split_are_refused_in_one_line(tmp_path, norm, ghost, n_train, fragment):
    spec = load_spec(write_spec(tmp_path, norm=norm, ghost=ghost, n_train=n_train)).base()
    with pytest.raises(BatchscopeError) as e:
        check_run(spec, 2)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_before_starting_processes(tmp_path):
    spec = write_spec(tmp_path)
    r = CliRunner().invoke(app, ["train", str(spec), "--store", str(tmp_path / "s.db"), "--nproc", "5"])
    assert isinstance(r.exception, BatchscopeError) and "--nproc 5" in str(r.exception)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.slow
def test_torchrun_runs_the_same_run(tmp_path):
    spec = write_spec(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "batchscope.cli", "train", str(spec), "--store", "s.db"],
        cwd=tmp_path, capture_output=True, text=True, env=env(tmp_path),
    )
    assert r.returncode == 0 and ": done" in r.stdout, r.stdout + r.stderr
    assert_matches_single_process(spec, tmp_path / "s.db")



@pytest.mark.slow
@pytest.mark.parametrize(
    "over",
    [
        # SAM's second pass and clipping use the global gradient; ghost statistics as before
        {"optim": {"lr": 0.05, "momentum": 0.9, "sam_rho": 0.05, "grad_clip": 1.0}},
        # images: augmented whole then sliced; 2-d batch norm over the global batch
        {"data": {"name": "digits", "n_train": 256, "n_test": 64, "augment": True},
         "model": {"name": "simple_cnn", "width": 0.25, "norm": "batch"}},
    ],
)
def test_more_settings_equal_single_process_run(tmp_path, over):
    body = yaml.safe_load(load_spec(write_spec(tmp_path, epochs=2)).base().model_dump_json())
    body.update(over)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(body))
    r = cli("train", str(spec), "--store", "s.db", "--nproc", "2", cwd=tmp_path, check=False, env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert_matches_single_process(spec, tmp_path / "s.db")
