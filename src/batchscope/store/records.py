"""Run records: the runs table (a run's spec, status and outcome) and its metrics."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..spec import spec_identity
from .db import Database

STATUSES = ("pending", "running", "done", "diverged", "failed")
FINAL_STATUSES = ("done", "diverged", "failed")

_RUN_COLUMNS = (
    "run_id, spec, status, grp, error, created, started, finished, seconds, provenance, final, "
    "diverged_step, attempts, version, host, pid, heartbeat"
)


@dataclass
class RunRecord:
    """One run as recorded in the store."""

    run_id: str
    spec: dict
    status: str
    group: str | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    seconds: float | None  # training wall time, as reported by the trainer (or finished - started)
    provenance: dict
    final: dict  # final metrics, name -> float
    diverged_step: int | None
    attempts: int
    version: str | None  # batchscope version that produced it (from provenance)
    host: str | None = field(default=None, repr=False)  # who holds / last held the claim
    pid: int | None = field(default=None, repr=False)
    heartbeat: float | None = field(default=None, repr=False)

    @classmethod
    def _from_row(cls, row: tuple) -> RunRecord:
        """Build from a row selected with _RUN_COLUMNS."""
        (run_id, spec, status, grp, error, created, started, finished, seconds, prov, final,
         diverged_step, attempts, version, host, pid, heartbeat) = row  # fmt: skip
        return cls(
            run_id=run_id,
            spec=json.loads(spec),
            status=status,
            group=grp,
            error=error,
            created=created,
            started=started,
            finished=finished,
            seconds=seconds,
            provenance=json.loads(prov),
            final=json.loads(final),
            diverged_step=diverged_step,
            attempts=attempts,
            version=version,
            host=host,
            pid=pid,
            heartbeat=heartbeat,
        )


def _canonical(obj: Any) -> str:
    """Canonical JSON: equal specs give equal strings whatever their key order."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"not JSON-serializable: {e}") from None


