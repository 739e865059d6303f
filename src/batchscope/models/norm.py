"""Normalization layers: Ghost Batch Normalization (Hoffer et al. 2017) and the `norm_layer` factory."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from batchscope.errors import ModelError

NORM_KINDS: tuple[str, ...] = ("none", "batch", "ghost")


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose batch statistics come from consecutive chunks of `ghost_size` samples.

    Input (B, C, *spatial). In training mode the batch is split along dim 0 into chunks of
    `ghost_size` (the last one may be smaller); each chunk is normalized with its own biased
    mean/variance, gamma/beta are shared, and the running statistics receive one momentum update
    per chunk, in order, exactly as if nn.BatchNorm had been applied to each chunk in turn.
    Everything else (eval mode, `track_running_stats`, `momentum=None`) follows nn.BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        ghost_size: int = 128,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(ghost_size, bool) or not isinstance(ghost_size, int) or ghost_size < 1:
            raise ModelError(f"ghost_size {ghost_size!r}: expected an integer >= 1")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_size = ghost_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_size={self.ghost_size}"

    def forward(self, input: Tensor) -> Tensor:
        """(B, C, *spatial) -> same shape."""
        self._check_input_dim(input)
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_stats or input.shape[0] <= self.ghost_size:
            # One chunk (or running stats): identical to nn.BatchNorm, bit for bit.
            return super().forward(input)
        return self._ghost_forward(input)

    def _ghost_forward(self, x: Tensor) -> Tensor:
        batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
        ghost = self.ghost_size
        full_chunks, remainder = divmod(batch, ghost)
        values_per_sample = math.prod(spatial)
        if remainder * values_per_sample == 1:
            # Same condition (and message) as nn.BatchNorm on a one-sample batch: variance is undefined.
            raise ValueError(
                f"Expected more than 1 value per channel when training, got a last ghost chunk of "
                f"size {list((remainder, channels, *spatial))} (batch {batch}, ghost_size {ghost})"
            )

        # Full chunks in one go: (K, ghost, C, *spatial), statistics over all dims but K and C.
        head = x[: full_chunks * ghost].reshape(full_chunks, ghost, channels, *spatial)
        parts = [_normalize_chunks(head, self.eps)]
        if remainder:
            parts.append(_normalize_chunks(x[full_chunks * ghost :].unsqueeze(0), self.eps))
        out = torch.cat([normed.reshape(-1, channels, *spatial) for normed, _, _ in parts])

        if self.training and self.track_running_stats and self.running_mean is not None:
            means = torch.cat([mean for _, mean, _ in parts])
            unbiased = torch.cat(
                [var * _bessel(normed.shape[1] * values_per_sample) for normed, _, var in parts]
            )
            self._update_running_stats(means, unbiased)

        if self.affine:
            shape = (1, channels) + (1,) * len(spatial)
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, variances: Tensor) -> None:
        """Apply K sequential BN updates at once; means/variances are (K, C), in chunk order.

        EMA: m_K = (1-a)^K m_0 + sum_k a (1-a)^(K-k) x_k.  Cumulative average (momentum None):
        m_K = (n_0 m_0 + sum_k x_k) / (n_0 + K), n_0 = num_batches_tracked before the update.
        """
        chunks = means.shape[0]
        means, variances = means.detach(), variances.detach()
        if self.momentum is None:
            # Tensor arithmetic instead of float(num_batches_tracked): stays traceable, no sync.
            total = (self.num_batches_tracked + chunks).to(means.dtype)
            decay = self.num_batches_tracked.to(means.dtype) / total
            weights = torch.ones(chunks, dtype=means.dtype, device=means.device) / total
        else:
            keep = 1.0 - self.momentum
            decay = keep**chunks
            powers = torch.arange(chunks - 1, -1, -1, dtype=means.dtype, device=means.device)
            weights = self.momentum * keep**powers
        self.running_mean.mul_(decay).add_(weights @ means)
        self.running_var.mul_(decay).add_(weights @ variances)
        self.num_batches_tracked.add_(chunks)


def _normalize_chunks(chunks: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(K, n, C, *spatial) -> (normalized same shape, mean (K, C), biased var (K, C))."""
    dims = [1, *range(3, chunks.dim())]
    var, mean = torch.var_mean(chunks, dim=dims, correction=0, keepdim=True)
    normed = (chunks - mean) * torch.rsqrt(var + eps)
    k, c = chunks.shape[0], chunks.shape[2]
    return normed, mean.reshape(k, c), var.reshape(k, c)


def _bessel(count: int) -> float:
    """Factor turning a biased variance over `count` values into the unbiased one."""
    return count / (count - 1)


class GhostBatchNorm1d(GhostBatchNorm, nn.BatchNorm1d):
    """Ghost batch norm over (B, C) or (B, C, L) inputs; see `GhostBatchNorm`."""


class GhostBatchNorm2d(GhostBatchNorm, nn.BatchNorm2d):
    """Ghost batch norm over (B, C, H, W) inputs; see `GhostBatchNorm`."""


def norm_layer(kind: str, num_features: int, dims: int, ghost_size: int, momentum: float) -> nn.Module:
    """Normalization over `num_features` channels of a 1-D ((B,C) or (B,C,L)) or 2-D (B,C,H,W) input."""
    if kind not in NORM_KINDS:
        raise ModelError(f"norm {kind!r}: expected one of {', '.join(NORM_KINDS)}")
    if dims not in (1, 2):
        raise ModelError(f"norm dims {dims!r}: expected 1 or 2")
    if kind == "none":
        return nn.Identity()
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
        raise ModelError(f"bn_momentum {momentum!r}: expected a number in (0, 1]")
    if kind == "batch":
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features, momentum=momentum)
    ghost_cls = GhostBatchNorm1d if dims == 1 else GhostBatchNorm2d
    return ghost_cls(num_features, ghost_size=ghost_size, momentum=momentum)
