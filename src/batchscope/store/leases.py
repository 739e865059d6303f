"""Claims: which process trains a run, and when its claim is stale (a dead pid, or an expired lease)."""

from __future__ import annotations

import functools
import os
import socket
import time

from .checkpoints import Checkpoints
from .records import _canonical

# A running claim whose last heartbeat (claim, metrics or checkpoint write) is older than this is stale,
# whichever machine holds it. Generous, because stealing a live run would train it twice; override per
# Store or per claim (math.inf disables it, leaving only the dead-pid test).
DEFAULT_LEASE = 2 * 3600.0
_HOST = socket.gethostname()


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


class Leases(Checkpoints):
    """claim and release (a claim cleans the temporary files a killed checkpoint save left)."""

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
