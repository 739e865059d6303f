"""The batch objective an update descends: the run's loss on the batch, or Goodfellow et al.'s adversarial mix.

Written over a `forward(x) -> logits` callable so that the plain step (the module itself) and the fused step
(a functional call on one run's stacked parameters, under vmap) share it. The input gradient is taken with
`torch.func.grad`, which works in both places and leaves the parameters' autograd graph alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import AdversarialSpec

Forward = Callable[[Tensor], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> the mean over the batch


def fgsm(forward: Forward, x: Tensor, y: Tensor, eps: float, loss_fn: LossFn = F.cross_entropy) -> Tensor:
    """The fast gradient sign examples x + eps sign(grad_x loss(forward(x), y)), detached (Goodfellow et al. 2015).
    `forward` must not change state: the caller passes one that leaves batch-norm statistics alone."""
    gx = torch.func.grad(lambda xx: loss_fn(forward(xx), y))(x.detach())
    return (x + eps * gx.sign()).detach()


def batch_objective(forward: Forward, x: Tensor, y: Tensor, adv: AdversarialSpec | None,
                    quiet: Forward | None = None, loss_fn: LossFn = F.cross_entropy) -> Tensor:
    """The mean loss on (x, y); with `adv`, (1 - mix) x that + mix x the loss on the batch's FGSM examples.
    `quiet` is `forward` without side effects (batch-norm statistics) for the two extra passes; the clean pass,
    last, is the only one that updates them, as without adversarial training."""
    if adv is None:
        return loss_fn(forward(x), y)
    quiet = quiet or forward
    x_adv = fgsm(quiet, x, y, adv.eps, loss_fn)
    adv_loss = loss_fn(quiet(x_adv), y)
    return (1 - adv.mix) * loss_fn(forward(x), y) + adv.mix * adv_loss
