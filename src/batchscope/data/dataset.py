"""The `Dataset` container: a train/test split of in-memory tensors plus what augmentation may do."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

from batchscope.errors import DataError


@dataclass(eq=False, repr=False)
class Dataset:
    """A data set held in memory.

    x_* are tensors of shape (N, *input_shape): float, or integer token ids (kept as integers). y_* are int64 class
    labels of shape (N,) for the built-in sets; a user's data may have int64 labels of shape (N, ...) (token-level)
    or float targets of shape (N, ...) (regression; `num_classes` is then the number of target values per example).
    `hflip` says whether a horizontal flip keeps the label; `crop_pad` is the default zero padding
    (pixels per side) for random-crop augmentation, 0 where cropping makes no sense.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    hflip: bool = False
    crop_pad: int = 0

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if tuple(x.shape[1:]) != self.input_shape:
                raise DataError(
                    f"{self.name}: x_{split} has shape {tuple(x.shape)}, expected (N, *{self.input_shape})"
                )
            if y.dim() == 0 or y.shape[0] != x.shape[0]:
                raise DataError(f"{self.name}: y_{split} has shape {tuple(y.shape)}, expected ({x.shape[0]}, ...)")
            if y.dtype != torch.int64 and not y.is_floating_point():
                raise DataError(f"{self.name}: y_{split} has dtype {y.dtype}, expected torch.int64 labels or float targets")

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, hflip={self.hflip}, "
            f"crop_pad={self.crop_pad}, dtype={self.x_train.dtype}, device={self.x_train.device})"
        )

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Dataset:
        """A copy with all tensors on `device`; float inputs and float targets cast to `dtype` if given, integer
        ones (labels, token ids) left as they are."""
        if dtype is not None and not dtype.is_floating_point:
            raise DataError(f"{self.name}: input dtype must be floating point, got {dtype}")

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return dataclasses.replace(
            self, x_train=move(self.x_train), y_train=move(self.y_train), x_test=move(self.x_test), y_test=move(self.y_test)
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """A copy keeping the first `n_train` training and `n_test` test examples (None keeps all)."""
        n_train = self.n_train if n_train is None else _check_count(self.name, "n_train", n_train, self.n_train, 1)
        n_test = self.n_test if n_test is None else _check_count(self.name, "n_test", n_test, self.n_test, 0)
        return dataclasses.replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )


def _check_count(name: str, what: str, n: int, available: int, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not minimum <= n <= available:
        raise DataError(f"{name}: {what}={n!r} requested, expected an integer in [{minimum}, {available}]")
    return int(n)
