"""One training run from one spec."""

from .loop import RunResult, train_run

__all__ = ["RunResult", "train_run"]
