"""Mini-batch index schedules."""

from __future__ import annotations

import numbers

import torch

from batchscope.errors import DataError


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False) -> list[torch.Tensor]:
    """One epoch: a random permutation of range(n), drawn on CPU from `generator`, cut into int64
    index tensors of `batch_size` (the last one shorter unless `drop_last`)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise DataError(f"epoch_batches: n={n!r}, expected an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise DataError(f"epoch_batches: batch_size={batch_size!r}, expected an integer >= 1")
    if drop_last and batch_size > n:
        # An empty epoch would silently train for zero steps.
        raise DataError(f"epoch_batches: batch_size={batch_size} > n={n} with drop_last leaves no batch")
    batches = list(torch.randperm(int(n), generator=generator).split(int(batch_size)))
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
