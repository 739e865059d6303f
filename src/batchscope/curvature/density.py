"""Spectral density of an abstract symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit probe v, m Lanczos steps give T_m = S diag(theta) S^T; the nodes theta_i with weights
S[0, i]^2 form an m-point Gauss quadrature of v's spectral measure, so v^T f(A) v ~ sum_i w_i f(theta_i)
(exact for polynomials of degree < 2m). Averaged over Rademacher probes, sum_i w_i f(theta_i)
estimates tr f(A) / n; Gaussian broadening of the nodes turns that into a density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from batchscope.curvature.lanczos import LanczosBasis, Matvec
from batchscope.curvature.trace import rademacher


def slq(
    matvec: Matvec, n: int, num_probes: int, steps: int, *, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> tuple[list[Tensor], list[Tensor]]:
    """Per probe, Gauss quadrature nodes and weights (float64, host; weights sum to 1), from
    min(steps, n) fully reorthogonalized Lanczos steps. A probe whose Krylov space becomes invariant
    stops there: its quadrature is then exact, and continuing would leave the probe's measure."""
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes: expected an integer >= 1, got {num_probes!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lanczos_steps: expected an integer >= 1, got {steps!r}")
    steps = min(steps, n)
    nodes, weights = [], []
    for z in rademacher(num_probes, n, generator=generator, dtype=dtype, device=device):
        basis = LanczosBasis(matvec, z, capacity=steps + 1)
        for _ in range(steps):
            basis.step()
        alpha, beta = basis.tridiagonal()
        j = basis.first_breakdown(alpha, beta)
        if j is not None:
            basis.m = j + 1
            alpha, beta = alpha[: j + 1], beta[: j + 1]
        theta, S, _ = basis.ritz(alpha, beta)
        nodes.append(theta)
        weights.append(S[0] ** 2)
    return nodes, weights


def make_grid(nodes: list[Tensor], sigma: float, grid: int | Sequence[float] | Tensor | None) -> Tensor:
    """The evaluation grid: given points, or `grid` (default 1000) points spanning all nodes +- 5 sigma."""
    if grid is not None and not isinstance(grid, int):
        g = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        if g.numel() < 2 or not bool((g.diff() > 0).all()):
            raise ValueError("grid: expected an increasing sequence of at least 2 points")
        return g
    num = 1000 if grid is None else grid
    if num < 2:
        raise ValueError(f"grid: expected at least 2 points, got {num}")
    allnodes = torch.cat(nodes)
    return torch.linspace(float(allnodes.min()) - 5 * sigma, float(allnodes.max()) + 5 * sigma, num,
                          dtype=torch.float64)


def default_sigma(nodes: list[Tensor]) -> float:
    """1% of the spread of all nodes (or of their magnitude when they coincide)."""
    allnodes = torch.cat(nodes)
    width = float(allnodes.max() - allnodes.min())
    return 0.01 * (width if width > 0 else max(float(allnodes.abs().max()), 1.0))


def broaden(nodes: list[Tensor], weights: list[Tensor], grid: Tensor, sigma: float) -> Tensor:
    """Mean over probes of sum_i w_i N(x; theta_i, sigma^2) on `grid`, rescaled to integrate to 1 there
    (trapezoid rule), so mass cut off at the grid's ends does not bias the shape."""
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    density = torch.zeros_like(grid)
    for theta, w in zip(nodes, weights):
        z = (grid[:, None] - theta[None, :]) / sigma
        density += (torch.exp(-0.5 * z**2) * w[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))
    mass = float(torch.trapezoid(density, grid))
    if not mass > 0:
        raise ValueError("grid: holds no mass of the density; widen it or increase sigma")
    return density / mass
