"""Transformations applied to whole data sets: seeded splits, label noise, standardization."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from batchscope.data.dataset import Dataset
from batchscope.errors import DataError


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test): round(test_fraction * n_c) of each class c go to test.

    Both index arrays are shuffled, so any prefix of either is a random sample across classes.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def add_label_noise(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """Replace round(fraction * n_train) training labels, chosen by `seed`, with a different random class.

    Test labels are untouched.
    """
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise DataError(f"{ds.name}: label_noise={fraction!r}, expected a fraction in [0, 1)")
    n_flip = int(round(fraction * ds.n_train))
    if n_flip == 0:
        return ds
    if ds.num_classes < 2:
        raise DataError(f"{ds.name}: label_noise needs at least 2 classes, found {ds.num_classes}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(ds.n_train, generator=g)[:n_flip]
    # Adding a shift in [1, C-1] modulo C gives a uniformly random *different* class.
    shift = torch.randint(1, ds.num_classes, (n_flip,), generator=g)
    y = ds.y_train.clone()
    y[idx] = (y[idx] + shift.to(y.device)) % ds.num_classes
    return dataclasses.replace(ds, y_train=y)


def standardize(ds: Dataset) -> Dataset:
    """Subtract the training mean and divide by the training std: per channel for images
    (N, C, H, W), one global pair for 1-D inputs (N, L). Constant inputs keep std 1."""
    x = ds.x_train.double()
    dims = [0, *range(2, x.dim())] if x.dim() >= 3 else list(range(x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    mean, std = mean.squeeze(0), std.squeeze(0)  # broadcast against (N, *input_shape)

    def apply(t: torch.Tensor) -> torch.Tensor:
        return ((t.double() - mean) / std).to(t.dtype)

    return dataclasses.replace(ds, x_train=apply(ds.x_train), x_test=apply(ds.x_test))


def from_numpy(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    hflip: bool = False,
    crop_pad: int = 0,
) -> Dataset:
    """Wrap numpy arrays as a CPU Dataset: inputs float32, labels int64; input_shape from x_train."""

    def xs(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def ys(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return Dataset(
        name=name,
        x_train=xs(x_train),
        y_train=ys(y_train),
        x_test=xs(x_test),
        y_test=ys(y_test),
        num_classes=int(num_classes),
        input_shape=tuple(x_train.shape[1:]),
        hflip=hflip,
        crop_pad=crop_pad,
    )
