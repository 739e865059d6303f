"""Batch-size advice for a model (`batchscope advise`): measured from a reference run and branches from its
checkpoints, see `core`. `advise(spec, target)` in Python; `batchscope advise SPEC --target ...` on the command line."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from ..spec import RunSpec, SweepSpec, load_spec
from ..store import Store
from .core import Advice, CheckpointAdvice, run_advice
from .fit import Tradeoff, critical_batch, fit_tradeoff
from .plan import AdviseOptions, Target

__all__ = ["Advice", "AdviseOptions", "CheckpointAdvice", "Target", "Tradeoff", "advise", "critical_batch", "defaults_from",
           "fit_tradeoff"]


def defaults_from(spec: RunSpec | SweepSpec) -> dict:
    """A sweep's grid as the advice's defaults: its smallest train.batch_size is B0 and its optim.lr values are the
    learning rates tried at B0."""
    grid = spec.grid if isinstance(spec, SweepSpec) else {}
    out: dict = {}
    if grid.get("train.batch_size"):
        out["b0"] = int(min(grid["train.batch_size"]))
    if grid.get("optim.lr"):
        out["reference_lrs"] = tuple(float(x) for x in grid["optim.lr"])
    return out


def advise(spec: RunSpec | SweepSpec | str | Path, target: str, *, store: Store | str | Path, out: str | Path | None = None,
           executor: str | None = None, **options) -> Advice:
    """Measure and recommend: `spec` a run spec (or a spec file; a sweep's grid is ignored, its base is used), `target`
    e.g. "train_loss<=0.3" or "test_error<=0.25", `options` those of `AdviseOptions`. With `out`, the HTML report and
    advice.json are written there. Runs and measurements go to `store` (a path or an open Store). A sweep's grid
    supplies defaults (`defaults_from`)."""
    sweep = load_spec(spec) if isinstance(spec, (str, Path)) else spec
    base = sweep.base() if isinstance(sweep, SweepSpec) else sweep
    opts = AdviseOptions(target=target, **{**defaults_from(sweep), **options})
    own = not isinstance(store, Store)
    st = Store(store) if own else store
    try:
        advice = run_advice(base, opts, st, executor=executor)
    finally:
        if own:
            st.close()
    if out is not None:
        from .page import write_advice

        write_advice(advice, out)
    return advice


class _Callable(types.ModuleType):
    """`batchscope.advise(...)` is `batchscope.advise.advise(...)`: the package is also the function."""

    def __call__(self, spec: RunSpec | SweepSpec | str | Path, target: str, **kwargs) -> Advice:
        return advise(spec, target, **kwargs)


sys.modules[__name__].__class__ = _Callable
