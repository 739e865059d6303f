"""Hoffer, Hubara and Soudry 2017, "Train longer, generalize better".

A ladder of cumulative interventions on a large-batch run: LB, + sqrt learning-rate scaling,
+ Ghost Batch Normalization, + regime adaptation (as many updates as SB); and the
"ultra-slow diffusion" of the weights: in the high learning-rate phase ||w_t - w_0|| grows like log t.
Beside it, the mechanism the paper proposes for that growth, simulated (`batchscope.randomwalk`): a
random walk on a random potential whose fluctuations grow with distance, taking SGD's update with the
Li & Li simulator's minibatch noise, against the same walk on a flat potential. Each seed's group of
walkers is a pseudo-run of the store (spec kind "simulation", group "hoffer"), so the report rebuilds
without simulating again.

The analysis is split in two: `Hoffer.analyze` reads the numbers from the store (`measure`), and
`decide` turns plain numbers into claims, so the rules can be tested on numbers alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as _st

from .. import randomwalk as rwk
from ..errors import BatchscopeError
from ..report.claims import Claim, Magnitude
from ..report.figures import errorbar_points, line_with_band, new_figure
from ..spec import SweepSpec
from ..stats import RegimeCheck, all_of, equivalence, paired_difference, summarize
from .base import (
    Analysis,
    Options,
    ScaledConfig,
    Study,
    fit_line,
    magnitude,
    merge_counts,
    nanmean,
    nanstd,
    percent_points,
    seed_grid,
    seed_of,
    simulated,
    with_exclusions,
)

LADDER = ["SB", "LB", "+LR", "+GBN", "+RA"]
FITTED = ["SB", "LB"]  # the runs whose ||w_t - w_0|| is fitted (the paper's Fig. 2 shows several batch sizes)

# -- the paper's numbers ------------------------------------------------------------------------------
# Test accuracy (%) along the ladder SB, LB, +LR, +GBN, +RA, from the results table as transcribed in
# /work/shared/papers.md. UNCONFIRMED source: the transcription has not been checked against the paper.
PUBLISHED = {
    "F1 (MNIST)": (99.23, 98.27, 98.95, 99.01, 99.25),
    "C1 (CIFAR-10)": (87.80, 83.95, 86.15, 86.4, 88.20),
    "ResNet-44 (CIFAR-10)": (92.83, 86.10, 89.30, 90.50, 93.07),
}
SOURCE = "Hoffer et al. 2017, results table, {} (transcribed in papers.md; unconfirmed source)"


def published_step(table: str, cur: str) -> float:
    """The paper's effect of ladder step `cur`, in accuracy points: SB - LB for "LB" (the gap), else cur - previous."""
    acc = dict(zip(LADDER, PUBLISHED[table]))
    if cur == "LB":
        return acc["SB"] - acc["LB"]
    if cur == "gap":  # +RA - SB: what is left of the gap
        return acc["+RA"] - acc["SB"]
    return acc[cur] - acc[LADDER[LADDER.index(cur) - 1]]


def _mean_step(cur: str) -> float:
    return float(np.mean([published_step(t, cur) for t in PUBLISHED]))


# Minimal effects, stated in advance from the PAPER's numbers (never from our runs), as accuracy fractions:
# a tenth of the paper's step averaged over its three tables. The step size varies about 7-fold between
# the tables with the networks' error level (F1's LB gap is 0.96 points, ResNet-44's 6.73), and the quick
# data (MNIST-1D) matches none of them, so the typical step stands for the paper's effect; a tenth of it is
# the smallest improvement still worth calling the paper's. Points: LB 0.38, +LR 0.20, +GBN 0.05, +RA 0.15.
MIN_EFFECT = {cur: 0.1 * _mean_step(cur) / 100 for cur in LADDER[1:]}
# "The gap is closed": +RA within a quarter of the paper's mean LB gap of SB (3.85 points -> +-0.96 points).
# The paper's own +RA - SB is +0.02, +0.40 and +0.24 points in its three tables, well inside this band.
GAP_MARGIN = 0.25 * _mean_step("LB") / 100
# Fitting the training set: Keskar et al.'s F1 (the network Hoffer et al. replicate) reaches over 99%
# training accuracy with both the small and the large batch; a gap in test accuracy between runs that both
# fit the training set is a generalization gap, otherwise it may be an optimization gap.
FIT_ACC = 0.99
# Regime adaptation: +RA must make as many updates as SB (the paper multiplies the epochs by ceil(B / SB)).
RA_UPDATES = (0.9, 1.1)
# The weight-distance fit: points after the first epoch (the transient) and before the first lr drop; at
# least this many per run, spanning at least this many decades of t (the paper's F1 replica's high-lr
# phase runs from epoch 1 to its first drop at epoch 10: one decade).
DIFFUSION_MIN_POINTS = 10
DIFFUSION_MIN_DECADES = 1.0
# log t against sqrt t, a model comparison: log t holds when its line leaves at most half the residual sum
# of squares of the sqrt t line (log10 ratio >= log10 2 = 0.30). The paper reports no number ("close to a
# straight line" on a log axis); a factor 2 in residuals is the smallest difference we call "fits better".
DIFFUSION_MIN_RATIO = 2.0

# -- the random walk on a random potential (the paper's model for that growth), simulated ----------------------
# The theory the paper cites (Marinari et al. 1983; Bouchaud and Georges 1990): on a random potential with
# E[(V(x) - V(y))^2] ~ |x - y|^alpha the walker's distance grows like (log t)^(2 / alpha). Our potential is a
# fractional Brownian motion of Hurst index H, alpha = 2H; H = 1/2 is Sinai's walk, (log t)^2. The paper's
# own wording of the formula is not transcribed in papers.md: the exponent is quoted from the theory.
WALK_SOURCE = ("theory cited by Hoffer et al. 2017 Sec. 3 (Bouchaud and Georges 1990; Sinai 1982): distance ~ "
               "(log t)^(2 / alpha), alpha = 2H = {alpha:g} here; the paper's formula is not transcribed in papers.md")
