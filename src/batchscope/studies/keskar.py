"""Keskar et al. 2017, "On large-batch training for deep learning: generalization gap and sharp minima".

Small-batch (SB) and large-batch (LB = 10% of the training set) Adam runs from the same
initialization, trained until the training loss stops improving (as the paper did); test accuracy,
epsilon-sharpness (full space and a random 100-dim subspace), the distance travelled from the
initial weights, the 1-D loss along the line between the two solutions, and a batch-size sweep.

The analysis has two halves: `_read_runs` / `Keskar._line` take the numbers from the store (measuring
and caching what is missing), and `decide` turns plain numbers into claims, so the rules can be
tested on made-up numbers without training (tests/studies/test_keskar_rules.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..curvature import Objective, epsilon_sharpness, hessian_eigenvalues, interpolate
from ..errors import BatchscopeError
from ..factories import train_size
from ..report.claims import Claim, Magnitude
from ..report.figures import errorbar_points, line_with_band, new_figure
from ..spec import SweepSpec
from ..stats import RegimeCheck, Verdict, paired_difference, summarize, trend
from .base import (
    Analysis,
    Options,
    ScaledConfig,
    Study,
    count_reasons,
    cpu_loss,
    fmt,
    log_or_nan,
    magnitude,
    merge_counts,
    nanmean,
    seed_grid,
    seed_of,
    with_exclusions,
)

ALPHAS = np.linspace(-1.0, 2.0, 25)  # as in the authors' code
LINE_STEP = 2  # grid points either side of a solution for the rise along the line: 2 x 0.125 = 0.25 in alpha
RISE_FLOOR = 1e-6  # a rise at or below 0 (not a minimum along the line) enters the log ratio as this loss

# The sharpness measures: (eps, subspace dim or None), the claim id, and the paper's published SB and LB values
# (Table 3: full space; Table 4: random subspace p = 100), network -> (SB, LB).
SHARPNESS = {
    "sharper_eps0.001": (1e-3, None, "Table 3 (eps = 1e-3, full space)", {
        "F1": (1.23, 205.14), "F2": (1.39, 310.64), "C1": (28.58, 707.23), "C2": (8.68, 925.32),
        "C3": (29.85, 258.75), "C4": (12.83, 421.84)}),
    "sharper_eps0.0005": (5e-4, None, "Table 3 (eps = 5e-4, full space)", {
        "F1": (0.61, 42.90), "C1": (7.08, 227.31), "C2": (2.07, 175.31)}),
    "sharper_eps0.001_p100": (1e-3, 100, "Table 4 (eps = 1e-3, random subspace p = 100)", {
        "F1": (0.11, 9.22), "F2": (0.29, 23.63), "C1": (2.18, 137.25), "C2": (0.95, 25.09),
        "C3": (17.02, 236.03), "C4": (6.05, 72.99)}),
}


# The paper's networks at paper scale (F2, on licensed TIMIT features, is not built in): the data sets each was
# trained on, and its model section. The shallow and deep nets differ between CIFAR-10 and CIFAR-100 only in the
# number of classes, which the data set gives.
_SHALLOW = {"name": "keskar_shallow", "norm": "batch", "dropout": 0.5}  # dropout 0.5 after FC 384 and FC 192
_DEEP = {"name": "keskar_deep", "norm": "batch", "dropout": 0.5}  # the classifier's 0.5; 0.3 / 0.4 in the convs
NETWORKS: dict[str, tuple[tuple[str, ...], Mapping[str, Any]]] = {
    "F1": (("mnist", "fashion_mnist"), {"name": "mlp", "depth": 5, "norm": "batch"}),  # 5 x 512, BN, ReLU
    "C1": (("cifar10",), _SHALLOW),
    "C2": (("cifar10",), _DEEP),
    "C3": (("cifar100",), _SHALLOW),
    "C4": (("cifar100",), _DEEP),
}
DEFAULT_NETWORK = {"mnist": "F1", "fashion_mnist": "F1", "cifar10": "C1", "cifar100": "C3"}  # the shallow nets on CIFAR


def _networks_help() -> str:
    """Which data set each network needs: "F1: mnist or fashion_mnist; C1, C2: cifar10; C3, C4: cifar100"."""
    by_data: dict[tuple[str, ...], list[str]] = {}
    for net, (datasets, _) in NETWORKS.items():
        by_data.setdefault(datasets, []).append(net)
    return "; ".join(f"{', '.join(nets)}: {' or '.join(d)}" for d, nets in by_data.items())


def paper_network(network: str | None, data_name: str) -> str:
    """The network to train on `data_name`: the one asked for (checked against its data set), else the default."""
    if network is None:
        return DEFAULT_NETWORK[data_name]
    if network not in NETWORKS:
        raise BatchscopeError(f"--network {network}: expected one of {', '.join(NETWORKS)} ({_networks_help()})")
    datasets = NETWORKS[network][0]
    if data_name not in datasets:
        raise BatchscopeError(f"--network {network} needs --data {' or '.join(datasets)}, not {data_name} "
                              f"({_networks_help()})")
    return network


def published_ratios(table: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """LB / SB sharpness ratio per network of a published table."""
    return {net: lb / sb for net, (sb, lb) in table.items()}


# -- minimal effects, stated in advance from the paper's numbers (never from our runs) ----------------
# Sharpness (and the rise along the line, a 1-D sharpness): the paper's LB/SB ratios are multiplicative
# (8.7 to 224 for eps = 1e-3), so the effect is measured as log(LB / SB) and must reach a tenth of the
# log of the paper's SMALLEST published ratio for the same metric (a tenth of its orders of magnitude):
# eps 1e-3 full: C3's 8.67 -> 1.24x; eps 5e-4: C1's 32.1 -> 1.41x; subspace: C4's 12.1 -> 1.28x.
# ("A tenth of the ratio" itself would be 0.87 < 1, no effect at all.)
SHARP_MIN_LOG = {cid: math.log(min(published_ratios(t).values())) / 10 for cid, (_, _, _, t) in SHARPNESS.items()}
# The line: the paper publishes only curves (Fig. 3), no number; its rise is a 1-D sharpness, so it gets
# the minimal effect of the full-space sharpness at eps = 1e-3 (1.24x).
LINE_MIN_LOG = SHARP_MIN_LOG["sharper_eps0.001"]
# The top Hessian eigenvalue: the paper says LB minimizers have "significantly larger" Hessian eigenvalues and
# gives no number; eps-sharpness is its proxy, so it gets the minimal effect of eps = 1e-3 full-space sharpness.
HESSIAN_MIN_LOG = SHARP_MIN_LOG["sharper_eps0.001"]
# Distance from the initial weights: the paper gives ||x_SB - x0|| / ||x_LB - x0|| between 3 and 10; a tenth
# of the log of its low end, 3, is 1.12x.
DIST_PUBLISHED = (3.0, 10.0)
DIST_MIN_LOG = math.log(DIST_PUBLISHED[0]) / 10
# The gap, in accuracy points: Table 2 gives 0.22 (F1, 98.03 -> 97.81) to 5.27 (C4). A tenth of F1's would be
# 0.022 points, a fifth of one test example in 1,000: not a measurable effect. The minimum is 0.2 points,
# about the paper's smallest published gap (F1's 0.22), i.e. 2 examples of a 1,000-example test set.
GAP_PUBLISHED = {"F1": (98.03, 97.81), "F2": (64.02, 59.45), "C1": (80.04, 77.26), "C2": (89.24, 87.26),
                 "C3": (49.58, 46.45), "C4": (63.08, 57.81)}
GAP_MIN_POINTS = 0.2
# Trends over the batch-size grid: the paper shows curves (Fig. 4), no correlation. A mean per-seed Spearman
# |rho| of at least 0.5 (Cohen's "large" correlation) is asked: the paper describes a clear fall of accuracy
# and rise of sharpness across the range, not a slight tilt.
TREND_MIN_RHO = 0.5

# Remedies (the paper's appendix): "data augmentation, conservative training and adversarial training improve LB
# test accuracy but leave the minima sharp" -- no numbers in papers.md. "Improves" asks the gap's own minimal
# effect (GAP_MIN_POINTS) of LB + remedy over LB; "stays sharp" asks the full-space eps = 1e-3 sharpness claim's
# minimal ratio (1.24x) of LB + remedy over SB. Each remedy is an LB arm with one change to the LB spec.
ADV_EPS = 0.1  # FGSM radius in input units: a tenth of one standard deviation of the standardized inputs
REMEDIES: dict[str, tuple[str, Any, str]] = {
    "augmentation": ("data.augment", True, "data augmentation (random shifts, and flips where they keep the label)"),
    "adversarial": ("train.adversarial", {"eps": ADV_EPS, "mix": 0.5},
                    f"adversarial training (Goodfellow et al.'s FGSM, eps {ADV_EPS:g}, half the loss on the examples)"),
}

# -- regime thresholds (conditions under which the claims can be tested at all) ---------------------
MIN_USABLE_FRACTION = 0.8  # of each arm's (each batch size's) runs: 4 of 5 seeds; one odd seed may be left out
# Sharpness measured where the gradient is not zero partly measures the gradient. Its first-order part `lin`
# (the largest gain of a linear model of the loss over the same box) bounds that both ways: what the sharpness
# would be without the gradient lies in [S - lin, S + lin]. A claim is testable where the gradient cannot decide
# it: every ratio those bounds allow lies on the same side of the claim's minimal effect (gradient_part_* checks).
MAX_RANKED_SIZES = 9  # exact Spearman bounds enumerate the orders of the sweep's sizes (9! = 362,880)


@dataclass(frozen=True)
class KeskarConfig(ScaledConfig):
    """Every choice of the reproduction, by scale (tests shrink it: tests/tiny_configs.py)."""

    data: Mapping[str, Any]  # the sweep's data section
    model: Mapping[str, Any]  # the sweep's model section
    sb: int
    grid: tuple[int, ...]  # batch sizes of the sweep (SB and LB are added)
    epochs: int  # a cap (see `patience`)
    # the paper's f is the training loss: sharpness and the 1-D line on the first n training examples (None: all)
    measure_examples: int | None = None
    lr: float = 1e-3  # Adam's, the paper's, the same for every batch size
    lb_fraction: float = 0.1
    measure_batch: int = 500
    fit_acc: float = 0.99  # the paper's runs all reached 98.35-99.99% training accuracy
    # "Trained until the loss stops improving": stop once the training loss has not improved by
    # min_delta for `patience` evaluations (every epoch); the epoch budget is only a cap (a run that
    # reaches it fails the regime check "at a minimum").
    patience: int = 10
    min_delta: float = 1e-4
    # then the learning rate falls 10x and training goes on to the next plateau: the small batch's
    # noise floor keeps its iterate where the gradient is large against the sharpness box
    reduce_lr: float | None = 0.1
    reductions: int = 1
    # "gradient norm small against its start": the full-batch gradient at the final weights is at
    # most a tenth of that at the initial weights (an order of magnitude below it)
    max_grad_ratio: float = 0.1
    min_usable: float = MIN_USABLE_FRACTION
    # The warm-start experiment: LB trained from SB's weights after k epochs of SB (k = 0: LB from the
    # initialization), k on a log scale up to about the SB run's length; empty: not run
    warm_epochs: tuple[int, ...] = (1, 4, 16, 64)
    # The remedies, each an LB arm (keys of REMEDIES); empty: not run
    remedies: tuple[str, ...] = tuple(REMEDIES)
    # The paper's network the runs stand for (a key of NETWORKS): its published numbers stand beside the measured
    # ones in the report. Quick scale trains a small MLP, F1's kind, and is compared with F1.
    network: str = "F1"

    @classmethod
    def quick(cls, opts: Options) -> KeskarConfig:
        if opts.network is not None:
            raise BatchscopeError(f"--network {opts.network}: only with --scale paper (quick scale trains a small MLP "
                                  "on built-in data)")
        return cls(
            data=opts.data_spec("mnist1d"),
            # F1's kind, narrower and without batch norm: with batch statistics the loss a run minimizes depends
            # on its batch size, so a batch-32 solution is no minimum of the loss measured in batches of 500
            # (its eps-sharpness there was 50-70% first-order, gradient) and the sharpness claims were untested
            model={"name": "mlp", "width": 0.25, "depth": 3},
            sb=32,
            grid=(32, 64, 128, 256, 400, 1000, 2000),
            epochs=1500,  # a cap: batch 2000 stops near 450 epochs (900 updates)
            # all 4,000 training examples. (The first 1,000 only, tried first, changes the measure: LB's
            # sharpness there is 4x its value on the whole set.)
            measure_examples=None,
        )

    @classmethod
    def paper(cls, opts: Options) -> KeskarConfig:
        data = opts.data_spec("cifar10", tuple(DEFAULT_NETWORK))
        network = paper_network(opts.network, data["name"])
        return cls(data=data, model=dict(NETWORKS[network][1]), sb=256, grid=(256, 512, 1024, 2048, 5000), epochs=500,
                   network=network)


class Keskar(Study):
    name = "keskar"
    title = "Large-batch training converges to sharp minima (Keskar et al. 2017)"
    citation = "N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy, P. T. P. Tang. ICLR 2017."
    networks = tuple(NETWORKS)
    takes_model = True  # sharp and flat minima are a claim about training, not about one architecture

    def config(self, opts: Options) -> KeskarConfig:
        return KeskarConfig.of(opts)

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        c = self.config(opts)
        n_train = train_size(c.data)
        lb = int(round(c.lb_fraction * n_train))
        sizes = sorted(set(c.grid) | {c.sb, lb})
        body = {
            "name": "keskar",
            "data": c.data,
            "model": {"name": opts.model} if opts.model else c.model,  # --model: the user's, on the study's data
            "optim": {"name": "adam", "lr": c.lr},  # the same for SB and LB (not re-tuned), as in the paper
            "train": {
                "epochs": c.epochs,
                "device": opts.device,
                # until the training loss stops improving (the paper's protocol), not to a target accuracy
                "stop": {"metric": "train_loss", "patience": c.patience, "min_delta": c.min_delta,
                         "reduce_lr": c.reduce_lr, "reductions": c.reductions},
            },
            "log": {"log_points": 15},
            **opts.seeding(self.default_seeds),
        }
        ks = list(c.warm_epochs)
        # SB keeps checkpoints at the warm-start epochs; the other sizes' specs (and run ids) stay as they were
        grid = {**body, "zip": [{"train.batch_size": sizes,
                                 "log.checkpoint_epochs": [ks if b == c.sb else [] for b in sizes]}]}
        out = [SweepSpec.model_validate(grid)]
        if ks:
            # LB from SB's checkpoint at epoch k, to a minimum under the same stopping rule (the source: this spec at
            # SB's batch size with SB's checkpoints, i.e. the SB run of the grid above)
            warm = {**body, "train": {**body["train"], "batch_size": lb, "warm_start": {
                        "source": {"train.batch_size": c.sb, "log.checkpoint_epochs": ks}, "epoch": ks[0]}},
                    "grid": {"train.warm_start.epoch": ks}}
            out.append(SweepSpec.model_validate(warm))
        for name in c.remedies:  # LB with one remedy, from the same initializations, under the same stopping rule
            path, value, _ = REMEDIES[name]
            out.append(SweepSpec.model_validate({**body, "tags": {"remedy": name}, "grid": {path: [value]},
                                                 "train": {**body["train"], "batch_size": lb}}))
        return out

    # -- reading the store ----------------------------------------------------------------------
    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        n_train = train_size(c.data)
        lb = int(round(c.lb_fraction * n_train))
        sb = c.sb
        loss = cpu_loss()
        every = _read_runs(ctx, c, loss, (sb, lb))
        runs = [r for r in every if r["warm"] is None and r["remedy"] is None]
        remedies = [r for r in every if r["remedy"] is not None]
        # the warm-start runs, with k = 0 (LB from the initialization) taken from the grid's LB runs
        warm = [r for r in every if r["warm"] is not None] + [{**r, "warm": 0} for r in runs if r["batch"] == lb]
        by_key = {(r["batch"], r["seed"]): r for r in runs}
        usable = lambda r: why_excluded(r, c) is None  # noqa: E731
        pairs = [(by_key[(sb, s)], by_key[(lb, s)]) for s in sorted({r["seed"] for r in runs})
                 if (sb, s) in by_key and (lb, s) in by_key]
        lines = {}
        specs = {(r.train.batch_size, seed_of(r)): r for r in ctx.runs
                 if r.train.warm_start is None and "remedy" not in r.tags}
        for r_sb, r_lb in pairs:
            if usable(r_sb) and usable(r_lb):
                lines[r_sb["seed"]] = self._line(ctx, specs[(sb, r_sb["seed"])], specs[(lb, r_lb["seed"])], c, loss)
        claims, info = decide(runs, lines, sb=sb, lb=lb, cfg=c, warm=warm if c.warm_epochs else None,
                              remedies=remedies if c.remedies else None)
        for claim in claims:
            ctx.add_claim(claim)
        if ctx.opts.scale == "paper":
            ctx.meta["network"] = c.network
        self._report(ctx, c, runs, lines, info, sb, lb)
        if c.warm_epochs:
            _warm_figure(ctx, warm, c)
        if c.remedies:
            _remedy_figure(ctx, runs, remedies, c, sb, lb)

    def _line(self, ctx: Analysis, r_sb, r_lb, c, loss) -> dict[str, np.ndarray]:
        n = c.measure_examples
        prefix = "line_all" if n is None else f"line_n{n}"
        names = [f"{prefix}_{split}_{m}_{i}" for split in ("train", "test") for m in ("loss", "acc") for i in range(len(ALPHAS))]

        def compute() -> dict[str, float]:
            m_sb, ds = ctx.model(r_sb)
            m_lb, _ = ctx.model(r_lb)
            out = {}
            for split, (x, y) in (("train", (ds.x_train, ds.y_train)), ("test", (ds.x_test, ds.y_test))):
                n = c.measure_examples
                data = _chunks(x[:n], y[:n], c.measure_batch)
                res = interpolate(m_sb, loss, data, m_sb.state_dict(), m_lb.state_dict(), ALPHAS, bn_mode="train")
                for i in range(len(ALPHAS)):
                    out[f"{prefix}_{split}_loss_{i}"] = float(res.loss[i])
                    out[f"{prefix}_{split}_acc_{i}"] = float(res.accuracy[i])
            return out

        # cached on the SB run (the line belongs to the pair; SB and LB share the seed)
        vals = ctx.measure(r_sb, names, compute)
        return {
            f"{split}_{m}": np.array([vals[f"{prefix}_{split}_{m}_{i}"] for i in range(len(ALPHAS))])
            for split in ("train", "test") for m in ("loss", "acc")
        }

    def _report(self, ctx: Analysis, c: KeskarConfig, runs, lines, info, sb: int, lb: int) -> None:
        sizes = sorted({r["batch"] for r in runs})
        seeds = sorted({r["seed"] for r in runs})
        grid_acc, grid_sharp = _grid(runs, sizes, seeds, "test_acc", c), _grid(runs, sizes, seeds, "sharp_eps0.001", c)
        _figures(ctx, lines, sizes, grid_acc, grid_sharp)
        _hessian_figure(ctx, runs, sb, lb, c)
        _notes(ctx, c, runs, info)
        _table(ctx, c, runs, sizes, grid_sharp, sb, lb)


def _hessian_figure(ctx: Analysis, runs, sb: int, lb: int, c: KeskarConfig) -> None:
    seeds = sorted({r["seed"] for r in runs})
    grid = np.array([[_value(next((r for r in runs if r["batch"] == b and r["seed"] == s), None), "lambda1", c)
                      for b in (sb, lb)] for s in seeds])
    fig, ax = new_figure()
    errorbar_points(ax, [0, 1], grid, "top Hessian eigenvalue")
    if not np.isfinite(grid).any():  # the claim refers to the figure: drawn empty, and saying why
        _nothing_used(ax)
    ax.set_xticks([0, 1], [f"SB (batch {sb})", f"LB (batch {lb})"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel("lambda_1 of the training loss")
    if np.isfinite(grid).any() and np.nanmin(grid) > 0:
        ax.set_yscale("log")
    ctx.add_figure("hessian_sb_lb", fig, "Top Hessian eigenvalue (Lanczos) of the SB and LB solutions: mean and sd over "
                   "seeds, single seeds as dots (runs fitted and at a minimum only).")


def _figures(ctx: Analysis, lines, sizes: list[int], grid_acc: np.ndarray, grid_sharp: np.ndarray) -> None:
    if lines:
        train = np.array([lines[s]["train_loss"] for s in sorted(lines)])
        fig, ax = new_figure()
        line_with_band(ax, ALPHAS, train, "train loss")
        line_with_band(ax, ALPHAS, np.array([lines[s]["test_loss"] for s in sorted(lines)]), "test loss")
        ax.set_xlabel("alpha  (0 = SB solution, 1 = LB solution)")
        ax.set_ylabel("cross-entropy")
        if np.nanmin(train, initial=np.inf) > 0:
            ax.set_yscale("log")
        ctx.add_figure("line_sb_lb", fig, f"Loss along (1-alpha) x_SB + alpha x_LB, mean and sd over {len(lines)} seeds.")
    for name, g, ylabel in (("accuracy_vs_batch", grid_acc, "test accuracy"),
                            ("sharpness_vs_batch", grid_sharp, "sharpness (eps=1e-3)")):
        fig, ax = new_figure()
        errorbar_points(ax, sizes, g, ylabel)
        ax.set_xscale("log")
        if not np.isfinite(g).any():  # a log axis without data has no positive limits of its own
            ax.set_xlim(min(sizes) / 2, max(sizes) * 2)
            _nothing_used(ax)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        finite = g[np.isfinite(g)]
        if name == "sharpness_vs_batch" and finite.size and finite.min() > 0:
            ax.set_yscale("log")
        ctx.add_figure(name, fig, f"{ylabel} against batch size: mean and sd over seeds (runs fitted and at a minimum only).")


def _nothing_used(ax) -> None:
    ax.text(0.5, 0.5, "no run fitted and at a minimum", transform=ax.transAxes, ha="center", va="center")


def _notes(ctx: Analysis, c: KeskarConfig, runs, info) -> None:
    reasons = info["excluded"]
    where = "all" if c.measure_examples is None else f"the first {c.measure_examples}"
    ctx.notes.append(
        f"{len(runs)} runs; {sum(reasons.values())} left out of every comparison"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else "")
        + f". Runs train until the training loss has not improved by {c.min_delta:g} for {c.patience} "
        f"evaluations (cap {c.epochs} epochs), as the paper trained until the loss stopped improving"
        + (f"; at the first {c.reductions} such plateau(s) Adam's learning rate falls {1 / c.reduce_lr:g}x and "
           "training goes on, so that each run settles into the minimum it found instead of hovering at its noise "
           "floor" if c.reduce_lr else "")
        + ". A run is "
        f"used when it fits the training set (train acc >= {c.fit_acc:.0%}) and is at a minimum (stopped by that "
        f"rule, and full-batch gradient norm at most {c.max_grad_ratio:g} x its value at the initial weights). "
        f"Batch norm is measured with batch statistics (batches of {c.measure_batch}), as the authors' code did; "
        f"sharpness and the line on {where} training examples, gradient norms on all of them. The maximization "
        f"runs 10 L-BFGS-B iterations in the box as the paper's does, but from a random point of the box (seeded) "
        f"instead of y = 0: where the gradient vanishes, L-BFGS-B from y = 0 stops at once and measures nothing. "
        f"The first-order "
        f"part of each sharpness is 100 eps sum_i |(A^T g)_i| (|(A+ x)_i| + 1) / (1 + f): the largest gain a linear model "
        f"of the loss finds in the box, an upper bound on what the gradient contributes."
    )
    failed = [chk for chk in info["checks"].values() if not chk.passed]
    if failed:
        ctx.notes.append(
            "Not in the paper's regime here, so the claims these checks gate are untested: "
            + "; ".join(f"{chk.id} ({chk.condition})" for chk in failed) + "."
        )
        if any(chk.id.startswith("gradient_part") for chk in failed):
            ctx.notes.append(
                "Where the solutions are not close enough to a minimum, eps-sharpness partly measures the gradient: "
                "the first-order share in the table bounds how much. The gradient_part checks fail where that part "
                "could move a ratio across its claim's minimal effect."
            )
    if c.remedies:
        ctx.notes.append(
            "Remedies (the paper's appendix): each is an LB arm trained from the same initializations under the same "
            "stopping rule, with one change: " + "; ".join(f"{n}: {REMEDIES[n][2]}" for n in c.remedies)
            + ". Each is asked two things: that it raises LB's test accuracy (by the gap's minimal effect) and that its "
            "minimum stays sharper than SB's (by the sharpness claim's minimal ratio). Conservative training (a "
            "proximal term towards the previous iterate), the paper's third remedy, is not built."
        )
    if ctx.opts.model:
        ctx.notes.append(
            f"Model: yours, {ctx.opts.model}, in place of the study's {c.model.get('name')}, trained and measured on the "
            "study's data with cross-entropy; the paper's published numbers stand beside the measured ones for scale only."
        )
    if ctx.opts.scale == "paper":
        ctx.notes.append(
            f"Network {c.network} ({ctx.opts.model or c.model.get('name')} on {c.data.get('name')}); the paper's "
            f"published numbers beside the measured ones are {c.network}'s where the paper gives them (Tables 2-4), "
            "with the range over its networks."
        )
    if ctx.opts.scale == "quick":
        ctx.notes.append(
            "Quick scale is not the paper's regime in size: a 3 x 128 MLP on MNIST-1D (4,000 training examples) "
            "instead of F1 (5 x 512 with batch norm on MNIST, 60,000) and SB = 32 instead of 256; LB is 10% of the "
            "training set as in the paper. The quick MLP has no batch norm: with batch statistics the loss each run "
            "minimizes depends on its batch size, and the small batches' solutions were then no minima of the loss "
            "the sharpness is measured on (regime checks gradient_part_* failed). Effect sizes are to be read "
            "beside the paper's, not expected to equal them. LB stays at the paper's 10% (400): with runs trained to "
            "a minimum the gap is measurable there (the gap claim shows it in standard errors of the paired mean, "
            "on MNIST-1D's 1,000 test examples), so no larger generated set or larger LB fraction is used."
        )
    if c.lr != 1e-3:
        ctx.notes.append(
            f"Adam's learning rate is {c.lr:g}, not the paper's 1e-3 (still the same for every batch size, not "
            "re-tuned): at 1e-3 the small batches stop at a noise floor where the gradient accounts for about half of "
            "their eps-sharpness (regime checks gradient_part_*), which a smaller step lowers."
        )


def _table(ctx: Analysis, c: KeskarConfig, runs, sizes: list[int], grid_sharp: np.ndarray, sb: int, lb: int) -> None:
    rows = []
    for j, b in enumerate(sizes):
        rs = [r for r in runs if r["batch"] == b]
        used = [r for r in rs if why_excluded(r, c) is None]
        rows.append([
            str(b) + (" (SB)" if b == sb else " (LB)" if b == lb else ""),
            f"{len(used)}/{len(rs)}",
            fmt(nanmean([r["train_acc"] for r in rs])),
            fmt(nanmean([r["train_loss"] for r in rs]), 3),
            fmt(nanmean([r["test_acc"] for r in rs])),
            f"{sum(bool(r['plateau']) for r in rs)}/{len(rs)}",
            fmt(nanmean([r["grad_ratio"] for r in rs]), 3),
            fmt(nanmean(grid_sharp[:, j]), 3),
            fmt(nanmean([_share(r, "_eps0.001") for r in used]), 2),
            fmt(nanmean([r["epochs"] for r in rs]), 4),
            fmt(nanmean([r["steps"] for r in rs]), 5),
        ])
    ctx.add_table(
        "Final metrics by batch size (means over seeds; sharpness over runs used)",
        ["batch", "used/runs", "train acc", "train loss", "test acc", "loss plateaued", "|g|/|g0|",
         "sharpness 1e-3", "first-order share", "epochs", "steps"],
        rows,
    )


def _read_runs(ctx: Analysis, c: KeskarConfig, loss, arms: tuple[int, int]) -> list[dict[str, Any]]:
    """Every run of the study as plain numbers: status, final metrics, stop reason, gradient norms at the
    initial and final weights, and (for runs used in comparisons) sharpness; measurements are cached."""
    out, seen = [], set()
    for spec in ctx.runs:
        if spec.run_id() in seen:  # a warm start's source is also a run of the grid
            continue
        seen.add(spec.run_id())
        ws = spec.train.warm_start
        fin = ctx.final(spec)
        status = ctx.status(spec)
        r: dict[str, Any] = {
            "batch": spec.train.batch_size, "seed": seed_of(spec), "status": status,
            "train_acc": fin.get("train_acc", np.nan), "train_loss": fin.get("train_loss", np.nan),
            "test_acc": fin.get("test_acc", np.nan), "distance": fin.get("weight_distance", np.nan),
            "epochs": fin.get("epochs", np.nan), "steps": fin.get("steps", np.nan),
            "plateau": "did not improve" in str(fin.get("stop_reason", "")),
            "grad_ratio": np.nan,
            **{f"sharp{cid[len('sharper'):]}": np.nan for cid in SHARPNESS},
            **{f"lin{cid[len('sharper'):]}": np.nan for cid in SHARPNESS},
            "lambda1": np.nan,
            "warm": None if ws is None else ws.epoch,  # epochs of SB before this LB run started
            "remedy": spec.tags.get("remedy"),
        }
        if status == "done":
            g = _gradients(ctx, spec, c, loss)
            g0 = g["grad_norm_init"] if ws is None else _initial_gradient(out, r, arms[1])
            r["grad_init"] = g["grad_norm_init"]
            r["grad_ratio"] = g["grad_norm_final"] / g0 if g0 > 0 else np.nan
            if why_excluded(r, c) is None:  # sharpness only where compared: eps 1e-3 along the sweep, all at SB and LB
                arm = r["batch"] in arms and ws is None and r["remedy"] is None
                for cid, (eps, sub, _, _) in SHARPNESS.items():
                    suffix = cid[len("sharper"):]
                    if cid == "sharper_eps0.001" or arm:
                        r[f"sharp{suffix}"], r[f"lin{suffix}"] = _sharpness(ctx, spec, c, loss, eps, sub)
                if arm:
                    r["lambda1"] = _hessian_top(ctx, spec, c, loss)
        out.append(r)
    return out


def _gradients(ctx: Analysis, spec, c, loss) -> dict[str, float]:
    """Full-batch gradient norm (all training examples) at the initial and final weights, batch norm with
    batch statistics over chunks of measure_batch, as for the sharpness."""
    names = ["grad_norm_init", "grad_norm_final"]

    def compute() -> dict[str, float]:
        out = {}
        for tag in ("init", "final"):
            model, ds = ctx.model(spec, tag)
            with Objective(model, loss, _chunks(ds.x_train, ds.y_train, c.measure_batch), bn_mode="train") as obj:
                _, g = obj.loss_and_grad()
                out[f"grad_norm_{tag}"] = float(torch.linalg.vector_norm(g))
        return out

    return ctx.measure(spec, names, compute)


def _sharpness(ctx: Analysis, spec, c, loss, eps: float, sub: int | None) -> tuple[float, float]:
    """(epsilon-sharpness, its first-order part) on the measurement set: the part is the largest gain a
    linear model of the same loss finds in the same box, 100 eps sum_i |(A^T g)_i| (|(A+ x)_i| + 1) / (1 + f)."""
    n = c.measure_examples
    # L-BFGS-B starts at a random point of the box: from y = 0 (the paper's start) it stops at once where the
    # gradient vanishes, and well-converged small-batch solutions then measured ~1e-9 (no maximization at all)
    key = f"sharpness_eps{eps:g}" + (f"_p{sub}" if sub else "") + ("_all" if n is None else f"_n{n}") + "_y0random"
    lin_key = "first_order_" + key

    def compute() -> dict[str, float]:
        model, ds = ctx.model(spec)
        data = _chunks(ds.x_train[:n], ds.y_train[:n], c.measure_batch)
        # the authors' batch norm used batch statistics, also when measuring
        res = epsilon_sharpness(model, loss, data, eps=eps, subspace_dim=sub, seed=seed_of(spec), bn_mode="train",
                                y0="random")
        with Objective(model, loss, data, bn_mode="train") as obj:
            f, g = obj.loss_and_grad()
        gp = g if res.subspace is None else res.subspace.T @ g
        lin = float((gp.detach().abs().double().cpu() * res.box).sum())
        return {key: res.sharpness, lin_key: 100 * lin / (1 + f)}

    vals = ctx.measure(spec, [key, lin_key], compute)
    return vals[key], vals[lin_key]


# -- deciding the claims from numbers ---------------------------------------------------------------


def _initial_gradient(read: Sequence[Mapping[str, Any]], r: Mapping[str, Any], lb: int) -> float:
    """The gradient norm at the initialization for a warm-started run: "at a minimum" means small against the
    start of training, not against the SB weights it started from (near a minimum already). Every run of a seed
    starts from the same weights, and the grid's LB run (read before the warm starts) measured it there."""
    ref = next((x for x in read if x["batch"] == lb and x["seed"] == r["seed"] and x["warm"] is None), None)
    return np.nan if ref is None else float(ref.get("grad_init", np.nan))


