"""Run store: lifecycle, metrics, checkpoints, export and errors, in one process."""

from __future__ import annotations

import csv
import math
import os
import socket
import sqlite3
import sys
import time

import numpy as np
import pytest
import torch

from batchscope.errors import BatchscopeError
from batchscope.store import STATUSES, RunRecord, Store, provenance

SPEC_A = {"model": "mlp", "optim": {"name": "sgd", "lr": 0.1}, "batch_size": 32, "widths": [64, 64]}
SPEC_B = {"model": "mlp", "optim": {"name": "sgd", "lr": 0.05}, "batch_size": 128, "widths": [64, 64]}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "runs.db") as s:
        yield s


@pytest.fixture(scope="module")
def prov():
    return provenance("cpu", "float32")


# -- lifecycle -------------------------------------------------------------------------------------


def test_lifecycle(store, prov):
    assert STATUSES == ("pending", "running", "done", "diverged", "failed")
    assert store.add_run("a", SPEC_A, group="sweep1") is True
    assert store.add_run("b", SPEC_B) is True
    # Same spec, keys in another order: not new, not duplicated.
    assert store.add_run("a", dict(reversed(list(SPEC_A.items())))) is False
    assert [r.run_id for r in store.runs()] == ["a", "b"]
    assert store.get_run("missing") is None

    rec = store.get_run("a")
    assert isinstance(rec, RunRecord)
    assert (rec.status, rec.group, rec.spec, rec.attempts) == ("pending", "sweep1", SPEC_A, 0)
    assert rec.started is None and rec.finished is None and rec.version is None
    assert [r.run_id for r in store.runs(group="sweep1")] == ["a"]

    assert store.claim("a", prov) is True
    assert store.claim("a", prov) is False  # running, held by this live process
    rec = store.get_run("a")
    assert rec.status == "running" and rec.attempts == 1 and rec.started is not None
    assert rec.pid == os.getpid() and rec.provenance == prov and rec.version == prov["batchscope_version"]

    store.finish("a", "done", final={"loss": 0.25, "acc": torch.tensor(0.5)}, seconds=1.5)
    rec = store.get_run("a")
    assert (rec.status, rec.final, rec.seconds, rec.error) == ("done", {"loss": 0.25, "acc": 0.5}, 1.5, None)
    assert rec.finished >= rec.started
    assert store.claim("a", prov) is False  # a sweep run twice trains nothing twice
    with pytest.raises(ValueError, match="already done"):
        store.finish("a", "failed", error="late worker")
    assert store.get_run("a").status == "done"

    assert store.claim("b", prov)
    store.finish("b", "diverged", diverged_step=17, final={"loss": float("nan")})
    rec = store.get_run("b")
    assert rec.status == "diverged" and rec.diverged_step == 17 and math.isnan(rec.final["loss"])
    assert rec.seconds is not None and rec.seconds >= 0  # defaults to finished - started
    assert store.claim("b", prov) is False
    assert [r.run_id for r in store.runs(status=["done", "diverged"])] == ["a", "b"]
    assert store.runs(status="pending") == []
    with pytest.raises(ValueError):
        store.runs(status="finished")
    with pytest.raises(ValueError):
        store.finish("b", "running")


def test_add_run_conflicting_spec(store):
    store.add_run("a", SPEC_A)
    with pytest.raises(ValueError, match="different spec"):
        store.add_run("a", SPEC_B)
    assert store.get_run("a").spec == SPEC_A
    assert len(store.runs()) == 1


def test_failed_retry_and_release(store, prov):
    store.add_run("a", SPEC_A)
    assert store.claim("a", prov)
    store.finish("a", "failed", error="RuntimeError: boom")
    assert store.get_run("a").error == "RuntimeError: boom"
    assert store.claim("a", prov, retry_failed=False) is False
    assert store.claim("a", prov) is True
    rec = store.get_run("a")
    assert (rec.status, rec.attempts, rec.error) == ("running", 2, None)
    assert store.release("a") is True  # e.g. Ctrl-C in a notebook: the kernel lives on
    assert store.get_run("a").status == "pending"
    assert store.release("a") is False
    assert store.claim("a", prov) and store.get_run("a").attempts == 3
    with pytest.raises(KeyError):
        store.claim("nope", prov)


