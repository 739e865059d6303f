"""What a study is: the sweeps it needs, and an analysis that turns stored results into claims.

Everything a study concludes is computed from the store. Measurements taken after training
(sharpness, interpolation, ...) are cached in the store as metrics of the run, so rebuilding a
report never retrains and never measures twice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..errors import BatchscopeError
from ..factories import dataset_for, model_for, resolve_device
from ..report.claims import Magnitude
from ..runs import simulated  # noqa: F401  (the studies import it from here)
from ..spec import RunSpec, SweepSpec
from ..stats import Verdict
from ..store import Store

Scale = Literal["quick", "paper"]


@dataclass
class Options:
    """What the user asked of `batchscope reproduce`."""

    scale: Scale = "quick"
    data: list[str] = field(default_factory=list)  # NAME or NAME=PATH
    seeds: int | None = None
    device: str = "auto"
    seed_offset: int = 0  # seeds used: offset .. offset + seeds - 1 (a disjoint set for a second opinion)
    network: str | None = None  # the paper's network, for a study that offers a choice (Study.networks); None: its default
    model: str | None = None  # a user's model factory, "package.module:callable", for a study that takes one (Study.takes_model)

    def seeding(self, default: int) -> dict:
        """The sweep fields that choose the seeds: `seeds_n` and `seeds_offset`."""
        return {"seeds_n": self.seeds or default, "seeds_offset": self.seed_offset}

    def seed_list(self, default: int) -> list[int]:
        n = self.seeds or default
        return list(range(self.seed_offset, self.seed_offset + n))

    def data_spec(self, default: str, allowed: tuple[str, ...] | None = None) -> dict:
        """The data section for the study: the user's choice (first --data), else the study's default."""
        entry = self.data[0] if self.data else default
        name, _, path = entry.partition("=")
        if not path and ("/" in name or Path(name).exists()):
            raise BatchscopeError(f"--data {entry}: give the format with the path, e.g. cifar10={entry}")
        if allowed is not None and name not in allowed:
            raise BatchscopeError(f"--data {name}: this study runs on {', '.join(allowed)}")
        return {"name": name, **({"path": path} if path else {})}


_C = TypeVar("_C", bound="ScaledConfig")


class ScaledConfig:
    """A study's typed configuration (a frozen dataclass) with one constructor per scale."""

    @classmethod
    def quick(cls: type[_C], opts: Options) -> _C:
        raise NotImplementedError

    @classmethod
    def paper(cls: type[_C], opts: Options) -> _C:
        raise NotImplementedError

    @classmethod
    def of(cls: type[_C], opts: Options) -> _C:
        """The configuration at the scale the user asked for."""
        return cls.quick(opts) if opts.scale == "quick" else cls.paper(opts)


class Study:
    """A paper's experiments. Subclasses define `config`, `sweeps` and `analyze`."""

    name: str = ""
    title: str = ""
    citation: str = ""
    default_seeds: int = 5
    networks: tuple[str, ...] = ()  # the paper's networks `Options.network` may name; empty: the study has no choice
    takes_model: bool = False  # whether `Options.model` may replace the study's models (its claims hold for any model)

    def config(self, opts: Options) -> Any:
        """Every choice of the reproduction, typed (the tests replace it with a tiny one: tests/tiny_configs.py)."""
        raise NotImplementedError

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        raise NotImplementedError

    def analyze(self, ctx: Analysis) -> None:
        raise NotImplementedError


