import os

import pytest
import torch

# Tiny models run fastest on one thread, and the CLI tests start more processes: one thread each.
torch.set_num_threads(int(os.environ.get("BATCHSCOPE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes caches under a temporary directory, never the user's."""
    monkeypatch.setenv("BATCHSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# -- the studies' tiny configurations (tests/tiny_configs.py), as fixtures -----------------------------

import tiny_configs  # noqa: E402  (tests/ is on sys.path: pytest puts this conftest's folder there, no __init__.py)


def _tiny(study_cls):
    @pytest.fixture
    def fixture(monkeypatch):
        tiny_configs.use(monkeypatch, study_cls)

    return fixture


for _cls in tiny_configs.CONFIGS:
    globals()[f"tiny_{_cls.name}"] = _tiny(_cls)
