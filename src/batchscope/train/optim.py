"""Functional optimizers over lists of tensors, with hyperparameters as tensors.

The update of every optimizer is written as pure tensor arithmetic on (params, grads, state)
so that the same code can later train many runs at once (each hyperparameter a tensor with one
entry per run) without a branch on any run's values.
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

    @classmethod
    def from_spec(cls, spec: OptimSpec, device: torch.device, dtype: torch.dtype) -> Hyper:
        t = lambda v: torch.tensor(float(v), device=device, dtype=dtype)  # noqa: E731
        return cls(t(spec.lr), t(spec.momentum), t(spec.weight_decay), t(spec.betas[0]), t(spec.betas[1]), t(spec.eps))


def init_state(spec: OptimSpec, params: list[Tensor]) -> dict[str, list[Tensor] | Tensor]:
    """Zero optimizer state: momentum buffers for SGD, first/second moments and a step count for Adam."""
    if spec.name == "sgd":
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


def optimizer_step(spec: OptimSpec, params: list[Tensor], grads: list[Tensor], state: dict, hp: Hyper, lr: Tensor) -> None:
    (sgd_step if spec.name == "sgd" else adam_step)(spec, params, grads, state, hp, lr)


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
