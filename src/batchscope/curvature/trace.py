"""Stochastic trace estimators for an abstract symmetric operator `matvec: Tensor -> Tensor` on R^n.

* `hutchinson`: mean of z^T A z over Rademacher probes z; error = standard error of that mean.
* `hutchpp`: Hutch++ (Meyer, Musco, Musco, Woodruff 2021): the trace of A on a sketched dominant
  subspace, exactly, plus Hutchinson on the deflated rest. Where a few eigenvalues carry most of
  ||A||_F (as in neural-network Hessians) it reaches a given error with far fewer matvecs.

`samples` is the matvec budget in both. Probes are drawn on the host from `generator`, so a seed
gives the same estimate on every device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from batchscope.curvature.lanczos import Matvec


@dataclass
class TraceEstimate:
    """An estimate of tr(A) with its standard error (0 where the estimate is exact)."""

    trace: float
    stderr: float
    samples: int  # matvecs spent


def rademacher(count: int, n: int, *, generator: torch.Generator | None, dtype: torch.dtype,
               device: torch.device | str) -> Tensor:
    """(count, n) independent +-1 entries, drawn on the host."""
    z = torch.randint(0, 2, (count, n), generator=generator, dtype=torch.int8) * 2 - 1
    return z.to(dtype=dtype, device=device)


def _quadratic_forms(matvec: Matvec, Z: Tensor) -> Tensor:
    """z_i^T A z_i for each row z_i, float64 on the host."""
    return torch.stack([(z.double() @ matvec(z).double().reshape(-1)).cpu() for z in Z])


def _mean_and_stderr(x: Tensor) -> tuple[float, float]:
    # a single sample says nothing about its own spread
    stderr = float(x.std(unbiased=True)) / math.sqrt(x.numel()) if x.numel() > 1 else math.nan
    return float(x.mean()), stderr


def _check_samples(samples: int, least: int, method: str) -> None:
    if not isinstance(samples, numbers.Integral) or samples < least:
        raise ValueError(f"samples: {method} needs an integer >= {least}, got {samples!r}")


def hutchinson(
    matvec: Matvec, n: int, samples: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> TraceEstimate:
    """tr(A) as the mean of z^T A z over `samples` Rademacher probes (variance 2(||A||_F^2 - sum A_ii^2)
    per probe); one matvec per probe, probes drawn one at a time to keep memory at O(n)."""
    _check_samples(samples, 2, "hutchinson")
    samples = int(samples)
    forms = torch.cat([
        _quadratic_forms(matvec, rademacher(1, n, generator=generator, dtype=dtype, device=device))
        for _ in range(samples)
    ])
    trace, stderr = _mean_and_stderr(forms)
    return TraceEstimate(trace, stderr, samples)


def hutchpp(
    matvec: Matvec, n: int, samples: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> TraceEstimate:
    """tr(A) by Hutch++ with `samples` matvecs: s = samples//3 to sketch Q = orth(A S), s for
    tr(Q^T A Q), the remaining >= s for Hutchinson on (I - QQ^T) A (I - QQ^T). The first part is exact
    given Q, so `stderr` is the standard error of the residual Hutchinson mean. A budget >= n buys the
    exact trace sum_i e_i^T A e_i instead (n matvecs, stderr 0): no sampling can beat that."""
    _check_samples(samples, 3, "hutch++")
    samples = int(samples)
    if samples >= n:
        eye = torch.eye(n, dtype=dtype, device=device)
        return TraceEstimate(float(_quadratic_forms(matvec, eye).sum()), 0.0, n)
    s = samples // 3
    S = rademacher(s, n, generator=generator, dtype=dtype, device=device)
    Y = torch.stack([matvec(z).reshape(-1) for z in S])
    # orthonormal rows spanning A S; for rank-deficient A the extra columns are still orthonormal,
    # which keeps the estimator unbiased (any orthonormal Q splits the trace exactly)
    Q = torch.linalg.qr(Y.t()).Q.t().contiguous()
    del Y
    head = float(_quadratic_forms(matvec, Q).sum())
    G = rademacher(samples - 2 * s, n, generator=generator, dtype=dtype, device=device)
    # project twice: one pass leaves O(eps * ||G||) components along Q, which A can amplify
    for _ in range(2):
        G -= (G @ Q.t()) @ Q
    tail, stderr = _mean_and_stderr(_quadratic_forms(matvec, G))
    return TraceEstimate(head + tail, stderr, samples)