class Analysis:
    """Read access to a study's stored runs, cached post-hoc measurements, and the report being built."""

    def __init__(self, store: Store, runs: list[RunSpec], opts: Options, figure_dir: Path) -> None:
        self.store, self.runs, self.opts, self.figure_dir = store, runs, opts, figure_dir
        self.claims: list = []
        self.figures: list[tuple[str, Path, str]] = []
        self.tables: list[tuple[str, list[str], list[list[str]]]] = []
        self.notes: list[str] = []
        self.meta: dict[str, Any] = {}  # facts of the reproduction the study adds to claims.json's meta
        self._records = {r.run_id: r for r in store.runs()}

    # -- runs --------------------------------------------------------------------------------
    def status(self, spec: RunSpec) -> str:
        rec = self._records.get(spec.run_id())
        return rec.status if rec else "absent"

    def exclusion(self, spec: RunSpec, fitted: Callable[[RunSpec], bool] | None = None) -> str | None:
        """Why a run is left out of the comparisons (None: it is used): diverged, failed, not trained, or
        missed the study's fitting criterion (`fitted`)."""
        st = self.status(spec)
        if st == "done":
            return None if fitted is None or fitted(spec) else "missed the fitting criterion"
        return st if st in ("diverged", "failed") else "not trained"

    def exclusions(self, runs: list[RunSpec], fitted: Callable[[RunSpec], bool] | None = None) -> dict[str, int]:
        """{reason: number of distinct runs} left out among `runs`."""
        return count_reasons(self.exclusion(r, fitted) for r in {r.run_id(): r for r in runs}.values())

    def usable(self, spec: RunSpec, fitted: Callable[[RunSpec], bool] | None = None) -> bool:
        return self.exclusion(spec, fitted) is None

    def final(self, spec: RunSpec) -> dict:
        rec = self._records.get(spec.run_id())
        return dict(rec.final or {}) if rec else {}

    def final_if_used(self, spec: RunSpec) -> dict:
        """The final metrics of a run that is used, {} for one left out (its values then read as NaN)."""
        return self.final(spec) if self.usable(spec) else {}

    def series(self, spec: RunSpec, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a stored metric."""
        pts = self.store.metrics(spec.run_id(), [name]).get(name, [])
        if not pts:
            return np.zeros(0), np.zeros(0)
        s, v = zip(*pts)
        return np.asarray(s, dtype=float), np.asarray(v, dtype=float)

    # -- post-hoc measurements, cached in the store --------------------------------------------
    def model(self, spec: RunSpec, tag: str = "final") -> tuple[nn.Module, Dataset]:
        device = resolve_device(self.opts.device if self.opts.device != "auto" else spec.train.device)
        ds = dataset_for(spec, device)
        model = model_for(spec, ds, device)
        state = self.store.load_checkpoint(spec.run_id(), tag, map_location=device)
        model.load_state_dict(state["model"])
        return model, ds

    def measure(self, spec: RunSpec, names: list[str], fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Stored metrics `names` at the run's last step, computing them with `fn` (once) if absent."""
        stored = self.store.metrics(spec.run_id(), names)
        if all(stored.get(n) for n in names):
            return {n: stored[n][-1][1] for n in names}
        values = fn()
        step = int(self.final(spec).get("steps", 0))
        self.store.log_metrics(spec.run_id(), step, {n: float(values[n]) for n in names})
        return {n: float(values[n]) for n in names}

    # -- report pieces -------------------------------------------------------------------------
    def add_claim(self, claim) -> None:
        self.claims.append(claim)

    def add_figure(self, name: str, fig, caption: str) -> None:
        from ..report.figures import save

        self.figures.append((name, save(fig, self.figure_dir, name), caption))

    def add_table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        self.tables.append((title, header, rows))


def nanmean(x, axis=None):
    """Mean over finite values; NaN (without a warning) where there are none."""
    x = np.asarray(x, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def nanstd(x, axis=None):
    """Sample sd (ddof=1, as `stats.summarize`) over finite values; NaN where fewer than two."""
    x = np.asarray(x, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(x, axis=axis, ddof=1)


def fmt(x: float, digits: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def seed_of(spec: RunSpec) -> int:
    return spec.seeds.init


# -- exclusions: {reason: runs}, in the order the reasons first appear --------------------------------


def count_reasons(whys: Iterable[str | None]) -> dict[str, int]:
    """{reason: count} of the reasons runs are left out (None: the run is used)."""
    out: dict[str, int] = {}
    for why in whys:
        if why is not None:
            out[why] = out.get(why, 0) + 1
    return out


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """The sum of several {reason: count}."""
    out: dict[str, int] = {}
    for c in counts:
        for why, n in c.items():
            out[why] = out.get(why, 0) + n
    return out


def with_exclusions(verdict: Verdict, reasons: Mapping[str, int]) -> Verdict:
    """`verdict` with the runs left out before the test, by reason, in its details and its count."""
    counted = sum(reasons.values())
    details = {**verdict.details, "excluded_reasons": dict(reasons)}
    # the test itself counts non-finite pairs: those are the same runs, so the larger count is the union
    return Verdict(verdict.verdict, verdict.rule, verdict.test, verdict.estimate, verdict.ci, verdict.n,
                   max(verdict.n_excluded, counted), verdict.confidence, details)


# -- numbers -------------------------------------------------------------------------------------


def log_or_nan(x: float) -> float:
    """log x of a finite x > 0; NaN otherwise (the value is then left out of the test and counted)."""
    return math.log(x) if math.isfinite(x) and x > 0 else math.nan


def fit_line(x, y) -> tuple[float, float, float]:
    """(slope, intercept, residual sum of squares) of the least-squares line y ~ a + b x through every point
    given (leave out the non-finite ones first)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    b, a = np.polyfit(x, y, 1)
    return float(b), float(a), float(np.sum((y - (a + b * x)) ** 2))


def slope_line(x, y) -> float:
    """Least-squares slope of y on x over the finite points (NaN with fewer than 2)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return math.nan
    return fit_line(x[ok], y[ok])[0]


def seed_grid(values: Mapping[Any, Mapping[int, float]], columns: Sequence[Any], seeds: Sequence[int]) -> np.ndarray:
    """seeds x columns array of values[column][seed] (a figure's input), NaN where absent."""
    out = np.full((len(seeds), len(columns)), np.nan)
    for j, col in enumerate(columns):
        for s, v in values.get(col, {}).items():
            if s in seeds:
                out[list(seeds).index(s), j] = v
    return out


# -- magnitudes ------------------------------------------------------------------------------------


def percent_points(x: float) -> float:
    """An accuracy difference (fraction) in percentage points."""
    return 100 * x


def ci_of(v: Verdict, scale: Callable[[float], float] | None = None) -> tuple[float, float] | None:
    """The verdict's CI in the units `scale` (monotone) maps it to; None where it is not finite."""
    lo, hi = v.ci
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    a, b = (scale(lo), scale(hi)) if scale else (lo, hi)
    return (a, b) if a <= b else (b, a)  # a decreasing scale swaps the ends


def magnitude(quantity: str, v: Verdict, published: float | tuple[float, float] | None = None, source: str = "",
              scale: Callable[[float], float] | None = None) -> Magnitude:
    """The verdict's estimate and CI beside the paper's number, in the units `scale` (monotone) maps them to:
    percent_points for accuracies, math.exp for a log ratio. None where they are not finite."""
    est = v.estimate
    est = None if est is None or not math.isfinite(est) else scale(est) if scale else est
    return Magnitude(quantity, est, published, source, ci_of(v, scale))


def cpu_loss() -> nn.Module:
    return torch.nn.CrossEntropyLoss()


