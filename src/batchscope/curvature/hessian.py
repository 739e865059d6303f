"""The Hessian of the training loss: extreme eigenvalues, trace, spectral density, and a SciPy operator.

Every function measures H = d^2 f / d theta^2 for f(theta) = the loss averaged over all examples of
`data` (batches weighted by their size), at the model's current weights (theta: its trainable
parameters, or those `wrt` selects, the others held fixed: a per-layer or per-block Hessian), in
measurement mode: dropout off, batch norm with running statistics (bn_mode="eval") or with each
batch's own statistics and no buffer updates (bn_mode="train"). The model comes back exactly as given
(see `batchscope.curvature._core.Objective`). Eigenvalues are in loss units per unit parameter^2.

Options shared by every function: `batch_loss(model, batch)` (with loss_fn=None) for batches other
than (inputs, targets), e.g. HuggingFace `BatchEncoding`s (`batch_loss=lambda m, b: m(**b).loss`);
`batch_size_fn(batch)`, a batch's examples (default: its first tensor's leading dimension); `wrt`,
the parameters measured (a name glob, a re.Pattern, a module, or a list of them); `distributed=True`:
each process passes its shard of the data and all get the Hessian of all of it (random vectors and
choices from rank 0). A DataLoader is streamed batch by batch on every Hessian-vector product.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from batchscope.curvature._batch import BatchSizeFn
from batchscope.curvature._core import (
    BatchLoss,
    BNMode,
    Data,
    GraphBudget,
    HVPMethod,
    LossFn,
    MeasurementInfo,
    Objective,
    Wrt,
)
from batchscope.curvature.density import broaden, default_sigma, make_grid, slq
from batchscope.curvature.lanczos import Which, check_which, lanczos, power_iteration
from batchscope.curvature.trace import hutchinson, hutchpp

__all__ = [
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "TraceResult",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
]


@dataclass
class EigenResult:
    """Extreme Hessian eigenpairs: largest first (top), smallest first (bottom), largest |.| first."""

    eigenvalues: list[float]
    eigenvectors: Tensor  # (k, n_params), flat in `Objective.flatten` order, model dtype, unit norm
    residuals: list[float]  # ||H x - lambda x|| per pair, same units as the eigenvalues
    converged: bool
    iterations: int  # Hessian-vector products spent
    info: MeasurementInfo


@dataclass
class TraceResult:
    """tr(H) with its standard error (0 where exact)."""

    trace: float
    stderr: float
    samples: int  # Hessian-vector products spent
    info: MeasurementInfo


@dataclass
class DensityResult:
    """Spectral density of H on `grid` (integrates to 1 there) and the raw SLQ quadrature per probe."""

    grid: Tensor  # float64
    density: Tensor  # float64, same length as grid
    nodes: list[Tensor]  # per probe: Ritz values (float64)
    weights: list[Tensor]  # per probe: quadrature weights (float64, sum to 1)
    sigma: float  # Gaussian broadening, eigenvalue units
    info: MeasurementInfo

    def moment(self, p: int) -> float:
        """SLQ estimate of tr(H^p) / n_params (mean over probes of sum_i w_i theta_i^p)."""
        return float(torch.stack([(w * t**p).sum() for t, w in zip(self.nodes, self.weights)]).mean())




# hvp_method="auto" times both HVP implementations at the first product (about four HVPs on the
# largest batch); the winner depends only on the model's structure and the batch shape, so remember
# it per process instead of paying that again on every call
_HVP_PICKS: dict[tuple, str] = {}


def _pick_key(obj: Objective) -> tuple:
    layers = tuple(type(m) for m in obj.model.modules())
    return (layers, tuple(obj.names), tuple(obj.shapes), obj.batch_signature(), obj.dtype, str(obj.device),
            obj.bn_mode, obj.pairs)


@contextlib.contextmanager
def _measuring(obj: Objective) -> Iterator[Objective]:
    """Enter `obj`, reusing this process's earlier `auto` pick of the HVP method for the same setup."""
    auto = obj.hvp_method == "auto"
    key = _pick_key(obj) if auto else None
    if auto and key in _HVP_PICKS:
        obj.hvp_method = _HVP_PICKS[key]
    if auto:  # across processes: all pick (a collective) or none does
        obj.hvp_method = obj.same_on_all_ranks(obj.hvp_method)
    with obj:
        yield obj
    if auto and obj.hvp_method != "auto":  # still "auto" if no product was computed
        _HVP_PICKS[key] = obj.hvp_method


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _start_vector(v0: Tensor | None) -> Tensor | None:
    """A warm start from previous eigenvectors: one vector as is; several (rows) as the sum of their
    unit versions, so the Krylov space starts with a component along each."""
    if v0 is None or v0.dim() <= 1:
        return v0
    rows = v0.detach().reshape(v0.shape[0], -1)
    return (rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)).sum(0)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    k: int = 1,
    which: Which = "top",
    tol: float = 1e-4,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    max_iter: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    hvp_method: HVPMethod = "auto",
    chunk_size: int | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
    graph_budget: GraphBudget = "auto",
) -> EigenResult:
    """k extreme eigenvalues of the Hessian of the example-averaged loss (eval or train batch-norm mode).

    method="lanczos": stops when each wanted Ritz residual ||H x - lambda x|| <= tol * |largest
    eigenvalue found|; max_iter caps the Hessian-vector products (default min(n_params, max(300, 20k))).
    v0: warm start, e.g. the previous result's `eigenvectors` (one row or several; random if None).
    method="power": PyHessian's power iteration with deflation (largest |.| pairs, so which is "top" or
    "magnitude"); tol is its relative-change rule and max_iter (default 100) counts products per pair.
    seed: for the random start vectors. graph_budget: bytes of gradient graphs kept across products ("auto": a
    quarter of the free memory, for data held in memory; None: rebuilt for every product; see `Objective.hvp`).
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method: expected 'lanczos' or 'power', got {method!r}")
    check_which(which)
    if method == "power" and which == "bottom":
        raise ValueError("which: 'bottom' needs method='lanczos' (power iteration finds the largest |eigenvalues|)")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    obj = Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method=hvp_method,
                    chunk_size=chunk_size, batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt,
                    distributed=distributed, graph_budget=graph_budget)
    if k > obj.n_params:
        raise ValueError(f"k: {k} exceeds the model's {obj.n_params} trainable parameters")
    gen = _generator(obj.same_on_all_ranks(seed))
    v0 = obj.same_on_all_ranks(v0)
    with _measuring(obj):
        if method == "lanczos":
            res = lanczos(obj.hvp, obj.n_params, k, which, tol, v0=_start_vector(v0), max_iter=max_iter,
                          dtype=obj.dtype, device=obj.device, generator=gen)
        else:
            if v0 is not None:
                raise ValueError("v0: method='power' starts each pair from a random vector, as PyHessian does")
            res = power_iteration(obj.hvp, obj.n_params, k, tol, max_iter=100 if max_iter is None else max_iter,
                                  dtype=obj.dtype, device=obj.device, generator=gen)
        info = obj.info(method=method, which=which, k=k, tol=tol)
    return EigenResult(res.eigenvalues.tolist(), res.eigenvectors, res.residuals.tolist(), res.converged,
                       res.iterations, info)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    samples: int = 100,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    seed: int = 0,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    hvp_method: HVPMethod = "auto",
    chunk_size: int | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
    graph_budget: GraphBudget = "auto",
) -> TraceResult:
    """tr(H) of the example-averaged loss from `samples` Hessian-vector products with Rademacher probes.

    method="hutch++" (default): exact trace on a sketched top subspace plus Hutchinson on the rest;
    stderr is that rest's standard error; samples >= n_params gives the exact trace. method=
    "hutchinson": the plain probe mean and its standard error. Reproducible for a given seed.
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method: expected 'hutch++' or 'hutchinson', got {method!r}")
    estimator = hutchpp if method == "hutch++" else hutchinson
    obj = Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method=hvp_method,
                    chunk_size=chunk_size, batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt,
                    distributed=distributed, graph_budget=graph_budget)
    with _measuring(obj):
        est = estimator(obj.hvp, obj.n_params, samples, generator=_generator(obj.same_on_all_ranks(seed)),
                        dtype=obj.dtype,
                        device=obj.device)
        info = obj.info(method=method, seed=seed)
    return TraceResult(est.trace, est.stderr, est.samples, info)


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    *,
    num_probes: int = 3,
    lanczos_steps: int = 80,
    grid: int | Sequence[float] | Tensor | None = None,
    sigma: float | None = None,
    seed: int = 0,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    hvp_method: HVPMethod = "auto",
    chunk_size: int | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
    graph_budget: GraphBudget = "auto",
) -> DensityResult:
    """Eigenvalue density of the Hessian of the example-averaged loss by stochastic Lanczos quadrature
    (num_probes Rademacher probes x lanczos_steps products), broadened by Gaussians of width sigma
    (eigenvalue units; default 1% of the spread of the nodes). grid: points, or how many points
    (default 1000) spanning the nodes +- 5 sigma."""
    obj = Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method=hvp_method,
                    chunk_size=chunk_size, batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt,
                    distributed=distributed, graph_budget=graph_budget)
    with _measuring(obj):
        nodes, weights = slq(obj.hvp, obj.n_params, num_probes, lanczos_steps,
                             generator=_generator(obj.same_on_all_ranks(seed)),
                             dtype=obj.dtype, device=obj.device)
        info = obj.info(num_probes=num_probes, lanczos_steps=lanczos_steps, seed=seed)
    sigma = default_sigma(nodes) if sigma is None else float(sigma)
    g = make_grid(nodes, sigma, grid)
    return DensityResult(g, broaden(nodes, weights, g, sigma), nodes, weights, sigma, info)