WALK_VERSION = 1  # bump when the simulator changes what a stored walk means
WALK_GROUP = "hoffer"
# The fit window starts at 100 time units (l0^2 / a^2 steps, the walk's own clock): by then a Sinai walker has
# crossed barriers up to T log(100) = 4.6 T (Boltzmann factor 100), so it has met the potential; before that the
# walk is free diffusion at short range, which neither model describes. It ends at the last step.
WALK_START = 100.0
# The window must span at least 2 decades of t, so that log t changes by a factor >= 2 across it: a power of
# log t curves on log-log axes only over a wide range of log t (over a short one every curve is a power law).
WALK_MIN_DECADES = 2.0
WALK_MIN_POINTS = 10
# "Fits clearly better": the log-power line (log d on log log t) leaves at most half the residual sum of
# squares of the power-law line (log d on log t), both with two parameters: the rule of the log t claim above.
WALK_MIN_RATIO = DIFFUSION_MIN_RATIO
# "Far below free diffusion": the power-law exponent beta of the random-potential walk is below the flat
# control's (paired: the same minibatches) by at least half of what the theory predicts, 0.5 - beta_theory,
# where beta_theory is the least-squares exponent of the theory's (log t)^(1 / H) over the window's points
# (a power of log t, read as a power law over a finite window, has a positive exponent). Half: the smallest
# slowdown still worth calling the theory's; known from the window alone, before any walk is simulated.
WALK_GAP_FRACTION = 0.5
# The control diffuses: its exponent within 0.05 (a tenth) of 1/2 in every group. Independent steps make
# E x_t^2 = t eta^2 sigma^2 / m exactly; the fitted exponent varies by ~0.005 between groups of 2,048 walkers.
CONTROL_BETA = (0.45, 0.55)
# Walkers left their initial basin: at the window's start their mean distance is at least the length over
# which the potential's rms fluctuation is 2 T, 2^(1 / H) l0, so they have climbed out of the region where V is
# within about T of V(0) and are walking on the random potential, not in the well they started in.
BASIN_FLUCTUATION = 2.0


def table_for(data_name: str) -> str:
    """The paper's table whose setting is closest to ours: an MLP on MNIST-like data is F1, CIFAR is ResNet-44."""
    return "ResNet-44 (CIFAR-10)" if data_name.startswith("cifar") else "F1 (MNIST)"


@dataclass(frozen=True)
class HofferConfig(ScaledConfig):
    """Every choice of the reproduction, by scale (tests shrink it: tests/tiny_configs.py)."""

    data: Mapping[str, Any]  # the sweep's data section
    model: Mapping[str, Any]  # the sweep's model section (ghost batch = SB)
    sb: int
    lb: int
    epochs: float
    milestones: tuple[float, ...]  # epochs of the lr drops (x 0.1)
    lr: float
    margin: float = GAP_MARGIN
    log_points: int = 40
    every_epoch: bool = True
    augment: bool = False
    # the random walk on a random potential: 2,048 walkers a seed, each on its own Sinai potential, 2^17 = 131,072
    # steps (5 decades of t; the paper's ResNet-44 high-lr phase is about 32,000 updates), l0 = dx = a (see
    # randomwalk.Walk). Fewer walkers leave the model comparison to the walkers' sampling noise: at 512 it was
    # inconclusive on seeds 5-9 in development. About 20 s of one CPU core.
    walk: rwk.Walk = rwk.Walk()

    @classmethod
    def quick(cls, opts: Options) -> HofferConfig:
        # MNIST-1D (4,000 training examples), MLP 3 x 256 with BN: SB 32 (125 updates an epoch), LB 512
        # (8 an epoch, 240 in all). The first lr drop at epoch 20 of 30 gives a high-lr phase of 1.3
        # decades of t after the first epoch; 80 log-spaced evaluations (no extra ones at epoch ends)
        # weight every decade of t equally in the log t fit. See notes for what differs from the paper.
        return cls(
            data=opts.data_spec("mnist1d"),
            model={"name": "mlp", "width": 0.5, "depth": 3, "norm": "batch"},
            sb=32, lb=512, epochs=30, milestones=(20.0, 25.0), lr=0.1, log_points=80, every_epoch=False,
        )

    @classmethod
    def paper(cls, opts: Options) -> HofferConfig:
        data = opts.data_spec("cifar10", ("cifar10", "cifar100", "mnist", "fashion_mnist"))
        if "mnist" in data["name"]:  # their replica of Keskar's F1
            return cls(data=data, model={"name": "mlp", "depth": 5, "norm": "batch"}, sb=128, lb=4096,
                       epochs=40, milestones=(10.0, 20.0, 30.0), lr=0.1, log_points=80)
        return cls(data=data, model={"name": "resnet", "depth": 44, "norm": "batch"}, sb=128, lb=4096,
                   epochs=200, milestones=(81.0, 122.0, 164.0), lr=0.1, augment=True, log_points=80)