def test_stale_claim_by_lease_and_dead_pid(store, prov, tmp_path):
    store.add_run("a", SPEC_A)
    assert store.claim("a", prov)
    raw = sqlite3.connect(tmp_path / "runs.db")
    try:
        # Held on another machine, heartbeat fresh: only the lease could free it.
        with raw:
            raw.execute("UPDATE runs SET host = 'elsewhere', heartbeat = ? WHERE run_id = 'a'", (time.time(),))
        assert store.claim("a", prov) is False
        with raw:
            raw.execute("UPDATE runs SET heartbeat = ? WHERE run_id = 'a'", (time.time() - 120,))
        assert store.claim("a", prov, lease=math.inf) is False
        assert store.claim("a", prov, lease=60) is True
        assert store.get_run("a").attempts == 2
        # Logging metrics keeps the lease alive.
        with raw:
            raw.execute("UPDATE runs SET host = 'elsewhere', heartbeat = ? WHERE run_id = 'a'", (time.time() - 120,))
        store.log_metrics("a", 0, {"loss": 1.0})
        assert store.claim("a", prov, lease=60) is False
        # Held on this machine by a pid that no longer exists.
        with raw:
            raw.execute("UPDATE runs SET host = ?, pid = ? WHERE run_id = 'a'", (socket.gethostname(), 2**22 + 1))
        assert store.claim("a", prov) is True
        assert store.get_run("a").attempts == 3
    finally:
        raw.close()


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_round_trip_replace_truncate(store):
    store.add_run("a", SPEC_A)
    for step in range(10):
        store.log_metrics("a", step, {"loss": 1.0 / (step + 1), "acc": step / 10}, epoch=step / 5)
    store.log_metrics("a", 9, {"val_loss": float("nan")})
    store.log_metrics("a", 8, {"val_loss": float("inf")})
    m = store.metrics("a")
    assert set(m) == {"loss", "acc", "val_loss"}
    assert m["loss"] == [(s, 1.0 / (s + 1)) for s in range(10)]
    assert m["val_loss"][0] == (8, math.inf) and m["val_loss"][1][0] == 9 and math.isnan(m["val_loss"][1][1])

    # A resumed run replays steps 5..9: values replaced, no duplicates.
    for step in range(5, 10):
        store.log_metrics("a", step, {"loss": -step})
    m = store.metrics("a", names=["loss", "nope"])
    assert m["nope"] == [] and len(m["loss"]) == 10
    assert m["loss"][5:] == [(s, -s) for s in range(5, 10)] and m["loss"][4] == (4, 0.2)

    store.truncate_metrics("a", after_step=6)
    m = store.metrics("a")
    assert max(s for s, _ in m["loss"]) == 6 and "val_loss" not in m
    store.truncate_metrics("a", after_step=-1)
    assert store.metrics("a") == {}


def test_log_metrics_many_is_one_transaction(store):
    store.add_run("a", SPEC_A)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    store.log_metrics_many("a", [(s, s / 100, {"loss": float(s), "lr": 0.1}) for s in range(500)])
    store._conn.set_trace_callback(None)
    assert sum(st.startswith("BEGIN") for st in statements) == 1
    assert sum(st == "COMMIT" for st in statements) == 1
    assert [v for _, v in store.metrics("a")["loss"]] == [float(s) for s in range(500)]
    # A bad value anywhere: nothing of the batch is written.
    with pytest.raises(TypeError, match="bad"):
        store.log_metrics_many("a", [(1000, None, {"loss": 1.0}), (1001, None, {"bad": "x"})])
    assert len(store.metrics("a")["loss"]) == 500
    with pytest.raises(KeyError):
        store.log_metrics("unknown", 0, {"loss": 1.0})


