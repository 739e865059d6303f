"""The run store: runs, their status, provenance, metric trajectories and checkpoints, in one SQLite file.

Layout: ``<name>.db`` holds every record; checkpoints are files under ``<name>_artifacts/<run_id>/<tag>.pt``
beside it, recorded in the database with paths relative to that folder (so the pair can be moved together).

Guarantees:

* Every write is one transaction, started with ``BEGIN IMMEDIATE`` so that writers queue on SQLite's
  lock (``busy_timeout``) instead of failing when a read would upgrade to a write; the database runs in
  WAL mode so readers never block writers. A crash or Ctrl-C at any point leaves the last committed state.
* ``claim`` is the only way a run becomes ``running`` and is atomic across processes, so a sweep run
  twice trains nothing twice, and two workers never train the same run.
* Checkpoints are written to a temporary file in the same folder, fsynced, then ``os.replace``-d over the
  old one, so a failed save leaves the previous checkpoint intact.
* Metrics are keyed by ``(run_id, step, name)``; logging a step again replaces it, so a run resumed from a
  checkpoint can replay steps without duplicating rows.

Processes on one machine may share a file (a process pool; a single writing driver). SQLite's WAL mode does
not work over network file systems: do not share one store between machines at the same time.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchscope.errors import BatchscopeError
from batchscope.provenance import provenance
from batchscope.spec import spec_identity

__all__ = ["STATUSES", "SCHEMA_VERSION", "DEFAULT_LEASE", "RunRecord", "Store", "provenance"]

STATUSES = ("pending", "running", "done", "diverged", "failed")
FINAL_STATUSES = ("done", "diverged", "failed")
SCHEMA_VERSION = 1
# A running claim whose last heartbeat (claim, metrics or checkpoint write) is older than this is stale,
# whichever machine holds it. Generous, because stealing a live run would train it twice; override per
# Store or per claim (math.inf disables it, leaving only the dead-pid test).
DEFAULT_LEASE = 2 * 3600.0

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

_RUN_COLUMNS = (
    "run_id, spec, status, grp, error, created, started, finished, seconds, provenance, final, "
    "diverged_step, attempts, version, host, pid, heartbeat"
)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,199}")
_HOST = socket.gethostname()
# Connections inherited through fork must never be used or closed by the child (closing one would drop
# the child's own POSIX locks on the file); they are parked here instead.
_ABANDONED: list[sqlite3.Connection] = []


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


def _check_name(name: str, what: str) -> str:
    """A run id or tag used as a file name: no separators, no leading dot, nothing to escape."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} cannot name a file: use letters, digits and _ . = + - (max 200)")
    return name


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


def _pid_ns() -> str | None:
    """This process's PID namespace: pids are only comparable within one (containers share hostnames)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _boot_time() -> float | None:
    """Boot time in epoch seconds (Linux), to turn a process start time from /proc into wall time."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _pid_alive(pid: int, since: float | None) -> bool:
    """Whether pid names a live process that may be the one that claimed at time `since`."""
    if pid <= 0:  # os.kill(0, ...) would signal our whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return True  # cannot tell: assume alive, never steal on doubt
    # Linux: a zombie runs nothing, and a process started after the claim is a reused pid.
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    if fields[0] in ("Z", "X"):
        return False
    boot = _boot_time()
    if since is not None and boot is not None:
        try:
            start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (IndexError, ValueError, OSError):
            return True
        if start > since + 2.0:  # btime has 1 s resolution
            return False
    return True


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested spec -> {"optim.lr": 0.1, ...}; lists become JSON strings so every column is scalar."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple, dict)):
            out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = v
    return out


def _as_ids(run_ids: str | Iterable[str]) -> list[str]:
    """Accept one id or many (a bare string is one id, not its characters)."""
    return [run_ids] if isinstance(run_ids, str) else list(run_ids)


def _open_store(path: str, lease: float, timeout: float) -> Store:
    """Unpickling helper: a Store travels to another process as its path and reopens there."""
    return Store(path, lease=lease, timeout=timeout)