class Hoffer(Study):
    name = "hoffer"
    title = "Train longer, generalize better (Hoffer et al. 2017)"
    citation = "E. Hoffer, I. Hubara, D. Soudry. NeurIPS 2017."

    def config(self, opts: Options) -> HofferConfig:
        return HofferConfig.of(opts)

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        c = self.config(opts)
        body = {
            "name": "hoffer",
            "data": {**c.data, "augment": c.augment},
            "model": {**c.model, "ghost_size": c.sb},
            "optim": {"name": "sgd", "lr": c.lr, "momentum": 0.9, "weight_decay": 1e-4, "grad_clip": 5.0},
            "schedule": {"name": "step", "milestones": c.milestones, "gamma": 0.1, "reference_batch": c.sb},
            "train": {"batch_size": c.sb, "epochs": c.epochs, "device": opts.device},
            "log": {"log_points": c.log_points, "every_epoch": c.every_epoch},
            "ladder": [
                {"label": "SB", "set": {}},
                {"label": "LB", "set": {"train.batch_size": c.lb}},
                {"label": "+LR", "set": {"schedule.scaling": "sqrt"}},  # sqrt(B / ghost) with ghost = SB batch
                {"label": "+GBN", "set": {"model.norm": "ghost"}},
                {"label": "+RA", "set": {"train.regime_adaptation": True}},
            ],
            **opts.seeding(self.default_seeds),
        }
        return [SweepSpec.model_validate(body)]

    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        m = measure(ctx)
        m.walk = walk_numbers(ctx, c.walk, ctx.opts.seed_list(self.default_seeds))
        for claim in decide(m, sb=c.sb, lb=c.lb, margin=c.margin, table=table_for(c.data["name"])):
            ctx.add_claim(claim)
        _figures_and_table(ctx, m, c)
        w = c.walk
        ctx.notes.append(
            f"The random walk on a random potential (figure random_potential, beside weight_distance) is the mechanism "
            f"Hoffer et al. propose for the log t growth of ||w_t - w_0||, simulated: {w.n_walkers} walkers a seed, each on "
            f"its own random potential (a fractional Brownian motion with H = {w.hurst:g}, Sinai's potential for H = 1/2; "
            f"piecewise linear on a grid of spacing {w.dx:g} a), take SGD's step x <- x - eta (V'(x) + minibatch noise) "
            f"with eta = {w.eta:g}, batch {w.batch} of {w.n_examples} examples whose gradient offsets have variance "
            f"sigma^2 = {w.sigma**2:g} (the Li & Li simulator's finite sum), for {w.steps} steps; a control walker on the "
            f"flat potential V = 0 takes the same minibatches. The potential's strength puts its rms fluctuation over one "
            f"noise step a = eta sigma / sqrt(m) equal to the temperature eta sigma^2 / (2 m) (Sinai length "
            f"{w.sinai_length:g} a). It is a 1-D model of the mechanism, not a network.")
        if ctx.opts.scale == "quick":
            ctx.notes.append(
                "Quick scale is not the paper's setting: MNIST-1D (4,000 training examples) with an MLP of 3 x 256 "
                f"units and batch norm, SB {c.sb} and LB {c.lb} (a ratio of {c.lb // c.sb}; the paper's is "
                "4096 / 128 = 32), 30 epochs with lr drops at 20 and 25. Accuracies are therefore far from the "
                "paper's (roughly 60-75% test accuracy here, 98-99% on MNIST) and the steps along the ladder are "
                "larger; magnitudes are compared in accuracy points beside the closest table (F1, an MLP on MNIST). "
                "The paper's weight-distance figure is from ResNet-44 on CIFAR-10, about 32,000 updates in its "
                "high-lr phase; here the fitted part of that phase ends at "
                + " and ".join(f"update {_last_t(m, label):.0f} with {label}" for label in FITTED) + ".")


# -- numbers read from the store ----------------------------------------------------------------------


@dataclass
class Measured:
    """Everything the rules need, as plain numbers keyed by ladder label and seed (NaN: the run is excluded)."""

    test_acc: dict[str, dict[int, float]] = field(default_factory=dict)
    train_acc: dict[str, dict[int, float]] = field(default_factory=dict)
    train_loss: dict[str, dict[int, float]] = field(default_factory=dict)
    updates: dict[str, dict[int, float]] = field(default_factory=dict)
    excluded: dict[str, dict[str, int]] = field(default_factory=dict)
    # label -> seed -> (t, ||w_t - w_0||) in the high-lr window (after the first epoch, before the first lr drop)
    windows: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    # label -> seed -> (steps, distance) over the whole run, for the figure
    curves: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    # the simulated random walk on a random potential (None: not simulated, no claim)
    walk: WalkNumbers | None = None


@dataclass
class WalkNumbers:
    """The random walk's numbers by seed: mean distance from the start over a group's walkers at `steps`, on
    the random potential and on the flat control, and the walkers that reached the end of their field."""

    steps: np.ndarray
    potential: dict[int, np.ndarray]
    flat: dict[int, np.ndarray]
    left_field: dict[int, int]
    length: float  # the Sinai length l0, in the walk's units of x
    time_unit: float  # l0^2 / a^2 steps
    hurst: float
    walkers: int


def high_lr_window(steps, dist, lr, per_epoch: float) -> tuple[np.ndarray, np.ndarray]:
    """(t, distance) at the logged steps after the first epoch and before the first learning-rate drop,
    read from the logged lr (the lr of the update that ended at each step; step 0 logs no update)."""
    steps, dist, lr = (np.asarray(v, dtype=float) for v in (steps, dist, lr))
    o = np.argsort(steps)
    steps, dist, lr = steps[o], dist[o], lr[o]
    upd = steps >= 1
    if not upd.any() or not np.isfinite(per_epoch) or per_epoch <= 0:
        return np.zeros(0), np.zeros(0)
    peak = float(np.nanmax(lr[upd]))
    dropped = upd & (lr < peak * (1 - 1e-6))
    end = float(steps[dropped][0]) if dropped.any() else math.inf  # first logged step after the drop
    keep = (steps >= per_epoch) & (steps < end) & np.isfinite(dist)
    return steps[keep], dist[keep]


def measure(ctx: Analysis) -> Measured:
    """Read every run of the study (not only the finished ones): excluded runs become NaN with their reason."""
    m = Measured()
    for label in LADDER:
        runs = sorted((r for r in ctx.runs if r.tags.get("ladder") == label), key=seed_of)
        m.excluded[label] = ctx.exclusions(runs)
        for key in ("test_acc", "train_acc", "train_loss", "updates"):
            getattr(m, key)[label] = {}
        m.windows[label], m.curves[label] = {}, {}
        for r in runs:
            s = seed_of(r)
            fin = ctx.final_if_used(r)
            m.test_acc[label][s] = float(fin.get("test_acc", np.nan))
            m.train_acc[label][s] = float(fin.get("train_acc", np.nan))
            m.train_loss[label][s] = float(fin.get("train_loss", np.nan))
            m.updates[label][s] = float(fin.get("steps", np.nan))
            if label in FITTED and fin:
                steps, dist = ctx.series(r, "weight_distance")
                _, lr = ctx.series(r, "lr")
                per_epoch = fin.get("steps", np.nan) / fin.get("epochs", np.nan) if fin.get("epochs") else np.nan
                if len(lr) == len(steps) and len(steps):
                    m.windows[label][s] = high_lr_window(steps, dist, lr, per_epoch)
                m.curves[label][s] = (steps, dist)
    return m


