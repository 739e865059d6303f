"""The life of a stored run, shared by `sweep`, every executor and `batchscope train`: register it, claim
it, train it, record its outcome; and the summary of what happened to a sweep's runs.

It sits below `sweep` and `executors`, so that neither imports the other to reach these.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

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
