"""The README's library example runs as written."""

import re
from pathlib import Path

import pytest


def test_readme_python_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "batchscope.hessian_eigenvalues" in b]
    assert blocks, "README has no python example of the instruments"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert len(namespace["top"].eigenvalues) == 5
    assert namespace["sharp"].sharpness >= 0


def test_readme_spec_example_is_a_valid_sweep():
    import tomllib

    from batchscope.spec import SweepSpec

    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks, "README has no spec example"
    for block in blocks:
        SweepSpec.model_validate(tomllib.loads(block))


def test_readme_own_model_example_sweeps(tmp_path, monkeypatch):
    """"On your own model": its module and its spec, on less data and fewer epochs, train and probe."""
    import tomllib

    from batchscope.spec import SweepSpec
    from batchscope.store import Store
    from batchscope.sweep import run_sweep

    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("## On your own model"):text.index("## The instruments, on your own model")]
    (module,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (spec,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    (tmp_path / "my_models.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    body = tomllib.loads(spec)
    body["store"] = None
    body["data"]["options"]["n"] = 400
    body["train"]["epochs"] = 2
    body["probes"][0]["subset"] = 100
    sweep = SweepSpec.model_validate(body)
    with Store(tmp_path / "own.db") as st:
        summary = run_sweep(st, sweep, executor="serial")
        assert len(summary.trained) == 4
        for r in st.runs():
            assert r.status == "done" and r.final["test_acc"] != r.final["test_acc"]  # NaN: regression
            assert [s for s, _ in st.metrics(r.run_id, ["hessian_lambda_1"])["hessian_lambda_1"]][0] == 0

def test_readme_user_loop_example_runs_and_writes_tensorboard(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("tensorboard")
    text = (Path(__file__).parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "batchscope.TrajectoryProbes(" in b]
    monkeypatch.chdir(tmp_path)  # it writes tb/sgd-64
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    probes = namespace["probes"]
    assert [s for s, _ in probes.series("hessian_lambda_1")] == [0, 1, 2, 4, 7, 14, 26, 50, 96]
    assert list((tmp_path / "tb" / "sgd-64").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_readme_advise_example_runs(tmp_path, monkeypatch):
    """"Batch-size advice": the Python example, as written, in a fresh directory with the examples."""
    import shutil

    root = Path(__file__).parent.parent
    text = (root / "README.md").read_text()
    section = text[text.index("## Batch-size advice"):text.index("## One run across processes")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    shutil.copytree(root / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    a = namespace["a"]
    assert a.recommendation["batch"] >= a.b0
    assert (tmp_path / "reports" / "advise-quick" / "index.html").exists()
