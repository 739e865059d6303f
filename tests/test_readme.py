"""The README's library example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
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
