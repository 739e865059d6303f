"""`batchscope train SPEC`: one run, trained in this process or data-parallel in several (DDP).

- `train_here`: this process's part: the whole run, or one rank of a data-parallel run started by torchrun
  or `launch`. Rank 0 claims the run, trains it with the others and records its outcome; the others train
  alongside and never touch the store. The collectives are `batchscope.train.distributed`.
- `launch`: `--nproc N` on this machine: N processes, as torchrun would start them, each running this
  module (`python -m batchscope.launch`, not the CLI, which sits above it), and one line when one of them
  dies or fails.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from .console import err, final_line, out, progress_bars
from .errors import BatchscopeError
from .factories import check_objective, dataset_for, forget_datasets, model_for
from .runs import Claims, failure_text, register, run_one
from .spec import RunSpec, load_spec
from .store import Store
from .sweep import preflight
from .train.distributed import LAUNCHER_ENV, DistContext, PeerLostError, check_run, join, worker_rank
from .train.loop import Progress
from .train.plain import train_run


def train_here(spec: RunSpec, group: str | None, store_path: Path, nproc: int, timeout_s: float) -> int:
    """This process's part of the run: all of it, or its rank's under torchrun or `launch`. Prints the
    outcome as `batchscope train` does; returns the exit code (a bad spec raises BatchscopeError)."""
    ctx = None if worker_rank() is None else join(spec, nproc, timeout_s)  # checks the spec on its own GPU
    if ctx is None:
        preflight([spec])
    elif ctx.rank > 0:  # only rank 0 touches the store
        problem = follow(spec, ctx)
        if problem:
            err.print(f"error: {problem}", markup=False, highlight=False)
            return 1
        return 0
    with Store(store_path) as st, progress_bars() as prog:
        register(st, [spec], group)
        task = prog.add_task(f"run {spec.run_id()}", total=None)
        update = lambda s, t: prog.update(task, completed=s, total=t)  # noqa: E731
        status = run_one(st, spec, update) if ctx is None else lead(st, spec, update, ctx)
        rec = st.get_run(spec.run_id())
    out.print(f"run {spec.run_id()}: {rec.status if status == 'skipped' else status}  {final_line(rec.final or {})}")
    if rec.status == "failed":
        err.print(f"error: {rec.error.splitlines()[0] if rec.error else 'failed'}")
        return 1
    out.print(f"store: {store_path}")
    return 0


def stop_note(store: Any, run_id: str, step: int | None) -> str:
    """Where an interrupted run stopped and where running it again resumes."""
    ck = store.latest_checkpoint(run_id, prefix="resume")
    at = f" at step {step}" if step is not None else ""
    return f"run {run_id} stopped{at}; run the same command to resume from step {ck[1] if ck else 0}"


def lead(store: Any, spec: RunSpec, progress: Progress | None, ctx: DistContext) -> str:
    """Rank 0: claim the run, train it with the other processes, record its outcome; its status (as run_one)."""
    run_id = spec.run_id()
    at: list[int | None] = [None]

    def track(step: int, total: int) -> None:
        at[0] = step
        if progress is not None:
            progress(step, total)

    def describe(err: Exception) -> str:  # a lost peer: where the run stopped, and where it resumes
        return f"{err}; {stop_note(store, run_id, at[0])}" if isinstance(err, PeerLostError) else failure_text(err)

    claims = Claims(store)
    try:
        if not ctx.from_rank0(lambda: claims.claim(run_id, ctx.provenance(spec))):
            return "skipped"
        with claims.training(describe) as attempt:
            result = train_run(spec, store, run_id, progress=track, dist=ctx)
        return "failed" if attempt.failed else claims.record(run_id, result)
    finally:
        ctx.close()


def follow(spec: RunSpec, ctx: DistContext) -> str | None:
    """A rank above 0: train alongside rank 0 and never touch the store; an error line, or None."""
    try:
        if ctx.from_rank0(None):  # rank 0 claimed the run
            train_run(spec, None, spec.run_id(), dist=ctx)
    except BatchscopeError as err:
        return str(err)
    finally:
        ctx.close()
    return None


def launch(spec_file: Path, spec: RunSpec, store_path: Path, nproc: int, timeout_s: float) -> int:
    """`batchscope train SPEC --nproc N`: the run in N local processes of this module, as torchrun would start
    them; the exit code.

    On a failure, waits for rank 0 to record it (at most the timeout), ends the other processes, and prints
    one line: which rank died or failed, where the run stopped, where running it again resumes."""
    # Checked on CPU: a CUDA context here would sit on GPU 0 beside rank 0 for the whole run.
    cpu = torch.device("cpu")
    ds = dataset_for(spec, cpu)
    check_objective(spec, model_for(spec, ds, cpu), ds)
    check_run(spec, nproc, cpu)
    forget_datasets()  # the workers load their own copies
    timeout = datetime.timedelta(seconds=timeout_s)
    # Port 0: the launcher holds a free port from now on, so no other program can take it before rank 0.
    rendezvous = tdist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False, timeout=timeout)
    logs = Path(tempfile.mkdtemp(prefix="batchscope-ddp-"))
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(rendezvous.port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        LAUNCHER_ENV: "1",
    }
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # do not oversubscribe cores
    cmd = [sys.executable, "-m", "batchscope.launch", str(spec_file), str(store_path), repr(float(timeout_s))]
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            with open(logs / f"rank{rank}.log", "wb") as log:
                stdout = None if rank == 0 else subprocess.DEVNULL  # rank 0 reports the run, as one process would
                rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                procs.append(subprocess.Popen(cmd, env=rank_env, stdout=stdout, stderr=log))
        first = _wait(procs, timeout_s)
    except KeyboardInterrupt:
        for p in procs:  # they got the Ctrl-C too: let rank 0 give the run back
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if first is None:
        sys.stderr.write((logs / "rank0.log").read_text(errors="replace"))  # warnings, if any
        shutil.rmtree(logs, ignore_errors=True)
        return 0
    sys.stderr.write(f"error: {_summary(first, logs, store_path, spec.run_id())}\n")
    return 1


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> tuple[int, int] | None:
    """Wait for the processes; (rank, exit code) of the failure that ended the run, or None if all succeeded."""
    first: tuple[int, int] | None = None
    since = 0.0
    while any(p.poll() is None for p in procs):
        failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
        if first is None and failed:
            # A process killed by a signal is the cause; the others' errors are its consequences.
            first = min(failed, key=lambda f: (f[1] > 0, f[0]))
            since = time.monotonic()
        if first is not None and (procs[0].returncode is not None or time.monotonic() - since > timeout_s + 5):
            return first  # rank 0 has recorded the outcome (or never will); the rest only wait for the dead
        time.sleep(0.05)
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    return first or (min(failed, key=lambda f: (f[1] > 0, f[0])) if failed else None)


def _error_line(path: Path) -> str | None:
    """The last `error: ...` message of a process's stderr (else its last line), without the prefix."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    if not starts:
        return lines[-1] if lines else None
    # The console wraps long messages at its width: the lines after it are the rest of the message.
    return " ".join(lines[starts[-1] :])[len("error: ") :]


