"""Run a grid of specs through the store: train only what is not done, resume what was interrupted."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import __version__
from .executors import Executor, choose_executor
from .factories import check_objective, dataset_for, model_for, resolve_device
from .probes import probes_for
from .runs import OnRunStart, SweepSummary, register
from .spec import RunSpec, SweepSpec
from .store import Store


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


def preflight(runs: Sequence[RunSpec], remote: bool = False) -> None:
    """Load each distinct data set, build each distinct model and try its loss once, so that a bad name, option,
    file or user factory fails the whole command at the boundary, before anything is written to the store.
    `remote`: the runs train on other machines, so check on this one's CPU, not on the runs' device."""
    seen: set[str] = set()
    for r in runs:
        probes_for(r)  # unknown instruments or options fail here, in one line
        key = (r.data.model_dump_json() + r.model.model_dump_json() + r.loss.model_dump_json() + r.train.device
               + r.train.dtype + str(r.train.adversarial is None) + r.train.stop.metric)
        if key not in seen:
            seen.add(key)
            device = torch.device("cpu") if remote else resolve_device(r.train.device)
            ds = dataset_for(r, device)
            check_objective(r, model_for(r, ds, device), ds)


def prepare(runs: Sequence[RunSpec], executor: Executor) -> None:
    """What fails before the store is written: the runs' specs (`preflight`) and, for a remote executor,
    its cluster. Commands call it before they open the store, then `run_sweep(..., prepared=True)`."""
    preflight(runs, remote=executor.remote)
    if executor.remote:
        executor.connect()


def run_sweep(
    store: Store,
    sweep: SweepSpec,
    *,
    recompute_old: bool = False,
    executor: str | Executor | None = None,
    on_run_start: OnRunStart | None = None,
    prepared: bool = False,
) -> SweepSummary:
    """Train every run of the sweep that is not done; runs already done are never trained twice.
    `executor`: serial, fused, processes, an Executor, or None to let `choose_executor` pick.
    `prepared`: the caller has run `prepare` on these runs (or more) with this executor."""
    runs = plan_runs(sweep)
    ex = executor if executor is not None and not isinstance(executor, str) else choose_executor(runs, None, executor)
    if not prepared:
        prepare(runs, ex)
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
