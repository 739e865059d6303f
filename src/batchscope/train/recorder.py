"""A run's view of the store: where its metrics and checkpoints go, and where its resume point and warm
start come from. Without a store (library use) it keeps the metrics in memory only. Sinks (TensorBoard,
MLflow, see batchscope.sinks) get every row as it is logged, so they show a run while it trains; a run
resumed from a checkpoint sends the steps after it again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from ..errors import BatchscopeError
from ..sinks import Sink, flush_all
from ..spec import RunSpec

if TYPE_CHECKING:
    from ..store import RunStore


class Recorder:
    """Where a run's metrics and checkpoints go: a store, or nowhere (library use); and its sinks."""

    def __init__(self, store: RunStore | None, run_id: str, sinks: Sequence[Sink] = ()) -> None:
        self.store, self.run_id, self.sinks = store, run_id, tuple(sinks)
        self.pending: list[tuple[int, float, dict[str, float]]] = []
        self.all: list[tuple[int, float, dict[str, float]]] = []

    def log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.pending.append((step, epoch, metrics))
        self.all.append((step, epoch, metrics))
        for sink in self.sinks:
            sink(step, metrics)

    def flush(self) -> None:
        if self.store is not None and self.pending:
            self.store.log_metrics_many(self.run_id, [(s, e, m) for s, e, m in self.pending])
        self.pending = []
        flush_all(self.sinks)

    def save(self, tag: str, state: dict, step: int) -> None:
        if self.store is not None:
            self.store.save_checkpoint(self.run_id, tag, state, step)

    def resume_point(self) -> dict | None:
        """The latest resume checkpoint, with the run's initial weights under "init" (distances count from
        them), its later metrics dropped; or None."""
        if self.store is None:
            return None
        latest = self.store.latest_checkpoint(self.run_id, prefix="resume")
        if latest is None:
            return None
        state = self.store.load_checkpoint(self.run_id, latest[0])
        self.store.truncate_metrics(self.run_id, state["step"])
        return {**state, "init": self.load(self.run_id, "init")["model"]}

    def load(self, run_id: str, tag: str) -> dict:
        assert self.store is not None, "no store, no checkpoints: callers check rec.store first"
        return self.store.load_checkpoint(run_id, tag)


def warm_start(spec: RunSpec, model: nn.Module, rec: Recorder) -> None:
    """Load the weights of the spec's warm-start source at its epoch into `model` (no-op without one)."""
    src = spec.source_spec()
    if src is None:
        return
    if rec.store is None:
        raise BatchscopeError("train.warm_start: needs a store that holds the source run")
    src_id = src.run_id()
    ws = spec.train.warm_start
    assert ws is not None  # source_spec() is None exactly when it is
    run = rec.store.get_run(src_id)
    if run is None or run.status != "done":
        raise BatchscopeError(f"train.warm_start: source run {src_id} is not done (status {getattr(run, 'status', 'absent')})")
    tag = ws.tag
    if tag not in {t for t, _ in rec.store.checkpoints(src_id)}:
        where, field = ("epoch", "checkpoint_epochs") if ws.epoch is not None else ("step", "checkpoint_steps")
        point = ws.epoch if ws.epoch is not None else ws.step
        raise BatchscopeError(
            f"train.warm_start: source run {src_id} has no checkpoint at {where} {point}; add {point} to log.{field}"
        )
    model.load_state_dict(rec.load(src_id, tag)["model"])
