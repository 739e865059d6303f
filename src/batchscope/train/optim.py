"""Functional optimizers over lists of tensors, with hyperparameters as tensors.

The update of every optimizer is written as pure tensor arithmetic on (params, grads, state)
so that the same code can later train many runs at once (each hyperparameter a tensor with one
entry per run) without a branch on any run's values: a zero norm is handled by `torch.where`, and the only
Python branch, LARS's choice of which tensors to adapt, is on a tensor's number of dimensions, which is the
same for every run (under vmap a tensor shows its per-run shape).

sgd and adam are torch.optim's SGD and Adam; adamw is torch.optim.AdamW; lars and lamb follow the papers'
update equations (You et al. 2017, Algorithm 1; You et al. 2020, Algorithm 2), with their trust ratios taken
per parameter tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..spec import OptimSpec


@dataclass
class Hyper:
    """The optimizer's hyperparameters as 0-d tensors on the training device."""

    lr: Tensor
    momentum: Tensor
    weight_decay: Tensor
    beta1: Tensor
    beta2: Tensor
    eps: Tensor
    trust: Tensor  # LARS's trust coefficient eta

    @classmethod
    def from_spec(cls, spec: OptimSpec, device: torch.device, dtype: torch.dtype) -> Hyper:
        t = lambda v: torch.tensor(float(v), device=device, dtype=dtype)  # noqa: E731
        return cls(t(spec.lr), t(spec.momentum), t(spec.weight_decay), t(spec.betas[0]), t(spec.betas[1]), t(spec.eps),
                   t(spec.trust_coefficient))


def init_state(spec: OptimSpec, params: list[Tensor]) -> dict[str, list[Tensor] | Tensor]:
    """Zero optimizer state: momentum buffers for SGD and LARS, first/second moments and a step count for
    Adam, AdamW and LAMB."""
    if spec.name in ("sgd", "lars"):
        return {"buf": [torch.zeros_like(p) for p in params]}
    return {
        "m": [torch.zeros_like(p) for p in params],
        "v": [torch.zeros_like(p) for p in params],
        "t": torch.zeros((), device=params[0].device, dtype=params[0].dtype),
    }


