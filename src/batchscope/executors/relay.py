"""The store as a training loop sees it when another process is the store's only writer.

A worker's loop (`train_run`, `train_group`) gets a `Relay`: its reads go to a reader (the store file itself
for a local process pool; a `Snapshot` of what the run needs for a worker on another machine), and its
writes become messages, sent in order, that the writer applies with `apply_write`. Order matters: a resume
checkpoint is never recorded before the metrics that precede it.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..probes import probes_for
from ..runs import failure_text
from ..spec import RunSpec
from ..store import RunReader, RunRecord, RunStore, Store
from ..train.fused import train_group
from ..train.plain import train_run

Message = tuple  # (kind, run_id, *body)


class Relay:
    """Reads from `reader`; writes (metrics, checkpoints, truncation on resume) sent through `send`."""

    def __init__(self, reader: RunReader, send: Callable[[Message], None]) -> None:
        self.reader, self.send = reader, send

    def log_metrics_many(self, run_id: str, rows: list[tuple[int, float | None, dict[str, float]]]) -> None:
        self.send(("metrics", run_id, rows))

    def truncate_metrics(self, run_id: str, after_step: int) -> None:
        self.send(("truncate", run_id, after_step))

    def save_checkpoint(self, run_id: str, tag: str, state: dict, step: int) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)  # bytes, not tensors: no shared-memory or device handles outlive the worker
        self.send(("checkpoint", run_id, tag, buf.getvalue(), step))

    def get_run(self, run_id: str) -> RunRecord | None:
        return self.reader.get_run(run_id)

    def checkpoints(self, run_id: str) -> list[tuple[str, int]]:
        return self.reader.checkpoints(run_id)

    def latest_checkpoint(self, run_id: str, prefix: str = "resume") -> tuple[str, int] | None:
        return self.reader.latest_checkpoint(run_id, prefix)

    def load_checkpoint(self, run_id: str, tag: str) -> dict:
        return self.reader.load_checkpoint(run_id, tag)


def train_relayed(specs: Sequence[RunSpec], run_ids: Sequence[str], relay: Relay, every: float = 0.5) -> None:
    """A worker's task: train one run (with its probes) or a fused group against `relay`; each run's outcome,
    ("result", run_id, RunResult) or ("failed", run_id, error), is sent after all its writes. Progress,
    ("progress", first run_id, (step, total)), is sent at most every `every` seconds."""
    sent = [0.0]

    def progress(step: int, total: int) -> None:
        now = time.monotonic()
        if now - sent[0] >= every or step == total:
            sent[0] = now
            relay.send(("progress", run_ids[0], (step, total)))

    try:
        if len(specs) == 1:
            results = [train_run(specs[0], relay, run_ids[0], progress, callbacks=probes_for(specs[0]))]
        else:
            results = train_group(specs, relay, run_ids, progress)
    except Exception as err:
        text = failure_text(err)
        for run_id in run_ids:
            relay.send(("failed", run_id, text))
        return
    for run_id, result in zip(run_ids, results):
        relay.send(("result", run_id, dataclasses.replace(result, metrics=[])))  # the metrics went as writes


def apply_write(store: Store, message: Message) -> bool:
    """Apply a relayed write to the store; False if the message is not a write (progress, outcome)."""
    kind, run_id, *body = message
    if kind == "metrics":
        store.log_metrics_many(run_id, body[0])
    elif kind == "truncate":
        store.truncate_metrics(run_id, body[0])
    elif kind == "checkpoint":
        tag, data, step = body
        store.save_checkpoint(run_id, tag, torch.load(io.BytesIO(data), weights_only=True), step)
    else:
        return False
    return True


@dataclass
class Snapshot:
    """What training these runs reads from the store, copied out of it for a worker that cannot open the
    file: each run's checkpoints (the files of its resume point and initial weights) and, for a warm start,
    the source run's record, checkpoint list and the checkpoint it starts from. A run's own list holds only
    what is sent (its latest resume checkpoint and initial weights), so the resume point is the store's."""

    records: dict[str, RunRecord | None] = field(default_factory=dict)
    listed: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, store: Store, specs: Iterable[RunSpec]) -> Snapshot:
        snap = cls()
        for spec in specs:
            run_id = spec.run_id()
            snap.records[run_id] = store.get_run(run_id)
            latest = store.latest_checkpoint(run_id, "resume")
            snap.listed[run_id] = []  # only what is sent: the resume point is then the store's latest
            if latest is not None:
                init = dict(store.checkpoints(run_id))["init"]
                snap.listed[run_id] = [("init", init), latest]
                snap._copy(store, run_id, latest[0])
                snap._copy(store, run_id, "init")
            src, ws = spec.source_spec(), spec.train.warm_start
            if src is not None and ws is not None:  # both None, or neither
                src_id = src.run_id()
                snap._add(store, src_id)
                tag = ws.tag
                if tag in {t for t, _ in snap.listed[src_id]}:
                    snap._copy(store, src_id, tag)
        return snap

    def _add(self, store: Store, run_id: str) -> None:
        rec = store.get_run(run_id)
        if rec is not None:
            self.records[run_id] = rec
        self.listed[run_id] = store.checkpoints(run_id)

    def _copy(self, store: Store, run_id: str, tag: str) -> None:
        buf = io.BytesIO()
        torch.save(store.load_checkpoint(run_id, tag), buf)
        self.files[(run_id, tag)] = buf.getvalue()

    def get_run(self, run_id: str) -> RunRecord | None:
        return self.records.get(run_id)

    def checkpoints(self, run_id: str) -> list[tuple[str, int]]:
        return list(self.listed.get(run_id, []))

    def latest_checkpoint(self, run_id: str, prefix: str = "resume") -> tuple[str, int] | None:
        found = [(step, tag) for tag, step in self.listed.get(run_id, []) if tag.startswith(prefix)]
        return None if not found else max(found)[::-1]

    def load_checkpoint(self, run_id: str, tag: str) -> dict:
        if (run_id, tag) not in self.files:
            raise KeyError(f"run {run_id!r}: checkpoint {tag!r} was not sent to this worker")
        return torch.load(io.BytesIO(self.files[(run_id, tag)]), weights_only=True)


if TYPE_CHECKING:  # mypy holds each to the protocol it stands in for, naming what is missing

    def _relay_is_a_run_store(relay: Relay) -> RunStore:
        return relay

    def _snapshot_is_a_run_reader(snapshot: Snapshot) -> RunReader:
        return snapshot
