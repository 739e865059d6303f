"""One training run from one spec."""

from .loop import RunResult, epoch_plan, train_run

__all__ = ["RunResult", "epoch_plan", "train_run"]
