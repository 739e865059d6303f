"""`load_dataset`: data sets by name, with subsetting, label noise and standardization applied uniformly."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchscope.data import builtin
from batchscope.data.cifar import CIFAR10, CIFAR100, load_cifar
from batchscope.data.dataset import Dataset
from batchscope.data.idx import load_idx_dataset
from batchscope.data.options import choice_option, resolve_options
from batchscope.data.preprocess import add_label_noise, standardize
from batchscope.errors import DataError


@dataclass(frozen=True)
class _Entry:
    """A built-in set is called as build(seed, **options); a file set as build(path, **options)."""

    build: Callable[..., Dataset]
    from_files: bool
    options: Mapping[str, Any] = field(default_factory=dict)  # accepted options and their defaults


def _cifar100(path: str | os.PathLike | None, label_mode: str) -> Dataset:
    return load_cifar(CIFAR100, path, choice_option("cifar100", "label_mode", label_mode, ("fine", "coarse")))


_REGISTRY: dict[str, _Entry] = {
    "mnist1d": _Entry(builtin.mnist1d, False, builtin.MNIST1D_OPTIONS),
    "mnist5k": _Entry(builtin.mnist5k, False),
    "digits": _Entry(builtin.digits, False),
    "gaussian_mixture": _Entry(builtin.gaussian_mixture, False, builtin.GAUSSIAN_MIXTURE_OPTIONS),
    "teacher_student": _Entry(builtin.teacher_student, False, builtin.TEACHER_STUDENT_OPTIONS),
    "first_marker": _Entry(builtin.first_marker, False, builtin.FIRST_MARKER_OPTIONS),
    "mnist": _Entry(functools.partial(load_idx_dataset, "mnist"), True),
    "fashion_mnist": _Entry(functools.partial(load_idx_dataset, "fashion_mnist"), True),
    "cifar10": _Entry(functools.partial(load_cifar, CIFAR10), True),
    "cifar100": _Entry(_cifar100, True, {"label_mode": "fine"}),
}


def available_datasets() -> list[str]:
    """Names accepted by `load_dataset`, sorted."""
    return sorted(_REGISTRY)


def load_dataset(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    label_noise: float = 0.0,
    normalize: bool = True,
    **options: Any,
) -> Dataset:
    """Data set `name` as float32/int64 CPU tensors.

    Built-in sets take no `path`; file sets (mnist, fashion_mnist, cifar10, cifar100) require it.
    `seed` drives the seeded splits, synthetic generation and label noise. Steps, in order: keep
    the first n_train/n_test examples; replace a `label_noise` fraction of training labels by a
    different class; standardize with the statistics of the kept training inputs.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise DataError(f"unknown data set {name!r} (available: {', '.join(available_datasets())})")
    opts = resolve_options(name, options, entry.options)
    if entry.from_files:
        ds = entry.build(path, **opts)
    elif path is not None:
        raise DataError(f"{name}: built-in data set, takes no path (got {os.fspath(path)})")
    else:
        ds = entry.build(seed, **opts)
    ds = add_label_noise(ds.subset(n_train, n_test), label_noise, seed)
    return standardize(ds) if normalize else ds
