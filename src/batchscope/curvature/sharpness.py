"""Epsilon-sharpness of Keskar et al. (2017), "On Large-Batch Training for Deep Learning", Metric 2.1.

With x the flat weights, f the training loss averaged over all of `data`, A an n x p matrix
(A = I_n for the full space, i.i.d. standard Gaussian columns for a random p-dimensional subspace)
and A+ its pseudo-inverse, the box is

    C_eps = { z in R^p : |z_i| <= eps * (|(A+ x)_i| + 1) }

and the sharpness is

    phi_{x,f}(eps, A) = 100 * (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)).

The maximum is approximated as in the paper: L-BFGS-B on -f(x + A y) from y = 0 with at most
`max_iter` iterations (the paper uses 10), gradient -A^T grad f(x + A y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn

from ._batch import BatchSizeFn
from ._core import BatchLoss, BNMode, Data, LossFn, MeasurementInfo, Objective, Wrt


@dataclass
class SharpnessResult:
    """Keskar's epsilon-sharpness; losses are averaged over all of `data` in the measurement mode `info.bn_mode`."""

    sharpness: float  # phi, in percent of (1 + f(x))
    loss: float  # f(x): the loss at the model's weights
    max_loss: float  # the largest f(x + A y) found in the box (a lower bound on the true maximum)
    eps: float
    subspace_dim: int | None  # p, or None for the full space (A = I)
    iterations: int  # L-BFGS-B iterations (<= max_iter)
    fevals: int  # loss-and-gradient evaluations, each over all of `data`
    message: str  # scipy's termination message
    y_max: Tensor  # (p,) float64 on the CPU: the maximizing point in box coordinates
    box: Tensor  # (p,) float64 on the CPU: the half-widths eps * (|(A+ x)_i| + 1)
    subspace: Tensor | None  # A (n x p, the model's dtype and device), None in the full space
    info: MeasurementInfo


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    eps: float = 1e-3,
    subspace_dim: int | None = None,
    *,
    max_iter: int = 10,
    seed: int = 0,
    y0: Literal["zero", "random"] = "zero",
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
) -> SharpnessResult:
    """Keskar et al. Metric 2.1 (percent) of the data-averaged loss, in the full space or a random subspace.

    `y0="zero"` starts L-BFGS-B at y = 0 like the paper; at an exact critical point the gradient there
    is zero and L-BFGS-B stops at once (phi = 0): `y0="random"` starts at a uniform random point of
    the box instead (seeded). A is drawn from `seed` with i.i.d. N(0, 1) entries, so A y is in units of
    the weights; memory for A is n * p entries of the model's dtype.
    """
    if not eps > 0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
    if y0 not in ("zero", "random"):
        raise ValueError(f"y0: expected 'zero' or 'random', got {y0!r}")
    # no Hessian-vector products here: name the HVP method so the Objective does not time both
    with Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method="double_backward",
                   batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt, distributed=distributed) as obj:
        x = obj.theta0
        n = obj.n_params
        seed = obj.same_on_all_ranks(seed)  # one box and one start on every process
        if subspace_dim is None:
            A = None
            ax = x  # A+ x with A = I
        else:
            if not 1 <= subspace_dim <= n:
                raise ValueError(f"subspace_dim: expected 1 <= p <= n_params = {n}, got {subspace_dim}")
            gen = torch.Generator().manual_seed(seed)
            # drawn on the CPU so that A does not depend on the device
            A = torch.randn(n, subspace_dim, generator=gen, dtype=obj.dtype).to(obj.device)
            # A+ x by least squares: A is tall and, being Gaussian, well conditioned
            ax = torch.linalg.lstsq(A, x[:, None]).solution[:, 0]
        half = eps * (ax.detach().double().abs().cpu().numpy() + 1.0)
        bounds = list(zip(-half, half))
        p = half.shape[0]

        f0 = obj.loss(x)
        best = {"f": -np.inf, "y": np.zeros(p)}

        def neg_f(y: np.ndarray) -> tuple[float, np.ndarray]:
            yt = torch.from_numpy(y).to(device=obj.device, dtype=obj.dtype)
            f, g = obj.loss_and_grad(x + (yt if A is None else A @ yt))
            # L-BFGS-B keeps iterates in the box: every evaluated point is feasible, so the best one
            # is a valid value of the maximum (normally it is the final iterate)
            if f > best["f"]:
                best["f"], best["y"] = f, y.copy()
            gy = g if A is None else A.T @ g
            return -f, -gy.double().cpu().numpy()

        if y0 == "zero":
            start = np.zeros(p)
        else:
            start = np.random.default_rng(seed).uniform(-half, half)
        res = minimize(neg_f, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": max_iter})
        max_loss = max(best["f"], f0)  # y = 0 is in the box, so the maximum is at least f(x)
        y_max = best["y"] if best["f"] >= f0 else np.zeros(p)
        phi = 100.0 * (max_loss - f0) / (1.0 + f0)
        return SharpnessResult(
            sharpness=phi,
            loss=f0,
            max_loss=max_loss,
            eps=eps,
            subspace_dim=subspace_dim,
            iterations=int(res.nit),
            fevals=int(res.nfev),
            message=str(res.message),
            y_max=torch.from_numpy(y_max),
            box=torch.from_numpy(half),
            subspace=A,
            info=obj.info(optimizer="L-BFGS-B", max_iter=max_iter, y0=y0, seed=seed),
        )
