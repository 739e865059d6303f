"""Training: one loop (loop.py) over a group of runs, stepped by one run's own module (plain.py, also one
process of a data-parallel run) or by a vmapped stack of runs (fused.py)."""

from .loop import RunResult
from .plain import train_run

__all__ = ["RunResult", "train_run"]