class HessianOperator(LinearOperator):
    """H of the example-averaged loss as a `scipy.sparse.linalg.LinearOperator` (float64 numpy in and
    out), e.g. for `eigsh(HessianOperator(model, loss_fn, data), k=6)`.

    The weights, buffers and in-memory data are snapshotted at construction (a DataLoader is read again by
    every product, one batch at a time); each product re-enters measurement
    mode and leaves it, so between products the model is exactly as given and may be used (changing
    its weights does not change this operator). Products are computed in the model's dtype. With
    distributed=True every product is a collective: each rank must apply it to the same vectors (give
    scipy's solvers the same `v0` on every rank; ARPACK's own random start differs between processes).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: Data,
        *,
        bn_mode: BNMode = "eval",
        device: str | torch.device | None = None,
        hvp_method: HVPMethod = "auto",
        chunk_size: int | None = None,
        batch_loss: BatchLoss | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        wrt: Wrt = None,
        distributed: bool = False,
        graph_budget: GraphBudget = "auto",
    ) -> None:
        self.objective = Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method=hvp_method,
                                   chunk_size=chunk_size, batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt,
                                   distributed=distributed, graph_budget=graph_budget)
        self.seconds = 0.0
        n = self.objective.n_params
        super().__init__(dtype=np.dtype(np.float64), shape=(n, n))

    @property
    def matvecs(self) -> int:
        """Hessian-vector products computed so far."""
        return self.objective.matvecs

    def _products(self, X: np.ndarray) -> np.ndarray:
        obj = self.objective
        t = time.perf_counter()
        with _measuring(obj):
            V = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float64)).to(dtype=obj.dtype, device=obj.device)
            out = torch.stack([obj.hvp(v) for v in V.t().contiguous()], dim=1)
        self.seconds += time.perf_counter() - t
        return out.detach().to(device="cpu", dtype=torch.float64).numpy()

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._products(np.reshape(x, (-1, 1)))[:, 0]

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        # one entry into measurement mode for all columns
        return self._products(X)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # H is symmetric

    def _adjoint(self) -> HessianOperator:
        return self

    def info(self, **extra) -> MeasurementInfo:
        """How the products so far were measured; `seconds` counts time inside products only."""
        with _measuring(self.objective) as obj:  # info needs an entered objective
            info = obj.info(**extra)
        info.seconds = self.seconds
        return info
