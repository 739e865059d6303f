"""Li and Li 2017, "Batch size matters: a diffusion approximation framework on nonconvex SGD".

SGD seen as the diffusion dX = -grad f(X) dt + sqrt(eta / m) Sigma^(1/2) dW (time t = k eta): from a
local minimum it escapes after a number of iterations exponential in 1/eta, from a saddle after about
1/eta (up to a log); small batches escape sharp minima and saddles sooner; raising the batch late in
training lets SGD settle.

Claims A-C are simulations (`batchscope.diffusion`): SGD on small finite-sum potentials, minibatches
drawn from N examples, many trajectories per setting, in groups by seed. Each (setting, seed) is a
pseudo-run of the store (spec kind "simulation", group "lili") that holds every trajectory's escape
step, so the report rebuilds without simulating again, and every number is computed from stored
values. The paper is a theory paper and publishes formulas, not numbers: the "published" side of every
simulated effect is the SDE's prediction (its Kramers and saddle-exit formulas), and the batch claims
are tested quantitatively against it (the paper's weak-approximation point), so that they can fail.
Claim E tests the weak approximation itself: the SDE is simulated too (`dif.simulate_sde`, stored the same
way), and its escape-time distribution is compared whole with SGD's (two-sample KS) at two settings deep in
its regime. Claim D trains real networks through the sweep machinery: small batch throughout, small then raised
late (`train.batch_schedule`), large throughout for the same epochs (same examples) and for the same
number of updates as the raised run.

The analysis is split in two: reading numbers from the store (`_sim_numbers`, `_weak_numbers`, `_training_numbers`)
and deciding the claims from plain arrays (`decide_simulations`, `decide_weak`, `decide_training`), which the rules
tests feed with made-up numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

from .. import diffusion as dif
from ..errors import BatchscopeError
from ..factories import epoch_plan, train_size
from ..report.claims import Claim, Magnitude
from ..report.figures import errorbar_points, line_with_band, log_ticks, new_figure
from ..spec import SweepSpec
from ..stats import RegimeCheck, all_of, equivalence, paired_difference, same_distribution, summarize, trend
from .base import (
    Analysis,
    Options,
    ScaledConfig,
    Study,
    ci_of,
    fit_line,
    fmt,
    log_or_nan,
    magnitude,
    merge_counts,
    nanmean,
    seed_of,
    simulated,
    slope_line,
    with_exclusions,
)

SIM_VERSION = 1  # bump when the simulator changes what a stored setting means
SDE_VERSION = 1  # the same for the SDE's simulator (its pseudo-runs only)
SIM_GROUP = "lili"
CONDITIONS = ("small", "raised", "large", "large_updates")
SDE_SOURCE = "SDE prediction (Li & Li, Kramers)"
SDE_SADDLE_SOURCE = "SDE prediction (Li & Li, exit from an unstable point)"
NO_NUMBER = "Li & Li give no number (a theory paper)"
USES = ("minimum", "saddle", "sharp", "flat_vs_sharp", "saddle_batch")
LABELS = {"minimum": "escape from a minimum over eta", "saddle": "escape from a saddle over eta",
          "sharp": "escape from the sharp minimum over the batch", "flat_vs_sharp": "flat against sharp minimum",
          "saddle_batch": "escape from a saddle over the batch"}
WEAK = {"saddle": "weak_saddle", "well": "weak_well"}  # E's settings -> their SGD cells in `_cells`
WEAK_LABELS = {"saddle": "saddle", "well": "shallow well"}
RATIO_FLOOR = 1e-3  # a measured/SDE slope ratio <= 0 (no or the reverse dependence) counts as this: far outside any factor
CENSORED = "too few trajectories escaped (censored group)"


# -- the configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Simulation:
    """Every simulated setting: N examples whose gradient offsets have mean 0 and variance sigma^2;
    minibatches drawn with replacement (noise variance sigma^2 / m exactly, as the SDE has it)."""

    n_traj: int  # trajectories in a group (one group per setting and seed)
    n_examples: int = 1000
    replace: bool = True
    chunk: int = 256
    min_escaped: float = 0.5  # a group's mean escape needs half its trajectories out (else NaN, excluded)


@dataclass(frozen=True)
class MinimumGrid:
    """A: a flat well (curvature 4 dV / w^2 = 1) of depth dV; escape = past the barrier top."""

    inv_eta: tuple[float, ...]
    max_steps: int
    dV: float = 1.0
    w: float = 2.0
    sigma: float = 5.0
    batch: int = 4


@dataclass(frozen=True)
class SharpGrid:
    """C: a sharp well of the same depth (curvature 4), at one step size small enough for the SDE
    (eta h = 0.2), over batch sizes; sigma sets 2 dV / (eta sigma^2) = 0.82 per unit of batch.
    The flat well of A (curvature 1) beside it at the same eta, sigma and batch `vs_flat_batch`."""

    batches: tuple[int, ...]
    max_steps: int
    vs_flat_batch: int = 6
    w: float = 1.0
    eta: float = 0.05
    sigma: float = 7.0


@dataclass(frozen=True)
class SaddleGrid:
    """B: -gamma x^2 / 2 + h y^2 / 2, leave the ball of radius r around the saddle."""

    etas: tuple[float, ...]  # at batch `batch`
    batches: tuple[int, ...]  # at eta `batch_eta`
    max_steps: int
    gamma: float = 1.0
    h: float = 1.0
    r: float = 1.0
    sigma: float = 0.5
    batch: int = 4
    batch_eta: float = 0.02


@dataclass(frozen=True)
class WeakGrid:
    """E: the weak approximation itself -- SGD's escape steps against those of its SDE (`dif.simulate_sde`,
    Euler-Maruyama with dt = eta / substeps, the exit checked at whole steps as SGD's is), compared as
    distributions, at two settings deep in the SDE's regime, chosen from the theory before any run:

    - the saddle of B at eta = `saddle_eta` (eta gamma = 0.005), batch B's: its SGD groups are B's;
    - a shallow flat well (curvature h = 4 dV / w^2 = 1) at eta h = 0.02 whose barrier is twice the SDE's
      temperature eta sigma^2 / (2 m). Over an escape from a well the first-order error (SGD's stationary
      variance is the SDE's x (1 + eta h / 2)) enters the Arrhenius exponent 2 dV m / (eta sigma^2) as about
      h dV m / sigma^2 = 0.02 here: a ~2% shift of the escape times, a KS distance under 0.01, below what
      5 x 1,024 trajectories a side resolve (~0.03). (At the sharp-well settings of C, eta h = 0.2 with an
      exponent up to 6.5, the same estimate is O(1): the weak approximation is not expected to hold there to
      within sampling error, which is why C is tested against the SDE within a factor of 2.)
    """

    well_max_steps: int
    substeps: int = 10  # dt = eta / 10: the SDE's own O(dt) discretization error a tenth of SGD's O(eta) against it
    chunk: int = 32  # steps per batch of Gaussian draws (x 10 substeps x trajectories: ~26 MB at 5,120 x 2-D)
    saddle_eta: float = 0.005
    dV: float = 1.0
    w: float = 2.0
    eta: float = 0.02
    sigma: float = 10.0
    batch: int = 2


@dataclass(frozen=True)
class Rules:
    """Minimal effects, stated before any run (none read off a result)."""

    # "exponential, not polynomial": the exponential model log(eta T) = a + b / eta must leave at
    # most half the residual sum of squares of the power law log T = a + c log(1/eta) (same number
    # of parameters): log(RSS_power / RSS_exp) >= log 2.
    exp_over_power: float = math.log(2)
    # ... and its slope b must be at least a tenth of the SDE's 2 dV m / sigma^2 (the brief's
    # "a tenth of the published effect"; the SDE's slope stands for the published one).
    exp_slope_fraction: float = 0.1
    # "about 1/eta": |log-log slope - 1| < 0.25 (the log adds ~1 / log(m / eta) ~ 0.1-0.2 on the grid)
    slope_margin: float = 0.25
    # "exponential against about linear": the minimum's log-log slope exceeds the saddle's by > 1
    steeper_margin: float = 1.0
    # the batch claims, quantitative (the weak approximation): the measured slope or ratio is the
    # SDE's within a factor of 2 -- wide enough for the O(eta h) <= 0.2 discretization, narrow
    # enough to exclude no dependence, the reverse, or one several times weaker or stronger.
    sde_factor: float = 2.0
    # "settles": the final train loss lower by at least a tenth of the SDE's noise-floor drop,
    # 0.1 x log(lb / sb) in log-loss (the stationary excess loss scales with eta / m).
    settle_fraction: float = 0.1
    # "generalizes better": at least one point of test accuracy (10 of the 1,000 MNIST-1D test
    # examples); the paper gives no number.
    min_acc_gain: float = 0.01
    # the weak approximation: SGD's and the SDE's escape-step distributions within a KS distance of 0.1 with
    # 95% confidence -- for memoryless (exponential) escapes, mean escape times within about 30% (exponentials
    # whose means differ by 1.3x are 0.096 apart): tighter than the factor 2 the batch claims allow against the
    # SDE's formulas, yet above the DKW interval's half-width reachable with 5 x 1,024 trajectories a side (0.04).
    weak_ks_margin: float = 0.1
    weak_confidence: float = 0.95


@dataclass(frozen=True)
class Regime:
    """Regime checks: when the claims can be tested at all (thresholds stated here, measured values decide them)."""

    min_escaped: float = 0.9  # every group: >= 90% of trajectories escaped (censoring small)
    max_eta_curvature: float = 0.2  # eta x |curvature| <= 0.2: SGD's stationary variance within 11% of the SDE's
    # the grid can tell exponential from power law: on the SDE's curve, the power-law fit's rms
    # residual in log(steps) is >= 3x the measured standard error of a group's log(mean escape)
    power_resolution: float = 3.0
    plateau_window: int = 6  # epochs before the raise over which the small batch's loss must have stalled
    fit_gap: float = 0.02  # the large arm's train accuracy at most 2 points below the raised arm's
    equal_updates_tol: float = 0.01  # "same updates": within 1%


@dataclass(frozen=True)
class BatchRaise:
    """D: real training runs, the batch raised from `sb` to `lb` at epoch `raise_at` (plain SGD at `lr`)."""

    data: Mapping[str, Any]  # the sweep's data section
    model: Mapping[str, Any]  # the sweep's model section
    lr: float
    sb: int
    lb: int
    epochs: float
    raise_at: float


@dataclass(frozen=True)
class LiLiConfig(ScaledConfig):
    """Every choice of the reproduction, by scale (tests shrink it: tests/tiny_configs.py)."""

    sim: Simulation
    minimum: MinimumGrid
    sharp: SharpGrid
    saddle: SaddleGrid
    weak: WeakGrid
    train: BatchRaise
    rules: Rules = Rules()
    regime: Regime = Regime()

    @classmethod
    def quick(cls, opts: Options) -> LiLiConfig:
        return cls(
            sim=Simulation(n_traj=1024),
            minimum=MinimumGrid(inv_eta=(6, 8, 10, 12, 14, 16), max_steps=60_000),
            sharp=SharpGrid(batches=(3, 4, 5, 6, 7, 8), max_steps=40_000),
            saddle=SaddleGrid(etas=(0.005, 0.01, 0.02, 0.04, 0.08), batches=(1, 4, 16, 64), max_steps=20_000),
            # the well's mean escape is ~1,300 steps, memoryless after relaxing: 8,000 leaves ~0.2% censored
            weak=WeakGrid(well_max_steps=8000),
            train=BatchRaise(
                data=opts.data_spec("mnist1d"), model={"name": "mlp", "width": 0.25, "depth": 3},
                # lr 0.5 at batch 32 keeps the small-batch loss noise-limited, so settling can show
                lr=0.5, sb=32, lb=512, epochs=20, raise_at=14,
            ),
        )

    @classmethod
    def paper(cls, opts: Options) -> LiLiConfig:
        data = opts.data_spec("mnist1d", ("mnist1d", "mnist", "fashion_mnist", "mnist5k"))
        if data["name"] == "mnist1d":
            train = BatchRaise(data=data, model={"name": "mlp", "width": 0.25, "depth": 3},
                               lr=0.5, sb=32, lb=512, epochs=40, raise_at=28)
        else:  # 28x28 digits: not run in development (no copy of the data there)
            train = BatchRaise(data=data, model={"name": "mlp", "width": 0.5, "depth": 3},
                               lr=0.2, sb=32, lb=1024, epochs=30, raise_at=20)
        return cls(
            sim=Simulation(n_traj=2048),
            minimum=MinimumGrid(inv_eta=tuple(range(6, 19)), max_steps=400_000),
            sharp=SharpGrid(batches=tuple(range(3, 11)), max_steps=300_000),
            saddle=SaddleGrid(etas=tuple(np.geomspace(0.0025, 0.08, 11).round(6).tolist()),
                              batches=(1, 2, 4, 8, 16, 32, 64, 128), max_steps=50_000),
            weak=WeakGrid(well_max_steps=12_000),
            train=train,
        )


class LiLi(Study):
    name = "lili"
    title = "Batch size and SGD as a diffusion: escape from minima and saddles (Li and Li 2017)"
    citation = (
        "C. J. Li, L. Li. Batch size matters: a diffusion approximation framework on nonconvex "
        "stochastic gradient descent. arXiv, 2017."
    )

    def config(self, opts: Options) -> LiLiConfig:
        return LiLiConfig.of(opts)

    # -- training runs (claim D) ------------------------------------------------------------------

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        t = self.config(opts).train
        body = {
            "name": "lili",
            "data": t.data,
            "model": t.model,
            "optim": {"name": "sgd", "lr": t.lr},  # plain SGD, constant step: the batch alone sets the noise
            "train": {"batch_size": t.sb, "epochs": t.epochs, "device": opts.device},
            "log": {"log_points": 0},  # every epoch end
            **opts.seeding(self.default_seeds),
        }
        updates = raised_updates(t, train_size(t.data))
        body["zip"] = [{
            "tags.condition": list(CONDITIONS),
            "train.batch_size": [t.sb, t.sb, t.lb, t.lb],
            "train.batch_schedule": [[], [[t.raise_at, t.lb]], [], []],
            # the large batch for the same epochs (same examples) and for the raised run's number of updates
            "train.epochs": [t.epochs, t.epochs, t.epochs, None],
            "train.steps": [None, None, None, updates],
        }]
        return [SweepSpec.model_validate(body)]

    # -- analysis -------------------------------------------------------------------------------

    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        seeds = ctx.opts.seed_list(self.default_seeds)
        cells = _cells(c, seeds)
        chunk = c.sim.chunk
        times = _escape_times(ctx, [s for group in cells.values() for row in group for s in row], chunk)
        sims = {k: _sim_numbers(rows, times, chunk, c.sim.min_escaped) for k, rows in cells.items()}
        for claim in decide_simulations(c, sims, seeds):
            ctx.add_claim(claim)
        wk = c.weak
        sde_times = _escape_times(ctx, [row[0] for use in WEAK.values() for row in cells[use]], wk.chunk, substeps=wk.substeps)
        weak = _weak_numbers(c, cells, times, sde_times)
        weak_claim = decide_weak(c, weak)
        ctx.add_claim(weak_claim)
        values, small_curves, excluded, curves = _training_numbers(ctx)
        for claim in decide_training(c, values, small_curves, excluded):
            ctx.add_claim(claim)
        self._simulation_figures(ctx, c, sims, seeds)
        self._training_figure_and_table(ctx, c, values, curves, excluded)
        self._simulation_table(ctx, c, cells, times, sims)
        self._weak_figure_and_table(ctx, c, cells, weak, weak_claim)
        sim = c.sim
        ctx.notes.append(
            f"Simulations: {len(times)} distinct (setting, seed) groups of {sim.n_traj} independent SGD trajectories, "
            f"on finite sums "
            f"of N={sim.n_examples} examples whose gradient offsets have mean 0 and variance sigma^2; minibatches drawn "
            f"{'with' if sim.replace else 'without'} replacement, independently at every step. A group's mean escape "
            f"step is the sample mean, or with censoring the exponential maximum-likelihood mean (steps at risk / escapes); "
            f"groups with fewer than {sim.min_escaped:.0%} escaped are left out (counted as excluded). A seed drives one "
            f"group of every setting (common random numbers across settings, as a training seed is shared across "
            f"conditions); the statistics are over seeds, that is over independent groups of trajectories."
        )
        ctx.notes.append(
            "Li and Li publish formulas, not numbers: each simulated effect is shown beside the SDE's prediction "
            "(Kramers' escape time pi / (h eta) exp(2 dV m / (eta sigma^2)) for the wells, the exit time "
            "(log(2 gamma r^2 m / (eta sigma^2)) + 0.577 + log 2) / (2 gamma eta) for the saddle). The batch claims "
            "are tested against these predictions within a factor of 2: in the simulator a smaller batch always "
            "means more noise, so only the size of the dependence, not its sign, can fail. The paper's regime "
            "(eta -> 0) is met by the simulations (eta x curvature <= 0.2, a regime check); the training claims run a "
            "small MLP on MNIST-1D, far from the deep networks the paper's discussion has in mind, and the paper "
            "gives no number for them."
        )
        ctx.notes.append(
            f"The weak approximation itself (claim weak_approximation): the SDE of a setting, dX = -grad V dt + "
            f"sqrt(eta s2) dW with s2 = sigma^2 / m the minibatch noise variance, is simulated by Euler-Maruyama with "
            f"dt = eta / {wk.substeps}, from an independent Gaussian stream per group, with the exit checked at every "
            f"whole step t = k eta as SGD's is (the continuous first passage would be shorter: between steps a path "
            f"crosses the barrier top and comes back). Its escape steps and SGD's, pooled over groups, are compared "
            f"whole, not only their means: the two-sample Kolmogorov-Smirnov distance between the two CDFs and a "
            f"distribution-free (DKW) interval for it; escapes not seen within the step limit count as censored, larger "
            f"than every observed step. The claim is agreement within a tolerance (an equivalence test): the SDE is a "
            f"first-order approximation of SGD, so the KS test of exact equality (its p is shown) is expected to detect "
            f"the O(eta) difference once the groups are large enough, and does not decide. The settings are chosen "
            f"deep in the SDE's regime, where first-order theory predicts a difference of a few percent."
        )

    # -- figures and tables ---------------------------------------------------------------------

    def _simulation_figures(self, ctx, c: LiLiConfig, sims, seeds) -> None:
        self._minimum_figure(ctx, c, sims, seeds)
        self._saddle_figure(ctx, c, sims, seeds)
        self._batch_figure(ctx, c, sims)

    @staticmethod
    def _minimum_figure(ctx, c: LiLiConfig, sims, seeds) -> None:
        """A: mean escape iterations over 1/eta, beside the SDE's and the best power law."""
        mn = c.minimum
        inv_eta = np.asarray(mn.inv_eta, dtype=float)
        t_min = sims["minimum"]["mean"]
        fig, ax = new_figure()
        errorbar_points(ax, inv_eta, t_min, "SGD: mean escape iterations")
        fine = np.linspace(inv_eta.min(), inv_eta.max(), 100)
        ax.plot(fine, [dif.kramers_escape_steps(mn.dV, mn.w, 1 / ie, mn.sigma, mn.batch) for ie in fine],
                "k--", linewidth=1, label="SDE (Kramers)")
        y = np.log(nanmean(t_min, 0))
        ok = np.isfinite(y)
        if ok.sum() >= 2:  # the best power law through the mean: the alternative the exponential must beat
            c_pow, a_pow, _ = fit_line(np.log(inv_eta[ok]), y[ok])
            ax.plot(fine, np.exp(a_pow) * fine**c_pow, ":", color="gray", linewidth=1,
                    label=f"best power law (1/eta)^{c_pow:.2g}")
        ax.set_yscale("log")
        ax.set_xlabel("1 / eta")
        ax.set_ylabel("iterations to escape")
        ax.legend(fontsize=8, frameon=False)
        ctx.add_figure("minimum_escape", fig,
                       f"Escape from a minimum (barrier {mn.dV:g}, curvature {4 * mn.dV / mn.w ** 2:g}, batch {mn.batch}, "
                       f"sigma {mn.sigma:g}): mean escape iterations per group, mean and sd over {len(seeds)} groups, the "
                       f"SDE's pi / (h eta) exp(2 dV m / (eta sigma^2)), and the best power law in 1/eta through the means. "
                       f"A straight line on these axes is exponential in 1/eta.")

    @staticmethod
    def _saddle_figure(ctx, c: LiLiConfig, sims, seeds) -> None:
        """B: mean escape iterations over 1/eta from the saddle, beside the SDE's and slope 1."""
        sd = c.saddle
        etas = np.asarray(sd.etas, dtype=float)
        t_sad = sims["saddle"]["mean"]
        fig, ax = new_figure()
        errorbar_points(ax, 1 / etas, t_sad, "SGD: mean escape iterations")
        fine = np.geomspace(1 / etas.max(), 1 / etas.min(), 100)
        ax.plot(fine, [dif.saddle_escape_steps(sd.gamma, sd.r, 1 / f, sd.sigma, sd.batch) for f in fine],
                "k--", linewidth=1, label="SDE")
        j = int(np.argmin(abs(etas - math.sqrt(etas.min() * etas.max()))))
        ref = nanmean(t_sad, 0)[j]
        if np.isfinite(ref):
            ax.plot(fine, ref * fine * etas[j], ":", color="gray", linewidth=1, label="slope 1")
        log_ticks(ax, 1 / etas, "x")
        ax.set_yscale("log")
        ax.set_xlabel("1 / eta")
        ax.set_ylabel("iterations to escape")
        ax.legend(fontsize=8, frameon=False)
        ctx.add_figure("saddle_escape", fig,
                       f"Escape from a saddle (curvature -{sd.gamma:g}, ball of radius {sd.r:g}, batch {sd.batch}, sigma "
                       f"{sd.sigma:g}) on log-log axes: mean and sd over {len(seeds)} groups; the SDE's "
                       f"(log(2 gamma r^2 m / (eta sigma^2)) + 0.577 + log 2) / (2 gamma eta); slope 1 is linear in 1/eta.")

    @staticmethod
    def _batch_figure(ctx, c: LiLiConfig, sims) -> None:
        """C: escape iterations over the batch size, from the sharp minimum and from the saddle."""
        mn, sd, sh = c.minimum, c.saddle, c.sharp
        ms = np.asarray(sh.batches, dtype=float)
        h_flat, h_sharp = 4 * mn.dV / mn.w ** 2, 4 * mn.dV / sh.w ** 2
        fig, axes = new_figure(1, 2)
        ax = axes[0, 0]
        errorbar_points(ax, ms, sims["sharp"]["mean"], f"sharp well (h={h_sharp:g})")
        ax.plot(ms, [dif.kramers_escape_steps(mn.dV, sh.w, sh.eta, sh.sigma, int(m)) for m in ms],
                "k--", linewidth=1, label="SDE (Kramers)")
        fvs = sims["flat_vs_sharp"]["mean"]
        errorbar_points(ax, [float(sh.vs_flat_batch)], fvs[:, :1], f"flat well (h={h_flat:g})")
        ax.plot([sh.vs_flat_batch], [dif.kramers_escape_steps(mn.dV, mn.w, sh.eta, sh.sigma, sh.vs_flat_batch)],
                "kx", label="SDE, flat well")
        ax.set_yscale("log")
        ax.set_xlabel("batch size m")
        ax.set_ylabel("iterations to escape")
        ax.set_title(f"minimum, eta={sh.eta:g}, sigma={sh.sigma:g}")
        ax.legend(fontsize=7, frameon=False)
        ax = axes[0, 1]
        bs = np.asarray(sd.batches, dtype=float)
        errorbar_points(ax, bs, sims["saddle_batch"]["mean"], "saddle")
        ax.plot(bs, [dif.saddle_escape_steps(sd.gamma, sd.r, sd.batch_eta, sd.sigma, int(m)) for m in bs],
                "k--", linewidth=1, label="SDE")
        log_ticks(ax, bs, "x")
        ax.set_xlabel("batch size m")
        ax.set_ylabel("iterations to escape")
        ax.set_title(f"saddle, eta={sd.batch_eta:g}")
        ax.legend(fontsize=7, frameon=False)
        ctx.add_figure("escape_vs_batch", fig, "Escape iterations against the batch size at a fixed step size: mean and sd "
                       "over groups of trajectories, with the SDE's prediction (the claims compare the slopes and the "
                       "flat/sharp ratio with the SDE's).")

    @staticmethod
    def _weak_figure_and_table(ctx, c: LiLiConfig, cells, weak: dict[str, dict], claim: Claim) -> None:
        """E: the fraction of trajectories escaped by each step, SGD's and the SDE's, pooled over groups."""
        wk = c.weak
        fig, axes = new_figure(1, len(weak))
        rows = []
        for j, (name, d) in enumerate(weak.items()):
            ax, m, s = axes[0, j], claim.measured[name], cells[WEAK[name]][0][0]
            for key, label, style in (("sgd", "SGD", "-"), ("sde", f"SDE (Euler-Maruyama, dt = eta / {wk.substeps})", "--")):
                x = np.asarray(d[key], dtype=float).ravel()
                steps = np.sort(x[np.isfinite(x)])
                ax.step(np.concatenate([[0.0], steps]), np.arange(len(steps) + 1) / len(x), where="post", linestyle=style,
                        linewidth=1.2, label=label)
            ax.set_xlabel("escape step k")
            ax.set_ylabel("fraction escaped by step k")
            ax.set_title(f"{WEAK_LABELS[name]} ({_shape(s)}, eta={s.eta:g}): KS D={fmt(m['ks_distance'], 2)}, "
                         f"p={fmt(m['ks_p'], 2)}", fontsize=8)
            ax.legend(fontsize=7, frameon=False)
            n_sgd, n_sde = m["trajectories"]["SGD"], m["trajectories"]["SDE"]
            rows.append([WEAK_LABELS[name], _shape(s), f"{s.eta:g}", f"{_eta_curvature(s):.3g}", str(s.batch), f"{s.sigma:g}",
                         f"{n_sgd} / {n_sde}", str(s.max_steps),
                         f"{1 - m['censored_fraction']['SGD']:.1%} / {1 - m['censored_fraction']['SDE']:.1%}",
                         fmt(m["mean_escape_steps_sgd"]), fmt(m["mean_escape_steps_sde"]), fmt(m["ratio_mean_sde_over_sgd"], 3),
                         fmt(m["ks_distance"], 2), fmt(m["ks_p"], 2)])
        ctx.add_figure("weak_approximation", fig,
                       f"SGD against its SDE: the fraction of trajectories escaped by each step (empirical CDFs, groups "
                       f"pooled), SGD's and the SDE's (Euler-Maruyama with dt = eta / {wk.substeps}, exit checked at whole "
                       f"steps); the KS distance D is the largest vertical gap between the two curves.")
        ctx.add_table("SGD against its SDE: escape steps (trajectories pooled over groups)",
                      ["setting", "shape", "eta", "eta x curvature", "batch", "sigma", "trajectories SGD / SDE", "max steps",
                       "escaped SGD / SDE", "mean SGD", "mean SDE", "SDE / SGD", "KS D", "KS p"], rows)

    def _training_figure_and_table(self, ctx, c, values, curves, excluded) -> None:
        t = c.train
        labels = {"small": f"batch {t.sb}", "raised": f"{t.sb} -> {t.lb} at epoch {t.raise_at:g}",
                  "large": f"batch {t.lb}, same epochs", "large_updates": f"batch {t.lb}, same updates"}
        if any(v is not None for v in curves.values()):
            fig, axes = new_figure(1, 2)
            for j, metric in enumerate(("train_loss", "test_acc")):
                ax = axes[0, j]
                # the long same-updates arm first, so the short same-epochs arm stays visible on top of it
                for k in ("large_updates", "small", "raised", "large"):
                    if curves.get(k) is not None:
                        steps, grid, _ = curves[k]
                        line_with_band(ax, steps, grid[metric], labels[k], color=f"C{CONDITIONS.index(k)}")
                if curves.get("raised") is not None:
                    ax.axvline(curves["raised"][2], color="gray", linestyle=":", linewidth=1)
                ax.set_xlabel("updates")
                ax.set_ylabel(metric.replace("_", " "))
                if metric == "train_loss":
                    ax.set_yscale("log")
                ax.legend(fontsize=7, frameon=False)
            ctx.add_figure("batch_raise", fig, f"Training curves against the number of updates, mean and sd over seeds "
                           f"({t.data['name']}, plain SGD at lr {t.lr:g}, values at every epoch end); the dotted line "
                           f"marks the batch raise.")
        rows = []
        for k in CONDITIONS:
            v = values.get(k, {})
            col = lambda name, v=v: fmt(nanmean([d.get(name, np.nan) for d in v.values()] or [np.nan]))  # noqa: E731
            ex = excluded.get(k, {})
            rows.append([labels[k], str(sum(np.isfinite(d.get("test_acc", np.nan)) for d in v.values())),
                         ", ".join(f"{n} {why}" for why, n in ex.items()) or "0",
                         col("train_loss"), col("train_acc"), col("test_acc"),
                         fmt(nanmean([d.get("steps", np.nan) for d in v.values()] or [np.nan]), 5)])
        ctx.add_table("Batch raised late: final metrics (mean over seeds)",
                      ["condition", "runs used", "excluded", "train loss", "train acc", "test acc", "updates"], rows)

    def _simulation_table(self, ctx, c, cells, times, sims) -> None:
        rows = []
        for key, grid in cells.items():
            for j in range(len(grid[0])):
                col = [row[j] for row in grid]
                s = col[0]
                esc = np.concatenate([times[_sim_id(x, c.sim.chunk)[0]] for x in col])
                pred = _prediction(s)
                m = float(nanmean(sims[key]["mean"][:, j]))
                rows.append([key, s.potential, _shape(s), f"{s.eta:g}", f"{_eta_curvature(s):.3g}", str(s.batch), f"{s.sigma:g}",
                             f"{len(col)} x {s.n_traj}", str(s.max_steps), f"{np.isfinite(esc).mean():.1%}", fmt(m),
                             fmt(pred), fmt(m / pred, 3)])
        ctx.add_table(
            "Simulated settings: mean escape iterations (mean over groups) and the SDE's prediction",
            ["use", "potential", "shape", "eta", "eta x curvature", "batch", "sigma", "groups x trajectories",
             "max steps", "escaped", "mean escape", "SDE", "ratio"],
            rows,
        )


# -- deciding the claims from numbers (pure: no store, no simulation) ---------------------------------


def decide_simulations(c: LiLiConfig, sims: dict[str, dict], seeds: list) -> list[Claim]:
    """The six simulation claims from plain numbers.

    sims[use] for use in USES holds seeds x grid arrays: "mean" (mean escape steps, NaN where a group
    was left out), "se_log" (standard error of log mean escape), "escaped" (escaped fraction) and
    "eta_curv" (eta x |curvature| of the setting). Grids and the SDE's predictions come from `c`.
    """
    d = _SimClaims(c, sims, seeds)
    return [d.minimum_exponential(), d.saddle_linear(), d.minimum_vs_saddle(), d.batch_sharp(), d.sharp_vs_flat(),
            d.batch_saddle()]


class _SimClaims:
    """The simulation claims from the groups' numbers (see `decide_simulations`): one method per claim, the
    escape curves from the minimum (A) and the saddle (B) read once, as A against B compares them."""

    def __init__(self, c: LiLiConfig, sims: dict[str, dict], seeds: list) -> None:
        self.c, self.seeds = c, seeds
        self.S = {k: {n: np.asarray(v, dtype=float) for n, v in d.items()} for k, d in sims.items()}
        self.checks = {use: _sim_regime(c.regime, use, self.S[use]) for use in USES}
        mn, sd = c.minimum, c.saddle
        # A: mean escape steps over 1/eta, and the SDE's (Kramers) prediction, in logs
        self.inv_eta = np.asarray(mn.inv_eta, dtype=float)
        self.t_min = self.S["minimum"]["mean"]
        self.y_min = np.log(self.t_min)
        self.sde_y = np.log([dif.kramers_escape_steps(mn.dV, mn.w, 1 / ie, mn.sigma, mn.batch) for ie in self.inv_eta])
        # B: per-group log-log slopes over 1/eta, and the SDE's
        self.etas = np.asarray(sd.etas, dtype=float)
        self.t_sad = self.S["saddle"]["mean"]
        x_sad = np.log(1 / self.etas)
        self.s_sad = np.array([slope_line(x_sad, row) for row in np.log(self.t_sad)])
        self.pred_sad = np.array([dif.saddle_escape_steps(sd.gamma, sd.r, e, sd.sigma, sd.batch) for e in self.etas])
        self.sde_s_sad = slope_line(x_sad, np.log(self.pred_sad))

    def minimum_exponential(self) -> Claim:
        """A: exponential in 1/eta, tested against a power law (which includes "linear in 1/eta")."""
        mn, rules, inv_eta, seeds = self.c.minimum, self.c.rules, self.inv_eta, self.seeds
        kappa = dif.arrhenius_slope(mn.dV, mn.sigma, mn.batch)
        fits = [_exp_vs_power(inv_eta, row) for row in self.y_min]
        b = np.array([f[0] for f in fits])
        log_rss_exp, log_rss_pow = np.array([f[1] for f in fits]), np.array([f[2] for f in fits])
        v_cmp = paired_difference(dict(zip(seeds, log_rss_pow)), dict(zip(seeds, log_rss_exp)), direction="greater",
                                  min_effect=rules.exp_over_power, names=("log RSS power law", "log RSS exponential"))
        v_slope = trend(inv_eta, self.y_min + np.log(1 / inv_eta), direction="increasing", method="slope",
                        min_effect=rules.exp_slope_fraction * kappa)
        censored = _censored(self.t_min)
        verdict = all_of({"exponential_fits_better": v_cmp, "slope_at_least_a_tenth_of_sde": v_slope},
                         what="both parts (the exponential beats the power law, and its slope is positive "
                              "and at least a tenth of the SDE's)",
                         excluded=sum(censored.values()))
        return Claim(
            "minimum_exponential",
            f"From a local minimum (barrier dV={mn.dV:g}, curvature {4 * mn.dV / mn.w ** 2:g}, batch {mn.batch}), "
            f"SGD escapes after a number of iterations exponential in 1/eta, not polynomial: per group, the exponential "
            f"model log(eta T) = a + b/eta fits log(mean escape iterations) better than the power law log T = a + c log(1/eta) "
            f"(which includes 'linear in 1/eta'), leaving at most half its residual sum of squares, and b is at least a "
            f"tenth of the SDE's 2 dV m / sigma^2 = {kappa:.3g}.",
            with_exclusions(verdict, censored),
            {"inv_eta": inv_eta, "mean_escape_steps": nanmean(self.t_min, 0),
             "sde_kramers_steps": np.exp(self.sde_y),
             "slope_log_eta_steps_per_inv_eta": summarize(b), "sde_slope_2dVm_over_sigma2": kappa,
             "ratio_slope_over_sde": summarize(b / kappa),
             "log_rss_power_minus_exp": summarize(log_rss_pow - log_rss_exp),
             "power_law_exponent": summarize([_power_exponent(inv_eta, row) for row in self.y_min]),
             "escaped_fraction_min": _nanmin(self.S["minimum"]["escaped"])},
            figure="minimum_escape",
            regime=self.checks["minimum"] + [self.resolution()],
            magnitude=[Magnitude("slope of log(eta x mean escape iterations) on 1/eta",
                                 float(np.nanmean(b)) if np.isfinite(b).any() else None,
                                 kappa, f"{SDE_SOURCE}: 2 dV m / sigma^2", ci_of(v_slope)),
                       magnitude("log(RSS power law / RSS exponential), per group", v_cmp, None,
                                 "the SDE's curve is exactly exponential (no number to compare)")],
        )

    def resolution(self) -> RegimeCheck:
        """The 1/eta grid can tell the SDE's exponential from the best power law, given the groups' noise."""
        _, _, sde_log_rss_pow = _exp_vs_power(self.inv_eta, self.sde_y)
        sde_rms_pow = math.sqrt(math.exp(sde_log_rss_pow) / len(self.inv_eta))
        se_log = self.S["minimum"]["se_log"]
        se_med = float(np.nanmedian(se_log)) if np.isfinite(se_log).any() else math.nan
        k = self.c.regime.power_resolution
        return RegimeCheck(
            "minimum_grid_resolves_exponential",
            f"the 1/eta grid can tell exponential from power law: on the SDE's curve the best power law leaves an rms "
            f"residual in log(steps) at least {k:g} x the measured standard error of a group's log(mean escape) (median)",
            sde_rms_pow >= k * se_med, {"sde_power_law_rms_residual": sde_rms_pow, "median_se_log_mean_escape": se_med,
                                        "ratio": sde_rms_pow / se_med if se_med else math.nan},
        )

    def saddle_linear(self) -> Claim:
        """B: about linear in 1/eta from a saddle."""
        sd, rules = self.c.saddle, self.c.rules
        v = equivalence(self.s_sad, np.ones_like(self.s_sad), margin=rules.slope_margin, names=("loglog_slope", "1"))
        return Claim(
            "saddle_linear",
            f"From a saddle (negative curvature -{sd.gamma:g}), SGD escapes after about 1/eta iterations, up to a log: "
            f"the slope of log(mean escape iterations) against log(1/eta) is within 1 +- {rules.slope_margin:g}.",
            with_exclusions(v, _censored(self.t_sad)),
            {"eta": self.etas, "mean_escape_steps": nanmean(self.t_sad, 0), "sde_steps": self.pred_sad,
             "ratio_measured_over_sde": nanmean(self.t_sad, 0) / self.pred_sad,
             "loglog_slope": summarize(self.s_sad), "sde_loglog_slope": self.sde_s_sad,
             "escaped_fraction_min": _nanmin(self.S["saddle"]["escaped"])},
            figure="saddle_escape", regime=self.checks["saddle"],
            magnitude=[magnitude("log-log slope of mean escape iterations on 1/eta", v, self.sde_s_sad,
                                 f"{SDE_SADDLE_SOURCE}, fitted over the grid", lambda x: x + 1.0)],
        )

    def minimum_vs_saddle(self) -> Claim:
        """A vs B: exponential against about linear."""
        margin = self.c.rules.steeper_margin
        s_min = np.array([slope_line(np.log(self.inv_eta), row) for row in self.y_min])
        sde_s_min = slope_line(np.log(self.inv_eta), self.sde_y)
        v = paired_difference(dict(zip(self.seeds, s_min)), dict(zip(self.seeds, self.s_sad)), direction="greater",
                              margin=margin, names=("loglog_slope_minimum", "loglog_slope_saddle"))
        return Claim(
            "minimum_vs_saddle",
            f"Escape from a minimum depends far more steeply on 1/eta than escape from a saddle (exponential against "
            f"about linear): over the grids, its log-log slope exceeds the saddle's by more than {margin:g}.",
            with_exclusions(v, _censored(self.t_min, self.t_sad)),
            {"loglog_slope_minimum": summarize(s_min), "loglog_slope_saddle": summarize(self.s_sad),
             "sde_loglog_slope_minimum": sde_s_min, "sde_loglog_slope_saddle": self.sde_s_sad},
            figure="minimum_escape", regime=self.checks["minimum"] + self.checks["saddle"],
            magnitude=[magnitude("log-log slope, minimum minus saddle", v, sde_s_min - self.sde_s_sad,
                                 f"{SDE_SOURCE}; {SDE_SADDLE_SOURCE}: both fitted over the grids")],
        )

    def batch_sharp(self) -> Claim:
        """C: batch at the sharp minimum, quantitatively against the SDE."""
        mn, sh, factor = self.c.minimum, self.c.sharp, self.c.rules.sde_factor
        ms = np.asarray(sh.batches, dtype=float)
        t_sharp = self.S["sharp"]["mean"]
        slope_m = np.array([slope_line(ms, row) for row in np.log(t_sharp)])
        sde_m = 2 * mn.dV / (sh.eta * sh.sigma ** 2)
        v = equivalence(_log_ratio(slope_m, sde_m), np.zeros_like(slope_m), margin=math.log(factor),
                        names=("log(slope / SDE slope)", "0"))
        return Claim(
            "batch_sharp",
            f"At a fixed step size (eta={sh.eta:g}), SGD escapes a sharp minimum (curvature {4 * mn.dV / sh.w ** 2:g}) "
            f"sooner with a smaller batch, as the diffusion approximation predicts: the slope of log(mean escape iterations) "
            f"on the batch size m is the SDE's 2 dV / (eta sigma^2) = {sde_m:.3g} within a factor of {factor:g} "
            f"(a slope <= 0 counts as a ratio of {RATIO_FLOOR:g}).",
            with_exclusions(v, _censored(t_sharp)),
            {"batch_sizes": ms, "mean_escape_steps": nanmean(t_sharp, 0),
             "sde_kramers_steps": [dif.kramers_escape_steps(mn.dV, sh.w, sh.eta, sh.sigma, int(m)) for m in ms],
             "slope_log_steps_per_unit_batch": summarize(slope_m), "sde_slope_2dV_over_eta_sigma2": sde_m,
             "ratio_slope_over_sde": summarize(slope_m / sde_m),
             "escaped_fraction_min": _nanmin(self.S["sharp"]["escaped"])},
            figure="escape_vs_batch", regime=self.checks["sharp"],
            magnitude=[Magnitude("slope of log(mean escape iterations) per unit of batch", _nanmean_or_none(slope_m), sde_m,
                                 f"{SDE_SOURCE}: 2 dV / (eta sigma^2)", _t_ci(slope_m))],
        )

    def sharp_vs_flat(self) -> Claim:
        """C: sharp against flat at the same depth, the ratio against the SDE's (Kramers' prefactor pi / h)."""
        mn, sh, factor = self.c.minimum, self.c.sharp, self.c.rules.sde_factor
        fvs = self.S["flat_vs_sharp"]["mean"]
        t_flat, t_sh = fvs[:, 0], fvs[:, 1]
        h_flat, h_sharp = 4 * mn.dV / mn.w ** 2, 4 * mn.dV / sh.w ** 2
        sde_ratio = h_sharp / h_flat
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.log(t_flat / t_sh)
        v = equivalence(dict(zip(self.seeds, d)), dict(zip(self.seeds, np.full(len(d), math.log(sde_ratio)))),
                        margin=math.log(factor), names=("log(T_flat / T_sharp)", "log(SDE ratio)"))
        return Claim(
            "sharp_vs_flat",
            f"SGD escapes a sharp minimum (curvature {h_sharp:g}) sooner than a flat one (curvature {h_flat:g}) of the same "
            f"depth (dV={mn.dV:g}), at eta={sh.eta:g}, sigma={sh.sigma:g} and batch {sh.vs_flat_batch}, by the SDE's "
            f"factor: the ratio of their mean escape iterations (flat / sharp) is the SDE's {sde_ratio:g} "
            f"within a factor of {factor:g}.",
            with_exclusions(v, _censored(fvs)),
            {"mean_escape_steps_flat": summarize(t_flat), "mean_escape_steps_sharp": summarize(t_sh),
             "ratio_flat_over_sharp": summarize(t_flat / t_sh), "sde_ratio_flat_over_sharp": sde_ratio,
             "escaped_fraction_min": _nanmin(self.S["flat_vs_sharp"]["escaped"])},
            figure="escape_vs_batch", regime=self.checks["flat_vs_sharp"],
            magnitude=[magnitude("mean escape iterations, flat / sharp", v, sde_ratio,
                                 f"{SDE_SOURCE}: same exponent, prefactor pi / h, so h_sharp / h_flat",
                                 lambda x: math.exp(x + math.log(sde_ratio)))],
        )

    def batch_saddle(self) -> Claim:
        """C: batch at the saddle, quantitatively against the SDE."""
        sd, factor = self.c.saddle, self.c.rules.sde_factor
        bs = np.asarray(sd.batches, dtype=float)
        t_sb = self.S["saddle_batch"]["mean"]
        pred_sb = np.array([dif.saddle_escape_steps(sd.gamma, sd.r, sd.batch_eta, sd.sigma, int(m)) for m in bs])
        slope_sb = np.array([slope_line(np.log(bs), row) for row in np.log(t_sb)])
        sde_sb = slope_line(np.log(bs), np.log(pred_sb))
        v = equivalence(_log_ratio(slope_sb, sde_sb), np.zeros_like(slope_sb), margin=math.log(factor),
                        names=("log(slope / SDE slope)", "0"))
        return Claim(
            "batch_saddle",
            f"At a fixed step size (eta={sd.batch_eta:g}), SGD leaves a saddle sooner with a smaller batch, as the diffusion "
            f"approximation predicts: the slope of log(mean escape iterations) on log m is the SDE's ({sde_sb:.3g}, a "
            f"logarithmic dependence) within a factor of {factor:g} (a slope <= 0 counts as a ratio of {RATIO_FLOOR:g}).",
            with_exclusions(v, _censored(t_sb)),
            {"batch_sizes": bs, "mean_escape_steps": nanmean(t_sb, 0), "sde_steps": pred_sb,
             "slope_log_steps_per_log_batch": summarize(slope_sb), "sde_slope": sde_sb,
             "ratio_slope_over_sde": summarize(slope_sb / sde_sb),
             "escaped_fraction_min": _nanmin(self.S["saddle_batch"]["escaped"])},
            figure="escape_vs_batch", regime=self.checks["saddle_batch"],
            magnitude=[Magnitude("slope of log(mean escape iterations) on log(batch)", _nanmean_or_none(slope_sb), sde_sb,
                                 f"{SDE_SADDLE_SOURCE}, fitted over the batch grid", _t_ci(slope_sb))],
        )


def _censored(*means: np.ndarray) -> dict[str, int]:
    """{reason: groups} of the groups left out (NaN mean: too few trajectories escaped)."""
    n = int(sum(np.isnan(m).sum() for m in means))
    return {CENSORED: n} if n else {}


def decide_weak(c: LiLiConfig, weak: dict[str, dict]) -> Claim:
    """E, the weak approximation itself, from plain numbers: weak[name] for name in WEAK holds "sgd" and "sde"
    (groups x trajectories escape steps, NaN where censored at "max_steps") and "eta_curv" (eta x |curvature|)."""
    rules, wk = c.rules, c.weak
    parts, measured, mags = {}, {}, []
    for name, d in weak.items():
        sgd, sde, cap = np.asarray(d["sgd"], dtype=float), np.asarray(d["sde"], dtype=float), int(d["max_steps"])
        v = same_distribution(sgd.ravel(), sde.ravel(), margin=rules.weak_ks_margin, confidence=rules.weak_confidence,
                              censored_at=cap, names=("SGD", "SDE"))
        parts[name] = v
        mean = lambda x, cap=cap: dif.mean_escape(x, cap, 0.0)  # noqa: E731  (censored: the exponential MLE)
        ratios = np.array([mean(b) / mean(a) for a, b in zip(sgd, sde)])  # per group (seed): the SDE's / SGD's
        pooled = mean(sde.ravel()) / mean(sgd.ravel())
        measured[name] = {
            "ks_distance": v.estimate, "ks_distance_ci": v.ci, "ks_p": v.details.get("ks_p"),
            "trajectories": {"SGD": int(sgd.size), "SDE": int(sde.size)}, "censored_at_step": cap,
            "censored_fraction": v.details["censored_fraction"],
            "mean_escape_steps_sgd": mean(sgd.ravel()), "mean_escape_steps_sde": mean(sde.ravel()),
            "ratio_mean_sde_over_sgd": pooled, "ratio_mean_sde_over_sgd_per_group": summarize(ratios),
            "eta_x_curvature": float(d["eta_curv"]),
        }
        label = WEAK_LABELS[name]
        mags += [magnitude(f"{label}: KS distance between SGD's and the SDE's escape steps", v, 0.0,
                           "Li & Li's weak approximation: one distribution"),
                 Magnitude(f"{label}: mean escape steps, SDE / SGD", pooled if math.isfinite(pooled) else None, 1.0,
                           "Li & Li's weak approximation (interval: t over groups)", _t_ci(ratios))]
    e_well = 2 * wk.dV * wk.batch / (wk.eta * wk.sigma ** 2)
    verdict = all_of(parts, what="both settings (the saddle and the well)")
    return Claim(
        "weak_approximation",
        f"SGD escapes when the SDE that approximates it does (dX = -grad V dt + sqrt(eta / m) sigma dW, time t = k eta: "
        f"Li & Li's weak approximation), as distributions, not only on average: at the saddle of B (eta x curvature "
        f"{wk.saddle_eta * c.saddle.gamma:g}) and at a shallow well (eta x curvature {wk.eta * 4 * wk.dV / wk.w ** 2:g}, "
        f"barrier {e_well:g} x the SDE's temperature eta sigma^2 / (2m)), the escape steps of SGD's trajectories and of "
        f"the SDE's (Euler-Maruyama, dt = eta / {wk.substeps}) have distributions within a two-sample Kolmogorov-Smirnov "
        f"distance of {rules.weak_ks_margin:g} of each other, with {rules.weak_confidence:.0%} confidence (DKW). The "
        f"SDE is a first-order approximation, not SGD itself: the KS test of exact equality is shown, not decisive.",
        verdict, measured, figure="weak_approximation", regime=_weak_regime(c.regime, weak), magnitude=mags,
    )


def _weak_regime(reg: Regime, weak: dict[str, dict]) -> list[RegimeCheck]:
    """E's regime: enough escapes in every SGD and SDE group, and steps small against the curvature."""
    esc = {f"{name}_{k}": _nanmin(np.isfinite(np.asarray(d[k], dtype=float)).mean(axis=-1)) for name, d in weak.items()
           for k in ("sgd", "sde")}
    low = min((v for v in esc.values() if v is not None), default=None)
    ec = max(float(d["eta_curv"]) for d in weak.values())
    thr = reg.max_eta_curvature
    return [
        RegimeCheck("weak_escaped",
                    f"SGD against the SDE: in every group of either, at both settings, at least {reg.min_escaped:.0%} of the "
                    f"trajectories escaped within the step limit (the distributions are compared up to it)",
                    low is not None and None not in esc.values() and low >= reg.min_escaped,
                    {"min_escaped_fraction": low, "by_setting": esc}),
        RegimeCheck("weak_diffusion",
                    f"SGD against the SDE: the step size is small against the curvature (the SDE's regime), eta x "
                    f"|curvature| <= {thr:g} at both settings",
                    math.isfinite(ec) and ec <= thr, {"max_eta_x_curvature": ec}),
    ]


_Get = Callable[[str, str], dict[int, float]]  # (condition, metric) -> {seed: value}, NaN for a run left out


def decide_training(c: LiLiConfig, values: dict[str, dict], small_curves: dict,
                    excluded: dict[str, dict[str, int]]) -> list[Claim]:
    """The three training claims from plain numbers.

    values[condition][seed] = {"train_loss", "train_acc", "test_acc", "steps"} (NaN for a run left out);
    small_curves[seed] = (epochs, train_loss at those epoch ends) of the small-batch run;
    excluded[condition] = {reason: runs}.
    """
    get: _Get = lambda cond, name: {s: float(d.get(name, np.nan)) for s, d in values.get(cond, {}).items()}  # noqa: E731
    reasons = lambda *conds: merge_counts(*(excluded.get(k, {}) for k in conds))  # noqa: E731
    noise_limited = _noise_limited(c, small_curves)
    equal_updates, fits = _large_arm_checks(c.regime, get)
    return [_settles_claim(c, get, reasons("small", "raised"), noise_limited),
            _generalizes_claim(c, get, reasons("small", "raised"), noise_limited),
            _beats_large_claim(c, get, reasons("raised", "large_updates"), [equal_updates, fits])]


def _noise_limited(c: LiLiConfig, small_curves: dict) -> RegimeCheck:
    """Regime: the small batch is noise-limited at the raise (its train loss had stopped falling)."""
    w, r = c.regime.plateau_window, c.train.raise_at
    falls, scatters = [], []
    for epochs, loss in small_curves.values():
        e, y = np.asarray(epochs, dtype=float), np.asarray(loss, dtype=float)
        sel = (e >= r - w) & (e <= r) & np.isfinite(y) & (y > 0)
        if sel.sum() < 4:
            continue
        slope, _, rss = fit_line(e[sel], np.log(y[sel]))
        falls.append(-slope)
        scatters.append(float(np.sqrt(rss / (sel.sum() - 2))))
    fall = float(np.mean(falls)) if falls else math.nan
    scatter = float(np.mean(scatters)) if scatters else math.nan
    return RegimeCheck(
        "small_batch_noise_limited",
        f"the small batch ({c.train.sb}) is noise-limited at the raise: over the {w} epochs before epoch {r:g} its train "
        f"loss falls per epoch (fitted trend of log loss) by no more than its epoch-to-epoch scatter around that trend "
        f"(means over seeds)",
        len(falls) >= 1 and fall <= scatter,
        {"fitted_fall_per_epoch_log": fall, "scatter_log": scatter, "seeds": len(falls)},
    )


def _large_arm_checks(reg: Regime, get: _Get) -> tuple[RegimeCheck, RegimeCheck]:
    """Regime: the large batch's same-updates arm made the raised run's updates and fits as well as it."""
    st_r, st_u = get("raised", "steps"), get("large_updates", "steps")
    gaps = [abs(st_u[s] / st_r[s] - 1) for s in st_r if s in st_u and np.isfinite(st_u[s]) and st_r[s] > 0]
    gap = max(gaps) if gaps else math.nan
    equal_updates = RegimeCheck(
        "large_arm_equal_updates",
        f"the large-batch arm got the raised run's number of updates (within {reg.equal_updates_tol:.0%})",
        bool(gaps) and gap <= reg.equal_updates_tol,
        {"max_relative_difference": gap, "updates_raised": _nanmean_or_none(list(st_r.values())),
         "updates_large": _nanmean_or_none(list(st_u.values()))},
    )
    acc_tr_r = _nanmean_or_none(list(get("raised", "train_acc").values()))
    acc_tr_u = _nanmean_or_none(list(get("large_updates", "train_acc").values()))
    fits = RegimeCheck(
        "large_arm_fits",
        f"the large-batch arm (same updates) fits the training set as well as the raised run, less "
        f"{100 * reg.fit_gap:g} points of train accuracy (mean over seeds): a test gap is then one of generalization",
        acc_tr_r is not None and acc_tr_u is not None and acc_tr_u >= acc_tr_r - reg.fit_gap,
        {"train_acc_large_updates": acc_tr_u, "train_acc_raised": acc_tr_r},
    )
    return equal_updates, fits


def _settles_claim(c: LiLiConfig, get: _Get, reasons: dict[str, int], noise_limited: RegimeCheck) -> Claim:
    t, rules = c.train, c.rules
    log_loss = lambda cond: {s: log_or_nan(v) for s, v in get(cond, "train_loss").items()}  # noqa: E731
    sde_drop = math.log(t.lb / t.sb)
    v = paired_difference(log_loss("small"), log_loss("raised"), direction="greater",
                          min_effect=rules.settle_fraction * sde_drop, names=("log train_loss_small", "log train_loss_raised"))
    return Claim(
        "raise_settles",
        f"Raising the batch late ({t.sb} -> {t.lb} at epoch {t.raise_at:g} of {t.epochs:g}) ends at a lower "
        f"training loss than staying at batch {t.sb}: SGD settles. The log-loss must fall by at least "
        f"{rules.settle_fraction:g} x log({t.lb}/{t.sb}), a tenth of the SDE's noise-floor drop.",
        with_exclusions(v, reasons),
        {"train_loss_small": summarize(list(get("small", "train_loss").values())),
         "train_loss_raised": summarize(list(get("raised", "train_loss").values()))},
        figure="batch_raise", regime=[noise_limited],
        magnitude=[magnitude("log(train loss small / train loss raised)", v, sde_drop,
                             "SDE prediction (Li & Li): the stationary excess loss near a minimum scales with eta / m, "
                             "so log(lb / sb) for the noise-limited part (an upper bound)")],
    )


def _generalizes_claim(c: LiLiConfig, get: _Get, reasons: dict[str, int], noise_limited: RegimeCheck) -> Claim:
    gain = c.rules.min_acc_gain
    v = paired_difference(get("raised", "test_acc"), get("small", "test_acc"), direction="greater", min_effect=gain,
                          names=("test_acc_raised", "test_acc_small"))
    return Claim(
        "raise_generalizes",
        f"Raising the batch late generalizes better than staying at batch {c.train.sb}: test accuracy higher by at least "
        f"{100 * gain:g} point(s).",
        with_exclusions(v, reasons),
        {"test_acc_raised": summarize(list(get("raised", "test_acc").values())),
         "test_acc_small": summarize(list(get("small", "test_acc").values()))},
        figure="batch_raise", regime=[noise_limited],
        magnitude=[magnitude("test accuracy, raised minus small", v, None, NO_NUMBER)],
    )


def _beats_large_claim(c: LiLiConfig, get: _Get, reasons: dict[str, int], regime: list[RegimeCheck]) -> Claim:
    gain, lb = c.rules.min_acc_gain, c.train.lb
    v = paired_difference(get("raised", "test_acc"), get("large_updates", "test_acc"), direction="greater", min_effect=gain,
                          names=("test_acc_raised", "test_acc_large_same_updates"))
    same_epochs = {s: a - get("large", "test_acc").get(s, math.nan) for s, a in get("raised", "test_acc").items()}
    return Claim(
        "raise_beats_large",
        f"Raising the batch late generalizes better than the large batch ({lb}) throughout, at equal updates: test "
        f"accuracy higher by at least {100 * gain:g} point(s) than a batch-{lb} run given the raised run's number of "
        f"updates. (The same-epochs arm, which sees the same examples in far fewer updates, is among the measured values.)",
        with_exclusions(v, reasons),
        {"test_acc_raised": summarize(list(get("raised", "test_acc").values())),
         "test_acc_large_same_updates": summarize(list(get("large_updates", "test_acc").values())),
         "test_acc_large_same_epochs": summarize(list(get("large", "test_acc").values())),
         "difference_raised_minus_large_same_epochs": summarize(list(same_epochs.values()))},
        figure="batch_raise", regime=regime,
        magnitude=[magnitude("test accuracy, raised minus large (same updates)", v, None, NO_NUMBER)],
    )


def _sim_regime(reg: Regime, use: str, d: dict) -> list[RegimeCheck]:
    esc = _nanmin(d["escaped"])
    ec = float(np.nanmax(d["eta_curv"])) if np.isfinite(d["eta_curv"]).any() else math.nan
    thr = reg.max_eta_curvature
    return [
        RegimeCheck(f"{use}_escaped",
                    f"{LABELS[use]}: in every group at least {reg.min_escaped:.0%} of the trajectories escaped within the "
                    f"step limit (so little of the mean escape time is extrapolated past the censoring)",
                    esc is not None and esc >= reg.min_escaped,
                    {"min_escaped_fraction": esc, "groups": int(np.size(d["escaped"]))}),
        RegimeCheck(f"{use}_diffusion",
                    f"{LABELS[use]}: the step size is small against the curvature (the SDE's regime): eta x |curvature| <= "
                    f"{thr:g} at every setting (SGD's stationary variance within {1 / (1 - thr / 2) - 1:.0%} of the SDE's)",
                    math.isfinite(ec) and ec <= thr, {"max_eta_x_curvature": ec}),
    ]


def _exp_vs_power(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope b of log(eta T) on 1/eta, log RSS of that exponential model, log RSS of the power law log T on
    log(1/eta)) over the finite points; x is 1/eta, y is log(mean escape steps). NaN with fewer than 4 points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 4:
        return math.nan, math.nan, math.nan
    x, y = x[ok], y[ok]
    ye = y - np.log(x)  # log(eta T), the SDE's time
    be, _, rss_e = fit_line(x, ye)
    _, _, rss_p = fit_line(np.log(x), y)
    tiny = 1e-12 * max(1.0, float((y**2).sum()))  # an exact fit: a floor, so the logs stay finite
    return be, math.log(rss_e + tiny), math.log(rss_p + tiny)


def _power_exponent(x, y) -> float:
    return slope_line(np.log(np.asarray(x, dtype=float)), y)


def _log_ratio(slopes: np.ndarray, reference: float) -> np.ndarray:
    r = np.asarray(slopes, dtype=float) / reference
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(r), np.log(np.maximum(r, RATIO_FLOOR)), np.nan)


