"""Store: a run store opened on one file, assembled from its parts (see the package docstring)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from batchscope.errors import BatchscopeError

from .checkpoints import _SAFE_NAME
from .export import Export
from .leases import DEFAULT_LEASE, Leases
from .protocol import RunStore
from .records import _as_ids


def _open_store(path: str, lease: float, timeout: float) -> Store:
    """Unpickling helper: a Store travels to another process as its path and reopens there."""
    return Store(path, lease=lease, timeout=timeout)


class Store(Leases, Export):
    """A run store in one SQLite file, with checkpoints in a folder beside it."""

    def __init__(self, path: str | os.PathLike, *, lease: float = DEFAULT_LEASE, timeout: float = 60.0):
        """Open (creating if needed) the store at path; `lease` and `timeout` (busy wait, s) as documented."""
        self.path = Path(path).expanduser().absolute()
        self.artifacts = self.path.with_name(self.path.stem + "_artifacts")
        self.lease = float(lease)
        self.timeout = float(timeout)
        self._lock = threading.RLock()  # one connection, shared by threads one at a time
        self._conn = None
        self._pid = os.getpid()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BatchscopeError(
                f"{self.path}: cannot create the folder {self.path.parent} for the run store ({e.strerror or e})"
            ) from None
        if self.path.is_dir():
            raise BatchscopeError(f"{self.path}: is a folder; expected a run store file (e.g. runs.db)")
        try:
            self._conn = self._connect()
            self._init_schema()
        except sqlite3.DatabaseError as e:
            self.close()
            code = getattr(e, "sqlite_errorcode", None)  # the error codes and their names are Python 3.11+
            if code == getattr(sqlite3, "SQLITE_NOTADB", 26) or "not a database" in str(e):
                what = "is not a SQLite database; expected a batchscope run store"
            elif code == getattr(sqlite3, "SQLITE_CORRUPT", 11):
                what = "is a corrupted SQLite database; expected a batchscope run store"
            else:
                what = f"cannot be opened as a batchscope run store ({e})"
            raise BatchscopeError(f"{self.path}: {what}") from None
        except BaseException:
            self.close()
            raise

    def reset(self, run_ids: str | Iterable[str]) -> None:
        """Put runs back to pending, deleting their metrics, checkpoints and outcome (to recompute them)."""
        ids = _as_ids(run_ids)
        with self._write() as c:
            for run_id in ids:
                if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                    raise KeyError(f"unknown run {run_id!r} in {self.path}")
            for run_id in ids:
                c.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
                c.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))
                c.execute(
                    "UPDATE runs SET status = 'pending', error = NULL, started = NULL, finished = NULL, "
                    "seconds = NULL, provenance = '{}', final = '{}', diverged_step = NULL, attempts = 0, "
                    "version = NULL, host = NULL, pid = NULL, pid_ns = NULL, heartbeat = NULL "
                    "WHERE run_id = ?",
                    (run_id,),
                )
        # Files go after the commit: a crash in between leaves orphan files, never records without files.
        for run_id in ids:
            if _SAFE_NAME.fullmatch(run_id):
                shutil.rmtree(self.artifacts / run_id, ignore_errors=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __reduce__(self):
        return (_open_store, (str(self.path), self.lease, self.timeout))

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"


if TYPE_CHECKING:  # mypy holds Store to what a training loop takes, naming what is missing

    def _store_is_a_run_store(store: Store) -> RunStore:
        return store