# -- checkpoints -----------------------------------------------------------------------------------


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    legacy = np.random.RandomState(seed).get_state()
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
        "step": seed,
        "lr": 0.1,
        "name": "resume",
        "history": [1.0, 2.0, {"nested": [3, "x"]}],
        "torch_rng": torch.get_rng_state(),
        "gen": g.get_state(),
        "numpy_rng": rng.bit_generator.state,  # dict of str and (128-bit) ints
        "numpy_legacy": [legacy[0], torch.from_numpy(legacy[1].astype(np.int64)), *legacy[2:]],
    }


def test_checkpoint_round_trip_weights_only(store):
    store.add_run("a", SPEC_A)
    state = _state(3)
    path = store.save_checkpoint("a", "resume-3", state, step=3)
    assert path.is_file() and path.parent == store.artifacts / "a"
    loaded = store.load_checkpoint("a", "resume-3")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["numpy_rng"] == state["numpy_rng"] and loaded["history"] == state["history"]
    assert torch.equal(loaded["numpy_legacy"][1], state["numpy_legacy"][1])
    # Restored generator states reproduce the streams.
    g = torch.Generator()
    g.set_state(loaded["gen"])
    g2 = torch.Generator()
    g2.set_state(state["gen"])
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=g2))
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded["numpy_rng"]
    assert rng.random() == np.random.default_rng(3).random()
    legacy = np.random.RandomState()
    legacy.set_state((loaded["numpy_legacy"][0], loaded["numpy_legacy"][1].numpy().astype(np.uint32),
                      *loaded["numpy_legacy"][2:]))
    assert legacy.rand() == np.random.RandomState(3).rand()


def test_checkpoint_tags_overwrite_latest_delete(store):
    store.add_run("a", SPEC_A)
    store.save_checkpoint("a", "resume", {"v": torch.tensor(1)}, step=10)
    store.save_checkpoint("a", "resume", {"v": torch.tensor(2)}, step=20)  # same tag overwrites
    store.save_checkpoint("a", "best", {"v": torch.tensor(3)}, step=15)
    store.save_checkpoint("a", "resume-old", {"v": torch.tensor(4)}, step=5)
    assert store.checkpoints("a") == [("resume-old", 5), ("best", 15), ("resume", 20)]
    assert store.load_checkpoint("a", "resume")["v"].item() == 2
    assert store.latest_checkpoint("a") == ("resume", 20)
    assert store.latest_checkpoint("a", prefix="best") == ("best", 15)
    assert store.latest_checkpoint("a", prefix="final") is None
    store.delete_checkpoint("a", "resume")
    store.delete_checkpoint("a", "resume")  # idempotent
    assert not (store.artifacts / "a" / "resume.pt").exists()
    assert store.latest_checkpoint("a") == ("resume-old", 5)
    with pytest.raises(KeyError):
        store.load_checkpoint("a", "resume")
    with pytest.raises(ValueError):
        store.save_checkpoint("a", "../evil", {}, step=0)
    with pytest.raises(KeyError):
        store.save_checkpoint("unknown", "resume", {}, step=0)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_checkpoint_failed_save_keeps_previous(store, monkeypatch, exc):
    store.add_run("a", SPEC_A)
    store.save_checkpoint("a", "resume", _state(1), step=1)
    before = (store.artifacts / "a" / "resume.pt").read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")  # a partial write, then the failure
        raise exc

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(exc)):
        store.save_checkpoint("a", "resume", _state(2), step=2)
    monkeypatch.undo()

    assert (store.artifacts / "a" / "resume.pt").read_bytes() == before
    assert store.checkpoints("a") == [("resume", 1)]
    assert store.load_checkpoint("a", "resume")["step"] == 1
    assert sorted(p.name for p in (store.artifacts / "a").iterdir()) == ["resume.pt"]  # no temp left


def test_reset_deletes_metrics_and_checkpoints(store, prov):
    store.add_run("a", SPEC_A)
    store.add_run("b", SPEC_B)
    for rid in ("a", "b"):
        store.claim(rid, prov)
        store.log_metrics(rid, 0, {"loss": 1.0})
        store.save_checkpoint(rid, "resume", {"x": 1}, step=0)
        store.finish(rid, "done", final={"loss": 1.0})
    store.reset("a")
    rec = store.get_run("a")
    assert (rec.status, rec.attempts, rec.final, rec.started, rec.provenance) == ("pending", 0, {}, None, {})
    assert store.metrics("a") == {} and store.checkpoints("a") == []
    assert not (store.artifacts / "a").exists()
    assert store.get_run("b").status == "done" and store.checkpoints("b") == [("resume", 0)]
    assert store.claim("a", prov)
    with pytest.raises(KeyError):
        store.reset(["b", "nope"])
    assert store.get_run("b").status == "done"  # all or nothing