def _t_ci(values, confidence: float = 0.95) -> tuple[float | None, float | None] | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return None
    half = float(_st.t.ppf(0.5 + confidence / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def _nanmin(a) -> float | None:
    a = np.asarray(a, dtype=float)
    return float(np.nanmin(a)) if np.isfinite(a).any() else None


def _nanmean_or_none(a) -> float | None:
    a = np.asarray(a, dtype=float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


# -- reading numbers from the store -------------------------------------------------------------------


def _sim_numbers(rows: list[list[dif.Setting]], times: dict[str, np.ndarray], chunk: int, min_escaped: float) -> dict:
    """seeds x grid arrays for `decide_simulations`: mean escape steps (NaN where too few escaped), the
    standard error of its log, the escaped fraction, and eta x |curvature|."""
    out = {n: np.full((len(rows), len(rows[0])), np.nan) for n in ("mean", "se_log", "escaped", "eta_curv")}
    for i, row in enumerate(rows):
        for j, s in enumerate(row):
            steps = times[_sim_id(s, chunk)[0]]
            ok = np.isfinite(steps)
            out["mean"][i, j] = dif.mean_escape(steps, s.max_steps, min_escaped)
            out["escaped"][i, j] = ok.mean()
            out["eta_curv"][i, j] = _eta_curvature(s)
            n = int(ok.sum())
            if n >= 2 and ok.all():
                out["se_log"][i, j] = float(steps.std(ddof=1) / steps.mean() / math.sqrt(n))
            elif n >= 1:  # censored: the exponential MLE's relative standard error
                out["se_log"][i, j] = 1 / math.sqrt(n)
    return out


def _weak_numbers(c: LiLiConfig, cells: dict[str, list[list[dif.Setting]]], times: dict[str, np.ndarray],
                  sde_times: dict[str, np.ndarray]) -> dict[str, dict]:
    """`decide_weak`'s numbers: each setting's SGD and SDE escape steps, groups (seeds) x trajectories."""
    out = {}
    for name, use in WEAK.items():
        col = [row[0] for row in cells[use]]
        out[name] = {"sgd": np.stack([times[_sim_id(s, c.sim.chunk)[0]] for s in col]),
                     "sde": np.stack([sde_times[_sim_id(s, c.weak.chunk, c.weak.substeps)[0]] for s in col]),
                     "max_steps": col[0].max_steps, "eta_curv": _eta_curvature(col[0])}
    return out


def _training_numbers(ctx: Analysis):
    """values[condition][seed] (NaN for excluded runs), the small runs' epoch curves, exclusions by reason,
    and every condition's curves for the figure."""
    by = {k: [r for r in ctx.runs if r.tags.get("condition") == k] for k in CONDITIONS}
    values: dict[str, dict] = {}
    excluded: dict[str, dict[str, int]] = {}
    for k, runs in by.items():
        excluded[k] = ctx.exclusions(runs)
        values[k] = {}
        for r in sorted(runs, key=seed_of):
            f = ctx.final_if_used(r)
            values[k][seed_of(r)] = {n: float(f.get(n, np.nan)) for n in ("train_loss", "train_acc", "test_acc", "steps")}
    curves = {k: _epoch_curves(ctx, [r for r in runs if ctx.usable(r)], ("train_loss", "test_acc")) for k, runs in by.items()}
    small_curves = {}
    if curves.get("small") is not None:
        steps, grid, _ = curves["small"]
        usable = sorted([r for r in by["small"] if ctx.usable(r)], key=seed_of)
        for i, r in enumerate(usable):
            small_curves[seed_of(r)] = (np.arange(len(steps), dtype=float), grid["train_loss"][i])
    return values, small_curves, excluded, curves


def _epoch_curves(ctx: Analysis, runs, names):
    """(updates at each epoch end 0..E, {metric: seeds x epochs}, updates at the start of epoch raise_at) of
    runs sharing one plan, or None without runs."""
    if not runs:
        return None
    runs = sorted(runs, key=seed_of)
    plan = epoch_plan(runs[0], train_size(runs[0].data))
    ends = np.concatenate([[0], np.cumsum([k for _, k in plan])])
    raise_step = math.nan
    for start, _ in runs[0].train.batch_schedule:
        raise_step = float(ends[min(int(math.ceil(start)), len(ends) - 1)])
    grids = {n: np.full((len(runs), len(ends)), np.nan) for n in names}
    for i, r in enumerate(runs):
        for n in names:
            steps, vals = ctx.series(r, n)
            at = dict(zip(steps.astype(int).tolist(), vals.tolist()))
            grids[n][i] = [at.get(int(e), np.nan) for e in ends]
    return ends.astype(float), grids, raise_step


def raised_updates(t: BatchRaise, n_train: int) -> int:
    """Updates of the raised run: raise_at epochs at the small batch, the rest at the large one."""
    per = lambda b: math.ceil(n_train / min(b, n_train))  # noqa: E731
    full = int(math.floor(t.epochs))
    total = sum(per(t.lb if e >= t.raise_at else t.sb) for e in range(full))
    frac = t.epochs - full
    if frac > 0:
        total += max(1, round(frac * per(t.lb if full >= t.raise_at else t.sb)))
    return int(total)


# -- simulation cells, cached in the store ----------------------------------------------------------


def _cells(c: LiLiConfig, seeds: list[int]) -> dict[str, list[list[dif.Setting]]]:
    """Every simulated setting, as seeds x grid lists per use."""
    sim, mn, sh, sd, wk = c.sim, c.minimum, c.sharp, c.saddle, c.weak
    common = dict(n_examples=sim.n_examples, n_traj=sim.n_traj, replace=sim.replace)

    def well(w, eta, m, sigma, max_steps, seed, dV=mn.dV):
        return dif.Setting("cliff_well", {"dV": float(dV), "w": float(w)}, eta=float(eta), batch=int(m),
                           sigma=float(sigma), max_steps=int(max_steps), seed=seed, **common)

    def saddle(eta, m, seed):
        return dif.Setting("saddle", {"gamma": float(sd.gamma), "h": float(sd.h), "r": float(sd.r)},
                           eta=float(eta), batch=int(m), sigma=float(sd.sigma), max_steps=int(sd.max_steps),
                           seed=seed, **common)

    return {
        "minimum": [[well(mn.w, 1 / ie, mn.batch, mn.sigma, mn.max_steps, s) for ie in mn.inv_eta] for s in seeds],
        "sharp": [[well(sh.w, sh.eta, m, sh.sigma, sh.max_steps, s) for m in sh.batches] for s in seeds],
        "flat_vs_sharp": [[well(mn.w, sh.eta, sh.vs_flat_batch, sh.sigma, sh.max_steps, s),
                           well(sh.w, sh.eta, sh.vs_flat_batch, sh.sigma, sh.max_steps, s)] for s in seeds],
        "saddle": [[saddle(e, sd.batch, s) for e in sd.etas] for s in seeds],
        "saddle_batch": [[saddle(sd.batch_eta, m, s) for m in sd.batches] for s in seeds],
        # E: one SGD group per seed at each weak-approximation setting (the saddle's is B's group at that eta)
        "weak_saddle": [[saddle(wk.saddle_eta, sd.batch, s)] for s in seeds],
        "weak_well": [[well(wk.w, wk.eta, wk.batch, wk.sigma, wk.well_max_steps, s, dV=wk.dV)] for s in seeds],
    }


def _sim_id(s: dif.Setting, chunk: int, substeps: int | None = None) -> tuple[str, dict]:
    """The pseudo-run's id and stored spec: a hash of everything that determines the result. With `substeps`,
    the setting's SDE (`dif.simulate_sde`) instead of SGD; SGD's specs are unchanged by it."""
    spec = {"kind": "simulation", "simulator": "batchscope.diffusion", "sim_version": SIM_VERSION, "chunk": chunk,
            **s.to_dict()}
    if substeps is not None:
        spec.update(simulator="batchscope.diffusion.simulate_sde", sde_version=SDE_VERSION, substeps=substeps)
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return "sim-" + hashlib.sha256(text.encode()).hexdigest()[:16], spec


def _escape_times(ctx: Analysis, settings: list[dif.Setting], chunk: int, substeps: int | None = None,
                  wait_s: float = 900.0) -> dict[str, np.ndarray]:
    """run id -> every trajectory's escape step (NaN: censored), read from the store; settings not stored
    yet are simulated (together) and stored first. A setting another process is simulating is waited for.
    With `substeps`: the settings' SDEs (`dif.simulate_sde`), not SGD."""
    store = ctx.store
    items = {rid: (spec, s) for s in settings for rid, spec in [_sim_id(s, chunk, substeps)]}
    ids = {rid: s for rid, (_, s) in items.items()}

    def simulate(todo: list[dif.Setting]) -> list[np.ndarray]:
        return (dif.simulate(todo, chunk=chunk) if substeps is None
                else dif.simulate_sde(todo, substeps=substeps, chunk=chunk))

    def record(rid: str, s: dif.Setting, steps: np.ndarray) -> dict:
        store.log_metrics_many(rid, [(i, None, {"escape_step": float(v)}) for i, v in enumerate(steps)])
        ok = np.isfinite(steps)
        final = {"escaped_fraction": float(ok.mean()), "steps": float(np.nanmax(steps)) if ok.any() else float(s.max_steps)}
        if ok.any():  # a summary for `batchscope runs`; the analysis recomputes it from the stored steps
            final["mean_escape"] = dif.mean_escape(steps, s.max_steps, 0.0)
        return final

    simulated(store, items, SIM_GROUP, simulate, record, wait_s)
    out = {}
    for rid, s in ids.items():
        pts = store.metrics(rid, ["escape_step"])["escape_step"]
        if len(pts) != s.n_traj:
            raise BatchscopeError(f"simulation {rid}: {len(pts)} of {s.n_traj} trajectories stored; reset it to recompute")
        out[rid] = np.array([v for _, v in pts], dtype=float)
    return out


def _prediction(s: dif.Setting) -> float:
    if s.potential == "cliff_well":
        return dif.kramers_escape_steps(s.params["dV"], s.params["w"], s.eta, s.sigma, s.batch)
    return dif.saddle_escape_steps(s.params["gamma"], s.params["r"], s.eta, s.sigma, s.batch)


def _eta_curvature(s: dif.Setting) -> float:
    """eta x the largest |curvature| of the potential (the well's h = 4 dV / w^2; the saddle's gamma and h)."""
    if s.potential == "cliff_well":
        return s.eta * 4 * s.params["dV"] / s.params["w"] ** 2
    return s.eta * max(abs(s.params["gamma"]), abs(s.params["h"]))


def _shape(s: dif.Setting) -> str:
    if s.potential == "cliff_well":
        return f"dV={s.params['dV']:g}, h={4 * s.params['dV'] / s.params['w'] ** 2:g}"
    return f"curvature -{s.params['gamma']:g}, r={s.params['r']:g}"
