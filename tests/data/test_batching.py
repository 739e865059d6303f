"""epoch_batches and augment."""

import pytest
import torch
import torch.nn.functional as F

from batchscope.data import augment, epoch_batches
from batchscope.errors import DataError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- epoch_batches


@pytest.mark.parametrize("n,batch_size", [(10, 3), (12, 4), (5, 8), (1, 1)])
def test_epoch_covers_each_index_once(n, batch_size):
    batches = epoch_batches(n, batch_size, gen())
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))
    assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
    assert len(batches) == -(-n // batch_size) and batches[0].dtype == torch.int64


def test_epoch_drop_last():
    batches = epoch_batches(10, 3, gen(), drop_last=True)
    assert [len(b) for b in batches] == [3, 3, 3] and len(set(torch.cat(batches).tolist())) == 9
    assert [len(b) for b in epoch_batches(12, 4, gen(), drop_last=True)] == [4, 4, 4]
    with pytest.raises(DataError, match="batch_size=8 > n=5"):
        epoch_batches(5, 8, gen(), drop_last=True)
    with pytest.raises(DataError, match="batch_size=0"):
        epoch_batches(5, 0, gen())


def test_epoch_order_follows_the_generator():
    a, b = epoch_batches(100, 7, gen(3)), epoch_batches(100, 7, gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(epoch_batches(100, 7, gen(4))))
    g = gen(3)
    first, second = torch.cat(epoch_batches(100, 7, g)), torch.cat(epoch_batches(100, 7, g))
    assert not torch.equal(first, second)  # the generator advances: each epoch is a fresh permutation
    assert not torch.equal(first, torch.arange(100))


# ---------------------------------------------------------------- augment


@pytest.fixture
def images():
    return torch.randn(16, 3, 6, 5, generator=gen(42))  # non-square, so H and W cannot be confused


def test_augment_identity_without_options(images):
    g = gen()
    out = augment(images, g)
    assert torch.equal(out, images)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=gen()))  # nothing drawn


def test_hflip_mirrors_width_only(images):
    out = augment(images, gen(), hflip=True)
    assert out.shape == images.shape and out.dtype == images.dtype
    flipped = torch.tensor([torch.equal(o, x.flip(-1)) for o, x in zip(out, images)])
    kept = torch.tensor([torch.equal(o, x) for o, x in zip(out, images)])
    assert torch.all(flipped ^ kept)  # each image is either mirrored along W or untouched
    assert 0 < flipped.sum() < len(images)  # p = 0.5: both happen in 16 draws for this seed
    assert not any(torch.equal(o, x.flip(-2)) for o, x in zip(out, images))


def shifts_matching(out: torch.Tensor, x: torch.Tensor, pad: int, flip: bool = False) -> list[tuple[int, int, bool]]:
    """All (dy, dx, flipped) with out == crop of the zero-padded x at offset (dy, dx), maybe mirrored."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for f in (False, True) if flip else (False,):
                if torch.equal(out, crop.flip(-1) if f else crop):
                    found.append((dy, dx, f))
    return found


def test_crop_is_a_shift_of_the_padded_image(images):
    pad = 2
    out = augment(images, gen(), crop_pad=pad)
    assert out.shape == images.shape
    offsets = [shifts_matching(o, x, pad) for o, x in zip(out, images)]
    assert all(len(m) == 1 for m in offsets)  # exactly one offset reproduces each output
    assert len({m[0] for m in offsets}) > 3  # per-example offsets, not one shared shift
    # One example against a hand-made crop: pad by hand, slice at the offset found.
    dy, dx, _ = offsets[0][0]
    manual = torch.zeros(3, 6 + 2 * pad, 5 + 2 * pad)
    manual[:, pad : pad + 6, pad : pad + 5] = images[0]
    assert torch.equal(out[0], manual[:, dy : dy + 6, dx : dx + 5])


def test_crop_and_flip_together(images):
    out = augment(images, gen(1), crop_pad=1, hflip=True)
    matches = [shifts_matching(o, x, 1, flip=True) for o, x in zip(out, images)]
    assert all(len(m) == 1 for m in matches)
    flips = [m[0][2] for m in matches]
    assert any(flips) and not all(flips)


def test_augment_reproducible_from_the_generator(images):
    a = augment(images, gen(5), crop_pad=2, hflip=True)
    assert torch.equal(a, augment(images, gen(5), crop_pad=2, hflip=True))
    assert not torch.equal(a, augment(images, gen(6), crop_pad=2, hflip=True))
    assert torch.equal(images, torch.randn(16, 3, 6, 5, generator=gen(42)))  # input not modified


@pytest.mark.parametrize("shape", [(16, 9), (16, 2, 9)])
def test_signal_crop_is_a_shift_of_the_padded_signal(shape):
    x = torch.randn(*shape, generator=gen(3))
    pad = 2
    out = augment(x, gen(), crop_pad=pad)
    assert out.shape == x.shape
    padded = F.pad(x, (pad, pad))
    found = [[d for d in range(2 * pad + 1) if torch.equal(o, p[..., d : d + x.shape[-1]])] for o, p in zip(out, padded)]
    assert all(len(f) == 1 for f in found)  # exactly one shift reproduces each output (random data: no ties)
    assert len({f[0] for f in found}) > 2  # per-example shifts
    # a hand-made shift of the first example: its zeros enter on one side
    d = found[0][0]
    manual = torch.cat([torch.zeros(*x.shape[1:-1], pad), x[0], torch.zeros(*x.shape[1:-1], pad)], -1)[..., d : d + 9]
    assert torch.equal(out[0], manual)
    assert torch.equal(augment(x, gen(), crop_pad=pad), out)  # reproducible from the generator


def test_augment_rejects_what_it_cannot_shift():
    with pytest.raises(DataError, match=r"\(N, C, H, W\) or signals"):
        augment(torch.zeros(4, 1, 1, 3, 3), gen(), crop_pad=2)
    with pytest.raises(DataError, match="hflip is for images"):
        augment(torch.zeros(4, 40), gen(), hflip=True)
    with pytest.raises(DataError, match="crop_pad=-1"):
        augment(torch.zeros(4, 1, 3, 3), gen(), crop_pad=-1)
