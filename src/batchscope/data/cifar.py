"""CIFAR-10 and CIFAR-100 from the files a user already has: the binary or the python (pickle) version.

Python batches are unpickled by a restricted Unpickler that admits only numpy array reconstruction,
so a tampered file raises DataError instead of running code.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchscope.data.dataset import Dataset
from batchscope.data.files import read_bytes, require_dir
from batchscope.data.preprocess import from_numpy
from batchscope.errors import DataError

PIXELS = 3 * 32 * 32  # per image: 1024 red, 1024 green, 1024 blue bytes, each plane row-major


@dataclass(frozen=True)
class CifarFormat:
    """Where a CIFAR variant keeps its files, in each version, and how its labels are stored."""

    name: str
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: str
    py_dir: str
    py_train: tuple[str, ...]
    py_test: str
    label_bytes: int  # label bytes at the start of each binary record
    # label_mode -> (byte index in a binary record, key in a python batch, number of classes)
    label_modes: dict[str, tuple[int, str, int]]


CIFAR10 = CifarFormat(
    name="cifar10",
    bin_dir="cifar-10-batches-bin",
    bin_train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    bin_test="test_batch.bin",
    py_dir="cifar-10-batches-py",
    py_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    py_test="test_batch",
    label_bytes=1,
    label_modes={"fine": (0, "labels", 10)},
)
CIFAR100 = CifarFormat(
    name="cifar100",
    bin_dir="cifar-100-binary",
    bin_train=("train.bin",),
    bin_test="test.bin",
    py_dir="cifar-100-python",
    py_train=("train",),
    py_test="test",
    label_bytes=2,  # coarse label, then fine label
    label_modes={"coarse": (0, "coarse_labels", 20), "fine": (1, "fine_labels", 100)},
)


def load_cifar(fmt: CifarFormat, path: str | os.PathLike | None, label_mode: str = "fine") -> Dataset:
    """CIFAR images (N, 3, 32, 32) in [0, 1] from `path`: the binary or python directory, or its parent.

    The version is detected from the files present; the binary one wins if both are there.
    """
    directory, binary = _locate(fmt, path)
    label_index, label_key, num_classes = fmt.label_modes[label_mode]

    def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [
            read_cifar_binary(directory / f, fmt.label_bytes, label_index)
            if binary
            else read_cifar_pickle(directory / f, label_key)
            for f in files
        ]
        for f, (_, labels) in zip(files, parts):
            if labels.size and labels.max() >= num_classes:
                raise DataError(f"{directory / f}: label {labels.max()} found, expected classes 0-{num_classes - 1}")
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x_train, y_train = read(fmt.bin_train if binary else fmt.py_train)
    x_test, y_test = read((fmt.bin_test,) if binary else (fmt.py_test,))
    scale = np.float32(1 / 255)
    return from_numpy(fmt.name, x_train * scale, y_train, x_test * scale, y_test, num_classes, hflip=True, crop_pad=4)


def _locate(fmt: CifarFormat, path: str | os.PathLike | None) -> tuple[Path, bool]:
    """(directory holding the batches, whether it is the binary version)."""
    expected = f"{fmt.bin_dir}/{fmt.bin_train[0]} or {fmt.py_dir}/{fmt.py_train[0]}"
    root = require_dir(path, fmt.name, f"{fmt.name} ({fmt.bin_dir} or {fmt.py_dir})")
    for d in (root, root / fmt.bin_dir, root / fmt.py_dir):
        if (d / fmt.bin_train[0]).is_file():
            return d, True
        if (d / fmt.py_train[0]).is_file():
            return d, False
    raise DataError(f"{root}: no {fmt.name} data found (expected {expected})")


def read_cifar_binary(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) from a file of (label_bytes + 3072)-byte records."""
    record = label_bytes + PIXELS
    expected = f"CIFAR binary records of {record} bytes"
    data = read_bytes(path, expected)
    if not data or len(data) % record:
        raise DataError(f"{path}: truncated or not a CIFAR binary file ({len(data)} bytes, expected {expected})")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return records[:, label_bytes:].reshape(-1, 3, 32, 32), records[:, label_index].astype(np.int64)


def read_cifar_pickle(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) from a python-version batch (a pickled dict)."""
    expected = f"a CIFAR python batch (a pickled dict with 'data' and '{label_key}')"
    data = read_bytes(path, expected)
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as e:  # a malformed pickle can fail in many ways; all mean "not a CIFAR batch"
        raise DataError(f"{path}: not {expected} ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not {expected} (found a {type(batch).__name__})")
    # The original files are Python 2 pickles: keys arrive as bytes under encoding='bytes'.
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != PIXELS:
        raise DataError(f"{path}: 'data' is not a uint8 array of shape (N, {PIXELS}) (expected {expected})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: '{label_key}' is not a list of integers (expected {expected})") from e
    if labels.shape != (len(images),) or (labels.size and labels.min() < 0):
        raise DataError(f"{path}: '{label_key}' does not hold one non-negative label per image (expected {expected})")
    return images.reshape(-1, 3, 32, 32), labels


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 moved the module; pickles may name either location
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global (os.system, ...) is a DataError."""

    _ALLOWED = _allowed_globals()

    def __init__(self, file: io.BytesIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refusing to unpickle {module}.{name} (a CIFAR python batch holds only numpy arrays)"
            ) from None
