"""Loaders of user-supplied files: tiny IDX and CIFAR files written in the exact formats."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from batchscope.data import load_dataset
from batchscope.errors import DataError

# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, one big-endian uint32 per dimension, then the uint8 data."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path, data: bytes):
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def idx_arrays():
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), 2051),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, 7, dtype=np.uint8), 2049),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), 2051),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, 3, dtype=np.uint8), 2049),
    }


def write_idx_dir(directory, arrays, gz: bool):
    directory.mkdir(exist_ok=True)
    for stem, (array, magic) in arrays.items():
        write(directory / (stem + (".gz" if gz else "")), idx_bytes(array, magic))
    return directory


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_round_trip(tmp_path, idx_arrays, gz, name):
    d = write_idx_dir(tmp_path / "mnist", idx_arrays, gz)
    ds = load_dataset(name, path=d, normalize=False)
    assert ds.name == name and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert (ds.n_train, ds.n_test) == (7, 3) and ds.crop_pad == 2 and not ds.hflip
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    images, labels = idx_arrays["train-images-idx3-ubyte"][0], idx_arrays["train-labels-idx1-ubyte"][0]
    torch.testing.assert_close(ds.x_train[:, 0], torch.from_numpy(images / np.float32(255)))
    assert ds.y_train.tolist() == labels.tolist()
    assert ds.y_test.tolist() == idx_arrays["t10k-labels-idx1-ubyte"][0].tolist()
    torch.testing.assert_close(ds.x_test[2, 0, 5, 7].item(), idx_arrays["t10k-images-idx3-ubyte"][0][2, 5, 7] / 255)


def test_idx_normalized_with_train_statistics(tmp_path, idx_arrays):
    d = write_idx_dir(tmp_path / "mnist", idx_arrays, gz=False)
    raw = load_dataset("mnist", path=d, normalize=False)
    ds = load_dataset("mnist", path=d)
    assert abs(ds.x_train.mean().item()) < 1e-5 and abs(ds.x_train.std(unbiased=False).item() - 1) < 1e-4
    mean, std = raw.x_train.double().mean(), raw.x_train.double().std(unbiased=False)
    torch.testing.assert_close(ds.x_test, ((raw.x_test.double() - mean) / std).float())


def test_idx_wrong_magic(tmp_path, idx_arrays):
    d = write_idx_dir(tmp_path / "mnist", idx_arrays, gz=False)
    labels = idx_arrays["train-labels-idx1-ubyte"][0]
    write(d / "train-images-idx3-ubyte", idx_bytes(labels, 2049))  # a label file where images belong
    with pytest.raises(DataError, match="magic 2051 expected, found 2049") as e:
        load_dataset("mnist", path=d)
    assert str(d / "train-images-idx3-ubyte") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, idx_arrays, gz):
    d = write_idx_dir(tmp_path / "mnist", idx_arrays, gz)
    f = d / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(DataError, match="truncated") as e:
        load_dataset("mnist", path=d)
    assert str(f) in str(e.value)


def test_idx_trailing_bytes_and_count_mismatch(tmp_path, idx_arrays):
    d = write_idx_dir(tmp_path / "mnist", idx_arrays, gz=False)
    f = d / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="trailing bytes"):
        load_dataset("mnist", path=d)
    write(f, idx_bytes(np.zeros(6, np.uint8), 2049))
    with pytest.raises(DataError, match="6 labels but train-images-idx3-ubyte holds 7 images") as e:
        load_dataset("mnist", path=d)
    assert str(f) in str(e.value)


def test_idx_missing_file_and_directory(tmp_path, idx_arrays):
    d = write_idx_dir(tmp_path / "mnist", idx_arrays, gz=False)
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz") as e:
        load_dataset("mnist", path=d)
    assert str(d) in str(e.value)
    with pytest.raises(DataError, match="no such directory") as e:
        load_dataset("fashion_mnist", path=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", path=d / "train-images-idx3-ubyte")
    with pytest.raises(DataError, match="path is required"):
        load_dataset("mnist")


# ---------------------------------------------------------------- CIFAR binary


def cifar_records(n: int, label_bytes: int, seed: int) -> np.ndarray:
    """n records of label_bytes label bytes (each < 10 so valid for every mode) + 3072 pixel bytes."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.integers(0, 10, (n, label_bytes), dtype=np.uint8), rng.integers(0, 256, (n, 3072), dtype=np.uint8)],
        axis=1,
    )


