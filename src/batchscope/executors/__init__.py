"""Executors: how a sweep's runs are trained. `choose_executor` picks one that fits the device and the grid.

- serial: one run after another in this process (the reference; one run, or one CPU core).
- processes: a pool of worker processes, one per core, the parent the store's only writer (CPUs).
- fused: runs that share an architecture, data and batch size in one vmapped step (GPUs).
- ray: each run, or fused group, a task on a Ray cluster; the driver the store's only writer (more machines).

Every executor stores the same runs under the same ids; serial and processes give identical results,
fused equal ones to float rounding without dropout (see `batchscope.train.fused`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch

from ..errors import BatchscopeError
from ..factories import resolve_device
from ..runs import OnRunStart, SweepSummary
from ..spec import RunSpec
from ..store import Store
from ..train.fused import group_key, unfusable_reason
from .fused import FusedExecutor
from .processes import ProcessExecutor, usable_cores
from .ray_cluster import RayExecutor, RaySettings
from .serial import SerialExecutor

EXECUTORS = ("serial", "fused", "processes", "ray")

__all__ = [
    "EXECUTORS", "Executor", "FusedExecutor", "ProcessExecutor", "RayExecutor", "RaySettings", "SerialExecutor",
    "choose_executor",
]


class Executor(Protocol):
    """Trains the runs of a sweep that are not done; `reason` says why it was chosen."""

    name: str
    reason: str
    remote: bool  # trains on other machines (specs are checked on this one's CPU); then it also has connect()

    def run(self, store: Store, runs: Sequence[RunSpec], on_progress: OnRunStart | None = None) -> SweepSummary:
        """Train every run not done or diverged (claiming each), store the outcomes and report them."""
        ...


def _pool(workers: int, cores: int) -> str:
    threads = max(1, cores // workers)
    return f"{workers} worker process{'es' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


def choose_executor(
    runs: Sequence[RunSpec],
    device: torch.device | str | None = None,
    requested: str | None = None,
    ray: RaySettings | None = None,
) -> Executor:
    """The executor for these runs on `device` (default: the first run's): `requested` if given, else
    fused on a GPU when runs can share a step, processes on a CPU with several cores, serial otherwise.
    `ray`: the cluster and resources for the ray executor (asking for it when `requested` is None)."""
    if requested is not None and requested not in EXECUTORS:
        raise BatchscopeError(f"executor {requested!r}: expected one of {', '.join(EXECUTORS)}")
    if requested == "ray" or (ray is not None and requested is None):
        settings = ray or RaySettings()  # the driver's own device does not matter: the workers' does
        where = f"cluster at {settings.address}" if settings.address else "local or RAY_ADDRESS cluster"
        return RayExecutor(settings, f"{where}, up to {settings.retries} retries of a run whose worker dies")
    if ray is not None:
        raise BatchscopeError(f"--address, --retries, --cpus-per-run, --gpus-per-run: only with --executor ray, not {requested}")
    n = len(runs)
    if device is None:
        device = resolve_device(runs[0].train.device) if runs else torch.device("cpu")
    device = torch.device(device)
    cores = usable_cores()
    if requested is not None:
        if requested == "processes":
            workers = max(1, min(cores, n))
            return ProcessExecutor(workers, f"asked for; {_pool(workers, cores)}")
        return FusedExecutor("asked for") if requested == "fused" else SerialExecutor("asked for")
    if n <= 1:
        return SerialExecutor("one run")
    if device.type == "cuda":
        sizes = Counter(group_key(r) for r in runs)
        firsts = {group_key(r): r for r in reversed(runs)}
        shared = sum(c for key, c in sizes.items() if c > 1 and unfusable_reason(firsts[key]) is None)
        if shared:
            return FusedExecutor(
                f"{n} runs on {device}: {shared} of them in {sum(1 for c in sizes.values() if c > 1)} groups "
                f"sharing an architecture, data and batch size (largest {max(sizes.values())}), one vmapped step each"
            )
        return SerialExecutor(f"{n} runs on {device}, no two share an architecture, data and batch size")
    if cores >= 2:
        workers = min(cores, n)
        return ProcessExecutor(workers, f"{n} runs on {cores} CPU cores: {_pool(workers, cores)}")
    return SerialExecutor(f"{n} runs on one CPU core")
