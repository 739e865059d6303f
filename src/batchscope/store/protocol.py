"""What a training loop needs of a store, as protocols the type checker holds Store, Relay and Snapshot to.

The loop (train_run, train_group, through their Recorder) and an executor's worker see a store only
through these methods; a worker on another process or machine gets a Relay, not a Store. A method the
loop starts calling goes here first, so that mypy finds every implementation that lacks it.
"""

from __future__ import annotations

from typing import Protocol

from .records import RunRecord


class RunReader(Protocol):
    """The reads: resume points, and a warm start's source run and its checkpoints."""

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def checkpoints(self, run_id: str) -> list[tuple[str, int]]: ...

    def latest_checkpoint(self, run_id: str, prefix: str = "resume") -> tuple[str, int] | None: ...

    def load_checkpoint(self, run_id: str, tag: str) -> dict: ...


class RunStore(RunReader, Protocol):
    """The reads and the writes of one run's training: metrics, checkpoints, truncation on resume."""

    def log_metrics_many(self, run_id: str, rows: list[tuple[int, float | None, dict[str, float]]]) -> None: ...

    def truncate_metrics(self, run_id: str, after_step: int) -> None: ...

    # Store returns the file's path, a Relay nothing: the loop uses no result.
    def save_checkpoint(self, run_id: str, tag: str, state: dict, step: int) -> object: ...
