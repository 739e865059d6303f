"""One run after another in this process: the reference executor (resumes interrupted runs)."""

from __future__ import annotations

from collections.abc import Sequence

from ..runs import OnRunStart, SweepSummary, is_finished, run_one
from ..spec import RunSpec
from ..store import Store


class SerialExecutor:
    """`run_one` on each run in order: the behaviour of `batchscope sweep` before executors existed."""

    name = "serial"
    remote = False

    def __init__(self, reason: str = "asked for") -> None:
        self.reason = reason

    def run(self, store: Store, runs: Sequence[RunSpec], on_progress: OnRunStart | None = None) -> SweepSummary:
        """Train every run not done or diverged, one by one."""
        summary = SweepSummary(total=len(runs), executor=self.name)
        for i, spec in enumerate(runs):
            run_id = spec.run_id()
            if is_finished(store, run_id):
                summary.skipped.append(run_id)
                continue
            progress = on_progress(i, len(runs), spec) if on_progress else None
            summary.add(run_id, run_one(store, spec, progress))
        return summary
