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
