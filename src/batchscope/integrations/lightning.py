"""Probes in a PyTorch Lightning run: `ProbeCallback`, a `lightning.pytorch.Callback` (needs `batchscope[lightning]`).

    from batchscope.integrations.lightning import ProbeCallback
    cb = ProbeCallback(["hessian_top", "grad_norm"], (x_train, y_train), schedule="log", points=10, subset=512)
    lightning.Trainer(max_steps=1000, callbacks=[cb]).fit(module, loader)
    cb.probes.series("hessian_lambda_1")

Step s is the weights after s optimizer steps (`trainer.global_step`); step 0, the initial weights, is measured
when training starts. A `log` schedule without `total_steps` is planned over `trainer.estimated_stepping_batches`,
an `epoch` schedule over the optimizer steps of one epoch. The metrics go to the trainer's loggers
(`logger.log_metrics(metrics, step)`, unthrottled by `log_every_n_steps`), to the probes' store and sinks, and to
`cb.probes.history`. Under data-parallel training only global rank 0 measures (on its own copy of the
weights, which all ranks share); the other ranks wait for it at their next synchronization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F

from ..curvature._core import LossFn
from ..probes import TrajectoryProbes, UserData
from ..sinks import require
from ..spec import ProbeSpec
from ._common import Forward, ProbeRunner

pl = require("lightning.pytorch", "lightning", "batchscope.integrations.lightning")

__all__ = ["ProbeCallback"]


class ProbeCallback(pl.Callback):
    """Run `probes` (a TrajectoryProbes, or probe names/dicts/ProbeSpecs with TrajectoryProbes' `settings`) on
    the fixed subset of `data` ((inputs, targets), or an iterable of such batches: a DataLoader), measuring
    `loss_fn(forward(module, x), y)`; `forward` defaults to the LightningModule's own forward (its `.logits`
    where it returns a model output). `log_to_trainer`: also send the metrics to the trainer's loggers."""

    def __init__(self, probes: TrajectoryProbes | Sequence[ProbeSpec | str | dict], data: UserData, *,
                 loss_fn: LossFn = F.cross_entropy, forward: Forward | None = None, log_to_trainer: bool = True,
                 **settings: Any) -> None:
        super().__init__()
        self.runner = ProbeRunner(probes, data, loss_fn=loss_fn, forward=forward, **settings)
        self.probes = self.runner.probes
        self.log_to_trainer = log_to_trainer

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        batches = trainer.num_training_batches
        per_epoch = None
        if isinstance(batches, int) or (isinstance(batches, float) and math.isfinite(batches)):
            per_epoch = max(int(batches) // max(trainer.accumulate_grad_batches, 1), 1)
        self.runner.plan(trainer.estimated_stepping_batches, per_epoch)
        if trainer.global_step == 0:  # not on a resume mid-run: those weights were measured already
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._measure(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.probes.flush()

    def _measure(self, trainer: Any, pl_module: Any) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero:
            return
        per_epoch = self.probes.steps_per_epoch
        metrics = self.runner.measure(step, pl_module, step / per_epoch if per_epoch else None)
        if metrics and self.log_to_trainer:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
