"""A user's own model, data and loss named in specs ("package.module:callable"): through training, the fused step,
probes, a sweep on the process executor, and the one-line errors of factories that fail."""

import math
import os
import re
import sys
import tempfile

import pytest
import torch

from batchscope.curvature.hessian import hessian_eigenvalues
from batchscope.errors import BatchscopeError
from batchscope.factories import check_objective, dataset_for, loss_for, model_for
from batchscope.probes import probes_for
from batchscope.spec import RunSpec, load_spec
from batchscope.store import Store
from batchscope.sweep import preflight, run_sweep
from batchscope.train import train_run
from batchscope.train.fused import VmappedStep, train_group
from batchscope.userfactories import as_dataset, pack_modules, resolve, shippable_modules, unpack_modules
from helpers import cli, write_user_module

CPU = torch.device("cpu")
M = "bs_user_factories"
REGRESSION = {
    "data": {"name": f"{M}:teacher", "options": {"n_train": 256, "n_test": 64}},
    "model": {"name": f"{M}:mlp", "options": {"hidden": 16}},
    "loss": f"{M}:mse",
    "optim": {"lr": 0.05, "momentum": 0.9},
    "train": {"batch_size": 32, "epochs": 3, "dtype": "float64"},
    "log": {"log_points": 3},
}


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """The folder holding bs_user_factories.py, on this process's sys.path for the module's tests."""
    folder = tmp_path_factory.mktemp("user")
    write_user_module(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        yield folder


def spec(base: dict = REGRESSION, **sections) -> RunSpec:
    return RunSpec.model_validate({**base, **sections})


def test_regression_trains_on_the_users_loss_without_accuracy(user_module):
    s = spec()
    ds = dataset_for(s, CPU)
    assert ds.y_train.dtype == torch.float64 and ds.num_classes == 1 and ds.input_shape == (8,)
    result = train_run(s)
    losses = [m["train_loss"] for _, _, m in result.metrics]
    assert result.status == "done" and losses[-1] < 0.5 * losses[0]
    assert math.isnan(result.final["train_acc"]) and math.isnan(result.final["test_acc"])
    # the stored loss is the user's mse, on the model the factory built
    model = model_for(s, ds, CPU)
    with torch.no_grad():
        assert losses[0] == pytest.approx(float(((model(ds.x_train).squeeze(-1) - ds.y_train) ** 2).mean()), rel=1e-12)
    assert sum(p.numel() for p in model.parameters()) == 8 * 16 + 16 + 16 + 1


def test_fused_runs_of_a_users_model_and_loss_equal_serial_ones(user_module):
    specs = [spec(optim={"lr": lr}) for lr in (0.02, 0.05)]
    fused = train_group(specs)
    for s, f in zip(specs, fused):
        serial = train_run(s)
        assert f.final["train_loss"] == pytest.approx(serial.final["train_loss"], rel=1e-9)
        assert f.final["weight_distance"] == pytest.approx(serial.final["weight_distance"], rel=1e-9)


def test_fused_dropout_keeps_the_rate_of_the_users_own_module(user_module):
    specs = [spec(model={"name": f"{M}:mlp", "options": {"hidden": 16, "dropout": 0.3}}, seeds={"init": i}) for i in (0, 1)]
    ds = dataset_for(specs[0], CPU)
    step = VmappedStep([model_for(s, ds, CPU) for s in specs], specs, CPU)
    rates = [v for k, v in step.live["buffers"].items() if k.endswith(".p")]
    assert len(rates) == 1 and rates[0].tolist() == pytest.approx([0.3, 0.3])


def test_map_style_classification_data_reports_accuracy(user_module):
    s = spec(data=f"{M}:blobs", loss="cross_entropy", model={"name": f"{M}:mlp"},
             train={"batch_size": 20, "epochs": 5, "dtype": "float64"})
    ds = dataset_for(s, CPU)
    assert (ds.n_train, ds.n_test, ds.num_classes, ds.y_train.dtype) == (200, 60, 3, torch.int64)
    assert ds.x_train.dtype == torch.float64  # numpy float32 items, cast to the run's dtype
    assert train_run(s).final["test_acc"] > 0.8


def test_token_level_targets_with_integer_inputs(user_module):
    s = spec(data=f"{M}:tokens", model=f"{M}:Tokens", loss="cross_entropy",
             optim={"lr": 0.5, "momentum": 0.9}, train={"batch_size": 32, "epochs": 8})
    ds = dataset_for(s, CPU)
    assert ds.x_train.dtype == torch.int64 and ds.y_train.shape == (128, 6) and ds.num_classes == 5
    result = train_run(s)
    accs = [m["train_acc"] for _, _, m in result.metrics]
    assert 0 < accs[0] < 0.5 < accs[-1] <= 1  # the fraction of tokens predicted right, over every position
    group = train_group([s, spec(s.model_dump(), seeds={"init": 1})])
    assert group[0].final["train_acc"] == result.final["train_acc"]


def test_probes_measure_the_runs_own_loss(user_module):
    probe = {"instrument": "hessian_top", "schedule": "epoch", "subset": 64, "options": {"hvp_method": "double_backward"}}
    s = spec(probes=[probe])
    result = train_run(s, callbacks=probes_for(s))
    (at_start,) = [m["hessian_lambda_1"] for step, _, m in result.metrics if step == 0]
    ds = dataset_for(s, CPU)
    batches = list(zip(ds.x_train[:64].split(32), ds.y_train[:64].split(32)))
    direct = hessian_eigenvalues(model_for(s, ds, CPU), loss_for(s).fn, batches, hvp_method="double_backward")
    assert at_start == pytest.approx(float(direct.eigenvalues[0]), rel=1e-6)


def test_old_run_ids_are_unchanged_and_new_settings_enter_them():
    assert RunSpec().run_id() == "a97cf21289341898"  # as computed before model.options and loss existed
    assert RunSpec.model_validate({"loss": "cross_entropy", "model": {"options": {}}}).run_id() == "a97cf21289341898"
    assert RunSpec.model_validate({"loss": "mse"}).run_id() != "a97cf21289341898"
    short = RunSpec.model_validate({"model": f"{M}:mlp", "data": f"{M}:teacher", "loss": f"{M}:mse"})
    assert short == RunSpec.model_validate({"model": {"name": f"{M}:mlp"}, "data": {"name": f"{M}:teacher"},
                                            "loss": {"name": f"{M}:mse"}})


@pytest.mark.parametrize("body, message", [
    ({"model": "no_such_pkg_b7.models:make"},
     "model 'no_such_pkg_b7.models:make': no module named 'no_such_pkg_b7.models' here; it must be importable wherever "
     "runs train (put its folder on PYTHONPATH, or install it)"),
    ({"data": f"{M}:nothing"}, f"data '{M}:nothing': {M} has no attribute 'nothing'"),
    ({"loss": f"{M}:NOT_CALLABLE"}, f"loss '{M}:NOT_CALLABLE': is a int, not a callable"),
    ({"model": f"{M}:not_a_model"}, f"model '{M}:not_a_model': returned a dict; expected a torch.nn.Module"),
    ({"data": f"{M}:not_data"}, f"data '{M}:not_data': returned a str; expected a batchscope Dataset"),
    ({"loss": f"{M}:per_example_loss"},
     f"loss '{M}:per_example_loss': returned a tensor of shape (2,); expected a scalar tensor, the mean loss over the batch"),
    ({"model": {"name": f"{M}:mlp", "options": {"widht": 3}}},
     f"model '{M}:mlp': calling it with (input_shape=(8,), num_classes=1, widht=3) raised TypeError"),
    ({"data": {"name": f"{M}:teacher", "path": "/data"}},
     f"data '{M}:teacher': data.path is set, but the factory takes no `path` argument"),
    ({"data": {"name": f"{M}:teacher", "label_noise": 0.1}}, f"data '{M}:teacher': label_noise needs class labels"),
    ({"train": {"stop": {"metric": "train_acc", "threshold": 0.9}}}, "train.stop.metric: train_acc needs class labels"),
    ({"loss": "cross_entropy"}, "loss 'cross_entropy': on outputs of shape (2, 1) and targets of shape (2,)"),
])  # fmt: skip
def test_a_factory_that_fails_gets_one_line_naming_it(user_module, body, message):
    with pytest.raises(BatchscopeError) as err:
        preflight([spec(**body)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_what_a_data_factory_may_return():
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    as_tuple = as_dataset((x[:8], y[:8], x[8:], y[8:]), "t")
    as_dict = as_dataset({"x_train": x[:8].numpy(), "y_train": y[:8].int().numpy(), "x_test": x[8:], "y_test": y[8:],
                          "num_classes": 7}, "d")
    assert as_tuple.num_classes == int(y.max()) + 1 and as_dict.num_classes == 7
    assert torch.equal(as_dict.x_train, as_tuple.x_train) and as_dict.y_train.dtype == torch.int64
    targets = as_dataset((x[:8], torch.randn(8, 2), x[8:], torch.randn(2, 2)), "r")
    assert targets.num_classes == 2 and targets.y_train.dtype == torch.float32
    for bad, why in [((x, y), "returned a tuple"), ({"x": x}, "returned a dict with keys ['x']"),
                     ((x[:8], y[:8], x[:0], y[:0]), "x_test holds no examples"),
                     ((x[:8], y[:8], x[8:], y[:3]), "y_test has shape (3,), expected (2, ...)")]:
        with pytest.raises(BatchscopeError, match=why.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            as_dataset(bad, "bad")


def test_check_objective_leaves_the_model_as_it_was(user_module):
    s = spec(model={"name": f"{M}:mlp", "options": {"dropout": 0.5}})
    ds = dataset_for(s, CPU)
    model = model_for(s, ds, CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_objective(s, model, ds)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_modules_to_ship_to_ray_workers_are_the_users_own(user_module):
    shipped = shippable_modules([f"{M}:mlp", "torch.nn:Linear", "json:loads", f"{M}:teacher"])
    assert shipped == [os.path.realpath(user_module / f"{M}.py")]


def test_packed_modules_import_from_where_a_worker_unpacks_them(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / "bs_user_pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("def make():\n    return 7\n")
    (pkg / "__pycache__" / "nets.cpython.pyc").write_bytes(b"stale")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "src"), *sys.path])  # restored after the test
    files = pack_modules(shippable_modules(["bs_user_pkg.nets:make"]))
    assert sorted(files) == ["bs_user_pkg/__init__.py", "bs_user_pkg/nets.py"]
    sys.path.remove(str(tmp_path / "src"))  # a worker without the driver's folder
    (tmp_path / "worker").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "worker"))
    unpack_modules(files)
    assert resolve("bs_user_pkg.nets:make", "model")() == 7
    assert sys.modules["bs_user_pkg.nets"].__file__.startswith(str(tmp_path / "worker" / "batchscope-code-"))


SWEEP = f"""
name = "own"
store = "runs.db"
[data]
name = "{M}:teacher"
options = {{n_train = 256, dim = 8}}
[model]
name = "{M}:mlp"
[loss]
name = "{M}:mse"
[optim]
momentum = 0.9
[train]
batch_size = 32
epochs = 3
[log]
log_points = 3
[[probes]]
instrument = "hessian_top"
schedule = "epoch"
subset = 64
options = {{hvp_method = "double_backward"}}
[grid]
"model.options.hidden" = [4, 16]
"optim.lr" = [0.02, 0.05]
"""


def test_a_sweep_over_user_factories_on_the_process_executor(user_module, tmp_path):
    (tmp_path / "own.toml").write_text(SWEEP)
    path = os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")])
    r = cli("sweep", "own.toml", "--executor", "processes", cwd=tmp_path, env={"PYTHONPATH": path})
    assert "executor: processes" in r.stdout and "4 runs: 4 trained" in r.stdout
    sweep = load_spec(tmp_path / "own.toml")
    runs = sweep.expand()
    with Store(tmp_path / "runs.db") as st:
        stored = {s.run_id(): (st.get_run(s.run_id()), st.load_checkpoint(s.run_id(), "final")["model"]) for s in runs}
        assert {rec.provenance["executor"] for rec, _ in stored.values()} == {"processes"}
        lambdas = {s.run_id(): st.metrics(s.run_id(), ["hessian_lambda_1"])["hessian_lambda_1"] for s in runs}
    for s in runs:
        rec, weights = stored[s.run_id()]
        hidden = s.model.options["hidden"]
        assert rec.status == "done" and math.isnan(rec.final["test_acc"]) and rec.final["train_loss"] < 1
        assert sum(w.numel() for w in weights.values()) == 8 * hidden + hidden + hidden + 1  # the factory's model
        assert [step for step, _ in lambdas[s.run_id()]] == [0, 8, 16, 24]
        # the probe measured the user's loss on the stored weights
        ds = dataset_for(s, CPU)
        model = model_for(s, ds, CPU)
        model.load_state_dict(weights)
        batches = list(zip(ds.x_train[:64].split(32), ds.y_train[:64].split(32)))
        direct = hessian_eigenvalues(model, loss_for(s).fn, batches, hvp_method="double_backward")
        assert lambdas[s.run_id()][-1][1] == pytest.approx(float(direct.eigenvalues[0]), rel=1e-3)
    # the same sweep in this process, one thread as each worker had: the same numbers
    with Store(tmp_path / "serial.db") as st:
        run_sweep(st, sweep, executor="serial")
        for s in runs:
            mine, theirs = st.get_run(s.run_id()).final, stored[s.run_id()][0].final
            assert mine["train_loss"] == theirs["train_loss"] and mine["test_loss"] == theirs["test_loss"]


def test_cli_names_a_factory_it_cannot_import_in_one_line(tmp_path):
    (tmp_path / "own.toml").write_text('model = "no_such_models_b7:mlp"\nstore = "runs.db"\n')
    r = cli("sweep", "own.toml", cwd=tmp_path, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model 'no_such_models_b7:mlp': no module named 'no_such_models_b7' here" in r.stderr
    assert not (tmp_path / "runs.db").exists()


def test_keskar_reproduces_on_a_users_model(user_module, tmp_path, monkeypatch):
    from dataclasses import replace

    import tiny_configs
    from batchscope import reproduce as rp
    from batchscope.studies import Options
    from batchscope.studies.keskar import Keskar
    from helpers import read_claims

    # the tiny configuration without the warm starts and remedies: the SB / LB grid alone
    monkeypatch.setattr(Keskar, "config", lambda self, opts: replace(tiny_configs.KESKAR, warm_epochs=(), remedies=()))
    opts = Options(scale="quick", seeds=2, model=f"{M}:mlp")
    rp.reproduce("keskar", opts, tmp_path / "s.db", tmp_path / "r", log=lambda s: None)
    doc, claims = read_claims(tmp_path / "r")
    assert doc["meta"]["models"] == [f"{M}:mlp"] and {"gap", "sharper_eps0.001"} <= set(claims)
    with Store(tmp_path / "s.db") as st:
        assert {r.spec["model"]["name"] for r in st.runs()} == {f"{M}:mlp"}
        assert {r.status for r in st.runs()} == {"done"}
    with pytest.raises(BatchscopeError, match=r"hoffer trains its own models \(studies that take yours: keskar\)"):
        rp.study_runs(rp.get_study("hoffer"), opts)
    with pytest.raises(BatchscopeError, match="--model mlp: expected a user's model factory, package.module:callable"):
        rp.study_runs(rp.get_study("keskar"), Options(model="mlp"))


def test_cli_reproduce_takes_a_users_model(user_module, tmp_path):
    from batchscope import reproduce as rp
    from batchscope.studies import Options

    env = {"PYTHONPATH": os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")])}
    r = cli("reproduce", "kaur", "--model", f"{M}:mlp", "--dry-run", cwd=tmp_path, check=False, env=env)
    assert r.returncode == 2 and "kaur trains its own models" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("reproduce", "keskar", "--model", f"{M}:mlp", "--seeds", "1", "--dry-run", cwd=tmp_path, env=env)
    planned = [s for _, runs in rp.study_runs(rp.get_study("keskar"), Options(seeds=1, model=f"{M}:mlp")) for s in runs]
    assert re.findall(r"^([0-9a-f]{16}) ", r.stdout, re.M) == [s.run_id() for s in planned]