def _last_t(m: Measured, label: str) -> float:
    ends = [float(t.max()) for t, _ in m.windows.get(label, {}).values() if len(t)]
    return max(ends) if ends else math.nan


# -- the random walk, simulated once and cached in the store --------------------------------------------------


def _walk_id(walk: rwk.Walk, seed: int) -> tuple[str, dict]:
    """The pseudo-run's id and stored spec: a hash of everything that determines the group's result."""
    spec = {"kind": "simulation", "simulator": "batchscope.randomwalk", "sim_version": WALK_VERSION, "seed": int(seed),
            **walk.to_dict()}
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return "walk-" + hashlib.sha256(text.encode()).hexdigest()[:16], spec


WALK_METRICS = ("walk_distance", "walk_sq_distance", "flat_distance", "flat_sq_distance")


def walk_numbers(ctx: Analysis, walk: rwk.Walk, seeds: list[int], wait_s: float = 600.0) -> WalkNumbers:
    """The walk's distances by seed, read from the store; groups not stored yet are simulated (together) and
    stored first. A group another process is simulating is waited for."""
    store = ctx.store
    items = {rid: (spec, s) for s in seeds for rid, spec in [_walk_id(walk, s)]}
    ids = {rid: s for rid, (_, s) in items.items()}

    def record(rid: str, _: int, r) -> dict:
        rows = [(int(t), None, dict(zip(WALK_METRICS, map(float, v))))
                for t, *v in zip(r.steps, r.mean_abs, r.mean_sq, r.flat_mean_abs, r.flat_mean_sq)]
        store.log_metrics_many(rid, rows)
        return {"steps": float(walk.steps), "left_field": float(r.left_field), "walk_distance": float(r.mean_abs[-1]),
                "flat_distance": float(r.flat_mean_abs[-1])}  # a summary for `batchscope runs`

    simulated(store, items, WALK_GROUP, lambda todo: rwk.simulate_walks(walk, todo), record, wait_s)
    steps = rwk.record_steps(walk.steps, walk.points).astype(float)
    out = WalkNumbers(steps, {}, {}, {}, walk.length, walk.time_unit, walk.hurst, walk.n_walkers)
    for rid, s in ids.items():
        pts = store.metrics(rid, WALK_METRICS)
        if any(len(pts[k]) != len(steps) for k in WALK_METRICS):
            raise BatchscopeError(f"simulation {rid}: not every recorded step is stored; reset it to recompute")
        out.potential[s] = np.array([v for _, v in pts["walk_distance"]], dtype=float)
        out.flat[s] = np.array([v for _, v in pts["flat_distance"]], dtype=float)
        out.left_field[s] = int(ctx.store.get_run(rid).final.get("left_field", 0))
    return out


# -- the rules: plain numbers in, claims out -----------------------------------------------------------


def diffusion_fit(t, d) -> dict[str, float]:
    """Per run: the lines d ~ a + b log t and d ~ a + b sqrt t, their residual sums of squares and R^2,
    the number of points and the decades of t they span."""
    t, d = np.asarray(t, dtype=float), np.asarray(d, dtype=float)
    ok = np.isfinite(t) & np.isfinite(d) & (t > 0)
    t, d = t[ok], d[ok]
    out = {"points": float(len(t)), "decades": float(np.log10(t.max() / t.min())) if len(t) else 0.0}
    if len(t) < 3 or np.ptp(t) == 0 or np.var(d) == 0:
        return {**out, "rss_log": math.nan, "rss_sqrt": math.nan, "r2_log": math.nan, "r2_sqrt": math.nan}
    floor = 1e-12 * float(np.sum((d - d.mean()) ** 2))  # a perfect line must not divide by zero
    rss_log, rss_sqrt = fit_line(np.log(t), d)[2] + floor, fit_line(np.sqrt(t), d)[2] + floor
    tss = float(np.sum((d - d.mean()) ** 2))
    return {**out, "rss_log": rss_log, "rss_sqrt": rss_sqrt, "r2_log": 1 - rss_log / tss, "r2_sqrt": 1 - rss_sqrt / tss}


def _mean(v: Mapping[int, float]) -> float:
    return float(nanmean(list(v.values()))) if v else math.nan


def fit_check(m: Measured, label: str) -> RegimeCheck:
    acc, loss = m.train_acc.get(label, {}), m.train_loss.get(label, {})
    n = int(sum(np.isfinite(v) for v in acc.values()))
    mean = _mean(acc)
    return RegimeCheck(
        f"fits_training_set_{label}",
        f"the {label} runs fit the training set: mean final training accuracy >= {FIT_ACC:g} over at least 3 "
        "usable runs (as Keskar et al.'s F1, which the paper replicates), so a test-accuracy difference is one "
        "of generalization, not of optimization",
        n >= 3 and mean >= FIT_ACC,
        {"train_acc_mean": mean, "train_acc_min": float(np.nanmin(list(acc.values()))) if n else math.nan,
         "train_loss_mean": _mean(loss), "runs": n},
    )


def updates_check(m: Measured) -> RegimeCheck:
    sb, ra = _mean(m.updates.get("SB", {})), _mean(m.updates.get("+RA", {}))
    ratio = ra / sb if sb and np.isfinite(sb) else math.nan
    lo, hi = RA_UPDATES
    return RegimeCheck(
        "ra_matches_sb_updates",
        f"regime adaptation gives +RA as many updates as SB: updates(+RA) / updates(SB) in [{lo:g}, {hi:g}]",
        bool(np.isfinite(ratio) and lo <= ratio <= hi),
        {"updates_SB": sb, "updates_+RA": ra, "ratio": ratio},
    )