def _hessian_top(ctx: Analysis, spec, c, loss) -> float:
    """The top Hessian eigenvalue of the training loss at the final weights (Lanczos), measured as the
    sharpness is: on the same examples, batch norm with batch statistics in chunks of measure_batch."""
    n = c.measure_examples
    key = "hessian_lambda1" + ("_all" if n is None else f"_n{n}")

    def compute() -> dict[str, float]:
        model, ds = ctx.model(spec)
        data = _chunks(ds.x_train[:n], ds.y_train[:n], c.measure_batch)
        res = hessian_eigenvalues(model, loss, data, k=1, tol=1e-4, seed=seed_of(spec), bn_mode="train")
        return {key: float(res.eigenvalues[0])}

    return ctx.measure(spec, [key], compute)[key]


def why_excluded(r: Mapping[str, Any], cfg: KeskarConfig) -> str | None:
    """Why a run is left out of every comparison (None: it is used)."""
    if r["status"] != "done":
        return r["status"] if r["status"] in ("diverged", "failed") else "not trained"
    if not r["train_acc"] >= cfg.fit_acc:
        return "missed the fitting criterion"
    if not r["plateau"]:
        return "loss still improving at the epoch cap"
    if not r["grad_ratio"] <= cfg.max_grad_ratio:
        return "gradient not small (not at a minimum)"
    return None


