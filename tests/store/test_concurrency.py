"""Run store across processes: exclusive claims, stale claims, concurrent writers.

Workers live in this module and it imports no torch at the top, so spawned children start fast.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import sqlite3

import pytest

from batchscope.store import Store

PROV = {"batchscope_version": "test", "device": "cpu", "dtype": "float32"}
CTX = mp.get_context("spawn")


def _claimer(path: str, run_ids: list[str], seed: int, start, done, results) -> None:
    """Claim what it can, in its own order, starting together with the others."""
    ids = list(run_ids)
    random.Random(seed).shuffle(ids)
    with Store(path) as s:
        start.wait()
        won = [rid for rid in ids if s.claim(rid, PROV)]
        results.put((os.getpid(), won))
        # Stay alive until everyone has tried: a dead claimer's runs would rightly be stale.
        done.wait()


def _holder(path: str, run_id: str, claimed, release) -> None:
    """Claim a run, then either die holding it or wait to be told to go."""
    with Store(path) as s:
        claimed.put(s.claim(run_id, PROV))
        if release is None:
            claimed.close()
            claimed.join_thread()  # flush the queue's feeder thread before dying
            os._exit(0)  # a crash: no finish, no close
        release.wait()


def _writer(store: Store, run_id: str, worker: int, steps: int) -> None:
    """Log many metrics, one transaction per step, into its own run and a shared one."""
    with store:  # the Store arrived pickled (path only) and reopened here
        for step in range(steps):
            store.log_metrics(run_id, step, {f"m{k}": step * 10 + k for k in range(5)}, epoch=step / steps)
            store.log_metrics("shared", step, {f"w{worker}": float(step)})
        store.log_metrics_many(run_id, [(steps + i, None, {"tail": float(i)}) for i in range(200)])


def _join(procs) -> None:
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_claim_is_exclusive_across_processes(tmp_path):
    path = str(tmp_path / "runs.db")
    run_ids = [f"r{i:02d}" for i in range(20)]
    with Store(path) as s:
        for rid in run_ids:
            s.add_run(rid, {"i": rid})
    n = 4
    start, done, results = CTX.Barrier(n + 1), CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_claimer, args=(path, run_ids, i, start, done, results)) for i in range(n)]
    for p in procs:
        p.start()
    start.wait(timeout=60)
    outcomes = [results.get(timeout=60) for _ in range(n)]
    done.set()
    _join(procs)

    won = [rid for _, ids in outcomes for rid in ids]
    assert sorted(won) == run_ids  # every run claimed exactly once
    with Store(path) as s:
        recs = s.runs()
        assert all(r.status == "running" and r.attempts == 1 for r in recs)
        owner = {rid: pid for pid, ids in outcomes for rid in ids}
        assert all(r.pid == owner[r.run_id] for r in recs)


def test_stale_running_is_reclaimed_live_one_is_not(tmp_path):
    path = str(tmp_path / "runs.db")
    with Store(path) as s:
        s.add_run("live", {"i": 0})
        s.add_run("dead", {"i": 1})
    claimed, release = CTX.Queue(), CTX.Event()
    live = CTX.Process(target=_holder, args=(path, "live", claimed, release))
    dead = CTX.Process(target=_holder, args=(path, "dead", claimed, None))
    live.start()
    dead.start()
    assert claimed.get(timeout=60) and claimed.get(timeout=60)
    dead.join(timeout=60)
    with Store(path) as s:
        assert s.claim("live", PROV) is False  # its holder is alive
        assert s.claim("dead", PROV) is True  # its holder crashed
        rec = s.get_run("dead")
        assert rec.attempts == 2 and rec.pid == os.getpid() and rec.status == "running"
        release.set()
        live.join(timeout=60)
        assert live.exitcode == 0
        assert s.claim("live", PROV) is True  # gone without finishing: stale now
        assert s.get_run("live").attempts == 2


def test_concurrent_writers(tmp_path):
    path = tmp_path / "runs.db"
    steps = 150
    with Store(path) as s:
        for rid in ("w0", "w1", "shared"):
            s.add_run(rid, {"id": rid})
        procs = [CTX.Process(target=_writer, args=(s, f"w{i}", i, steps)) for i in range(2)]
    for p in procs:
        p.start()
    _join(procs)
    with Store(path) as s:
        for i in range(2):
            m = s.metrics(f"w{i}")
            assert set(m) == {f"m{k}" for k in range(5)} | {"tail"}
            assert all(len(m[f"m{k}"]) == steps for k in range(5)) and len(m["tail"]) == 200
            assert m["m3"][7] == (7, 73.0)
        shared = s.metrics("shared")
        assert shared["w0"] == shared["w1"] == [(k, float(k)) for k in range(steps)]
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert raw.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 2 * (5 * steps + 200) + 2 * steps
    finally:
        raw.close()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_store_inherited_through_fork(tmp_path):
    """A forked child must not reuse the parent's SQLite connection: it opens its own."""
    with Store(tmp_path / "runs.db") as s:
        s.add_run("a", {"i": 0})
        s.log_metrics("a", 0, {"loss": 1.0})
        p = mp.get_context("fork").Process(target=_fork_child, args=(s,))
        p.start()
        p.join(timeout=60)
        assert p.exitcode == 0
        assert s.metrics("a")["loss"] == [(0, 1.0), (1, 0.5)]  # parent's connection still works
        s.log_metrics("a", 2, {"loss": 0.25})
        assert len(s.metrics("a")["loss"]) == 3


def _fork_child(s: Store) -> None:
    s.log_metrics("a", 1, {"loss": 0.5})
    s.close()