def _float(name: str, value: Any) -> float | None:
    """A metric value as a float for SQLite; NaN becomes NULL (SQLite would do so silently anyway)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r}: {value!r} is not a number") from None
    return None if math.isnan(v) else v


def _value(v: float | None) -> float:
    """Read back a metric value: NULL is NaN."""
    return math.nan if v is None else v


def _as_ids(run_ids: str | Iterable[str]) -> list[str]:
    """Accept one id or many (a bare string is one id, not its characters)."""
    return [run_ids] if isinstance(run_ids, str) else list(run_ids)


class Records(Database):
    """Runs and their metrics."""

    def add_run(self, run_id: str, spec: dict, group: str | None = None) -> bool:
        """Insert a pending run if absent; True if new. A different spec under the same id raises ValueError
        (the labels `name` and `tags` aside: the first registration's are kept)."""
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        text = _canonical(spec)
        with self._write() as c:
            cur = c.execute(
                "INSERT INTO runs (run_id, spec, status, grp, created) VALUES (?, ?, 'pending', ?, ?) "
                "ON CONFLICT (run_id) DO NOTHING",
                (run_id, text, group, time.time()),
            )
            if cur.rowcount == 1:
                return True
            (stored,) = c.execute("SELECT spec FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        # Compare canonical forms (the stored text may predate a change in json's output). Labels do
        # not identify a run (the same run may be registered by two sweeps under different tags), nor do
        # fields added since at their defaults (the stored spec may predate them).
        if _canonical(spec_identity(json.loads(stored))) != _canonical(spec_identity(spec)):
            raise ValueError(
                f"run {run_id} is already in {self.path} with a different spec "
                f"(hash collision or corrupted store): stored {stored}, given {text}"
            )
        return False

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run's record, or None if absent."""
        with self._lock:
            row = self._connection().execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        return None if row is None else RunRecord._from_row(row)

    def runs(self, *, status: str | Iterable[str] | None = None, group: str | None = None) -> list[RunRecord]:
        """Runs, in order of creation, optionally filtered by status (one or several) and group."""
        where, args = [], []
        if status is not None:
            wanted = _as_ids(status)
            bad = [s for s in wanted if s not in STATUSES]
            if bad:
                raise ValueError(f"unknown status {bad[0]!r}; expected one of {', '.join(STATUSES)}")
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            args += wanted
        if group is not None:
            where.append("grp = ?")
            args.append(group)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._connection().execute(sql + " ORDER BY created, rowid", args).fetchall()
        return [RunRecord._from_row(r) for r in rows]

    def update_provenance(self, run_id: str, values: dict) -> None:
        """Merge `values` into a run's provenance (where a remote worker trained a claimed run, say)."""
        with self._write() as c:
            row = c.execute("SELECT provenance FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown run {run_id!r} in {self.path}")
            merged = {**json.loads(row[0]), **values}
            c.execute("UPDATE runs SET provenance = ? WHERE run_id = ?", (_canonical(merged), run_id))
            self._touch(c, run_id)

    def finish(
        self,
        run_id: str,
        status: str,
        *,
        final: dict | None = None,
        error: str | None = None,
        diverged_step: int | None = None,
        seconds: float | None = None,
    ) -> None:
        """Record the outcome (done, diverged or failed) of a pending or running run.

        seconds defaults to finished - started. A run that already has an outcome raises ValueError, so a
        late, stale worker cannot overwrite a result; reset() it to recompute.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"finish status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        final_text = _canonical({k: v if isinstance(v, str) else float(v) for k, v in (final or {}).items()})
        now = time.time()
        with self._write() as c:
            row = c.execute("SELECT status, started FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown run {run_id!r} in {self.path}")
            current, started = row
            if current not in ("pending", "running"):
                raise ValueError(f"run {run_id} is already {current}; reset it before recording a new outcome")
            if seconds is None and started is not None:
                seconds = now - started
            c.execute(
                "UPDATE runs SET status = ?, final = ?, error = ?, diverged_step = ?, seconds = ?, "
                "finished = ?, heartbeat = NULL WHERE run_id = ?",
                (status, final_text, error, diverged_step, seconds, now, run_id),
            )

    # -- metrics ----------------------------------------------------------------------------------

    @staticmethod
    def _touch(c: sqlite3.Connection, run_id: str) -> None:
        """Check the run exists and refresh the heartbeat of a running claim (keeps its lease alive)."""
        cur = c.execute(
            "UPDATE runs SET heartbeat = CASE WHEN status = 'running' THEN ? ELSE heartbeat END "
            "WHERE run_id = ?",
            (time.time(), run_id),
        )
        if cur.rowcount != 1:
            raise KeyError(f"unknown run {run_id!r}")

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float], epoch: float | None = None) -> None:
        """Record metrics at a step; logging the same (run, step, name) again replaces the value."""
        self.log_metrics_many(run_id, [(step, epoch, metrics)])

    def log_metrics_many(self, run_id: str, rows: list[tuple[int, float | None, dict[str, float]]]) -> None:
        """Record many (step, epoch, metrics) rows in one transaction (one fsync-free commit, not one per row)."""
        params = [
            (run_id, name, int(step), _float(name, value), None if epoch is None else float(epoch))
            for step, epoch, metrics in rows
            for name, value in metrics.items()
        ]
        with self._write() as c:
            self._touch(c, run_id)
            c.executemany(
                "INSERT INTO metrics (run_id, name, step, value, epoch) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, name, step) DO UPDATE SET value = excluded.value, epoch = excluded.epoch",
                params,
            )

    def metrics(self, run_id: str, names: Iterable[str] | None = None) -> dict[str, list[tuple[int, float]]]:
        """name -> [(step, value)] sorted by step (NaN read back as NaN); every requested name is a key."""
        sql = "SELECT name, step, value FROM metrics WHERE run_id = ?"
        args: list[Any] = [run_id]
        wanted = None if names is None else list(names)
        if wanted is not None:
            if not wanted:
                return {}
            sql += f" AND name IN ({', '.join('?' * len(wanted))})"
            args += wanted
        with self._lock:
            rows = self._connection().execute(sql + " ORDER BY name, step", args).fetchall()
        out: dict[str, list[tuple[int, float]]] = {n: [] for n in (wanted or ())}
        for name, step, value in rows:
            out.setdefault(name, []).append((step, _value(value)))
        return out

    def truncate_metrics(self, run_id: str, after_step: int) -> None:
        """Drop metrics with step > after_step (on resume from a checkpoint at after_step; -1 drops all)."""
        with self._write() as c:
            c.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, int(after_step)))