def window_check(m: Measured, label: str) -> RegimeCheck:
    fits = [diffusion_fit(t, d) for t, d in m.windows.get(label, {}).values()]
    pts = [f["points"] for f in fits]
    dec = [f["decades"] for f in fits]
    firsts = [float(t.min()) for t, _ in m.windows.get(label, {}).values() if len(t)]
    lasts = [float(t.max()) for t, _ in m.windows.get(label, {}).values() if len(t)]
    ok = len(fits) >= 3 and min(pts) >= DIFFUSION_MIN_POINTS and min(dec) >= DIFFUSION_MIN_DECADES
    return RegimeCheck(
        f"diffusion_window_{label}",
        f"the log t fit of the {label} runs covers the high learning-rate phase: only points after the first "
        f"epoch (the transient) and before the first lr drop (read from the logged lr), at least "
        f"{DIFFUSION_MIN_POINTS} per run spanning at least {DIFFUSION_MIN_DECADES:g} decade(s) of t, in at least 3 runs",
        ok,
        {"runs": len(fits), "points_min": min(pts) if pts else 0, "decades_min": min(dec) if dec else 0.0,
         "t_first": max(firsts) if firsts else math.nan, "t_last": min(lasts) if lasts else math.nan},
    )


def decide(m: Measured, *, sb: int, lb: int, margin: float, table: str = "F1 (MNIST)") -> list[Claim]:
    """The claims from the numbers: the ladder steps, the closed gap, log t diffusion, and (when simulated) the
    random walk on a random potential."""
    fits = {label: fit_check(m, label) for label in LADDER}
    ra_updates = updates_check(m)
    claims = [_ladder_claim(m, prev, cur, sb, lb, table, [fits[prev], fits[cur]] + ([ra_updates] if cur == "+RA" else []))
              for prev, cur in zip(LADDER[:-1], LADDER[1:])]
    v = equivalence(m.test_acc["+RA"], m.test_acc["SB"], margin=margin, names=("test_acc[+RA]", "test_acc[SB]"))
    v = with_exclusions(v, merge_counts(m.excluded.get("SB", {}), m.excluded.get("+RA", {})))
    claims.append(Claim(
        "gap_closed",
        f"With all three (+RA), LB matches SB test accuracy (within +-{100 * margin:.2g} points): the gap is closed.",
        v, {"test_acc_SB": summarize(list(m.test_acc["SB"].values())),
            "test_acc_+RA": summarize(list(m.test_acc["+RA"].values()))},
        figure="ladder", regime=[fits["SB"], fits["+RA"], ra_updates],
        magnitude=[magnitude("+RA - SB (test accuracy, points)", v, round(published_step(table, "gap"), 2), SOURCE.format(table),
                             percent_points)],
    ))
    claims.append(_diffusion_claim(m))
    if m.walk is not None:
        claims.append(_walk_claim(m.walk))
    return claims


def _ladder_claim(m: Measured, prev: str, cur: str, sb: int, lb: int, table: str, regime: list[RegimeCheck]) -> Claim:
    """One step of the ladder: `cur` improves test accuracy over `prev` (for "LB": SB over LB, the gap)."""
    hi_, lo_ = (prev, cur) if cur == "LB" else (cur, prev)  # the arm claimed to be better first
    v = paired_difference(m.test_acc[hi_], m.test_acc[lo_], direction="greater", min_effect=MIN_EFFECT[cur],
                          names=(f"test_acc[{hi_}]", f"test_acc[{lo_}]"))
    v = with_exclusions(v, merge_counts(m.excluded.get(prev, {}), m.excluded.get(cur, {})))
    if cur == "LB":
        statement = (f"LB (batch {lb}, same epochs, {lb // sb}x fewer updates) generalizes worse than SB "
                     f"(batch {sb}): a test-accuracy gap between runs that both fit the training set.")
        quantity = "generalization gap, SB - LB (test accuracy, points)"
    else:
        what = {"+LR": "sqrt(B / B_SB) learning-rate scaling", "+GBN": "Ghost Batch Normalization (ghost = SB batch)",
                "+RA": "regime adaptation (as many updates as SB)"}[cur]
        statement = f"Adding {what} ({cur}) improves test accuracy over {prev}."
        quantity = f"{cur} - {prev} (test accuracy, points)"
    return Claim(
        f"ladder_{cur.lstrip('+')}", statement, v,
        {f"test_acc_{lbl}": summarize(list(m.test_acc[lbl].values())) for lbl in (prev, cur)}
        | {f"train_acc_{lbl}": summarize(list(m.train_acc[lbl].values())) for lbl in (prev, cur)}
        | {f"train_loss_{lbl}": summarize(list(m.train_loss[lbl].values())) for lbl in (prev, cur)},
        figure="ladder", regime=regime,
        magnitude=[magnitude(quantity, v, round(published_step(table, cur), 2), SOURCE.format(table), percent_points)],
    )


