"""Provenance of a run: which code, libraries, machine and numeric settings produced it."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import batchscope

_PKG_DIR = Path(batchscope.__file__).resolve().parent


def _git(*args: str) -> str | None:
    """Run git in the package directory; None on any failure (no git, not a checkout, timeout)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(_PKG_DIR), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the package source, or (None, None) when it is not tracked by git."""
    # An installed package can sit inside some unrelated repository (a venv inside a project):
    # only trust HEAD when the package's own files are tracked by that repository.
    if _git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return None, None
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit, (None if status is None else bool(status))


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    """The parts that cannot change within a process (computed once: a sweep claims many runs)."""
    import numpy
    import torch

    commit, dirty = _git_state()
    return {
        "batchscope_version": batchscope.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "numpy_version": numpy.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }


def provenance(device: str, dtype: str) -> dict[str, Any]:
    """Describe the code, libraries, machine, device and dtype of a run, as a JSON-serializable dict."""
    import torch

    info = dict(_static())
    device, dtype = str(device), str(dtype)
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            gpu = torch.cuda.get_device_name(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):
            gpu = None
    info.update(
        device=device,
        dtype=dtype,
        gpu=gpu,
        # Thread count changes results (reduction order) and timings; it can change at run time.
        num_threads=torch.get_num_threads(),
        pid=os.getpid(),
    )
    return info
