"""Probes in a HuggingFace `Trainer` run: `ProbeCallback`, a `transformers.TrainerCallback` (needs `batchscope[hf]`).

    from batchscope.integrations.hf import ProbeCallback
    cb = ProbeCallback(["hessian_top"], (input_ids, labels), schedule=50, subset=256, batch_size=32)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    cb.probes.series("hessian_lambda_1")

The model is called as `model(input_ids)` and its `.logits` measured with `loss_fn` (cross-entropy over the
last dimension by default; give `forward(model, x)` and `loss_fn(outputs, y)` for other heads, e.g. a
token-level loss). Step s is the weights after s optimizer steps (`state.global_step`, at `on_step_end`); step
0, the initial weights, is measured at `on_train_begin`. A `log` schedule without `total_steps` is planned over
`state.max_steps`, an `epoch` schedule over the optimizer steps of one epoch. The metrics go to the trainer's
`state.log_history` (so into `trainer_state.json` with each checkpoint), to the probes' store and sinks, and to
`cb.probes.history`. Only the main process (`state.is_world_process_zero`) measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F

from ..curvature._core import LossFn
from ..probes import TrajectoryProbes, UserData
from ..sinks import require
from ..spec import ProbeSpec
from ._common import Forward, ProbeRunner

transformers = require("transformers", "hf", "batchscope.integrations.hf")

__all__ = ["ProbeCallback"]


class ProbeCallback(transformers.TrainerCallback):
    """Run `probes` (a TrajectoryProbes, or probe names/dicts/ProbeSpecs with TrajectoryProbes' `settings`) on
    the fixed subset of `data` ((inputs, targets), or an iterable of such batches), measuring
    `loss_fn(forward(model, x), y)`; `forward` defaults to `model(x).logits`. With `batch_loss=` in the settings,
    e.g. `lambda model, batch: model(**batch).loss`, `data` may be an iterable of dicts or BatchEncodings (the
    Trainer's own batches) and the probes measure that loss."""

    def __init__(self, probes: TrajectoryProbes | Sequence[ProbeSpec | str | dict], data: UserData, *,
                 loss_fn: LossFn = F.cross_entropy, forward: Forward | None = None, **settings: Any) -> None:
        self.runner = ProbeRunner(probes, data, loss_fn=loss_fn, forward=forward, **settings)
        self.probes = self.runner.probes

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loader = kwargs.get("train_dataloader")
        per_epoch = None
        if loader is not None and hasattr(loader, "__len__"):
            per_epoch = max(len(loader) // max(args.gradient_accumulation_steps, 1), 1)
        self.runner.plan(state.max_steps if state.max_steps > 0 else None, per_epoch)
        if state.global_step == 0:  # not on a resume from a checkpoint: those weights were measured already
            self._measure(state, kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._measure(state, kwargs["model"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.probes.flush()

    def _measure(self, state: Any, model: Any) -> None:
        step = int(state.global_step)
        if not state.is_world_process_zero:
            return
        metrics = self.runner.measure(step, model, state.epoch)
        if metrics:
            state.log_history.append({**metrics, "step": step})