def _reasons(runs: Sequence[Mapping[str, Any]], cfg: KeskarConfig) -> dict[str, int]:
    return count_reasons(why_excluded(r, cfg) for r in runs)


def _value(r: Mapping[str, Any] | None, key: str, cfg) -> float:
    return float(r[key]) if r is not None and why_excluded(r, cfg) is None else np.nan


def _ratio_magnitude(quantity: str, v: Verdict, published, source: str) -> Magnitude:
    """A geometric-mean ratio from a verdict on log ratios."""
    return magnitude(quantity, v, published, source, math.exp)


def _fraction(rs: Sequence[Mapping[str, Any]], test) -> float:
    return sum(1 for r in rs if test(r)) / len(rs) if rs else 0.0


def regime_checks(runs: Sequence[Mapping[str, Any]], *, sb: int, lb: int, cfg: KeskarConfig) -> dict[str, RegimeCheck]:
    """The conditions under which Keskar et al.'s claims can be tested, measured on the runs."""
    arms = {"SB": [r for r in runs if r["batch"] == sb], "LB": [r for r in runs if r["batch"] == lb]}
    return {**_arm_checks(arms, sb, lb, cfg), **_gradient_checks(runs, arms, sb, lb, cfg), **_sweep_checks(runs, cfg)}


