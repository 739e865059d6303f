"""The life of a stored run, shared by `sweep`, every executor, `batchscope train` (data-parallel too) and
the studies' stored simulations: register it, claim it, train it, settle its outcome; and the summary of
what happened to a sweep's runs.

It sits below `sweep` and `executors`, so that neither imports the other to reach these.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import BatchscopeError
from .factories import resolve_device
from .probes import probes_for
from .spec import RunSpec
from .store import Store, provenance
from .train.loop import Progress, RunResult
from .train.plain import train_run

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


class Claims:
    """The one run lifecycle: the runs this process claimed, each settled once and filed in `summary`:
    `record`ed (done or diverged: never trained again), `fail`ed (retried next time) or `release`d (pending:
    resumed from its last checkpoint next time). Training here goes in `with claims.training() as attempt:`;
    a driver whose workers train settles each run as its outcome arrives, and releases the rest however it
    ends early (Ctrl-C, a lost cluster, its own bug): none of them failed."""

    def __init__(self, store: Store, summary: SweepSummary | None = None) -> None:
        self.store = store
        self.summary = summary if summary is not None else SweepSummary()
        self.held: list[str] = []

    def claim(self, run_id: str, prov: dict) -> bool:
        """Claim a run; False (and filed as skipped) when it is finished or a live worker holds it."""
        if is_finished(self.store, run_id) or not self.store.claim(run_id, prov):
            self.summary.skipped.append(run_id)
            return False
        self.held.append(run_id)
        return True

    def record(self, run_id: str, result: RunResult) -> str:
        """Store a trained run's outcome; returns its status."""
        self._settled(run_id, record_result(self.store, run_id, result))
        return result.status

    def finish(self, run_id: str, status: str, **outcome) -> None:
        """Store an outcome that is not a RunResult (a failure, a simulation's summary)."""
        self.store.finish(run_id, status, **outcome)
        self._settled(run_id, status)

    def fail(self, run_ids: Iterable[str], error: str) -> None:
        for run_id in list(run_ids):
            self.finish(run_id, "failed", error=error)

    def release(self, run_ids: Iterable[str] | None = None) -> None:
        """Give held runs (default: all) back to pending, to resume from their last checkpoints."""
        for run_id in list(self.held if run_ids is None else run_ids):
            self.store.release(run_id)
            self.held.remove(run_id)

    def _settled(self, run_id: str, status: str) -> None:
        self.held.remove(run_id)
        self.summary.add(run_id, status)

    def training(self, describe: Callable[[Exception], str] | None = None, reraise: bool = False) -> Training:
        return Training(self, describe or failure_text, reraise)


@dataclass
class Training:
    """Around code that trains every held run here: an interrupt (Ctrl-C, SystemExit) releases them and goes
    on up; an error fails them with `describe(err)` and ends at the block (`failed`), as one run's bug or OOM
    must not end a sweep, unless `reraise`. Not a generator: a stored traceback starts at the caller's frame."""

    claims: Claims
    describe: Callable[[Exception], str]
    reraise: bool
    failed: bool = False

    def __enter__(self) -> Training:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None:
            return False
        if not isinstance(err, Exception):
            self.claims.release()
            return False
        self.claims.fail(self.claims.held, self.describe(err))
        self.failed = True
        return not self.reraise


def register(store: Store, runs: list[RunSpec], group: str | None) -> None:
    for r in runs:
        store.add_run(r.run_id(), r.model_dump(mode="json"), group=group)


def run_one(store: Store, spec: RunSpec, progress: Progress | None = None) -> str:
    """Claim and train one stored run; returns its final status (or 'skipped' if not claimable)."""
    run_id = spec.run_id()
    claims = Claims(store)
    if not claims.claim(run_id, provenance(str(resolve_device(spec.train.device)), spec.train.dtype)):
        return "skipped"
    with claims.training() as attempt:
        result = train_run(spec, store, run_id, progress=progress, callbacks=probes_for(spec))
    return "failed" if attempt.failed else claims.record(run_id, result)


def failure_text(err: BaseException) -> str:
    """What a failed run stores as its error: the message of a BatchscopeError, else a short traceback."""
    if isinstance(err, BatchscopeError):
        return str(err)
    return f"{type(err).__name__}: {err}\n{''.join(traceback.format_exception(err, limit=5))}"


def record_result(store: Store, run_id: str, result: RunResult) -> str:
    """Store a trained run's outcome; returns its status (`Claims.record`, and replays in tests)."""
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


_S = TypeVar("_S")
_R = TypeVar("_R")


def simulated(store: Store, items: Mapping[str, tuple[dict, _S]], group: str, simulate: Callable[[list[_S]], list[_R]],
              record: Callable[[str, _S, _R], dict], wait_s: float) -> None:
    """Make every pseudo-run of `items` (run id -> (stored spec, setting)) done in the store: the ones not done are
    claimed, simulated together (`simulate(settings)`, results in order) and written by `record(run id, setting,
    result)`, which logs the metrics and returns the run's final summary; one that another process holds is waited
    for. A simulation is the numbers a report needs: its failure is raised again."""
    for rid, (spec, _) in items.items():
        if store.get_run(rid) is None:
            store.add_run(rid, spec, group=group)
    todo = [rid for rid in items if store.get_run(rid).status != "done"]
    claims = Claims(store)
    mine = [rid for rid in todo if claims.claim(rid, provenance("cpu", "float64"))]
    if mine:
        with claims.training(lambda err: f"{type(err).__name__}: {err}", reraise=True):
            results = simulate([items[rid][1] for rid in mine])
        for rid, res in zip(mine, results):
            claims.finish(rid, "done", final=record(rid, items[rid][1], res))
    deadline = time.monotonic() + wait_s
    for rid in todo:
        while store.get_run(rid).status != "done":
            rec = store.get_run(rid)
            if rec.status in ("failed", "pending") or time.monotonic() > deadline:
                raise BatchscopeError(f"simulation {rid} is {rec.status} (another process held it); run the report again")
            time.sleep(1.0)
