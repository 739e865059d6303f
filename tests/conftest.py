import os

import pytest
import torch

# Tiny models run fastest on one thread, and the CLI tests start more processes: one thread each.
torch.set_num_threads(int(os.environ.get("BATCHSCOPE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes caches under a temporary directory, never the user's."""
    monkeypatch.setenv("BATCHSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
