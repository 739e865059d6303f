"""Sinks: TensorBoard event files and MLflow runs read back, from a training run, a user's loop and `export`."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchscope.errors import BatchscopeError
from batchscope.probes import TrajectoryProbes
from batchscope.sinks import MissingExtraError, MLflowSink, TensorBoardSink, as_tracking_uri, mlflow_name
from batchscope.spec import RunSpec
from batchscope.store import Store
from batchscope.train import train_run
from helpers import cli

TINY = {
    "data": {"name": "gaussian_mixture", "n_train": 128, "n_test": 64, "options": {"dim": 8, "num_classes": 4}},
    "model": {"name": "mlp", "width": 0.05, "depth": 2},
    "optim": {"lr": 0.05},
    "train": {"batch_size": 32, "epochs": 2},  # 8 steps
    "log": {"log_points": 4},
    # a probe whose label MLflow would refuse in a name ('=')
    "probes": [{"instrument": "grad_norm", "schedule": "every", "every": 4, "subset": 64, "options": {"label": "b=32"}}],
}


def tb_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard run folder, as TensorBoard itself reads it (tensor-valued scalars)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if not tag.startswith("_hparams_")}


def tb_hparams(logdir) -> dict:
    """The settings TensorBoard's HParams tab shows for a run folder, and the session's end status."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    out: dict = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                out[k] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
        if data.HasField("session_end_info"):
            out["_status"] = api_pb2.Status.Name(data.session_end_info.status)
        if data.HasField("experiment"):
            out["_metrics"] = sorted(m.name.tag for m in data.experiment.metric_infos)
    return out


