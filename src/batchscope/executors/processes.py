"""Runs in a pool of worker processes, one per core: the executor for CPUs.

The parent claims each run (with its own pid, so a killed sweep's claims are stale at once and the next
call takes them over), hands it to a worker, and is the store's only writer: a worker trains with the
serial loop (`train_run`) against a relay that reads the store directly but sends every write (metrics,
checkpoints, truncation on resume) to the parent through one queue, in order, so a resume checkpoint is
never recorded before the metrics that precede it. Workers run `max(1, cores // workers)` threads each.

Interruptions: Ctrl-C releases the runs in flight (they resume from their last checkpoint on the next call)
and kills the workers; a killed parent takes its workers with it (they watch their parent) and leaves its
claims to the dead-pid test. A worker that dies (out of memory) fails the runs in flight, which the next
call retries; the remaining runs go on in a fresh pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from ..factories import resolve_device
from ..runs import Claims, OnRunStart, SweepSummary
from ..spec import RunSpec
from ..store import Store, provenance
from .relay import Relay, apply_write, train_relayed

_relay: Relay | None = None  # the worker's end, set by _init_worker


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init_worker(store: Store, q: mp.Queue, threads: int, parent: int) -> None:
    """Worker start: its thread budget, no Ctrl-C (the parent handles it), and death with its parent."""
    global _relay
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _relay = Relay(store, q.put)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # orphaned: the parent was killed, and its claims will be taken over

    threading.Thread(target=watch, daemon=True).start()


def _train(spec_json: str, run_id: str) -> None:
    """Worker task: train one claimed run; its outcome goes through the queue after all its writes."""
    assert _relay is not None
    train_relayed([RunSpec.model_validate_json(spec_json)], [run_id], _relay)


def _kill(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now, without waiting for the runs in its workers."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.kill()
    for p in procs:
        p.join(timeout=5)


class ProcessExecutor:
    """Up to `workers` runs at a time, each in its own process with `threads` threads."""

    name = "processes"
    remote = False

    def __init__(self, workers: int | None = None, reason: str = "asked for") -> None:
        cores = usable_cores()
        self.workers = max(1, workers or cores)
        self.threads = max(1, cores // self.workers)
        self.reason = reason

    def run(self, store: Store, runs: Sequence[RunSpec], on_progress: OnRunStart | None = None) -> SweepSummary:
        """Train every run not done or diverged; returns what happened to each."""
        claims = Claims(store, SweepSummary(total=len(runs), executor=self.name))
        todo = deque(enumerate(runs))
        inflight: dict[str, tuple[Future, object]] = {}  # run id -> (its task, its progress callback)
        pool: ProcessPoolExecutor | None = None
        q: mp.Queue | None = None
        try:
            while todo or inflight:
                while todo and len(inflight) < self.workers:
                    i, spec = todo[0]
                    if spec.train.warm_start is not None and inflight:
                        break  # its source may still be training: sources come first in a sweep's order
                    todo.popleft()
                    run_id = spec.run_id()
                    if not claims.claim(run_id, self._provenance(spec)):
                        continue
                    if pool is None:
                        ctx = mp.get_context("spawn")
                        q = ctx.Queue()
                        pool = ProcessPoolExecutor(
                            self.workers, mp_context=ctx, initializer=_init_worker,
                            initargs=(store, q, self.threads, os.getpid()),
                        )  # fmt: skip
                    callback = on_progress(i, len(runs), spec) if on_progress else None
                    try:
                        inflight[run_id] = (pool.submit(_train, spec.model_dump_json(), run_id), callback)
                    except BrokenProcessPool as err:  # broke since the last look: retry this run in a new pool
                        claims.release([run_id])
                        todo.appendleft((i, spec))
                        claims.fail(inflight, f"worker process died: {err!r}")
                        inflight.clear()
                        _kill(pool)
                        pool = q = None
                if not inflight:
                    continue
                assert pool is not None and q is not None
                if self._serve(claims, q, inflight):
                    _kill(pool)  # a dead worker broke the pool: its queue may hold half a message
                    pool = q = None
        except BaseException:
            claims.release()  # the runs in flight: resumed from their last checkpoints next time
            if pool is not None:
                _kill(pool)
            raise
        if pool is not None:
            pool.shutdown()
        return claims.summary

    def _serve(self, claims: Claims, q: mp.Queue, inflight: dict) -> bool:
        """Write one message from the workers to the store; True if the pool broke (runs in flight failed)."""
        try:
            kind, run_id, *body = q.get(timeout=0.2)
        except queue_mod.Empty:
            errors = {r: f.exception() for r, (f, _) in inflight.items() if f.done() and f.exception() is not None}
            broken = [e for e in errors.values() if isinstance(e, BrokenProcessPool)]
            if broken:  # every run in flight is lost with the pool
                claims.fail(inflight, f"worker process died: {broken[0]!r}")
                inflight.clear()
            for run_id, error in errors.items() if not broken else ():  # a task that raised outside train_run
                claims.fail([run_id], repr(error))
                del inflight[run_id]
            return bool(broken)
        if apply_write(claims.store, (kind, run_id, *body)):
            return False
        if kind == "progress":
            callback = inflight[run_id][1]
            if callback is not None:
                callback(*body[0])
        elif kind == "result":
            claims.record(run_id, body[0])
            del inflight[run_id]
        elif kind == "failed":
            claims.fail([run_id], body[0])
            del inflight[run_id]
        return False

    def _provenance(self, spec: RunSpec) -> dict:
        prov = provenance(str(resolve_device(spec.train.device)), spec.train.dtype)
        return {**prov, "num_threads": self.threads, "executor": self.name}