def _diffusion_claim(m: Measured) -> Claim:
    """Ultra-slow diffusion: log t against sqrt t, per run, paired over seeds, for SB and LB both."""
    parts, measured, windows, mags = {}, {}, [], []
    for label in FITTED:
        per_seed = {s: diffusion_fit(t, d) for s, (t, d) in m.windows.get(label, {}).items()}
        seeds = sorted(set(m.test_acc.get(label, {})) | set(per_seed))
        lg = {s: math.log10(per_seed[s]["rss_log"]) if s in per_seed and per_seed[s]["rss_log"] > 0 else math.nan
              for s in seeds}
        sq = {s: math.log10(per_seed[s]["rss_sqrt"]) if s in per_seed and per_seed[s]["rss_sqrt"] > 0 else math.nan
              for s in seeds}
        v = paired_difference(sq, lg, direction="greater", min_effect=math.log10(DIFFUSION_MIN_RATIO),
                              names=(f"log10 RSS(sqrt t line)[{label}]", f"log10 RSS(log t line)[{label}]"))
        parts[label] = with_exclusions(v, m.excluded.get(label, {}))
        r2l = [f["r2_log"] for f in per_seed.values()]
        r2s = [f["r2_sqrt"] for f in per_seed.values()]
        measured |= {f"R2_log_t_{label}": summarize(r2l), f"R2_sqrt_t_{label}": summarize(r2s),
                     f"log10_rss_ratio_{label}": summarize([sq[s] - lg[s] for s in seeds])}
        windows.append(window_check(m, label))
        mags.append(magnitude(f"RSS(sqrt t line) / RSS(log t line), {label}", v, None,
                              "Hoffer et al. 2017, Fig. 2 (ResNet-44): 'close to a straight line' in log t; no number",
                              lambda x: 10**x))
        mags.append(Magnitude(f"R^2 of the log t line, {label}", summarize(r2l).mean if r2l else None, None,
                              "Hoffer et al. 2017, Fig. 2: no number given"))
    excluded_runs = sum(sum(m.excluded.get(label, {}).values()) for label in FITTED)
    return Claim(
        "log_diffusion",
        "In the high learning-rate phase, ||w_t - w_0|| grows like log t (ultra-slow diffusion), in SB and LB "
        f"runs both: a line in log t leaves at most 1/{DIFFUSION_MIN_RATIO:g} of the residual of a line in sqrt t "
        "(a random walk's growth).",
        all_of(parts, what="the comparison for SB and for LB", excluded=excluded_runs),
        measured, figure="weight_distance", regime=windows, magnitude=mags,
    )


def walk_window(w: WalkNumbers) -> np.ndarray:
    """Which recorded steps the walk's fits use: from WALK_START time units to the last step."""
    return np.asarray(w.steps, dtype=float) >= WALK_START * w.time_unit


def walk_fit(t, d, time_unit: float) -> dict[str, float]:
    """The two models of a distance curve, both lines with two parameters in log d: a power of log t,
    log d = log c + k log log(t / time_unit), and a power law, log d = log c + beta log t; their exponents
    and residual sums of squares (NaN with fewer than 3 usable points)."""
    t, d = np.asarray(t, dtype=float), np.asarray(d, dtype=float)
    ok = np.isfinite(t) & np.isfinite(d) & (d > 0) & (t > time_unit)
    t, d = t[ok], d[ok]
    out = {"points": float(len(t)), "decades": float(np.log10(t.max() / t.min())) if len(t) else 0.0}
    if len(t) < 3 or np.ptp(t) == 0:
        return {**out, "k": math.nan, "beta": math.nan, "rss_logpow": math.nan, "rss_pow": math.nan}
    y = np.log(d)
    floor = 1e-12 * max(float(np.sum((y - y.mean()) ** 2)), 1e-300)  # an exact fit must not divide by zero
    k, _, rss_logpow = fit_line(np.log(np.log(t / time_unit)), y)
    beta, _, rss_pow = fit_line(np.log(t), y)
    return {**out, "k": k, "beta": beta, "rss_logpow": rss_logpow + floor, "rss_pow": rss_pow + floor}


def theory_beta(w: WalkNumbers) -> float:
    """The power-law exponent that the theory's distance, (log(t / time unit))^(1 / H), shows when fitted as
    t^beta over the window's points: known before any walk is simulated."""
    t = np.asarray(w.steps, dtype=float)[walk_window(w)]
    if len(t) < 2:
        return math.nan
    return fit_line(np.log(t), np.log(np.log(t / w.time_unit)) / w.hurst)[0]


def _walk_fits(w: WalkNumbers) -> tuple[dict[int, dict], dict[int, dict]]:
    win = walk_window(w)
    t = np.asarray(w.steps, dtype=float)[win]
    pot = {s: walk_fit(t, np.asarray(d)[win], w.time_unit) for s, d in w.potential.items()}
    flat = {s: walk_fit(t, np.asarray(d)[win], w.time_unit) for s, d in w.flat.items()}
    return pot, flat


def walk_checks(w: WalkNumbers) -> list[RegimeCheck]:
    """The walk's regime checks: the control diffuses; the window is long and the walkers have left their
    initial basin; no walker reached the end of its field."""
    pot, flat = _walk_fits(w)
    betas = [f["beta"] for f in flat.values()]
    lo, hi = CONTROL_BETA
    control = RegimeCheck(
        "walk_control_diffuses",
        f"the simulator diffuses when the potential is flat: the control walk's power-law exponent is in [{lo:g}, {hi:g}] "
        "in every group (free diffusion: 1/2), over at least 3 groups",
        len(betas) >= 3 and all(np.isfinite(b) and lo <= b <= hi for b in betas),
        {"groups": len(betas), "beta_flat_min": float(np.min(betas)) if betas else math.nan,
         "beta_flat_max": float(np.max(betas)) if betas else math.nan},
    )
    win = walk_window(w)
    t = np.asarray(w.steps, dtype=float)[win]
    start = [float(np.asarray(d)[win][0]) if win.any() else math.nan for d in w.potential.values()]
    need = BASIN_FLUCTUATION ** (1 / w.hurst) * w.length
    decades = float(np.log10(t[-1] / t[0])) if len(t) else 0.0
    basin = RegimeCheck(
        "walk_left_initial_basin",
        f"the fit window (t >= {WALK_START:g} time units l0^2 / a^2, to the last step) has at least {WALK_MIN_POINTS} "
        f"points spanning at least {WALK_MIN_DECADES:g} decades of t, and at its start every group's mean distance is "
        f"at least {BASIN_FLUCTUATION ** (1 / w.hurst):g} l0, where the potential's rms fluctuation reaches "
        f"{BASIN_FLUCTUATION:g} T: the walkers have left the region where V is within about T of V(0)",
        len(start) >= 3 and len(t) >= WALK_MIN_POINTS and decades >= WALK_MIN_DECADES
        and all(np.isfinite(x) and x >= need for x in start),
        {"groups": len(start), "points": len(t), "decades": decades, "t_first": float(t[0]) if len(t) else math.nan,
         "distance_at_start_min_over_l0": float(np.min(start) / w.length) if start else math.nan,
         "needed_over_l0": BASIN_FLUCTUATION ** (1 / w.hurst)},
    )
    left = sum(w.left_field.values())
    inside = RegimeCheck(
        "walk_inside_field",
        "no walker reached the end of its random potential's grid (its distance would be cut short)",
        left == 0 and len(w.left_field) > 0,
        {"walkers_left": left, "walkers": w.walkers * len(w.left_field)},
    )
    return [control, basin, inside]