class Store:
    """A run store in one SQLite file, with checkpoints in a folder beside it."""

    def __init__(self, path: str | os.PathLike, *, lease: float = DEFAULT_LEASE, timeout: float = 60.0):
        """Open (creating if needed) the store at path; `lease` and `timeout` (busy wait, s) as documented."""
        self.path = Path(path).expanduser().absolute()
        self.artifacts = self.path.with_name(self.path.stem + "_artifacts")
        self.lease = float(lease)
        self.timeout = float(timeout)
        self._lock = threading.RLock()  # one connection, shared by threads one at a time
        self._conn: sqlite3.Connection | None = None
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
            code = getattr(e, "sqlite_errorcode", None)
            if code == sqlite3.SQLITE_NOTADB or "not a database" in str(e):
                what = "is not a SQLite database; expected a batchscope run store"
            elif code == getattr(sqlite3, "SQLITE_CORRUPT", 11):
                what = "is a corrupted SQLite database; expected a batchscope run store"
            else:
                what = f"cannot be opened as a batchscope run store ({e})"
            raise BatchscopeError(f"{self.path}: {what}") from None
        except BaseException:
            self.close()
            raise

    # -- connection and transactions ------------------------------------------------------------

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

    # -- runs -------------------------------------------------------------------------------------

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

    def claim(
        self, run_id: str, provenance: dict, *, retry_failed: bool = True, lease: float | None = None
    ) -> bool:
        """Atomically make the run `running` for this process if it is claimable; True if claimed.

        Claimable: `pending`; `failed` when retry_failed; `running` but stale. A running claim is stale when
        (a) it was made on this machine (same hostname and PID namespace) by a process that is gone (dead,
        zombie, or its pid since reused by a later process), or (b) its heartbeat -- the claim, or the last
        log_metrics / save_checkpoint -- is older than `lease` seconds (default: the Store's lease,
        DEFAULT_LEASE; math.inf disables it). `done` and `diverged` runs are never claimed (reset them first).
        A claim records provenance, start time, host and pid, and counts an attempt. Metrics and checkpoints
        of earlier attempts are kept, for resuming (see latest_checkpoint and truncate_metrics).
        """
        lease = self.lease if lease is None else float(lease)
        prov = _canonical(provenance)
        version = provenance.get("batchscope_version") if isinstance(provenance, dict) else None
        with self._write() as c:
            row = c.execute(
                "SELECT status, host, pid, pid_ns, started, heartbeat FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"unknown run {run_id!r} in {self.path}")
            status, host, pid, pid_ns, started, heartbeat = row
            now = time.time()
            if status in ("done", "diverged") or (status == "failed" and not retry_failed):
                return False
            if status == "running" and not self._stale(host, pid, pid_ns, started, heartbeat, lease, now):
                return False
            c.execute(
                "UPDATE runs SET status = 'running', started = ?, finished = NULL, seconds = NULL, "
                "error = NULL, final = '{}', diverged_step = NULL, provenance = ?, version = ?, "
                "host = ?, pid = ?, pid_ns = ?, heartbeat = ?, attempts = attempts + 1 WHERE run_id = ?",
                (now, prov, version, _HOST, os.getpid(), _pid_ns(), now, run_id),
            )
        self._clean_temporaries(run_id)
        return True

    def update_provenance(self, run_id: str, values: dict) -> None:
        """Merge `values` into a run's provenance (where a remote worker trained a claimed run, say)."""
        with self._write() as c:
            row = c.execute("SELECT provenance FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown run {run_id!r} in {self.path}")
            merged = {**json.loads(row[0]), **values}
            c.execute("UPDATE runs SET provenance = ? WHERE run_id = ?", (_canonical(merged), run_id))
            self._touch(c, run_id)

    @staticmethod
    def _stale(
        host: str | None, pid: int | None, pid_ns: str | None, started: float | None,
        heartbeat: float | None, lease: float, now: float,
    ) -> bool:
        """Whether a running claim may be taken over (see claim)."""
        last = heartbeat if heartbeat is not None else started
        if last is None or now - last > lease:
            return True
        if host == _HOST and pid is not None and (pid_ns is None or pid_ns == _pid_ns()):
            return not _pid_alive(pid, started)
        return False  # another machine's process: only the lease can tell

    def release(self, run_id: str) -> bool:
        """Give a running run back (to `pending`), e.g. on Ctrl-C in a process that lives on; True if released."""
        with self._write() as c:
            cur = c.execute(
                "UPDATE runs SET status = 'pending', heartbeat = NULL WHERE run_id = ? AND status = 'running'",
                (run_id,),
            )
            return cur.rowcount == 1

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

    # -- checkpoints ------------------------------------------------------------------------------

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

    # -- export -----------------------------------------------------------------------------------

    def export(self, path: str | os.PathLike, fmt: str | None = None, run_ids: Iterable[str] | None = None) -> Path:
        """Write metrics wide (one row per run and step) with run_id, status, group, spec columns; the path.

        Columns: run_id, status, group, the flattened spec ("optim.lr"; lists as JSON), step, epoch, then one
        column per metric name. A spec key that collides with those names is prefixed "spec.", a metric
        named like a run column "metric.". A metric not logged at a step is empty (null); NaN stays NaN.
        fmt is "csv" or "parquet" (default: from the suffix). The file is replaced atomically.
        """
        out = Path(path).expanduser()
        if fmt is None:
            fmt = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(out.suffix.lower())
            if fmt is None:
                raise BatchscopeError(f"{out}: cannot tell the export format from the suffix; use .csv or .parquet")
        if fmt not in ("csv", "parquet"):
            raise BatchscopeError(f"{out}: unknown export format {fmt!r}; expected 'csv' or 'parquet'")
        if fmt == "parquet":
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise BatchscopeError(
                    f"{out}: Parquet export needs pyarrow (pip install 'batchscope[parquet]'), or export to .csv"
                ) from None

        columns, rows, n_metrics = self._wide(run_ids)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            if fmt == "csv":
                with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    w.writerow(columns)
                    w.writerows(["" if v is None else v for v in r] for r in rows)
            else:
                os.close(fd)
                n_fixed = len(columns) - n_metrics
                arrays = []
                for j, name in enumerate(columns):
                    values = [r[j] for r in rows]
                    if j >= n_fixed:  # metrics: always float64, so NaN and null stay distinct
                        arrays.append(pa.array(values, type=pa.float64()))
                    elif name == "step":
                        arrays.append(pa.array(values, type=pa.int64()))
                    else:
                        try:
                            arrays.append(pa.array(values))
                        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                            # Mixed types across runs (a number here, a string there): keep it readable.
                            arrays.append(pa.array([None if v is None else str(v) for v in values]))
                pq.write_table(pa.table(arrays, names=columns), tmp)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return out

    def _wide(self, run_ids: Iterable[str] | None) -> tuple[list[str], list[list[Any]], int]:
        """Columns, rows and number of (trailing) metric columns of the wide export, from one snapshot."""
        with self._read() as c:
            if run_ids is None:
                records = [
                    RunRecord._from_row(r)
                    for r in c.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created, rowid")
                ]
            else:
                records = []
                for run_id in dict.fromkeys(_as_ids(run_ids)):
                    row = c.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                    if row is None:
                        raise KeyError(f"unknown run {run_id!r} in {self.path}")
                    records.append(RunRecord._from_row(row))
            per_run = []
            metric_names: dict[str, None] = {}
            for rec in records:
                steps: dict[int, dict[str, Any]] = {}
                for name, step, value, epoch in c.execute(
                    "SELECT name, step, value, epoch FROM metrics WHERE run_id = ? ORDER BY step, name",
                    (rec.run_id,),
                ):
                    metric_names.setdefault(name)
                    cell = steps.setdefault(step, {"epoch": None})
                    cell[name] = _value(value)
                    if epoch is not None:
                        cell["epoch"] = epoch
                per_run.append((rec, _flatten(rec.spec), steps))

        fixed = ["run_id", "status", "group"]
        metric_cols = {n: (f"metric.{n}" if n in fixed + ["step", "epoch"] else n) for n in metric_names}
        taken = set(fixed) | {"step", "epoch"} | set(metric_cols.values())
        spec_keys: dict[str, None] = {}
        for _, flat, _ in per_run:
            spec_keys.update(dict.fromkeys(flat))
        spec_cols = {k: (f"spec.{k}" if k in taken else k) for k in spec_keys}

        columns = fixed + list(spec_cols.values()) + ["step", "epoch"] + list(metric_cols.values())
        rows: list[list[Any]] = []
        for rec, flat, steps in per_run:
            head = [rec.run_id, rec.status, rec.group] + [flat.get(k) for k in spec_cols]
            for step in sorted(steps):
                cell = steps[step]
                rows.append(head + [step, cell["epoch"]] + [cell.get(n) for n in metric_cols])
        return columns, rows, len(metric_cols)
