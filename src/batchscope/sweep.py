"""Run a grid of specs through the store: train only what is not done, resume what was interrupted."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import __version__
from .errors import BatchscopeError
from .factories import dataset_for, model_for, resolve_device
from .probes import probes_for
from .spec import RunSpec, SweepSpec
from .store import Store, provenance
from .train.loop import RunResult, train_run

if TYPE_CHECKING:
    from .executors import Executor

Progress = Callable[[int, int], None]
OnRunStart = Callable[[int, int, RunSpec], "Progress | None"]


@dataclass
class SweepSummary:
    total: int = 0
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # done before (or by another worker)
    failed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    older: list[str] = field(default_factory=list)  # done by another batchscope version
    executor: str = "serial"

    def add(self, run_id: str, status: str) -> None:
        """File a run under the outcome `run_one` (or an executor) returned for it."""
        outcome = {"done": self.trained, "diverged": self.diverged, "failed": self.failed}
        outcome.get(status, self.skipped).append(run_id)


def plan_runs(sweep: SweepSpec) -> list[RunSpec]:
    """The sweep's runs, with the sources of warm starts added and placed before the runs that need them."""
    runs = sweep.expand() if sweep.is_grid() else [sweep.base()]
    ids = {r.run_id() for r in runs}
    sources = []
    for r in runs:
        src = r.source_spec()
        if src is not None and src.run_id() not in ids:
            ids.add(src.run_id())
            sources.append(src)
    ordered = sources + runs
    return sorted(ordered, key=lambda r: r.train.warm_start is not None)  # stable: sources first


def preflight(runs: list[RunSpec], remote: bool = False) -> None:
    """Load each distinct data set and build each distinct model once, so that a bad name, option or
    file fails the whole command at the boundary, before anything is written to the store.
    `remote`: the runs train on other machines, so check on this one's CPU, not on the runs' device."""
    seen: set[str] = set()
    for r in runs:
        probes_for(r)  # unknown instruments or options fail here, in one line
        key = r.data.model_dump_json() + r.model.model_dump_json() + r.train.device + r.train.dtype
        if key not in seen:
            seen.add(key)
            device = torch.device("cpu") if remote else resolve_device(r.train.device)
            model_for(r, dataset_for(r, device), device)


def register(store: Store, runs: list[RunSpec], group: str | None) -> None:
    for r in runs:
        store.add_run(r.run_id(), r.model_dump(mode="json"), group=group)


def run_one(store: Store, spec: RunSpec, progress: Progress | None = None) -> str:
    """Claim and train one stored run; returns its final status (or 'skipped' if not claimable)."""
    run_id = spec.run_id()
    device = resolve_device(spec.train.device)
    if not store.claim(run_id, provenance(str(device), spec.train.dtype)):
        return "skipped"
    try:
        result = train_run(spec, store, run_id, progress=progress, callbacks=probes_for(spec))
    except KeyboardInterrupt:
        store.release(run_id)  # back to pending: the next call resumes it from its last checkpoint
        raise
    except Exception as err:  # a bug or an OOM in one run must not end the sweep
        store.finish(run_id, "failed", error=failure_text(err))
        return "failed"
    return record_result(store, run_id, result)


def failure_text(err: BaseException) -> str:
    """What a failed run stores as its error: the message of a BatchscopeError, else a short traceback."""
    if isinstance(err, BatchscopeError):
        return str(err)
    return f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"


def record_result(store: Store, run_id: str, result: RunResult) -> str:
    """Store a trained run's outcome (every executor ends a run here); returns its status."""
    store.finish(
        run_id,
        result.status,
        final={**result.final, "stop_reason": result.stop_reason},
        diverged_step=result.diverged_step, seconds=result.seconds
    )
    return result.status


def is_finished(store: Store, run_id: str) -> bool:
    """Done or diverged: never trained again (failed runs are retried)."""
    rec = store.get_run(run_id)
    return rec is not None and rec.status in ("done", "diverged")


def run_sweep(
    store: Store,
    sweep: SweepSpec,
    *,
    recompute_old: bool = False,
    executor: str | Executor | None = None,
    on_run_start: OnRunStart | None = None,
) -> SweepSummary:
    """Train every run of the sweep that is not done; runs already done are never trained twice.
    `executor`: serial, fused, processes, an Executor, or None to let `choose_executor` pick."""
    from .executors import choose_executor

    runs = plan_runs(sweep)
    ex = executor if executor is not None and not isinstance(executor, str) else choose_executor(runs, None, executor)
    preflight(runs, remote=ex.remote)
    if ex.remote:
        ex.connect()  # a cluster that is not there fails before anything is registered
    register(store, runs, sweep.name)
    summary = SweepSummary(total=len(runs))
    records = {r.run_id: r for r in store.runs(group=None)}
    for r in runs:
        rec = records.get(r.run_id())
        if rec is not None and rec.status in ("done", "diverged") and rec.version != __version__:
            summary.older.append(r.run_id())
    if recompute_old and summary.older:
        store.reset(summary.older)
    done = ex.run(store, runs, on_run_start)
    done.older, done.total, done.executor = summary.older, len(runs), ex.name
    return done
