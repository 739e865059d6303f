"""Learning-rate schedules and scaling rules, as functions of the epoch (a float: step / steps per epoch)."""

from __future__ import annotations

import math

from ..spec import RunSpec, budget_multiplier


def scaled_lr(spec: RunSpec, batch_size: int) -> float:
    """The base learning rate after the scaling rule (linear: Goyal et al.; sqrt: Hoffer et al.)."""
    s = spec.schedule
    ratio = batch_size / s.reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[s.scaling]
    return spec.optim.lr * factor


def lr_at(spec: RunSpec, epoch: float, total_epochs: float, batch_size: int) -> float:
    """Learning rate at a (fractional) epoch. Milestones and warm-up are stretched by regime
    adaptation's multiplier, so the large-batch run follows the small-batch schedule per update."""
    s = spec.schedule
    mult = budget_multiplier(spec)
    peak = scaled_lr(spec, batch_size)
    warm = s.warmup_epochs * mult
    if warm > 0 and epoch < warm:
        return peak * epoch / warm
    if s.name == "step":
        passed = sum(1 for m in s.milestones if epoch >= m * mult)
        return peak * s.gamma**passed
    if s.name == "cosine":
        span = max(total_epochs - warm, 1e-12)
        frac = min(max((epoch - warm) / span, 0.0), 1.0)
        lo = peak * s.min_lr_fraction
        return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    return peak
