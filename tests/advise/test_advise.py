"""`advise` end to end on a tiny problem: the runs it stores, resuming, the report, the one-line errors."""

import json

import pytest

from batchscope.advise import advise
from batchscope.errors import BatchscopeError
from batchscope.spec import validate_run
from batchscope.store import Store

BODY = {
    "data": {"name": "mnist1d", "n_train": 1000, "n_test": 200},
    "model": {"name": "mlp", "width": 0.25, "depth": 2},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "train": {"batch_size": 16, "epochs": 8},
    "log": {"log_points": 10},
}
OPTS = dict(doublings=3, checkpoints=3, noise_pairs=10, noise_examples=512, executor="serial")


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("advise")
    a = advise(validate_run(BODY), "train_loss<=1.0", store=tmp / "s.db", out=tmp / "report", **OPTS)
    return tmp, a


def test_advice_is_measured_and_reported(advised):
    tmp, a = advised
    assert a.b0 == 16 and a.lr0 == 0.05
    assert [c.point for c in a.checkpoints][0] == "epoch_0" and a.checkpoints[0].epoch == 0
    assert all(c.noise["b_simple"] > 0 and c.noise["b_simple_se"] > 0 for c in a.checkpoints)
    fitted = [c for c in a.checkpoints if c.tradeoff is not None]
    assert fitted and a.run_tradeoff is not None
    assert a.recommendation["batch"] in {16, 32, 64, 128}
    assert a.recommendation["stability"]["limit"] == pytest.approx(2 * 1.9 / a.recommendation["stability"]["lr"])
    assert {r["arm"] for r in a.recipe["arms"]} >= {"B0", "linear lr", "sqrt lr", "as many updates", "late increase"}
    page = (tmp / "report" / "index.html").read_text()
    for fig in ("steps_by_batch", "batch_over_training", "stability", "recipe", "branches"):
        assert (tmp / "report" / "figures" / f"{fig}.png").stat().st_size > 0
        assert f'id="fig-{fig}"' in page
    doc = json.loads((tmp / "report" / "advice.json").read_text())
    assert doc["recommendation"]["batch"] == a.recommendation["batch"]
    assert doc["compute"]["examples"] > doc["compute"]["reference_examples"] > 0


def test_batchscope_advise_is_the_function(advised):
    import batchscope
    import batchscope.advise as package

    tmp, a = advised
    assert callable(batchscope.advise) and package.advise is advise
    again = batchscope.advise(validate_run(BODY), "train_loss<=1.0", store=tmp / "s.db", **OPTS)  # stored: read back
    assert again.recommendation == a.recommendation


def test_branches_start_from_the_reference_checkpoints(advised):
    tmp, a = advised
    with Store(tmp / "s.db") as st:
        runs = st.runs(group="advise")
        specs = [validate_run(r.spec) for r in runs]
    sources = {s.source_spec().run_id() for s in specs if s.train.warm_start is not None}
    assert sources == {a.reference_id}
    assert {s.train.warm_start.tag for s in specs if s.train.warm_start is not None} <= {c.point for c in a.checkpoints}


def test_advice_resumes_without_training_again(advised):
    tmp, a = advised
    with Store(tmp / "s.db") as st:
        before = {r.run_id: r.finished for r in st.runs()}
    again = advise(validate_run(BODY), "train_loss<=1.0", store=tmp / "s.db", **OPTS)
    with Store(tmp / "s.db") as st:
        after = {r.run_id: r.finished for r in st.runs()}
    assert after == before  # nothing trained or measured twice
    assert again.recommendation == a.recommendation
    assert again.run_tradeoff == a.run_tradeoff


def test_unreachable_target_is_one_line(advised):
    tmp, _ = advised
    with pytest.raises(BatchscopeError, match=r"did not reach train_loss <= 1e-06 .*give a reachable target"):
        advise(validate_run(BODY), "train_loss<=1e-6", store=tmp / "s.db", **OPTS)


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from batchscope import cli

    spec = tmp_path / "s.toml"
    spec.write_text("[train]\nbatch_size = 16\n")
    for args, message in [(["--lr-grid", "1,x"], "--lr-grid '1,x': expected comma-separated numbers"),
                          (["--target", "train_acc<=0.5"], "train_acc is reached at or above its value")]:
        monkeypatch.setattr(sys, "argv", ["batchscope", "advise", str(spec), "--store", str(tmp_path / "s.db"), *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = " ".join(capsys.readouterr().err.split())
        assert e.value.code == 2 and message in err and err.count("error:") == 1
    assert not (tmp_path / "s.db").exists()  # nothing stored for a bad command


@pytest.mark.slow
def test_quick_example_through_the_cli(tmp_path):
    """The README's `batchscope advise examples/quick.toml`, in a fresh directory, writes its report."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "examples", tmp_path / "examples")
    r = subprocess.run([sys.executable, "-m", "batchscope.cli", "advise", "examples/quick.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recommended: batch" in r.stdout
    doc = json.loads((tmp_path / "reports" / "advise-quick" / "advice.json").read_text())
    assert doc["run_tradeoff"]["b_crit"] > 16


def test_advice_on_a_spec_naming_user_factories(tmp_path, monkeypatch):
    """A spec with the user's own model, data and loss (package.module:callable) gets advice like a built-in one."""
    (tmp_path / "adv_user.py").write_text(
        "import torch\n"
        "def data(n=512, seed=0):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x = torch.randn(n + 128, 8, generator=g)\n"
        "    y = x @ torch.ones(8) / 8 ** 0.5 + 0.5 * torch.randn(n + 128, generator=g)\n"
        "    return x[:n], y[:n, None], x[n:], y[n:, None]\n"
        "def model(input_shape):\n"
        "    return torch.nn.Linear(input_shape[0], 1)\n"
        "def loss(out, y):\n"
        "    return ((out - y) ** 2).mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = validate_run({"data": "adv_user:data", "model": "adv_user:model", "loss": "adv_user:loss",
                         "optim": {"lr": 0.02}, "train": {"batch_size": 8, "epochs": 6}, "log": {"log_points": 10}})
    a = advise(spec, "train_loss<=0.4", store=tmp_path / "s.db", out=tmp_path / "report", doublings=3, checkpoints=3,
               noise_pairs=10, noise_examples=256, executor="serial")
    assert a.b0 == 8 and a.checkpoints and all(c.noise["b_simple"] > 0 for c in a.checkpoints)
    assert (tmp_path / "report" / "index.html").exists()