def clip_grads(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """Global-norm clipping (no host sync: the scale is a tensor)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * scale for g in grads]


def sgd_step(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: dict, hp: Hyper, lr: Tensor) -> None:
    """PyTorch's SGD (dampening 0; coupled weight decay; optional Nesterov), in place."""
    with torch.no_grad():
        for p, g, buf in zip(params, grads, state["buf"]):
            d = g + hp.weight_decay * p
            buf.mul_(hp.momentum).add_(d)
            upd = d + hp.momentum * buf if spec.nesterov else buf
            p.sub_(lr * upd)


def adam_step(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: dict, hp: Hyper, lr: Tensor) -> None:
    """PyTorch's Adam (coupled L2 weight decay, bias correction), in place."""
    with torch.no_grad():
        state["t"].add_(1)
        c1 = 1 - hp.beta1 ** state["t"]
        c2 = 1 - hp.beta2 ** state["t"]
        for p, g, m, v in zip(params, grads, state["m"], state["v"]):
            d = g + hp.weight_decay * p
            m.mul_(hp.beta1).add_((1 - hp.beta1) * d)
            v.mul_(hp.beta2).add_((1 - hp.beta2) * d * d)
            p.sub_(lr * (m / c1) / ((v / c2).sqrt() + hp.eps))


def adamw_step(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: dict, hp: Hyper, lr: Tensor) -> None:
    """PyTorch's AdamW (Loshchilov & Hutter 2019), in place: the weights shrink by lr * wd outside the moments,
    then Adam's bias-corrected step, with eps added to sqrt(v) / sqrt(1 - beta2^t) as torch.optim.AdamW adds it."""
    with torch.no_grad():
        state["t"].add_(1)
        c1 = 1 - hp.beta1 ** state["t"]
        c2 = 1 - hp.beta2 ** state["t"]
        for p, g, m, v in zip(params, grads, state["m"], state["v"]):
            p.mul_(1 - lr * hp.weight_decay)
            m.mul_(hp.beta1).add_((1 - hp.beta1) * g)
            v.mul_(hp.beta2).add_((1 - hp.beta2) * g * g)
            p.sub_((lr / c1) * m / (v.sqrt() / c2.sqrt() + hp.eps))


def _trust_ratio(w_norm: Tensor, other_norm: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 1 where ||w|| or the other norm is 0 (a zero tensor, or one with nothing to follow, keeps
    the global lr). A where, not an if, so that each run of a fused stack gets its own; the denominator is
    replaced where unused so no 0/0 is formed even in the discarded branch."""
    ok = (w_norm > 0) & (other_norm > 0)
    one = torch.ones_like(num)
    return torch.where(ok, num / torch.where(ok, den, one), one)


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t)


def lars_step(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: dict, hp: Hyper, lr: Tensor) -> None:
    """LARS (You et al. 2017, Algorithm 1), in place: for each weight tensor, the local lr
    lambda = eta ||w|| / (||g|| + wd ||w||) (1 if ||w|| or ||g|| is 0), then
    v <- momentum v + lr lambda (g + wd w), w <- w - v.

    The velocity holds the lr, as in the paper (the same as keeping the lr outside the buffer, as torch's SGD
    does, only while the lr is constant). Tensors of at most one dimension (biases, batch-norm scales and
    shifts) are left out of the adaptation and of weight decay, the usual convention (not in Algorithm 1):
    they take plain SGD with momentum at the global lr.
    """
    with torch.no_grad():
        for p, g, buf in zip(params, grads, state["buf"]):
            if p.ndim > 1:  # a shape, the same for every run: not a branch on values
                w_norm, g_norm = _norm(p), _norm(g)
                local = _trust_ratio(w_norm, g_norm, hp.trust * w_norm, g_norm + hp.weight_decay * w_norm)
                buf.mul_(hp.momentum).add_(lr * local * (g + hp.weight_decay * p))
            else:
                buf.mul_(hp.momentum).add_(lr * g)
            p.sub_(buf)


def lamb_step(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: dict, hp: Hyper, lr: Tensor) -> None:
    """LAMB (You et al. 2020, Algorithm 2, phi the identity), in place: Adam's moments with bias correction,
    r = m_hat / (sqrt(v_hat) + eps) + wd w, then w <- w - lr (||w|| / ||r||) r per tensor (the ratio 1 if
    ||w|| or ||r|| is 0). Every tensor is adapted and decayed, biases too, as in the paper's algorithm."""
    with torch.no_grad():
        state["t"].add_(1)
        c1 = 1 - hp.beta1 ** state["t"]
        c2 = 1 - hp.beta2 ** state["t"]
        for p, g, m, v in zip(params, grads, state["m"], state["v"]):
            m.mul_(hp.beta1).add_((1 - hp.beta1) * g)
            v.mul_(hp.beta2).add_((1 - hp.beta2) * g * g)
            r = (m / c1) / ((v / c2).sqrt() + hp.eps) + hp.weight_decay * p
            w_norm, r_norm = _norm(p), _norm(r)
            p.sub_(lr * _trust_ratio(w_norm, r_norm, w_norm, r_norm) * r)


_STEPS = {"sgd": sgd_step, "adam": adam_step, "adamw": adamw_step, "lars": lars_step, "lamb": lamb_step}


def optimizer_step(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: dict, hp: Hyper, lr: Tensor) -> None:
    _STEPS[spec.name](spec, params, grads, state, hp, lr)


def sam_perturbation(grads: list[Tensor], rho: float | Tensor) -> list[Tensor]:
    """SAM's ascent step e = rho g / ||g|| (Foret et al. 2021)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * (rho / (norm + 1e-12)) for g in grads]


def descend(
    spec: OptimSpec, params: list[Tensor], grads: list[Tensor], second: Callable[[list[Tensor]], list[Tensor]] | None,
    state: dict, hp: Hyper, lr: Tensor, rho: float | Tensor,
) -> None:
    """One update in place: SAM when `second` is given (it returns the gradient at the perturbed weights from
    the unperturbed one), then clipping, then the optimizer's step."""
    if second is not None:
        # the gradient at the worst-case neighbour w + e drives the step taken from w
        e = sam_perturbation(grads, rho)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.add_(ei)
        grads = second(grads)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
    if spec.grad_clip is not None:
        grads = clip_grads(grads, spec.grad_clip)
    optimizer_step(spec, params, grads, state, hp, lr)