# -- export ----------------------------------------------------------------------------------------


def _fill_for_export(store: Store) -> None:
    store.add_run("a", SPEC_A, group="g")
    store.add_run("b", SPEC_B, group="g")
    store.add_run("c", {"model": "cnn"}, group="h")  # no metrics: no rows
    store.log_metrics_many("a", [(s, s / 10, {"loss": 1.0 / (s + 1), "acc": 0.1 * s}) for s in range(3)])
    store.log_metrics("a", 2, {"val_loss": float("nan")})
    store.log_metrics_many("b", [(s, None, {"loss": 2.0 + s}) for s in range(0, 40, 10)])


def test_export_csv(store, tmp_path):
    _fill_for_export(store)
    out = store.export(tmp_path / "out" / "m.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0])
    assert cols[:3] == ["run_id", "status", "group"]
    assert {"model", "optim.name", "optim.lr", "batch_size", "widths", "step", "epoch", "loss", "acc", "val_loss"} <= set(cols)
    assert cols.index("step") > cols.index("optim.lr") and cols.index("loss") > cols.index("epoch")
    assert [(r["run_id"], int(r["step"])) for r in rows] == [("a", 0), ("a", 1), ("a", 2)] + [("b", s) for s in range(0, 40, 10)]
    a1 = rows[1]
    assert float(a1["loss"]) == 0.5 and float(a1["acc"]) == 0.1 and float(a1["optim.lr"]) == 0.1 and float(a1["epoch"]) == 0.1
    assert a1["val_loss"] == "" and rows[2]["val_loss"] == "nan" and rows[3]["acc"] == ""

    sub = store.export(tmp_path / "b.csv", run_ids=["b"])
    with open(sub, newline="") as f:
        assert {r["run_id"] for r in csv.DictReader(f)} == {"b"}
    with pytest.raises(KeyError):
        store.export(tmp_path / "x.csv", run_ids=["zzz"])
    with pytest.raises(BatchscopeError, match="suffix"):
        store.export(tmp_path / "x.xlsx")


def test_export_csv_loads_in_pandas(store, tmp_path):
    pd = pytest.importorskip("pandas")  # the test extra's, not the package's
    _fill_for_export(store)
    df = pd.read_csv(store.export(tmp_path / "m.csv"))  # loads directly
    assert len(df) == 7 and df.groupby("run_id")["loss"].count().to_dict() == {"a": 3, "b": 4}
    assert df.loc[df.run_id == "b", "batch_size"].unique().tolist() == [128]


def test_export_parquet(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pd = pytest.importorskip("pandas")

    _fill_for_export(store)
    out = store.export(tmp_path / "m.parquet")
    table = pq.read_table(out)
    assert table.num_rows == 7
    d = table.to_pydict()
    assert d["run_id"] == ["a"] * 3 + ["b"] * 4 and d["step"] == [0, 1, 2, 0, 10, 20, 30]
    assert d["loss"] == [1.0, 0.5, 1 / 3, 2.0, 12.0, 22.0, 32.0]
    assert d["optim.lr"] == [0.1] * 3 + [0.05] * 4
    assert d["val_loss"][0] is None and math.isnan(d["val_loss"][2])  # missing vs NaN
    assert str(table.schema.field("loss").type) == "double" and str(table.schema.field("step").type) == "int64"
    df = pd.read_parquet(out)
    assert df.shape[0] == 7 and df["acc"].notna().sum() == 3


def test_export_parquet_without_pyarrow(store, tmp_path, monkeypatch):
    _fill_for_export(store)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(BatchscopeError, match="pyarrow"):
        store.export(tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_export_name_collisions(store, tmp_path):
    store.add_run("a", {"lr": 0.1, "step": 3})
    store.log_metrics("a", 0, {"lr": 0.05, "status": 1.0})
    out = store.export(tmp_path / "m.csv")
    with open(out, newline="") as f:
        row = next(csv.DictReader(f))
    assert row["lr"] == "0.05" and row["spec.lr"] == "0.1" and row["spec.step"] == "3"
    assert row["step"] == "0" and row["metric.status"] == "1.0" and row["status"] == "pending"


# -- files and errors ------------------------------------------------------------------------------


def test_reopen_persists_and_pickles(tmp_path, prov):
    import pickle

    path = tmp_path / "deep" / "er" / "runs.db"
    with Store(path) as s:
        s.add_run("a", SPEC_A)
        s.claim("a", prov)
        s.log_metrics("a", 1, {"loss": 0.5})
        s2 = pickle.loads(pickle.dumps(s))
    try:
        assert s2.get_run("a").status == "running" and s2.metrics("a") == {"loss": [(1, 0.5)]}
        assert s2.artifacts == tmp_path / "deep" / "er" / "runs_artifacts"
        (version,) = sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchone()
        assert version == 1
    finally:
        s2.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.get_run("a")


def test_not_a_sqlite_file(tmp_path):
    bad = tmp_path / "notes.db"
    content = b"these are my notes, not a database\n" * 100
    bad.write_bytes(content)
    with pytest.raises(BatchscopeError) as info:
        Store(bad)
    msg = str(info.value)
    assert str(bad) in msg and "not a SQLite database" in msg and "\n" not in msg
    assert bad.read_bytes() == content  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_foreign_sqlite_and_unknown_schema(tmp_path):
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    with pytest.raises(BatchscopeError, match="not a batchscope run store"):
        Store(other)

    newer = tmp_path / "newer.db"
    Store(newer).close()
    c = sqlite3.connect(newer)
    c.execute("UPDATE schema_version SET version = 99")
    c.commit()
    c.close()
    with pytest.raises(BatchscopeError, match="version 99") as info:
        Store(newer)
    assert str(newer) in str(info.value)


def test_uncreatable_parent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BatchscopeError) as info:
        Store(blocker / "sub" / "runs.db")
    assert str(blocker / "sub" / "runs.db") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BatchscopeError, match="folder"):
        Store(tmp_path)


def test_provenance_fields(prov):
    import batchscope

    assert prov["batchscope_version"] == batchscope.__version__
    assert prov["torch_version"] == str(torch.__version__)
    assert prov["device"] == "cpu" and prov["dtype"] == "float32"
    assert prov["num_threads"] == torch.get_num_threads()
    for key in ("python_version", "platform", "hostname", "git_commit"):
        assert key in prov
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40


def test_same_run_registered_with_other_labels_is_the_same_run(tmp_path):
    with Store(tmp_path / "s.db") as st:
        assert st.add_run("r1", {"name": "a", "tags": {"x": 1}, "optim": {"lr": 0.1}})
        assert not st.add_run("r1", {"name": "b", "tags": {"y": 2}, "optim": {"lr": 0.1}})
        assert st.get_run("r1").spec["name"] == "a"
        with pytest.raises(ValueError, match="different spec"):
            st.add_run("r1", {"name": "a", "tags": {"x": 1}, "optim": {"lr": 0.2}})


def test_a_run_stored_before_a_field_was_added_is_the_same_run(tmp_path):
    from batchscope.spec import RunSpec

    spec = RunSpec.model_validate({"data": {"name": "gaussian_mixture"}, "train": {"stop": {"patience": 3}}})
    old = spec.model_dump(mode="json")
    del old["train"]["stop"]["reduce_lr"], old["train"]["stop"]["reductions"]  # as an older version stored it
    with Store(tmp_path / "s.db") as store:
        assert store.add_run(spec.run_id(), old)
        assert not store.add_run(spec.run_id(), spec.model_dump(mode="json"))  # no "different spec" error
        changed = spec.model_dump(mode="json")
        changed["train"]["stop"]["reduce_lr"] = 0.5
        with pytest.raises(ValueError, match="different spec"):
            store.add_run(spec.run_id(), changed)