def _summary(first: tuple[int, int], logs: Path, store_path: Path, run_id: str) -> str:
    """One line: which rank died or failed, where the run stopped, where running it again resumes."""
    rank, code = first
    if code < 0:
        try:
            who = f"rank {rank} died ({signal.Signals(-code).name})"
        except ValueError:
            who = f"rank {rank} died (signal {-code})"
    else:
        who = (_error_line(logs / f"rank{rank}.log") or f"exited with code {code}").split("; run ")[0]
        who = who if who.startswith("rank ") else f"rank {rank}: {who}"
    step = re.search(r"stopped at step (\d+)", _error_line(logs / "rank0.log") or "")
    if (code < 0 or step) and store_path.exists():  # a lost process, not a failure of the run itself
        with Store(store_path) as st:
            who = f"{who}; {stop_note(st, run_id, int(step.group(1)) if step else None)}"
    return f"{who} (process logs: {logs})"


def main(argv: list[str] | None = None) -> None:
    """A process that `launch` started: `python -m batchscope.launch SPEC STORE TIMEOUT`; exits as the CLI
    would (1: the run failed, 2: an error before it, with one `error:` line that the launcher reports)."""
    spec_file, store_path, timeout_s = sys.argv[1:] if argv is None else argv
    try:
        sweep = load_spec(spec_file)
        code = train_here(sweep.base(), sweep.name, Path(store_path), 1, float(timeout_s))
    except BatchscopeError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        code = 2
    except KeyboardInterrupt:  # as click: the launcher's Ctrl-C reached this process too
        sys.stderr.write("\nAborted!\n")
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
