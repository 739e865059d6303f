"""Extreme eigenpairs of an abstract symmetric operator `matvec: Tensor -> Tensor`.

No model knowledge lives here: the operator is any symmetric linear map on flat vectors of length n.
Vectors stay in the operator's dtype and device; the small tridiagonal matrix and its Ritz pairs are
handled in float64 on the host, where they cost nothing next to one matvec.

* `lanczos`: Lanczos with full reorthogonalization (classical Gram-Schmidt, twice), stopping when the
  Ritz residual |beta_m * s_{m,i}| <= tol * max|Ritz value| for each of the k wanted pairs.
* `power_iteration`: power iteration with deflation and a relative-change stopping rule, the way
  PyHessian computes top eigenvalues; kept for comparison.
* `LanczosBasis`: the Krylov basis itself, shared with stochastic Lanczos quadrature (`density.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]
Which = Literal["top", "bottom", "magnitude"]
WHICH = ("top", "bottom", "magnitude")


@dataclass
class SpectralResult:
    """Ritz pairs of a symmetric operator, in the order asked for (see `select`)."""

    eigenvalues: Tensor  # (k,) float64, host
    eigenvectors: Tensor  # (k, n), operator dtype/device, unit norm
    residuals: Tensor  # (k,) float64: ||A x - theta x|| (Lanczos: |beta_m s_{m,i}|)
    converged: bool
    iterations: int  # matvecs spent


def check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which: expected 'top', 'bottom' or 'magnitude', got {which!r}")


def select(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted values: largest first (top), smallest first (bottom), largest |.| first."""
    if which == "top":
        order = torch.argsort(values, descending=True)
    elif which == "bottom":
        order = torch.argsort(values)
    else:
        order = torch.argsort(values.abs(), descending=True)
    return order[:k]


def _cgs2(Q: Tensor, w: Tensor) -> Tensor:
    """Orthogonalize w against the rows of Q in place, classical Gram-Schmidt twice (one pass loses
    orthogonality in proportion to the condition of the basis; two restore it to working precision).
    Returns the total coefficients Q w."""
    h = Q @ w
    w.addmv_(Q.t(), h, alpha=-1)
    h2 = Q @ w
    w.addmv_(Q.t(), h2, alpha=-1)
    return h + h2