def write_cifar10_bin(root, records_per_file=2):
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    train = [cifar_records(records_per_file, 1, i) for i in range(5)]
    for i, rec in enumerate(train, 1):
        (d / f"data_batch_{i}.bin").write_bytes(rec.tobytes())
    test = cifar_records(3, 1, 99)
    (d / "test_batch.bin").write_bytes(test.tobytes())
    return d, np.concatenate(train), test


def test_cifar10_binary_round_trip(tmp_path):
    d, train, test = write_cifar10_bin(tmp_path)
    for path in (tmp_path, d):  # the batches directory or its parent
        ds = load_dataset("cifar10", path=path, normalize=False)
        assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.hflip and ds.crop_pad == 4
        assert (ds.n_train, ds.n_test) == (10, 3)
        assert ds.y_train.tolist() == train[:, 0].tolist() and ds.y_test.tolist() == test[:, 0].tolist()
        # Record layout: label, then the red, green and blue 32x32 planes, each row-major.
        red_of_4th = train[3, 1:1025].reshape(32, 32) / np.float32(255)
        blue_of_4th = train[3, 1 + 2048 :].reshape(32, 32) / np.float32(255)
        torch.testing.assert_close(ds.x_train[3, 0], torch.from_numpy(red_of_4th))
        torch.testing.assert_close(ds.x_train[3, 2], torch.from_numpy(blue_of_4th))
        assert ds.x_test[1, 1, 0, 5].item() == pytest.approx(test[1, 1 + 1024 + 5] / 255)


def test_cifar100_binary_label_modes(tmp_path):
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    train, test = cifar_records(4, 2, 0), cifar_records(2, 2, 1)
    (d / "train.bin").write_bytes(train.tobytes())
    (d / "test.bin").write_bytes(test.tobytes())
    fine = load_dataset("cifar100", path=d, normalize=False)
    coarse = load_dataset("cifar100", path=tmp_path, normalize=False, label_mode="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.y_train.tolist() == train[:, 1].tolist() and fine.y_test.tolist() == test[:, 1].tolist()
    assert coarse.y_train.tolist() == train[:, 0].tolist()
    torch.testing.assert_close(fine.x_train.flatten(1), torch.from_numpy(train[:, 2:] / np.float32(255)))
    with pytest.raises(DataError, match="label_mode='medium'"):
        load_dataset("cifar100", path=d, label_mode="medium")
    with pytest.raises(DataError, match="unknown option.*label_mode"):
        load_dataset("cifar10", path=d, label_mode="fine")


def test_cifar_binary_truncated_missing_and_bad_label(tmp_path):
    d, _, _ = write_cifar10_bin(tmp_path)
    f = d / "data_batch_2.bin"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataError, match="3073") as e:
        load_dataset("cifar10", path=d)
    assert str(f) in str(e.value)
    f.unlink()
    with pytest.raises(DataError, match="no such file") as e:
        load_dataset("cifar10", path=d)
    assert str(f) in str(e.value)
    bad = cifar_records(2, 1, 0)
    bad[0, 0] = 10
    f.write_bytes(bad.tobytes())
    with pytest.raises(DataError, match="label 10 found"):
        load_dataset("cifar10", path=d)


def test_cifar_directory_without_data(tmp_path):
    expected = "cifar-10-batches-bin/data_batch_1.bin or cifar-10-batches-py/data_batch_1"
    with pytest.raises(DataError, match=expected) as e:
        load_dataset("cifar10", path=tmp_path)
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------- CIFAR python (pickles)