def _arm_checks(arms: Mapping[str, Sequence[Mapping[str, Any]]], sb: int, lb: int,
                cfg: KeskarConfig) -> dict[str, RegimeCheck]:
    """SB and LB fit the training set and stop at a minimum."""
    need = cfg.min_usable
    fits = lambda r: r["status"] == "done" and r["train_acc"] >= cfg.fit_acc  # noqa: E731
    at_min = lambda r: r["status"] == "done" and bool(r["plateau"]) and r["grad_ratio"] <= cfg.max_grad_ratio  # noqa: E731
    fit_m, min_m = {}, {}
    for arm, rs in arms.items():
        fit_m[arm] = {"fitted": f"{sum(fits(r) for r in rs)}/{len(rs)}",
                      "train_acc_min": float(np.nanmin([r["train_acc"] for r in rs], initial=np.inf)) if rs else None,
                      "train_loss_mean": float(nanmean([r["train_loss"] for r in rs])) if rs else None}
        min_m[arm] = {"loss_plateaued": f"{sum(bool(r['plateau']) for r in rs)}/{len(rs)}",
                      "grad_ratio_max": float(np.nanmax([r["grad_ratio"] for r in rs], initial=-np.inf)) if rs else None,
                      "grad_ratio_mean": float(nanmean([r["grad_ratio"] for r in rs])) if rs else None}
    return {
        "sb_lb_fit": RegimeCheck(
            "sb_lb_fit",
            f"SB (batch {sb}) and LB (batch {lb}) fit the training set: train accuracy >= {cfg.fit_acc:.0%} "
            f"(the paper's runs: 98.35-99.99%) in at least {need:.0%} of each arm's runs",
            all(_fraction(rs, fits) >= need for rs in arms.values()), fit_m),
        "sb_lb_minimum": RegimeCheck(
            "sb_lb_minimum",
            f"SB and LB solutions are at a minimum in at least {need:.0%} of each arm's runs: the training loss no "
            f"longer improving (no gain of {cfg.min_delta:g} in {cfg.patience} evaluations before the epoch "
            f"cap) and the full-batch gradient norm at most {cfg.max_grad_ratio:g} x its value at the initial weights",
            all(_fraction(rs, at_min) >= need for rs in arms.values()), min_m),
    }


