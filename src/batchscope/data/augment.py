"""Batched augmentation: random crop after zero padding (images and 1-D signals) and random horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchscope.errors import DataError


def augment(x: torch.Tensor, generator: torch.Generator, *, crop_pad: int = 0, hflip: bool = False) -> torch.Tensor:
    """Augmented copy of images x (N, C, H, W) or signals (N, L) / (N, C, L), on x's device, without a loop
    over examples.

    Each image is zero-padded by `crop_pad` pixels per side and cropped back to (H, W) at an offset
    drawn uniformly from [0, 2 * crop_pad]^2; with `hflip` it is then mirrored along W with p = 0.5.
    Randomness is drawn on CPU from `generator` (offsets first, then flips), so results are the
    same on every device. With crop_pad=0 and hflip=False, x itself is returned. A signal is shifted
    along L the same way (a random translation: MNIST-1D's own generator translates its templates).
    """
    if isinstance(crop_pad, bool) or not isinstance(crop_pad, int) or crop_pad < 0:
        raise DataError(f"augment: crop_pad={crop_pad!r}, expected an integer >= 0")
    if crop_pad == 0 and not hflip:
        return x
    if x.dim() in (2, 3):
        return _shift_signals(x, generator, crop_pad, hflip)
    if x.dim() != 4:
        raise DataError(f"augment: images (N, C, H, W) or signals (N, L) / (N, C, L) expected, got {tuple(x.shape)}")
    n, _, h, w = x.shape
    rows = torch.arange(h).expand(n, h)
    cols = torch.arange(w).expand(n, w)
    if crop_pad:
        offsets = torch.randint(0, 2 * crop_pad + 1, (2, n, 1), generator=generator)
        rows, cols = rows + offsets[0], cols + offsets[1]
        x = F.pad(x, (crop_pad, crop_pad, crop_pad, crop_pad))
    if hflip:
        # Reading the cropped columns in reverse order is the flip; it folds into the same gather.
        flip = torch.rand(n, 1, generator=generator) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing on (N, H', W', C) gives (N, H, W, C): out[i, :, r, c] = x[i, :, rows[i, r], cols[i, c]].
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _shift_signals(x: torch.Tensor, generator: torch.Generator, crop_pad: int, hflip: bool) -> torch.Tensor:
    """Signals zero-padded by `crop_pad` at both ends of L and cropped back at an offset in [0, 2 * crop_pad]."""
    if hflip:
        raise DataError("augment: hflip is for images; a reversed signal need not keep its label")
    n, length = x.shape[0], x.shape[-1]
    offsets = torch.randint(0, 2 * crop_pad + 1, (n, 1), generator=generator)
    cols = (torch.arange(length).expand(n, length) + offsets).to(x.device)
    padded = F.pad(x, (crop_pad, crop_pad))
    if x.dim() == 2:
        return padded.gather(1, cols).contiguous()
    return padded.gather(2, cols[:, None, :].expand(n, x.shape[1], length)).contiguous()