def py2_pickle(batch: dict) -> bytes:
    """A CIFAR batch pickled the way Python 2's cPickle wrote the originals (protocol 2: str as
    BINSTRING, arrays through numpy.core.multiarray._reconstruct)."""

    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    def array(a: np.ndarray) -> bytes:
        dtype = b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"  # dtype('u1', False, True)
        dtype += b"(K\x03" + string(b"|") + b"NNN" + integer(-1) + integer(-1) + b"K\x00tb"  # __setstate__
        shape = b"(" + b"".join(integer(d) for d in a.shape) + b"t"
        new = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
        return new + b"(K\x01" + shape + dtype + b"\x89" + string(a.tobytes()) + b"tb"

    def value(v) -> bytes:
        return array(v) if isinstance(v, np.ndarray) else b"](" + b"".join(integer(i) for i in v) + b"e"

    return b"\x80\x02}(" + b"".join(string(k) + value(v) for k, v in batch.items()) + b"u."


def write_cifar10_py(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for f, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
        batches[f] = {
            b"batch_label": np.zeros(0, np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (d / f).write_bytes(py2_pickle(batches[f]))
    return d, batches


def test_cifar10_python_round_trip(tmp_path):
    d, batches = write_cifar10_py(tmp_path)
    ds = load_dataset("cifar10", path=tmp_path, normalize=False)
    assert (ds.n_train, ds.n_test) == (10, 3) and ds.input_shape == (3, 32, 32)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert ds.y_train.tolist() == sum((b[b"labels"] for b in train), [])
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]
    data = np.concatenate([b[b"data"] for b in train])
    torch.testing.assert_close(ds.x_train, torch.from_numpy(data.reshape(-1, 3, 32, 32) / np.float32(255)))


def test_cifar100_python_round_trip(tmp_path):
    # A batch re-pickled by Python 3 + numpy 2: protocol 3, numpy._core module names.
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for f, n in [("train", 4), ("test", 2)]:
        batches[f] = {
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        (d / f).write_bytes(pickle.dumps(batches[f], protocol=3))
    fine = load_dataset("cifar100", path=d, normalize=False)
    coarse = load_dataset("cifar100", path=tmp_path, normalize=False, label_mode="coarse")
    assert fine.y_train.tolist() == batches["train"][b"fine_labels"]
    assert coarse.y_test.tolist() == batches["test"][b"coarse_labels"]
    torch.testing.assert_close(fine.x_test.flatten(1), torch.from_numpy(batches["test"][b"data"] / np.float32(255)))


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, protocol):
    d, _ = write_cifar10_py(tmp_path)
    marker = tmp_path / "pwned"
    payload = {"data": _RunsShell(marker), "labels": [0]}
    (d / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system") as e:
        load_dataset("cifar10", path=d)
    assert str(d / "data_batch_1") in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("global_", [b"builtins\neval\n", b"numpy\nload\n", b"__builtin__\nexec\n"])
def test_pickle_admits_only_numpy_array_reconstruction(tmp_path, global_):
    d, _ = write_cifar10_py(tmp_path)
    (d / "test_batch").write_bytes(b"\x80\x02c" + global_ + b"U\x011\x85R.")  # global('1')
    with pytest.raises(DataError, match="refusing to unpickle") as e:
        load_dataset("cifar10", path=d)
    assert str(d / "test_batch") in str(e.value)


def test_malformed_pickles(tmp_path):
    d, batches = write_cifar10_py(tmp_path)
    f = d / "data_batch_3"
    f.write_bytes(py2_pickle(batches["data_batch_3"])[:-40])
    with pytest.raises(DataError, match="not a CIFAR python batch") as e:
        load_dataset("cifar10", path=d)
    assert str(f) in str(e.value)
    f.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="found a list"):
        load_dataset("cifar10", path=d)
    f.write_bytes(py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        load_dataset("cifar10", path=d)
    f.write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DataError, match="one non-negative label per image"):
        load_dataset("cifar10", path=d)