def mlflow_history(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Equal step by step, NaN equal to NaN."""
    return len(a) == len(b) and all(s == t and (u == v or (math.isnan(u) and math.isnan(v))) for (s, u), (t, v) in zip(a, b))


@pytest.fixture
def file_store(monkeypatch):
    """MLflow 3 refuses its file store unless told to allow it (it prefers SQLite)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def test_train_run_sends_every_row_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from batchscope.probes import probes_for

    spec = RunSpec.model_validate(TINY)
    store = Store(tmp_path / "s.db")
    store.add_run(spec.run_id(), spec.model_dump(mode="json"))
    with TensorBoardSink(tmp_path / "tb", hparams=spec.model_dump(mode="json")) as tb:
        result = train_run(spec, store, callbacks=probes_for(spec), sinks=[tb])
    stored = store.metrics(spec.run_id())
    got = tb_scalars(tmp_path / "tb")
    assert set(got) == set(stored) and "grad_norm_b=32" in got
    for name, series in stored.items():  # double precision: what TensorBoard reads is what the store holds
        assert same(got[name], series), name
    assert [s for s, _ in got["grad_norm_b=32"]] == [0, 4, 8] and result.steps == 8
    hp = tb_hparams(tmp_path / "tb")
    assert hp["optim.lr"] == 0.05 and hp["train.batch_size"] == 32 and hp["_status"] == "STATUS_SUCCESS"
    assert "train_loss" in hp["_metrics"]


def test_user_loop_with_a_dataloader_logs_probes_to_mlflow(tmp_path, file_store):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    torch.manual_seed(0)
    x, y = torch.randn(200, 8), torch.randint(0, 4, (200,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    uri = f"file:{tmp_path / 'mlruns'}"
    sink = MLflowSink(uri, "user-loop", "sgd", params={"lr": 0.1, "model": {"width": 16}}, tags={"who": "test"})
    probes = TrajectoryProbes(["grad_norm", {"instrument": "hessian_top", "options": {"hvp_method": "double_backward"}}],
                              schedule=3, subset=50, sinks=[sink])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = 0
    for xb, yb in loader:
        probes.step(step, model, F.cross_entropy, loader)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        step += 1
    sink.close()

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([sink.experiment_id])
    assert run.info.run_name == "sgd" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "model.width": "16"} and run.data.tags["who"] == "test"
    for name in ("grad_norm", "hessian_lambda_1", "probe_seconds_grad_norm"):
        assert same(mlflow_history(client, run.info.run_id, name), probes.series(name)), name
    assert [s for s, _ in probes.series("grad_norm")] == [0, 3, 6, 9]


def test_export_writes_a_stored_sweep_to_tensorboard_and_mlflow(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from batchscope.cli import main
    from batchscope.probes import probes_for

    store = Store(tmp_path / "sweep.db")
    ids = []
    for lr in (0.05, 0.5):
        spec = RunSpec.model_validate({**TINY, "optim": {"lr": lr}})
        store.add_run(spec.run_id(), spec.model_dump(mode="json"), group="lr-grid")
        store.claim(spec.run_id(), {})
        res = train_run(spec, store, callbacks=probes_for(spec))
        store.finish(spec.run_id(), "done" if lr < 0.1 else "diverged", final=res.final)  # a failed run, for its status
        ids.append(spec.run_id())
    store.add_run("pending-one", {"name": "pending-one", "tags": {}})  # no group, no metrics yet
    store.close()

    out = cli("export", "tb", "--format", "tensorboard", "--store", "sweep.db", cwd=tmp_path).stdout
    assert "wrote tb" in out
    # in this process (an MLflow import less to wait for); a .db path is a SQLite store
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["batchscope", "export", "ml.db", "--format", "mlflow", "--store", "sweep.db"])
    with pytest.raises(SystemExit) as code:
        main()
    assert code.value.code == 0
    assert f"wrote sqlite:///{tmp_path / 'ml.db'}" in capsys.readouterr().out.replace("\n", "")
    with Store(tmp_path / "sweep.db") as st:  # again: each run replaced, not doubled
        st.export_runs(tmp_path / "tb", "tensorboard")
        st.export_runs(tmp_path / "ml.db", "mlflow")

    client = MlflowClient(tracking_uri=as_tracking_uri(tmp_path / "ml.db"))
    exp = client.get_experiment_by_name("sweep")  # named after the store
    runs = {r.data.tags["batchscope.run_id"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(ids + ["pending-one"])  # one MLflow run per stored run, after two exports
    with Store(tmp_path / "sweep.db") as st:
        for rid, status in zip(ids, ("done", "diverged")):
            stored = st.metrics(rid)
            logdir = tmp_path / "tb" / "lr-grid" / rid
            assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
            got = tb_scalars(logdir)
            assert set(got) == set(stored)
            run = runs[rid]
            assert set(run.data.metrics) == {mlflow_name(n) for n in stored} and "grad_norm_b_32" in run.data.metrics
            for name, series in stored.items():
                assert same(got[name], series), name
                assert same(mlflow_history(client, run.info.run_id, mlflow_name(name)), series), name
            spec = st.get_run(rid).spec
            hp = tb_hparams(logdir)
            assert hp["optim.lr"] == spec["optim"]["lr"] and hp["batchscope.status"] == status
            assert hp["_status"] == ("STATUS_SUCCESS" if status == "done" else "STATUS_FAILURE")
            assert run.data.params["optim.lr"] == str(spec["optim"]["lr"])
            assert run.data.params["train.epochs"] == str(spec["train"]["epochs"])
            assert run.data.tags["batchscope.status"] == status and run.data.tags["batchscope.group"] == "lr-grid"
            assert run.info.status == ("FINISHED" if status == "done" else "FAILED") and run.info.run_name == rid
    assert runs["pending-one"].info.status == "RUNNING" and (tmp_path / "tb" / "pending-one").is_dir()


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from batchscope.cli import main

    for module, extra, make in (("mlflow", "mlflow", lambda: MLflowSink(tmp_path / "ml.db")),
                                ("tensorboard", "tensorboard", lambda: TensorBoardSink(tmp_path / "tb"))):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
        with pytest.raises(MissingExtraError, match=rf"pip install 'batchscope\[{extra}\]'"):
            make()
    Store(tmp_path / "s.db").close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal's width; the message itself is one line
    for args, words in ((["--format", "mlflow"], "pip install 'batchscope[mlflow]'"),
                        (["--format", "tensorboard"], "pip install 'batchscope[tensorboard]'"),
                        (["--experiment", "e"], "only for --format mlflow")):
        monkeypatch.setattr(sys, "argv", ["batchscope", "export", "out", "--store", "s.db", *args])
        with pytest.raises(SystemExit) as code:
            main()
        err = capsys.readouterr().err
        assert code.value.code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0 and words in err, err
    assert not (tmp_path / "out").exists()


def test_mlflow_file_store_refusal_and_uris(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    assert as_tracking_uri(tmp_path / "a.db") == f"sqlite:///{tmp_path / 'a.db'}"
    assert as_tracking_uri(tmp_path / "mlruns") == (tmp_path / "mlruns").as_uri()
    assert as_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try:
        sink = MLflowSink(tmp_path / "mlruns")
    except BatchscopeError as e:  # MLflow 3 refuses its file store by default: one line saying what to do
        assert "\n" not in str(e) and "MLFLOW_ALLOW_FILE_STORE=true" in str(e) and ".db" in str(e)
    else:  # an MLflow that still takes it
        sink.close()