def _mean_ci(values, confidence: float = 0.95) -> tuple[float, tuple[float, float] | None]:
    """Mean of the finite values and its Student-t interval (None with fewer than 2)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan), None
    half = float(_st.t.ppf(0.5 + confidence / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean()), (float(v.mean()) - half, float(v.mean()) + half)


def _walk_claim(w: WalkNumbers) -> Claim:
    """Ultra-slow diffusion on a random potential: a power of log t fits, a power law does not, and the power-law
    exponent is far below the flat control's."""
    pot, flat = _walk_fits(w)
    seeds = sorted(set(w.potential) | set(w.flat))
    lg = {s: math.log10(pot[s]["rss_logpow"]) if s in pot and pot[s]["rss_logpow"] > 0 else math.nan for s in seeds}
    pw = {s: math.log10(pot[s]["rss_pow"]) if s in pot and pot[s]["rss_pow"] > 0 else math.nan for s in seeds}
    ratio = paired_difference(pw, lg, direction="greater", min_effect=math.log10(WALK_MIN_RATIO),
                              names=("log10 RSS(power law)", "log10 RSS(power of log t)"))
    b_theory = theory_beta(w)
    # no window, no theory exponent: the walk_left_initial_basin check fails then, and the claim is untested
    min_gap = WALK_GAP_FRACTION * (0.5 - b_theory) if np.isfinite(b_theory) else 0.0
    b_pot = {s: pot[s]["beta"] if s in pot else math.nan for s in seeds}
    b_flat = {s: flat[s]["beta"] if s in flat else math.nan for s in seeds}
    gap = paired_difference(b_flat, b_pot, direction="greater", min_effect=max(min_gap, 0.0),
                            names=("beta[flat control]", "beta[random potential]"))
    v = all_of({"power of log t fits better": ratio, "exponent far below the control's": gap},
               what="the model comparison and the exponent gap")
    alpha, k_theory = 2 * w.hurst, 1 / w.hurst
    k_mean, k_ci = _mean_ci([pot[s]["k"] for s in pot])
    bp_mean, bp_ci = _mean_ci(b_pot.values())
    bf_mean, bf_ci = _mean_ci(b_flat.values())
    source = WALK_SOURCE.format(alpha=alpha)
    return Claim(
        "random_potential_ultraslow",
        f"The paper's model of the log t growth: a random walk on a random potential whose fluctuations grow with distance "
        f"(E[(V(x) - V(y))^2] ~ |x - y|^alpha, alpha = {alpha:g}), taking SGD's step, diffuses ultra-slowly: its distance "
        f"from the start grows like a power of log t (theory: (log t)^{k_theory:g}), not like a power of t. A line in "
        f"log log t fits log distance with at most 1/{WALK_MIN_RATIO:g} of the residual of a line in log t, and the "
        f"power-law exponent is below the flat control's (same minibatches, V = 0: 1/2) by at least "
        f"{WALK_GAP_FRACTION:g} x (1/2 - {b_theory:.3f}), half the gap the theory's curve shows over this window.",
        v,
        {"k_log_power": summarize([pot[s]["k"] for s in pot]), "beta_potential": summarize(list(b_pot.values())),
         "beta_flat": summarize(list(b_flat.values())), "beta_theory": b_theory, "min_beta_gap": min_gap,
         "log10_rss_ratio": summarize([pw[s] - lg[s] for s in seeds]),
         "per_seed": {str(s): {"k": pot.get(s, {}).get("k"), "beta": b_pot[s], "beta_flat": b_flat[s],
                               "rss_ratio": 10 ** (pw[s] - lg[s]) if np.isfinite(pw[s] - lg[s]) else None} for s in seeds},
         "window_start_steps": WALK_START * w.time_unit, "walkers_per_group": w.walkers},
        figure="random_potential", regime=walk_checks(w),
        magnitude=[
            Magnitude("k, distance ~ (log t)^k on the random potential", k_mean, k_theory, source, k_ci),
            Magnitude("beta, distance ~ t^beta on the random potential (fitted over the window)", bp_mean,
                      round(b_theory, 3), f"the theory's (log t)^{k_theory:g} fitted as t^beta over the same points", bp_ci),
            Magnitude("beta of the flat control", bf_mean, 0.5, "free diffusion: E x_t^2 = t eta^2 sigma^2 / m", bf_ci),
            magnitude("beta[flat] - beta[random potential]", gap, round(0.5 - b_theory, 3),
                      "the theory's gap over the same points"),
            magnitude("RSS(power law) / RSS(power of log t), random potential", ratio, None,
                      "a model comparison: no published number", lambda x: 10**x),
        ],
    )


# -- figures and the ladder table ------------------------------------------------------------------------


def _figures_and_table(ctx: Analysis, m: Measured, c: HofferConfig) -> None:
    _ladder_figure(ctx, m, c)
    if any(m.curves.get(label) for label in FITTED):
        _distance_figure(ctx, m)
    if m.walk is not None:
        _walk_figure(ctx, m.walk)
    _ladder_table(ctx, m)


def _ladder_figure(ctx: Analysis, m: Measured, c: HofferConfig) -> None:
    seeds = sorted({s for label in LADDER for s in m.test_acc.get(label, {})})
    grid = seed_grid(m.test_acc, LADDER, seeds) if seeds else np.full((1, len(LADDER)), np.nan)
    fig, ax = new_figure()
    errorbar_points(ax, list(range(len(LADDER))), grid, "test accuracy")
    ax.set_xticks(range(len(LADDER)), LADDER)
    ax.set_ylabel("test accuracy")
    ctx.add_figure("ladder", fig, f"Test accuracy along the ladder (SB batch {c.sb}, LB batch {c.lb}); "
                                  "mean and sd over seeds.")


