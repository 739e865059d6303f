"""Checkpoint files: written atomically under <store>_artifacts/<run_id>/<tag>.pt, recorded in the database."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from batchscope.errors import BatchscopeError

from .records import Records

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,199}")


def _check_name(name: str, what: str) -> str:
    """A run id or tag used as a file name: no separators, no leading dot, nothing to escape."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} cannot name a file: use letters, digits and _ . = + - (max 200)")
    return name


class Checkpoints(Records):
    """A run's checkpoints (get_run checks that the run exists before a file is written)."""

    def _run_dir(self, run_id: str) -> Path:
        return self.artifacts / _check_name(run_id, "run_id")

    def _clean_temporaries(self, run_id: str) -> None:
        """Remove temp files a killed save left behind; safe after a claim, when no one else writes here."""
        if not _SAFE_NAME.fullmatch(run_id):
            return
        for tmp in (self.artifacts / run_id).glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def save_checkpoint(self, run_id: str, tag: str, state: dict, step: int) -> Path:
        """Atomically write state as checkpoint `tag` of the run (replacing one with the same tag); its path."""
        import torch

        folder = self._run_dir(run_id)
        _check_name(tag, "checkpoint tag")
        if self.get_run(run_id) is None:
            raise KeyError(f"unknown run {run_id!r} in {self.path}")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{tag}.pt"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{tag}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
            with self._write() as c:
                self._touch(c, run_id)
                c.execute(
                    "INSERT INTO checkpoints (run_id, tag, step, path, time) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (run_id, tag) DO UPDATE SET step = excluded.step, path = excluded.path, "
                    "time = excluded.time",
                    (run_id, tag, int(step), f"{run_id}/{tag}.pt", time.time()),
                )
                # Last step inside the transaction: if the rename fails the record rolls back with it.
                os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable (POSIX only)
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return target

    def _checkpoint_path(self, run_id: str, tag: str) -> Path:
        with self._lock:
            row = self._connection().execute(
                "SELECT path FROM checkpoints WHERE run_id = ? AND tag = ?", (run_id, tag)
            ).fetchone()
        if row is None:
            raise KeyError(f"run {run_id!r} has no checkpoint {tag!r} in {self.path}")
        return self.artifacts / row[0]

    def load_checkpoint(self, run_id: str, tag: str, map_location: Any = "cpu") -> dict:
        """Load a checkpoint with torch.load(weights_only=True): tensors, numbers, strings, lists, dicts."""
        import torch

        path = self._checkpoint_path(run_id, tag)
        if not path.is_file():
            raise BatchscopeError(f"{path}: checkpoint {tag!r} of run {run_id} is recorded but the file is missing")
        return torch.load(path, map_location=map_location, weights_only=True)

    def checkpoints(self, run_id: str) -> list[tuple[str, int]]:
        """(tag, step) of the run's checkpoints, by step then tag."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT tag, step FROM checkpoints WHERE run_id = ? ORDER BY step, tag", (run_id,)
            ).fetchall()
        return [(t, s) for t, s in rows]

    def latest_checkpoint(self, run_id: str, prefix: str = "resume") -> tuple[str, int] | None:
        """(tag, step) of the checkpoint with the highest step among tags starting with prefix, or None."""
        with self._lock:
            row = self._connection().execute(
                "SELECT tag, step FROM checkpoints WHERE run_id = ? AND substr(tag, 1, ?) = ? "
                "ORDER BY step DESC, time DESC LIMIT 1",
                (run_id, len(prefix), prefix),
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def delete_checkpoint(self, run_id: str, tag: str) -> None:
        """Delete a checkpoint's record, then its file (absent: nothing to do)."""
        with self._write() as c:
            row = c.execute(
                "SELECT path FROM checkpoints WHERE run_id = ? AND tag = ?", (run_id, tag)
            ).fetchone()
            c.execute("DELETE FROM checkpoints WHERE run_id = ? AND tag = ?", (run_id, tag))
        if row is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.artifacts / row[0]).unlink()
