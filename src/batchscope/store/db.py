"""The SQLite file: schema, one connection per process, transactions, closing."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from batchscope.errors import BatchscopeError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    run_id        TEXT PRIMARY KEY,
    spec          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    grp           TEXT,
    error         TEXT,
    created       REAL NOT NULL,
    started       REAL,
    finished      REAL,
    seconds       REAL,
    provenance    TEXT NOT NULL DEFAULT '{}',
    final         TEXT NOT NULL DEFAULT '{}',
    diverged_step INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    version       TEXT,
    host          TEXT,
    pid           INTEGER,
    pid_ns        TEXT,
    heartbeat     REAL
);
CREATE INDEX runs_status ON runs (status);
CREATE INDEX runs_grp ON runs (grp);
CREATE TABLE metrics (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    name   TEXT NOT NULL,
    step   INTEGER NOT NULL,
    value  REAL,          -- NULL stores NaN: SQLite cannot store a NaN REAL
    epoch  REAL,
    PRIMARY KEY (run_id, name, step)
) WITHOUT ROWID;
CREATE TABLE checkpoints (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    tag    TEXT NOT NULL,
    step   INTEGER NOT NULL,
    path   TEXT NOT NULL,  -- relative to the artifacts folder
    time   REAL NOT NULL,
    PRIMARY KEY (run_id, tag)
) WITHOUT ROWID;
"""
# Connections inherited through fork must never be used or closed by the child (closing one would drop
# the child's own POSIX locks on the file); they are parked here instead.
_ABANDONED: list[sqlite3.Connection] = []


class Database:
    """Connection and transactions of a store; Store's constructor sets these attributes."""

    path: Path
    artifacts: Path  # the checkpoint folder beside the file
    lease: float
    timeout: float
    _lock: threading.RLock
    _conn: sqlite3.Connection | None
    _pid: int  # the process that opened _conn

    def _connect(self) -> sqlite3.Connection:
        """Open a connection in autocommit mode (transactions are explicit) with WAL and a busy timeout."""
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.OperationalError as e:
            raise BatchscopeError(f"{self.path}: cannot open the run store ({e})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            deadline = time.monotonic() + self.timeout
            while True:
                # Switching to WAL needs a moment's exclusive lock, which a process creating the same
                # file at the same time may hold; the busy handler is not always consulted for it.
                try:
                    conn.execute("PRAGMA journal_mode = WAL").fetchone()
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            # NORMAL in WAL: a commit survives a process crash; only a power loss may drop the last ones.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        """The connection of this process; a child created by fork opens its own."""
        if self._conn is None:
            raise RuntimeError(f"{self.path}: store is closed")
        if os.getpid() != self._pid:
            _ABANDONED.append(self._conn)
            self._conn = None
            self._pid = os.getpid()
            self._conn = self._connect()
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so it cannot deadlock."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself fails (disk full): never leave the connection mid-transaction.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several SELECTs see one consistent snapshot."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def _init_schema(self) -> None:
        """Create the schema in an empty file, or check the version of an existing one."""
        # Check under a read transaction first: opening an existing store must not queue for the write
        # lock behind busy writers. Only an empty file takes it, and re-checks (another process may win).
        with self._read() as c:
            if self._check_schema(c):
                return
        with self._write() as c:
            if self._check_schema(c):
                return
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _check_schema(self, c: sqlite3.Connection) -> bool:
        """True if the file holds a store of our schema version, False if it is empty; else raise."""
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return False
        if "schema_version" not in tables:
            raise BatchscopeError(
                f"{self.path}: is a SQLite database but not a batchscope run store (no schema_version table)"
            )
        (found,) = c.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if found != SCHEMA_VERSION:
            raise BatchscopeError(
                f"{self.path}: run store schema version {found}; this batchscope reads version {SCHEMA_VERSION}"
            )
        return True

    def close(self) -> None:
        """Close the connection (idempotent); the last one out folds the WAL back into the file."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            if os.getpid() == self._pid:
                conn.close()
            else:
                _ABANDONED.append(conn)  # the parent's, inherited through fork: see _ABANDONED
