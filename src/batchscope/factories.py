"""From a spec to the objects of a run: its device, data, model, epoch plan and logged steps.

One module for every path that builds a run (the trainers, preflight, the executors, the studies and the
time estimate), so that each builds it the same way. It sits below training: it knows specs, data and
models, and nothing that trains or stores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Dataset, load_dataset
from .errors import BatchscopeError
from .models import build_model
from .spec import DataSpec, RunSpec, budget_multiplier, validate_run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BatchscopeError(f"train.device: unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BatchscopeError(f"train.device: {name!r} asked for, but torch sees no CUDA device")
    return dev


def _load(d: DataSpec) -> Dataset:
    return load_dataset(
        d.name, path=d.path, n_train=d.n_train, n_test=d.n_test, seed=d.seed, label_noise=d.label_noise, **d.options
    )


@functools.lru_cache(maxsize=4)
def _load_cached(key: str, device: str, dtype: str) -> Dataset:
    return _load(DataSpec.model_validate_json(key)).to(torch.device(device), getattr(torch, dtype))


def dataset_for(spec: RunSpec, device: torch.device) -> Dataset:
    """The run's data on its device, shared between the runs of a sweep that use the same data."""
    return _load_cached(spec.data.model_dump_json(), str(device), spec.train.dtype)


def forget_datasets() -> None:
    """Drop the data sets `dataset_for` holds (the --nproc launcher: its workers load their own)."""
    _load_cached.cache_clear()


def train_size(data: DataSpec | Mapping[str, Any]) -> int:
    """Training examples of a data section (a DataSpec or its dict), as a run on it counts them."""
    d = data if isinstance(data, DataSpec) else validate_run({"data": dict(data)}).data
    return _train_size(d.model_dump_json())


@functools.lru_cache(maxsize=None)
def _train_size(key: str) -> int:
    # a count, not the tensors: loaded once per distinct data section, then only the number is kept
    return _load(DataSpec.model_validate_json(key)).n_train


def model_for(spec: RunSpec, ds: Dataset, device: torch.device) -> nn.Module:
    """The architecture, initialized from the run's init seed alone."""
    m = spec.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seeds.init)
        model = build_model(
            m.name,
            input_shape=tuple(ds.input_shape),
            num_classes=ds.num_classes,
            width=m.width,
            depth=m.depth,
            norm=m.norm,
            ghost_size=m.ghost_size,
            dropout=m.dropout,
        )
    return model.to(device=device, dtype=getattr(torch, spec.train.dtype))


def epoch_plan(spec: RunSpec, n_train: int) -> list[tuple[int, int]]:
    """(batch size, updates) for each epoch, the last one possibly partial."""
    t = spec.train
    mult = budget_multiplier(spec)

    def batch_at(epoch: int) -> int:
        if t.full_batch:
            return n_train
        b = t.batch_size
        for start, size in t.batch_schedule:
            if epoch >= start:
                b = size
        return min(b, n_train)

    def per_epoch(b: int) -> int:
        return n_train // b if t.drop_last else math.ceil(n_train / b)

    plan: list[tuple[int, int]] = []
    if t.steps is not None:
        left = t.steps * mult
        while left > 0:
            b = batch_at(len(plan))
            k = min(per_epoch(b), left)
            plan.append((b, k))
            left -= k
    else:
        total = t.epochs * mult
        full = int(math.floor(total))
        for e in range(full):
            b = batch_at(e)
            plan.append((b, per_epoch(b)))
        frac = total - full
        if frac > 1e-9:
            b = batch_at(full)
            k = max(1, round(frac * per_epoch(b)))
            plan.append((b, k))
    if not plan or any(k <= 0 for _, k in plan):
        raise BatchscopeError(
            f"train: batch size {t.batch_size} with drop_last leaves no update on {n_train} training examples"
        )
    return plan


def log_steps(plan: list[tuple[int, int]], spec: RunSpec) -> set[int]:
    """Steps after which metrics are taken: 0, log-spaced ones, and every epoch end."""
    total = sum(k for _, k in plan)
    steps = {0, total}
    if spec.log.log_points > 0:
        steps |= {int(round(s)) for s in np.geomspace(1, total, spec.log.log_points)}
    if spec.log.every_epoch:
        steps |= set(np.cumsum([k for _, k in plan]).tolist())
    return steps