def _distance_figure(ctx: Analysis, m: Measured) -> None:
    fig, axes = new_figure(1, len(FITTED))
    for ax, label in zip(axes.flat, FITTED):
        curves = m.curves.get(label, {})
        if not curves:
            continue
        steps = sorted({float(x) for st, _ in curves.values() for x in st if x >= 1})
        idx = {x: i for i, x in enumerate(steps)}
        ys = np.full((len(curves), len(steps)), np.nan)
        for i, (st, d) in enumerate(curves.values()):
            for x, y in zip(st, d):
                if x >= 1:
                    ys[i, idx[float(x)]] = y
        line_with_band(ax, steps, ys, f"{label} (mean, sd)")
        win = [t for t, _ in m.windows.get(label, {}).values() if len(t)]
        if win:
            lo, hi = max(float(t.min()) for t in win), min(float(t.max()) for t in win)
            ax.axvspan(lo, hi, color="0.85", alpha=0.5, linewidth=0, label="fit window (high lr)")
            t = np.array([x for x in steps if lo <= x <= hi])
            y = nanmean(ys[:, [idx[x] for x in t]], axis=0)
            if len(t) >= 3:
                for fx, style, name in ((np.log(t), "--", "line in log t"), (np.sqrt(t), ":", "line in sqrt t")):
                    b, a, _ = fit_line(fx, y)
                    ax.plot(t, a + b * fx, style, color="k", linewidth=1, label=name)
            ax.legend(fontsize=7, frameon=False)
        ax.set_xscale("log")
        ax.set_xlabel("update t (log scale)")
        ax.set_ylabel("||w_t - w_0||")
    ctx.add_figure("weight_distance", fig,
                   "Distance from the initial weights over the whole run (mean and sd over seeds). Shaded: the "
                   "high learning-rate phase after the first epoch, where the lines in log t (dashed) and sqrt t "
                   "(dotted) are fitted; a straight curve on this axis is log t growth.")


def _walk_figure(ctx: Analysis, w: WalkNumbers) -> None:
    """Distance against t for the random potential and the flat control (mean and sd over seeds), with the
    fits over the window, on log-x and on log-log axes."""
    t = np.asarray(w.steps, dtype=float)
    win = walk_window(w)
    pot = np.array([w.potential[s] for s in sorted(w.potential)])
    flat = np.array([w.flat[s] for s in sorted(w.flat)])
    fig, axes = new_figure(1, 2)
    for ax, loglog in zip(axes.flat, (False, True)):
        line_with_band(ax, t, pot, "random potential (mean, sd)", color="C0")
        line_with_band(ax, t, flat, "flat control (mean, sd)", color="C1")
        if win.sum() >= 3:
            tw, ll = t[win], np.log(np.log(t[win] / w.time_unit))
            y, yf = np.log(nanmean(pot[:, win], axis=0)), np.log(nanmean(flat[:, win], axis=0))
            ax.axvspan(tw[0], tw[-1], color="0.85", alpha=0.5, linewidth=0, label="fit window")
            k, a, _ = fit_line(ll, y)
            b, a2, _ = fit_line(np.log(tw), y)
            bf, a3, _ = fit_line(np.log(tw), yf)
            ax.plot(tw, np.exp(a + k * ll), "--", color="k", linewidth=1, label=f"c (log t)^{k:.2f}")
            ax.plot(tw, np.exp(a2 + b * np.log(tw)), ":", color="k", linewidth=1, label=f"c t^{b:.3f}")
            ax.plot(tw, np.exp(a3 + bf * np.log(tw)), ":", color="C1", linewidth=1, label=f"control: c t^{bf:.3f}")
        ax.set_xscale("log")
        if loglog:
            ax.set_yscale("log")
        ax.set_xlabel("SGD step t (log scale)")
        ax.set_ylabel("mean |x_t - x_0|" + (" (log scale)" if loglog else ""))
        ax.legend(fontsize=7, frameon=False)
    ctx.add_figure(
        "random_potential", fig,
        "The mechanism Hoffer et al. propose for the log t growth of ||w_t - w_0|| (figure weight_distance): a random walk "
        f"on a random potential (fractional Brownian motion, H = {w.hurst:g}; each of {w.walkers} walkers a seed on its "
        "own), taking SGD's step with minibatch noise, against the same minibatches on a flat potential. Mean distance "
        "from the start, mean and sd over seeds; left on a log t axis (where (log t)^k bends upward and a straight line "
        "is log t growth), right on log-log axes (where a power law is straight). Shaded: the fit window; dashed: "
        "c (log t)^k, dotted: c t^beta, fitted to the mean curve. Before the window the walkers on the random potential "
        "can be a little faster than the free ones: at short range the potential's slopes act as extra noise.")


def _ladder_table(ctx: Analysis, m: Measured) -> None:
    rows = []
    for label in LADDER:
        acc = list(m.test_acc.get(label, {}).values())
        ex = m.excluded.get(label, {})
        rows.append([
            label, str(int(np.isfinite(acc).sum()) if acc else 0),
            ", ".join(f"{n} {why}" for why, n in ex.items()) or "0",
            f"{nanmean(acc):.4f}" if acc else "-", f"{nanstd(acc):.4f}" if acc else "-",
            f"{_mean(m.train_acc.get(label, {})):.4f}", f"{_mean(m.train_loss.get(label, {})):.4f}",
            f"{_mean(m.updates.get(label, {})):.0f}",
        ])
    ctx.add_table("Along the ladder: test accuracy, and whether the training set was fitted",
                  ["step", "runs used", "excluded", "test acc (mean)", "sd", "train acc (mean)",
                   "train loss (mean)", "updates"], rows)