class LanczosBasis:
    """An orthonormal Krylov basis Q and its tridiagonal T = Q^T A Q, grown one matvec at a step.

    Q lives in one tensor whose capacity doubles when full, so long runs cost amortized O(1) copies
    and short runs do not reserve memory for `max_iter` vectors. alpha/beta live on the operator's
    device in float64 so a step never waits on the host; `tridiagonal()` is the only sync.
    """

    def __init__(self, matvec: Matvec, q0: Tensor, *, capacity: int = 32) -> None:
        self.matvec, self.n = matvec, q0.numel()
        self.dtype, self.device = q0.dtype, q0.device
        cap = max(2, min(capacity, self.n + 1))
        self.Q = torch.empty(cap, self.n, dtype=self.dtype, device=self.device)
        self.Q[0] = q0 / torch.linalg.vector_norm(q0)
        self.alpha = torch.zeros(cap, dtype=torch.float64, device=self.device)
        self.beta = torch.zeros(cap, dtype=torch.float64, device=self.device)
        self.m = 0  # steps taken: Q[:m+1] is filled, T is m x m
        self.matvecs = 0
        self.block_start = 0  # T splits into blocks at restarts; earlier zero betas are not breakdowns
        # below this a beta means the Krylov space is (numerically) invariant
        self._tiny = torch.finfo(self.dtype).eps

    def _grow(self) -> None:
        cap = min(2 * self.Q.shape[0], self.n + 1)
        Q = torch.empty(cap, self.n, dtype=self.dtype, device=self.device)
        Q[: self.Q.shape[0]] = self.Q
        self.Q = Q
        self.alpha = torch.cat([self.alpha, self.alpha.new_zeros(cap - self.alpha.numel())])
        self.beta = torch.cat([self.beta, self.beta.new_zeros(cap - self.beta.numel())])

    def step(self) -> None:
        """One matvec: w = A q_j, reorthogonalized against the whole basis, becomes q_{j+1}."""
        j = self.m
        if j + 2 > self.Q.shape[0]:
            self._grow()
        w = self.matvec(self.Q[j]).to(dtype=self.dtype, device=self.device).reshape(-1)
        # full reorthogonalization subsumes the three-term recurrence: c[j] is alpha_j
        c = _cgs2(self.Q[: j + 1], w)
        b = torch.linalg.vector_norm(w)
        self.alpha[j] = c[j]
        self.beta[j] = b
        # clamp instead of branching on b (a host sync); an exact zero is repaired in `restart_at`
        torch.div(w, b.clamp_min(torch.finfo(self.dtype).tiny), out=self.Q[j + 1])
        self.m = j + 1
        self.matvecs += 1

    def tridiagonal(self) -> tuple[Tensor, Tensor]:
        """(alpha[:m], beta[:m]) on the host, float64; beta[m-1] couples T to the next vector."""
        return self.alpha[: self.m].to("cpu", copy=True), self.beta[: self.m].to("cpu", copy=True)

    def first_breakdown(self, alpha: Tensor, beta: Tensor) -> int | None:
        """Index j of the first beta_j (j < m-1) that is zero relative to ||T||: steps after it
        continued from a vector that was rounding noise (or exactly zero)."""
        scale = float(torch.cat([alpha.abs(), beta.abs()]).max()) if alpha.numel() else 0.0
        tiny = self._tiny * max(scale, torch.finfo(torch.float64).tiny)
        small = (beta[self.block_start : self.m - 1] <= tiny).nonzero()
        return self.block_start + int(small[0]) if small.numel() else None

    def restart_at(self, j: int, generator: torch.Generator | None) -> None:
        """Truncate to j+1 steps, set beta_j = 0 (T splits into blocks) and continue from a random
        vector orthogonal to the basis: Lanczos restarted inside the complement of an invariant space."""
        self.m = self.block_start = j + 1
        self.beta[j] = 0.0
        self.alpha[self.m :] = 0.0
        self.beta[self.m :] = 0.0
        r = _random(self.n, self.dtype, self.device, generator)
        _cgs2(self.Q[: self.m], r)
        self.Q[self.m] = r / torch.linalg.vector_norm(r)

    def ritz(self, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values theta (ascending), eigenvectors S of T, and residual norms |beta_m S[m-1, i]|."""
        m = alpha.numel()
        T = torch.diag(alpha)
        if m > 1:
            off = beta[: m - 1]
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        # the Krylov space is all of R^n: every Ritz pair is exact
        res = torch.zeros(m, dtype=torch.float64) if m >= self.n else (beta[m - 1] * S[m - 1]).abs()
        return theta, S, res

    def vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors Q^T S for the columns of S, as rows, unit norm."""
        X = S.t().to(dtype=self.dtype, device=self.device) @ self.Q[: self.m]
        return X / torch.linalg.vector_norm(X, dim=1, keepdim=True)


def _random(n: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A Gaussian vector drawn on the host (so a seed gives the same vector on every device)."""
    return torch.randn(n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def _start(
    n: int, v0: Tensor | None, dtype: torch.dtype | None, device: torch.device | str | None,
    generator: torch.Generator | None,
) -> Tensor:
    if v0 is not None:
        v0 = v0.detach().reshape(-1)
        if v0.numel() != n:
            raise ValueError(f"v0: expected {n} entries, got {v0.numel()}")
        v0 = v0.to(dtype=dtype or v0.dtype, device=device or v0.device).clone()
        if not bool(torch.isfinite(v0).all()) or float(torch.linalg.vector_norm(v0)) == 0.0:
            raise ValueError("v0: must be finite and non-zero")
        return v0
    return _random(n, dtype or torch.float64, torch.device(device or "cpu"), generator)


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= {n} (the operator's dimension), got {k}")


def lanczos(
    matvec: Matvec,
    n: int,
    k: int = 1,
    which: Which = "top",
    tol: float = 1e-4,
    *,
    v0: Tensor | None = None,
    max_iter: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    check_every: int | None = None,
) -> SpectralResult:
    """k extreme eigenpairs of the symmetric operator `matvec` on R^n by Lanczos with full
    reorthogonalization, stopping when every wanted Ritz residual is <= tol * max|Ritz value|.

    v0: starting vector (e.g. the previous top eigenvector for a warm start; random if None). A start
    lying exactly in an invariant subspace with >= k eigenvalues returns that subspace's pairs, as any
    Krylov method would; for the same reason an exactly repeated eigenvalue shows up once (single-vector
    Lanczos sees one direction of its eigenspace). max_iter: matvec budget (default
    min(n, max(300, 20k))). dtype/device: of the vectors (default: v0's, else float64 on cpu).
    check_every: matvecs between convergence checks (each check syncs with the device; default 1 on
    cpu, where syncs are free, else 4).
    """
    check_which(which)
    _check_k(k, n)
    if not tol > 0:
        raise ValueError(f"tol: expected > 0, got {tol}")
    max_iter = min(n, max(300, 20 * k) if max_iter is None else max_iter)
    if max_iter < k:
        raise ValueError(f"max_iter: expected >= k = {k}, got {max_iter}")
    q0 = _start(n, v0, dtype, device, generator)
    if check_every is None:
        check_every = 1 if q0.device.type == "cpu" else 4
    basis = LanczosBasis(matvec, q0, capacity=min(max_iter, 2 * k + 30) + 1)
    converged = False
    while True:
        basis.step()
        m = basis.m
        if m < k or (m - k) % check_every and m < max_iter:
            continue
        alpha, beta = basis.tridiagonal()
        j = basis.first_breakdown(alpha, beta)
        if j is not None and j + 1 < k and j + 1 < n:
            basis.restart_at(j, generator)  # too few pairs in the invariant space: explore beyond it
            continue
        if j is not None:
            # the Krylov space up to j is invariant and holds >= k exact pairs; the steps after it
            # ran on rounding noise and are dropped (see the docstring on starts in invariant spaces)
            basis.m = j + 1
            alpha, beta = alpha[: j + 1], beta[: j + 1]
            beta[j] = 0.0
        theta, S, res = basis.ritz(alpha, beta)
        idx = select(theta, k, which)
        scale = float(theta.abs().max())
        converged = bool((res[idx] <= tol * scale).all()) or basis.m >= n
        if converged or basis.m >= max_iter:
            break
    return SpectralResult(theta[idx], basis.vectors(S[:, idx]), res[idx], converged, basis.matvecs)


def power_iteration(
    matvec: Matvec,
    n: int,
    k: int = 1,
    tol: float = 1e-3,
    *,
    max_iter: int = 100,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> SpectralResult:
    """k dominant (largest |.|) eigenpairs by power iteration as PyHessian runs it: each pair from a
    fresh random vector, deflated by projecting out the pairs already found, stopped when the Rayleigh
    quotient changes by < tol relative (a rule that says nothing about the actual error), or after
    max_iter matvecs per pair. Returned largest |.| first."""
    _check_k(k, n)
    dtype = dtype or torch.float64
    device = torch.device(device or "cpu")
    found: list[Tensor] = []
    values, residuals = [], []
    total, converged = 0, True
    for _ in range(k):
        v = _random(n, dtype, device, generator)
        v /= torch.linalg.vector_norm(v)
        value, stopped = None, False
        deflate = torch.stack(found) if found else None
        for _ in range(max_iter):
            if deflate is not None:
                _cgs2(deflate, v)
                v /= torch.linalg.vector_norm(v)
            hv = matvec(v).to(dtype=dtype, device=device).reshape(-1)
            total += 1
            new = float(hv @ v)
            residual = float(torch.linalg.vector_norm(hv - new * v))
            v = hv / torch.linalg.vector_norm(hv)
            if value is not None and abs(value - new) / (abs(value) + 1e-6) < tol:
                value, stopped = new, True
                break
            value = new
        converged &= stopped
        found.append(v)
        values.append(value)
        residuals.append(residual)
    vals = torch.tensor(values, dtype=torch.float64)
    order = select(vals, k, "magnitude")
    return SpectralResult(
        vals[order], torch.stack(found)[order], torch.tensor(residuals, dtype=torch.float64)[order], converged, total
    )