def _gradient_checks(runs: Sequence[Mapping[str, Any]], arms: Mapping[str, Sequence[Mapping[str, Any]]], sb: int,
                     lb: int, cfg: KeskarConfig) -> dict[str, RegimeCheck]:
    """For each sharpness claim: the gradient's share of the sharpness cannot move a pair's ratio across the
    claim's minimal effect."""
    need = cfg.min_usable
    usable = lambda r: r is not None and why_excluded(r, cfg) is None  # noqa: E731
    by_key = {(r["batch"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    checks = {}
    for cid, (eps, sub, _, _) in SHARPNESS.items():
        suffix, m = cid[len("sharper"):], SHARP_MIN_LOG[cid]
        bounds, decided = _decided([(by_key.get((sb, s)), by_key.get((lb, s))) for s in seeds], suffix, m, usable)
        checks[f"gradient_part{suffix}"] = RegimeCheck(
            f"gradient_part{suffix}",
            f"The gradient cannot decide the eps={eps:g} sharpness claim{'' if sub is None else f' (subspace p={sub})'}: "
            f"without it each sharpness S would lie in [S - lin, S + lin] (lin: the first-order part), and in at least "
            f"{need:.0%} of the SB/LB pairs every LB/SB ratio those bounds allow lies on the same side of the minimal "
            f"effect {math.exp(m):.3g}x",
            bool(bounds) and sum(decided) / len(bounds) >= need,
            {"pairs_decided": f"{sum(decided)}/{len(bounds)}",
             "log_ratio_bounds": [[_round(lo), _round(hi)] for lo, hi in bounds], "min_effect_log": round(m, 4),
             **{f"first_order_share_{arm}_mean": float(nanmean([_share(r, suffix) for r in rs])) if rs else None
                for arm, rs in arms.items()}})
    return checks


def _decided(pairs: Sequence[tuple[Any, Any]], suffix: str, m: float,
             usable: Callable[[Any], bool]) -> tuple[list[tuple[float, float]], list[bool]]:
    """For the usable (SB, other) pairs: the log-ratio bounds the gradient allows, and whether each pair's bounds
    lie on one side of the minimal effect m (the gradient cannot decide that pair)."""
    bounds = [_log_ratio_bounds(a, b, suffix) for a, b in pairs if usable(a) and usable(b)]
    return bounds, [lo >= m or hi < m for lo, hi in bounds]


def _sweep_checks(runs: Sequence[Mapping[str, Any]], cfg: KeskarConfig, axis: str = "batch",
                  what: str = "batch size", sign: int = 1) -> dict[str, RegimeCheck]:
    """A sweep along `axis` (the batch size, or the warm start's k): the gradient cannot decide its sharpness
    trend (rising with `sign` 1, falling with -1), and every point of it has enough runs used. The checks'
    ids: gradient_part_sweep and sweep_minimum for the batch sizes, gradient_part_warm and warm_minimum for
    the warm starts."""
    need = cfg.min_usable
    tag = "sweep" if axis == "batch" else "warm"
    usable = lambda r: r is not None and why_excluded(r, cfg) is None  # noqa: E731
    by_key = {(r[axis], r["seed"]): r for r in runs}
    by_x = {x: [r for r in runs if r[axis] == x] for x in sorted({r[axis] for r in runs})}
    rho_bounds = []
    for s in sorted({r["seed"] for r in runs}):
        rs = [by_key[(x, s)] for x in by_x if usable(by_key.get((x, s))) and np.isfinite(by_key[(x, s)]["sharp_eps0.001"])]
        if len(rs) >= 3:
            lo, hi = zip(*(_sharpness_bounds(r, "_eps0.001") for r in rs))
            # Spearman reads ranks only: the axis' own values serve
            rho_bounds.append(_spearman_bounds(np.asarray([r[axis] for r in rs], float), np.asarray(lo), np.asarray(hi)))
    directed = [(lo, hi) if sign > 0 else (-hi, -lo) for lo, hi in rho_bounds]
    decided = [lo >= TREND_MIN_RHO or hi < TREND_MIN_RHO for lo, hi in directed]
    per_x = {str(x): _fraction(rs, lambda r: why_excluded(r, cfg) is None) for x, rs in by_x.items()}
    return {
        f"gradient_part_{tag}": RegimeCheck(
            f"gradient_part_{tag}",
            f"The gradient cannot decide the sharpness trend over the {what}: with each eps=1e-3 sharpness anywhere in "
            f"[S - lin, S + lin], the smallest and largest Spearman rho lie on the same side of {TREND_MIN_RHO:g} (in "
            f"absolute value) in at least {need:.0%} of the seeds",
            bool(rho_bounds) and sum(decided) / len(rho_bounds) >= need,
            {"seeds_decided": f"{sum(decided)}/{len(rho_bounds)}",
             "rho_bounds": [[_round(lo), _round(hi)] for lo, hi in rho_bounds],
             f"first_order_share_by_{axis}": {str(x): float(nanmean([_share(r, "_eps0.001") for r in rs if usable(r)]))
                                              for x, rs in by_x.items()}}),
        f"{tag}_minimum": RegimeCheck(
            f"{tag}_minimum",
            f"Every {what} of the sweep has at least {need:.0%} of its runs fitted and at a minimum (as above), so "
            f"that none leaves the trend for lack of updates, and at least 3 of them",
            len(by_x) >= 3 and all(f >= need for f in per_x.values()), {f"usable_fraction_by_{axis}": per_x}),
    }


def _share(r: Mapping[str, Any], suffix: str) -> float:
    """First-order part / sharpness (NaN where the sharpness is 0: nothing was found to compare with)."""
    return r[f"lin{suffix}"] / r[f"sharp{suffix}"] if r[f"sharp{suffix}"] > 0 else np.nan


def _round(x: float) -> float | None:
    return round(float(x), 4) if math.isfinite(x) else None


def _sharpness_bounds(r: Mapping[str, Any], suffix: str) -> tuple[float, float]:
    """What the sharpness would be without the gradient: within lin of it either way, and never below 0."""
    s, lin = float(r[f"sharp{suffix}"]), float(r[f"lin{suffix}"])
    return max(s - lin, 0.0), s + lin


def _log_ratio_bounds(r_sb: Mapping[str, Any], r_lb: Mapping[str, Any], suffix: str) -> tuple[float, float]:
    """The smallest and largest log(LB / SB) sharpness ratio that the gradient's bounds allow."""
    lo_sb, hi_sb = _sharpness_bounds(r_sb, suffix)
    lo_lb, hi_lb = _sharpness_bounds(r_lb, suffix)
    lo = math.log(lo_lb / hi_sb) if lo_lb > 0 and hi_sb > 0 else -math.inf
    hi = math.log(hi_lb / lo_sb) if lo_sb > 0 else math.inf
    return lo, hi


def _spearman_bounds(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
    """The smallest and largest Spearman rho of x with values v_i in [lo_i, hi_i] (x distinct): every order of
    the values that the intervals allow is enumerated (an order is possible when non-decreasing values can be
    picked along it)."""
    n = len(x)
    if n > MAX_RANKED_SIZES:
        return -1.0, 1.0  # not enumerated: the bounds say nothing
    rx = np.argsort(np.argsort(x)).astype(float)
    rx -= rx.mean()
    denom = float((rx**2).sum())
    best = [math.inf, -math.inf]
    for order in itertools.permutations(range(n)):
        cur = -math.inf
        for i in order:
            cur = max(cur, lo[i])
            if cur > hi[i]:
                break
        else:
            ranks = np.empty(n)
            ranks[list(order)] = np.arange(n) - (n - 1) / 2
            rho = float((rx * ranks).sum()) / denom
            best = [min(best[0], rho), max(best[1], rho)]
    return best[0], best[1]


def decide(
    runs: Sequence[Mapping[str, Any]],
    lines: Mapping[int, Mapping[str, Any]],
    *,
    sb: int,
    lb: int,
    cfg: KeskarConfig,
    warm: Sequence[Mapping[str, Any]] | None = None,
    remedies: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[Claim], dict[str, Any]]:
    """The claims, from plain numbers.

    `runs`: one dict per run with batch, seed, status, train_acc, train_loss, test_acc, distance, plateau
    (stopped because the loss no longer improved), grad_ratio (|g_final| / |g_init|), the sharpness measures
    sharp_eps0.001 / sharp_eps0.0005 / sharp_eps0.001_p100 and their first-order parts lin_eps0.001 / ...
    `lines`: seed -> {"train_loss": 25 values at ALPHAS} for the pairs that were measured. `cfg`: its fit_acc,
    patience, min_delta, max_grad_ratio and min_usable (regime thresholds) are read. `warm`: the warm-start runs
    as the same dicts plus "warm" (k, epochs of SB before LB; k = 0 for LB from the initialization). `remedies`:
    LB runs trained with a remedy, the same dicts plus "remedy" (a key of REMEDIES).
    """
    checks = regime_checks(runs, sb=sb, lb=lb, cfg=cfg)
    pairs = _Pairs(runs, sb, lb, cfg, [checks["sb_lb_fit"], checks["sb_lb_minimum"]])
    claims = [_gap_claim(pairs)]
    claims += [_sharpness_claim(pairs, cid, checks[f"gradient_part{cid[len('sharper'):]}"]) for cid in SHARPNESS]
    claims += [_hessian_claim(pairs), _distance_claim(pairs), _line_claim(pairs, lines)]
    sweep_reasons = _reasons(runs, cfg)
    claims += _trend_claims(runs, cfg, checks, sweep_reasons)
    if warm is not None:
        warm_checks = _sweep_checks(warm, cfg, axis="warm", what="warm start's k", sign=-1)
        checks.update(warm_checks)
        claims += _warm_claims(warm, cfg, warm_checks)
    if remedies is not None:
        for name in [n for n in REMEDIES if any(r["remedy"] == n for r in remedies)]:
            arm = [r for r in remedies if r["remedy"] == name]
            arm_checks = _remedy_checks(pairs, name, arm)
            checks.update(arm_checks)
            claims += _remedy_claims(pairs, name, arm, arm_checks)
    return claims, {"excluded": sweep_reasons, "checks": checks}


class _Pairs:
    """The SB and LB runs paired by seed (same initialization and data order): what the paired claims read."""

    def __init__(self, runs: Sequence[Mapping[str, Any]], sb: int, lb: int, cfg: KeskarConfig,
                 regime: list[RegimeCheck]) -> None:
        self.sb, self.lb, self.cfg, self.regime = sb, lb, cfg, regime
        self.by_key = {(r["batch"], r["seed"]): r for r in runs}
        self.seeds = [s for s in sorted({r["seed"] for r in runs}) if (sb, s) in self.by_key and (lb, s) in self.by_key]
        self.reasons = _reasons([r for r in runs if r["batch"] in (sb, lb)], cfg)

    def values(self, key: str, f: Callable[[float], float] = lambda x: x) -> tuple[np.ndarray, np.ndarray]:
        """(SB, LB) values of `key` through `f`, one per paired seed; NaN for an excluded run."""
        sb = [f(_value(self.by_key[(self.sb, s)], key, self.cfg)) for s in self.seeds]
        lb = [f(_value(self.by_key[(self.lb, s)], key, self.cfg)) for s in self.seeds]
        return np.asarray(sb, dtype=float), np.asarray(lb, dtype=float)

    def greater(self, a: np.ndarray, b: np.ndarray, min_effect: float, names: tuple[str, str]) -> Verdict:
        """a > b by at least `min_effect`, paired over seeds; the runs left out counted by reason."""
        v = paired_difference(a, b, direction="greater", min_effect=min_effect, names=names)
        return with_exclusions(v, self.reasons)


def _gap_claim(p: _Pairs) -> Claim:
    """1. The generalization gap, in accuracy points."""
    acc_sb, acc_lb = p.values("test_acc", lambda x: 100 * x)
    v = p.greater(acc_sb, acc_lb, GAP_MIN_POINTS, ("SB", "LB"))
    gaps = [a - b for a, b in GAP_PUBLISHED.values()]
    d = (acc_sb - acc_lb)[np.isfinite(acc_sb - acc_lb)]
    # is the gap large enough to measure? the mean paired gap in units of its standard error over seeds
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) >= 2 else math.nan
    in_se = float(np.mean(d)) / se if se > 0 else math.nan
    net = p.cfg.network
    sb_pub, lb_pub = GAP_PUBLISHED[net]
    return Claim(
        "gap",
        f"LB (batch {p.lb}) reaches lower test accuracy than SB (batch {p.sb}), both fitted and at a minimum; "
        f"by at least {GAP_MIN_POINTS:g} points.",
        v, {"test_acc_SB": summarize(acc_sb / 100), "test_acc_LB": summarize(acc_lb / 100),
            "gap_points_standard_error": se, "gap_in_standard_errors": in_se}, figure="accuracy_vs_batch",
        regime=p.regime,
        magnitude=[magnitude("SB - LB test accuracy, points", v, round(sb_pub - lb_pub, 2),
                             f"Table 2, {net} ({sb_pub:.2f} -> {lb_pub:.2f})"),
                   magnitude("SB - LB test accuracy, points (all six networks)", v,
                             (round(min(gaps), 2), round(max(gaps), 2)), "Table 2, F1 to C4")],
    )


def _sharpness_claim(p: _Pairs, cid: str, gradient_check: RegimeCheck) -> Claim:
    """2. Sharper minima: log(LB / SB) at least a tenth of the log of the paper's smallest ratio."""
    eps, sub, source, table = SHARPNESS[cid]
    s_sb, s_lb = p.values(f"sharp{cid[len('sharper'):]}", log_or_nan)
    v = p.greater(s_lb, s_sb, SHARP_MIN_LOG[cid], ("log LB", "log SB"))
    ratios = published_ratios(table)
    net = p.cfg.network
    # Table 3 gives eps = 5e-4 for F1, C1 and C2 only
    this_net = (round(ratios[net], 1), f"{source}, {net}") if net in ratios else (None, f"{source}: not published for {net}")
    where = "full space" if sub is None else f"a random {sub}-dim subspace"
    return Claim(
        cid,
        f"LB minimizers are sharper than SB ones (epsilon-sharpness, eps={eps:g}, {where}): the LB/SB ratio is at "
        f"least {math.exp(SHARP_MIN_LOG[cid]):.3g} (a tenth of the log of the paper's smallest, {min(ratios.values()):.3g}).",
        v, {"sharpness_LB": summarize(np.exp(s_lb)), "sharpness_SB": summarize(np.exp(s_sb))}, figure="sharpness_vs_batch",
        regime=[*p.regime, gradient_check],
        magnitude=[_ratio_magnitude("LB / SB sharpness (geometric mean)", v, *this_net),
                   _ratio_magnitude("LB / SB sharpness, all networks published", v,
                                    (round(min(ratios.values()), 1), round(max(ratios.values()), 1)), source)],
    )


def _hessian_claim(p: _Pairs) -> Claim:
    """2b. The top Hessian eigenvalue beside eps-sharpness, in the same measurement mode. The Hessian does not
    read the gradient, so the solutions being at a minimum (fit and plateau) is all its regime asks."""
    l_sb, l_lb = p.values("lambda1", log_or_nan)
    v = p.greater(l_lb, l_sb, HESSIAN_MIN_LOG, ("log lambda1 LB", "log lambda1 SB"))
    return Claim(
        "hessian_top",
        f"LB minimizers have a larger top Hessian eigenvalue than SB ones: the LB/SB ratio is at least "
        f"{math.exp(HESSIAN_MIN_LOG):.3g} (the paper gives no number; the minimal effect of eps=1e-3 sharpness).",
        v, {"lambda1_LB": summarize(np.exp(l_lb)), "lambda1_SB": summarize(np.exp(l_sb))}, figure="hessian_sb_lb",
        regime=p.regime,
        magnitude=_ratio_magnitude("LB / SB top Hessian eigenvalue (geometric mean)", v, None,
                                   "Section 4: 'significantly larger' eigenvalues (no number published)"),
    )


def _distance_claim(p: _Pairs) -> Claim:
    """3. SB travels farther from the initialization."""
    d_sb, d_lb = p.values("distance", log_or_nan)
    v = p.greater(d_sb, d_lb, DIST_MIN_LOG, ("log d_SB", "log d_LB"))
    return Claim(
        "distance",
        f"SB solutions lie farther from the initial weights than LB ones: ||x_SB - x0|| / ||x_LB - x0|| at least "
        f"{math.exp(DIST_MIN_LOG):.3g} (paper: 3 to 10).",
        v, {"ratio_SB_over_LB": summarize(np.exp(d_sb - d_lb))}, regime=p.regime,
        magnitude=_ratio_magnitude("||x_SB - x0|| / ||x_LB - x0|| (geometric mean)", v, DIST_PUBLISHED, "Section 4 (3 to 10)"),
    )


def _line_claim(p: _Pairs, lines: Mapping[int, Mapping[str, Any]]) -> Claim:
    """4. 1-D slices: the loss rises faster around LB than around SB. The rise is a symmetric second
    difference (mean of both neighbours minus the centre): a linear term (the gradient) cancels in it."""
    i0, i1 = int(np.argmin(abs(ALPHAS))), int(np.argmin(abs(ALPHAS - 1)))
    rise = lambda row, i: float(np.mean([row[i - LINE_STEP], row[i + LINE_STEP]]) - row[i])  # noqa: E731
    r_lb, r_sb = [], []
    for s in p.seeds:
        row = lines.get(s)
        t = np.asarray(row["train_loss"], dtype=float) if row is not None else None
        r_lb.append(np.nan if t is None else rise(t, i1))
        r_sb.append(np.nan if t is None else rise(t, i0))
    r_lb_a, r_sb_a = np.asarray(r_lb, dtype=float), np.asarray(r_sb, dtype=float)
    floor = lambda a: np.log(np.where(np.isfinite(a), np.maximum(a, RISE_FLOOR), np.nan))  # noqa: E731
    v = p.greater(floor(r_lb_a), floor(r_sb_a), LINE_MIN_LOG, ("log rise LB", "log rise SB"))
    return Claim(
        "line",
        "Along the line between the solutions, the training loss rises faster around LB than around SB: the rise "
        f"over 0.25 in alpha is at least {math.exp(LINE_MIN_LOG):.3g} times larger around LB.",
        v, {"rise_LB": summarize(r_lb_a), "rise_SB": summarize(r_sb_a), "delta_alpha": 0.25,
            "rise_floor": RISE_FLOOR}, figure="line_sb_lb" if lines else None, regime=p.regime,
        magnitude=_ratio_magnitude("rise around LB / rise around SB (geometric mean)", v, None,
                                   "Fig. 3 (curves only, no number published)"),
    )


def _trend_claims(runs: Sequence[Mapping[str, Any]], cfg: KeskarConfig, checks: Mapping[str, RegimeCheck],
                  reasons: Mapping[str, int]) -> list[Claim]:
    """5. The batch-size sweep: accuracy falls and sharpness rises with the batch size."""
    sizes = sorted({r["batch"] for r in runs})
    if len(sizes) < 2:
        return []
    seeds = sorted({r["seed"] for r in runs})
    logb = np.log(np.asarray(sizes, dtype=float))
    claims = []
    for cid, key, direction, what in (("acc_trend", "test_acc", "decreasing", "Test accuracy falls"),
                                      ("sharp_trend", "sharp_eps0.001", "increasing", "Sharpness (eps=1e-3, full space) rises")):
        g = _grid(runs, sizes, seeds, key, cfg)
        v = with_exclusions(trend(logb, g, direction=direction, min_effect=TREND_MIN_RHO), reasons)
        first, last = nanmean(g[:, 0]), nanmean(g[:, -1])
        change = (100 * (first - last), "test accuracy, smallest minus largest batch, points") if key == "test_acc" else (
            last / first if first > 0 else np.nan, "sharpness, largest / smallest batch")
        claims.append(Claim(
            cid,
            f"{what} as the batch size grows: mean per-seed Spearman |rho| at least {TREND_MIN_RHO:g}.",
            v, {"batch_sizes": sizes, f"{key}_mean": nanmean(g, 0).tolist()},
            figure="accuracy_vs_batch" if key == "test_acc" else "sharpness_vs_batch",
            regime=[checks["sweep_minimum"]] + ([checks["gradient_part_sweep"]] if key != "test_acc" else []),
            magnitude=[magnitude("mean per-seed Spearman rho with log batch size", v, None,
                                 "Fig. 4 (curves only, no correlation published)"),
                       Magnitude(change[1], change[0], None, "Fig. 4 (curves only)")],
        ))
    return claims


def _warm_claims(warm: Sequence[Mapping[str, Any]], cfg: KeskarConfig, checks: Mapping[str, RegimeCheck]) -> list[Claim]:
    """6. Warm starts (the paper's Section 4.2): LB trained from SB's weights after k epochs reaches flatter minima
    that generalize better as k grows. One Spearman rho of each with k per seed, as for the batch-size trend."""
    reasons = _reasons(warm, cfg)
    claims = []
    for cid, key, direction, what in (("warm_sharpness", "sharp_eps0.001", "decreasing", "sharpness (eps=1e-3) falls"),
                                      ("warm_accuracy", "test_acc", "increasing", "test accuracy rises")):
        ks, g = _warm_grid(warm, key, cfg)
        x = np.log1p(np.asarray(ks, dtype=float))
        v = with_exclusions(trend(x, g, direction=direction, min_effect=TREND_MIN_RHO), reasons)
        first, last = nanmean(g[:, 0]), nanmean(g[:, -1])
        change = (100 * (last - first), f"test accuracy, k = {ks[-1]} minus k = 0, points") if key == "test_acc" else (
            last / first if first > 0 else np.nan, f"sharpness, k = {ks[-1]} / k = 0")
        claims.append(Claim(
            cid,
            f"LB trained from SB's weights after k epochs of SB: its {what} as k grows (k = {', '.join(map(str, ks))}); "
            f"mean per-seed Spearman |rho| with k at least {TREND_MIN_RHO:g}.",
            v, {"k": ks, f"{key}_mean": nanmean(g, 0).tolist()}, figure="warm_start",
            regime=[checks["warm_minimum"]] + ([checks["gradient_part_warm"]] if key != "test_acc" else []),
            magnitude=[magnitude("mean per-seed Spearman rho with k", v, None, "Fig. 5 (curves only, no number published)"),
                       Magnitude(change[1], change[0], None, "Fig. 5 (curves only)")],
        ))
    return claims


def _warm_grid(warm: Sequence[Mapping[str, Any]], key: str, cfg: KeskarConfig) -> tuple[list[int], np.ndarray]:
    """The values of `key` as seeds x k (NaN where a run is excluded), with the sorted k."""
    ks, seeds = sorted({r["warm"] for r in warm}), sorted({r["seed"] for r in warm})
    g = np.full((len(seeds), len(ks)), np.nan)
    for r in warm:
        g[seeds.index(r["seed"]), ks.index(r["warm"])] = _value(r, key, cfg)
    return ks, g


def _warm_figure(ctx: Analysis, warm: Sequence[Mapping[str, Any]], cfg: KeskarConfig) -> None:
    fig, axes = new_figure(ncols=2)
    for ax, key, label in ((axes[0, 0], "sharp_eps0.001", "sharpness (eps=1e-3)"), (axes[0, 1], "test_acc", "test accuracy")):
        ks, g = _warm_grid(warm, key, cfg)
        errorbar_points(ax, list(range(len(ks))), g, label)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("k: epochs of SB before LB")
        ax.set_ylabel(label)
        if key.startswith("sharp") and np.isfinite(g).any() and np.nanmin(g) > 0:
            ax.set_yscale("log")
    ctx.add_figure("warm_start", fig, "LB trained to a minimum from SB's weights after k epochs (k = 0: from the "
                   "initialization): sharpness and test accuracy, mean and sd over seeds (runs fitted and at a minimum).")


def _remedy_checks(p: _Pairs, name: str, arm: Sequence[Mapping[str, Any]]) -> dict[str, RegimeCheck]:
    """LB with a remedy is fitted and at a minimum, as SB and LB must be, and the gradient cannot decide its
    sharpness against SB's (the gradient_part check of the eps = 1e-3 claim, on these pairs)."""
    cfg, need = p.cfg, p.cfg.min_usable
    ok = lambda r: r is not None and why_excluded(r, cfg) is None  # noqa: E731
    by_seed = {r["seed"]: r for r in arm}
    m = SHARP_MIN_LOG["sharper_eps0.001"]
    bounds, decided = _decided([(p.by_key[(p.sb, s)], by_seed.get(s)) for s in p.seeds], "_eps0.001", m, ok)
    return {
        f"remedy_{name}_minimum": RegimeCheck(
            f"remedy_{name}_minimum",
            f"LB (batch {p.lb}) with {name} fits the training set (>= {cfg.fit_acc:.0%}) and stops at a minimum (as "
            f"SB and LB must) in at least {need:.0%} of its runs",
            _fraction(arm, ok) >= need,
            {"usable": f"{sum(ok(r) for r in arm)}/{len(arm)}", "excluded": _reasons(arm, cfg),
             "train_acc_min": float(np.nanmin([r["train_acc"] for r in arm], initial=np.inf)) if arm else None,
             "grad_ratio_max": float(np.nanmax([r["grad_ratio"] for r in arm], initial=-np.inf)) if arm else None}),
        f"gradient_part_remedy_{name}": RegimeCheck(
            f"gradient_part_remedy_{name}",
            f"The gradient cannot decide whether LB with {name} stays sharper than SB (eps=1e-3): in at least "
            f"{need:.0%} of the pairs every ratio the first-order bounds allow lies on one side of {math.exp(m):.3g}x",
            bool(bounds) and sum(decided) / len(bounds) >= need,
            {"pairs_decided": f"{sum(decided)}/{len(bounds)}",
             "log_ratio_bounds": [[_round(lo), _round(hi)] for lo, hi in bounds]}),
    }


def _remedy_claims(p: _Pairs, name: str, arm: Sequence[Mapping[str, Any]],
                   checks: Mapping[str, RegimeCheck]) -> list[Claim]:
    """7. A remedy (the paper's appendix) improves LB's test accuracy, yet its minimum stays sharper than SB's."""
    cfg, by_seed = p.cfg, {r["seed"]: r for r in arm}
    reasons = merge_counts(p.reasons, _reasons(arm, cfg))
    rem = lambda key, f: np.asarray([f(_value(by_seed.get(s), key, cfg)) for s in p.seeds], dtype=float)  # noqa: E731
    acc_sb, acc_lb = p.values("test_acc", lambda x: 100 * x)
    acc_r = rem("test_acc", lambda x: 100 * x)
    s_sb, _ = p.values("sharp_eps0.001", log_or_nan)
    s_r = rem("sharp_eps0.001", log_or_nan)
    what = REMEDIES[name][2]
    source = "Appendix (remedies): LB test accuracy improves, the minima stay sharp (no number in papers.md)"
    regime = [*p.regime, checks[f"remedy_{name}_minimum"]]
    v_acc = with_exclusions(paired_difference(acc_r, acc_lb, direction="greater", min_effect=GAP_MIN_POINTS,
                                              names=(f"LB+{name}", "LB")), reasons)
    gap, gained = nanmean(acc_sb - acc_lb), nanmean(acc_r - acc_lb)
    v_sharp = with_exclusions(paired_difference(s_r, s_sb, direction="greater", min_effect=SHARP_MIN_LOG["sharper_eps0.001"],
                                                names=(f"log LB+{name}", "log SB")), reasons)
    return [
        Claim(f"remedy_{name}_accuracy",
              f"LB (batch {p.lb}) trained with {what} reaches higher test accuracy than plain LB, by at least "
              f"{GAP_MIN_POINTS:g} points (the gap's minimal effect).",
              v_acc, {"test_acc_LB_remedy": summarize(acc_r / 100), "test_acc_LB": summarize(acc_lb / 100),
                      "test_acc_SB": summarize(acc_sb / 100)}, figure="remedies", regime=regime,
              magnitude=[magnitude(f"LB+{name} - LB test accuracy, points", v_acc, None, source),
                         Magnitude("share of the SB - LB gap closed (mean gain / mean gap)",
                                   gained / gap if gap > 0 else None, None, source)]),
        Claim(f"remedy_{name}_sharp",
              f"LB trained with {what} still converges to a sharp minimum: its eps=1e-3 sharpness is at least "
              f"{math.exp(SHARP_MIN_LOG['sharper_eps0.001']):.3g} x SB's (the sharpness claim's minimal ratio).",
              v_sharp, {"sharpness_LB_remedy": summarize(np.exp(s_r)), "sharpness_SB": summarize(np.exp(s_sb))},
              figure="remedies", regime=[*regime, checks[f"gradient_part_remedy_{name}"]],
              magnitude=_ratio_magnitude(f"LB+{name} / SB sharpness (geometric mean)", v_sharp, None, source)),
    ]


def _remedy_figure(ctx: Analysis, runs: Sequence[Mapping[str, Any]], remedies: Sequence[Mapping[str, Any]],
                   cfg: KeskarConfig, sb: int, lb: int) -> None:
    arms = [("SB", [r for r in runs if r["batch"] == sb]), ("LB", [r for r in runs if r["batch"] == lb])]
    arms += [(f"LB+{n}", [r for r in remedies if r["remedy"] == n]) for n in REMEDIES if any(r["remedy"] == n for r in remedies)]
    seeds = sorted({r["seed"] for _, rs in arms for r in rs})
    fig, axes = new_figure(ncols=2)
    for ax, key, label in ((axes[0, 0], "test_acc", "test accuracy"), (axes[0, 1], "sharp_eps0.001", "sharpness (eps=1e-3)")):
        g = seed_grid({a: {r["seed"]: _value(r, key, cfg) for r in rs} for a, rs in arms}, [a for a, _ in arms], seeds)
        errorbar_points(ax, list(range(len(arms))), g, label)
        ax.set_xticks(range(len(arms)), [a for a, _ in arms], fontsize=7)
        ax.set_ylabel(label)
        if key.startswith("sharp") and np.isfinite(g).any() and np.nanmin(g) > 0:
            ax.set_yscale("log")
    ctx.add_figure("remedies", fig, f"The remedies: LB (batch {lb}) with each remedy beside SB (batch {sb}) and plain LB; "
                   "test accuracy and sharpness, mean and sd over seeds (runs fitted and at a minimum).")


def _chunks(x, y, size: int) -> list:
    return list(zip(x.split(size), y.split(size)))


def _grid(runs, sizes, seeds, key, cfg) -> np.ndarray:
    """seeds x batch sizes array of a value, NaN where a run is missing or excluded."""
    by_size = {b: {r["seed"]: _value(r, key, cfg) for r in runs if r["batch"] == b} for b in sizes}
    return seed_grid(by_size, sizes, seeds)


__all__ = ["Keskar", "decide", "published_ratios", "regime_checks", "why_excluded"]
