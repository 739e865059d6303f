"""What the Lightning and HuggingFace callbacks share: the probes they run and how a model is called."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature._core import LossFn
from ..errors import BatchscopeError
from ..probes import TrajectoryProbes, UserData
from ..spec import ProbeSpec

Forward = Callable[[nn.Module, Tensor], Tensor]


def logits(model: nn.Module, x: Tensor) -> Tensor:
    """`model(x)`, or its `.logits` where it returns a model output (HuggingFace models do)."""
    out = model(x)
    return out if isinstance(out, Tensor) else out.logits


class Forwarded(nn.Module):
    """`model` called through `forward(model, x)`: the instruments call a module with one tensor, and the
    parameters they vary are the model's own (they live in the submodule)."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.model, x)


class ProbeRunner:
    """TrajectoryProbes on `data`, measuring `loss_fn(forward(model, x), y)`, planned when training starts."""

    def __init__(self, probes: TrajectoryProbes | Sequence[ProbeSpec | str | dict], data: UserData, *,
                 loss_fn: LossFn = F.cross_entropy, forward: Forward | None = None, **settings: Any) -> None:
        if isinstance(probes, TrajectoryProbes):
            if settings:
                raise TypeError(f"{', '.join(settings)}: settings of TrajectoryProbes; give them to it, not here")
            self.probes = probes
        else:
            self.probes = TrajectoryProbes(probes, **settings)
        self.data, self.loss_fn, self.forward = data, loss_fn, forward or logits
        self.last: int | None = None  # the last step measured (or found due and skipped)
        self._wrapped: tuple[nn.Module, Forwarded] | None = None

    def plan(self, total_steps: float | int | None, steps_per_epoch: int | None) -> None:
        """Schedule against the trainer's run unless the probes were given a length of their own."""
        if self.probes.total_steps is None:
            total = int(total_steps) if total_steps is not None and total_steps != float("inf") else None
            self.probes.plan(total, steps_per_epoch or self.probes.steps_per_epoch)

    def measure(self, step: int, model: nn.Module, epoch: float | None = None) -> dict[str, float]:
        """The probes due at `step` (each step once: gradient accumulation repeats a step)."""
        if step == self.last:
            return {}
        self.last = step
        if self._wrapped is None or self._wrapped[0] is not model:
            self._wrapped = (model, Forwarded(model, self.forward))
        # with batch_loss (batches of any structure, e.g. the Trainer's dicts) the probes call the model themselves
        own = any(p.objective["batch_loss"] is not None for p in self.probes.probes)
        try:
            return self.probes.step(step, model if own else self._wrapped[1], None if own else self.loss_fn, self.data, epoch)
        except RuntimeError as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if "derivative for" in text and "not implemented" in text:  # e.g. fused attention: no second derivative
                raise BatchscopeError(f"probes at step {step}: {text}; a second-order probe needs every op to differentiate "
                                      "twice (transformers: load the model with attn_implementation='eager')") from e
            raise
