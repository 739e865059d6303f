"""MNIST and Fashion-MNIST from the IDX files a user already has (plain or .gz)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from batchscope.data.dataset import Dataset
from batchscope.data.files import find_file, read_bytes, require_dir
from batchscope.data.preprocess import from_numpy
from batchscope.errors import DataError

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
IMAGES_MAGIC = 0x00000803  # 2051: (N, rows, cols) uint8
LABELS_MAGIC = 0x00000801  # 2049: (N,) uint8
_KIND = {IMAGES_MAGIC: "IDX image", LABELS_MAGIC: "IDX label"}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in the IDX file at `path`, whose big-endian header must carry `magic`."""
    kind = f"{_KIND[magic]} file"
    data = read_bytes(path, kind)
    if len(data) < 4:
        raise DataError(f"{path}: truncated {kind} ({len(data)} bytes, a 4-byte magic number expected)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: not an {kind} (magic {magic} expected, found {found})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated {kind} (header of {header} bytes expected, found {len(data)})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(data) - header != size:
        what = "truncated" if len(data) - header < size else "trailing bytes in"
        raise DataError(
            f"{path}: {what} {kind} ({size} data bytes expected for shape {dims}, found {len(data) - header})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_split(directory: Path, prefix: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, rows, cols) in [0, 1] and labels (N,) from `{prefix}-images-idx3-ubyte[.gz]`
    and `{prefix}-labels-idx1-ubyte[.gz]` in `directory`."""
    expected = f"{name} IDX files"
    images_path = find_file(directory, _gz_variants(f"{prefix}-images-idx3-ubyte"), expected)
    labels_path = find_file(directory, _gz_variants(f"{prefix}-labels-idx1-ubyte"), expected)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels but {images_path.name} holds {len(images)} images")
    if labels.size and labels.max() >= 10:
        raise DataError(f"{labels_path}: label {labels.max()} found, expected classes 0-9")
    return images[:, None] / np.float32(255.0), labels


def _gz_variants(stem: str) -> tuple[str, str]:
    return stem, f"{stem}.gz"


def load_idx_dataset(name: str, path: str | os.PathLike | None) -> Dataset:
    """MNIST-format data set `name` from the directory `path` holding the four IDX files (60k/10k for MNIST)."""
    directory = require_dir(path, name, f"{name} IDX files (train-images-idx3-ubyte, ...)")
    x_train, y_train = load_idx_split(directory, "train", name)
    x_test, y_test = load_idx_split(directory, "t10k", name)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{directory}: train images {x_train.shape[2:]} and test images {x_test.shape[2:]} differ")
    return from_numpy(name, x_train, y_train, x_test, y_test, 10, crop_pad=2)
