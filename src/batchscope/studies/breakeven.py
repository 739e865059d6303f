"""Jastrzebski et al. 2020, "The break-even point on optimization trajectories of deep neural networks".

Plain SGD at two learning rates (at one batch size) and at two batch sizes (at the larger learning rate),
with and without batch norm, and (at quick scale) on a recurrent network, an LSTM on a generated sequence task
(the paper also used an LSTM); along each trajectory, densely early: lambda_1^H (top Hessian eigenvalue),
lambda_1^K and tr K (gradient second-moment matrix) and K's conditioning lambda_k / lambda_1, measured by
probes on a fixed subset of the training set.

The paper's claims are comparisons *after the break-even point*, the step from which SGD is unstable
along the top Hessian direction. Whether a run got there is a regime check, not a claim: the reference
run (the larger learning rate at the larger batch, shared by both comparisons) must bring lambda_1^H up
to at least 0.9 x 2/eta and keep it near there. The checks are read per seed: a seed out of the regime is
left out of the comparisons (counted with its reason), and with fewer than 80% of the seeds in it every claim
the check gates is `untested`.

Runs are compared where they made the same progress (matched training loss, papers.md: "compare runs
at matched training accuracy, not only at equal epochs"), not at equal steps: a smaller learning rate
moves more slowly, so at equal steps it is simply earlier on the same path.

`decide` turns plain trajectories into claims (no store, no torch) and is what the rules' tests feed;
`Breakeven.analyze` only reads the store into `Trajectory` objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from matplotlib.ticker import NullFormatter

from ..report.claims import Claim, Magnitude
from ..report.figures import line_with_band, new_figure
from ..spec import SweepSpec
from ..stats import RegimeCheck, Verdict, all_of, paired_difference, summarize
from .base import Analysis, Options, ScaledConfig, Study, count_reasons, magnitude, merge_counts, with_exclusions

METRICS = ("hessian_lambda_1", "K_lambda_1", "K_trace", "K_condition_k")
SYMBOL = {"hessian_lambda_1": "lambda_1^H", "K_lambda_1": "lambda_1^K", "K_condition_k": "lambda_k^K / lambda_1^K"}

# -- thresholds, stated in advance ---------------------------------------------------------------
# Break-even passed: the reference run's lambda_1^H reaches REACH x 2/eta at some probe step >= 1 (step 0,
# the shared initialization, never counts) and stays at or above NEAR x 2/eta for STAY consecutive probe
# points from there (the crossing point included). With mini-batch noise SGD settles below 2/eta (the
# noisier the lower), so "near" is within a factor of 2 below the limit, not on it.
REACH = 0.9
NEAR = 0.5
STAY = 4
# Matched-progress windows: the comparison after break-even uses training-loss levels from the loss at the
# break-even point down to the lowest loss both runs reach; that lowest common loss must be at most
# WINDOW x the loss at break-even (both runs go at least 10% further down than the break-even point).
# The "before" window (for the separation claim) likewise runs from the loss at step 1 down to the loss at
# break-even, which must be at most WINDOW x the former.
WINDOW = 0.9
LEVELS = 8  # training-loss levels, log-spaced, in each window
# A regime check is per seed: a seed that misses it is left out of the comparisons it gates (counted with that
# reason), and the check passes when at least SHARE of the seeds and at least MIN_SEEDS of them are in the regime
# (the share kaur.py asks of fitted runs). With every seed required, one seed in ten that just misses (a before
# window of 0.90, one spike that does not stay) turned every claim of a network kind `untested` in one seed set
# and not in the other.
SHARE = 0.8
MIN_SEEDS = 3
# Minimal effect: a ratio of 1.25 (log-ratio >= log 1.25 = 0.223). The paper's Fig. 1 (SimpleCNN, CIFAR-10,
# eta 0.1 vs 0.01) shows lambda_1^K and lambda_1^H several times lower for the larger learning rate, i.e.
# a ratio of 2 at the very least; 1.25 is a third of that on the log scale, well short of the paper's
# effect yet large enough that a few percent of probe noise cannot pass for it. The same ratio is asked of
# the conditioning lambda_k^K / lambda_1^K (better by 25%) and of the separation after break-even.
MIN_RATIO = 1.25
MIN_LOG = math.log(MIN_RATIO)
FIG1 = ("Jastrzebski et al. 2020, Fig. 1 (SimpleCNN on CIFAR-10, SGD, eta 0.1 vs 0.01): the curves of the larger "
        "learning rate lie several times lower after the break-even point; the text gives no number")
FIG_COND = ("Jastrzebski et al. 2020, Fig. 1 and Conjecture 2: lambda_*^K / lambda_1^K is larger (better conditioned) "
            "for a larger learning rate or a smaller batch; the text gives no number")


@dataclass
class Trajectory:
    """One run's probe points: steps, the training loss at those steps, and each probed metric."""

    step: np.ndarray
    train_loss: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.step = np.asarray(self.step, dtype=float)
        order = np.argsort(self.step, kind="stable")
        self.step = self.step[order]
        self.train_loss = np.asarray(self.train_loss, dtype=float)[order]
        self.values = {k: np.asarray(v, dtype=float)[order] for k, v in self.values.items()}
        for k, v in {"train_loss": self.train_loss, **self.values}.items():
            if v.shape != self.step.shape:
                raise ValueError(f"trajectory: {k} has {v.shape}, steps {self.step.shape}")

    @property
    def after_init(self) -> np.ndarray:
        """Indices of the points after the first update (step 0, the shared initialization, is left out)."""
        return np.nonzero(self.step >= 1)[0]


@dataclass(frozen=True)
class Setting:
    """What was compared: learning rates and batch sizes (for the statements and the 2/eta limit)."""

    lr_small: float
    lr_large: float
    batch: int
    batch_small: int
    label: str = ""  # "", " (with batch norm)" or " (LSTM)": appended to the statements


# Roles: "small_lr" and "large_lr" at batch `batch`; "small_batch" at lr_large. "large_lr" is the reference
# of both comparisons: the larger learning rate in one, the larger batch in the other.
ROLES = ("small_lr", "large_lr", "small_batch")
Runs = Mapping[str, Mapping[int, "Trajectory | str"]]  # role -> seed -> trajectory, or why the run is left out


# -- trajectory arithmetic --------------------------------------------------------------------------
def breakeven_index(t: Trajectory, lr: float) -> int | None:
    """First probe point after initialization where lambda_1^H >= REACH x 2/lr (None: never)."""
    h = t.values["hessian_lambda_1"]
    hit = [i for i in t.after_init if np.isfinite(h[i]) and h[i] >= REACH * 2.0 / lr]
    return hit[0] if hit else None


def points_near(t: Trajectory, lr: float, start: int) -> int:
    """Consecutive probe points from `start` on (included) with lambda_1^H >= NEAR x 2/lr."""
    h = t.values["hessian_lambda_1"]
    n = 0
    for i in range(start, len(h)):
        if not (np.isfinite(h[i]) and h[i] >= NEAR * 2.0 / lr):
            break
        n += 1
    return n


def lowest_loss(t: Trajectory) -> float:
    idx = t.after_init
    return float(np.nanmin(t.train_loss[idx])) if len(idx) else math.nan


def first_loss(t: Trajectory) -> float:
    idx = t.after_init
    return float(t.train_loss[idx[0]]) if len(idx) else math.nan


def at_loss(t: Trajectory, metric: str, levels: np.ndarray) -> np.ndarray:
    """`metric` where the run first gets down to each training-loss level (interpolated between probe points,
    geometrically in loss and value); NaN for a level the run never reaches."""
    idx = t.after_init
    loss, v = t.train_loss[idx], t.values[metric][idx]
    out = np.full(len(levels), np.nan)
    for j, lev in enumerate(levels):
        below = np.nonzero(loss <= lev * (1 + 1e-12))[0]
        if not len(below):
            continue
        i = below[0]
        if i == 0 or not loss[i - 1] > lev:
            out[j] = v[i]
            continue
        w = (math.log(loss[i - 1]) - math.log(lev)) / (math.log(loss[i - 1]) - math.log(loss[i]))
        a, b = v[i - 1], v[i]
        out[j] = math.exp((1 - w) * math.log(a) + w * math.log(b)) if a > 0 and b > 0 else (1 - w) * a + w * b
    return out


def peak_until(t: Trajectory, metric: str, level: float) -> float:
    """The maximum attained by `metric` over the points after initialization up to the first one at training loss
    <= level, read as the highest level it holds at two consecutive probe points (max of min(v_i, v_i+1)). At the
    larger learning rate lambda_1^K and lambda_1^H spike (catapults) for a few steps; whether a sparse probe lands
    on a spike is chance, so a single probe's value does not set the maximum (NaN with fewer than two points)."""
    idx = t.after_init
    loss, v = t.train_loss[idx], t.values[metric][idx]
    below = np.nonzero(loss <= level * (1 + 1e-12))[0]
    if not len(below):
        return math.nan
    v = v[: below[0] + 1]
    if len(v) < 2:
        return math.nan
    return float(np.nanmax(np.minimum(v[:-1], v[1:])))


@dataclass
class Pair:
    """One seed's comparison: P is the run the paper predicts to be flatter (larger lr / smaller batch), Q the
    other; break-even is read on the reference run."""

    p: Trajectory
    q: Trajectory
    ref: Trajectory
    lr_ref: float

    def __post_init__(self) -> None:
        i = breakeven_index(self.ref, self.lr_ref)
        self.loss_be = float(self.ref.train_loss[i]) if i is not None else math.nan
        self.loss_common = max(lowest_loss(self.p), lowest_loss(self.q))
        self.loss_start = min(first_loss(self.p), first_loss(self.q))

    @property
    def after_levels(self) -> np.ndarray | None:
        lo, hi = self.loss_common, self.loss_be
        return np.geomspace(hi, lo, LEVELS) if np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi else None

    @property
    def before_levels(self) -> np.ndarray | None:
        lo, hi = self.loss_be, self.loss_start
        return np.geomspace(hi, lo, LEVELS) if np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi else None

    def log_ratio_at_loss(self, metric: str, levels: np.ndarray | None, flatter_larger: bool = False) -> float:
        """Mean over the loss levels of log(Q / P) (log(P / Q) when the flatter run's value should be larger)."""
        if levels is None:
            return math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.log(at_loss(self.q, metric, levels) / at_loss(self.p, metric, levels))
        r = -r if flatter_larger else r
        return float(np.mean(r)) if len(r) and np.all(np.isfinite(r)) else math.nan

    def log_ratio_peak(self, metric: str) -> float:
        """log(max attained by Q / max attained by P), both up to the lowest training loss both reach."""
        lev = self.loss_common
        a, b = peak_until(self.q, metric, lev), peak_until(self.p, metric, lev)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log(a / b)) if a > 0 and b > 0 else math.nan

    def log_ratio_last(self, metric: str) -> float:
        """log(Q / P) at the last probe step both share (equal steps; shown, not tested)."""
        common = np.intersect1d(self.p.step, self.q.step)
        if not len(common):
            return math.nan
        s = common[-1]
        a = self.q.values[metric][self.q.step == s][0]
        b = self.p.values[metric][self.p.step == s][0]
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log(a / b)) if a > 0 and b > 0 else math.nan


# -- the decision: trajectories in, claims out --------------------------------------------------------
def _usable(runs: Runs, role: str) -> dict[int, Trajectory]:
    return {s: t for s, t in runs.get(role, {}).items() if isinstance(t, Trajectory)}


def _left_out(runs: Runs, *roles: str) -> dict[str, int]:
    """{reason: number of distinct runs} left out among the runs of `roles`."""
    return count_reasons(why for role in roles for why in runs.get(role, {}).values() if isinstance(why, str))


def breakeven_check(kind: str, runs: Runs, s: Setting) -> RegimeCheck:
    """Break-even passed on the reference run (larger learning rate, larger batch), per usable seed."""
    limit = 2.0 / s.lr_large
    per_seed: dict[int, dict] = {}
    for seed, t in sorted(_usable(runs, "large_lr").items()):
        h = t.values["hessian_lambda_1"][t.after_init]
        i = breakeven_index(t, s.lr_large)
        near = points_near(t, s.lr_large, i) if i is not None else 0
        last = i + near - 1 if i is not None and near else None
        per_seed[seed] = {
            "max_lambda_over_limit": float(np.nanmax(h) / limit) if len(h) else math.nan,
            "breakeven_step": float(t.step[i]) if i is not None else None,
            "points_near": near,
            "near_until_step": float(t.step[last]) if last is not None else None,
            "passed": i is not None and near >= STAY,
        }
    n_pass = sum(v["passed"] for v in per_seed.values())
    return RegimeCheck(
        f"{kind}_breakeven_passed",
        f"break-even passed: with eta = {s.lr_large:g} at batch {s.batch}{s.label}, lambda_1^H reaches at least "
        f"{REACH:g} x 2/eta = {REACH * limit:.3g} at a probe step >= 1 and stays at or above {NEAR:g} x 2/eta = "
        f"{NEAR * limit:.3g} for at least {STAY} consecutive probe points from there, in at least {SHARE:.0%} of the "
        f"usable seeds (and >= {MIN_SEEDS}); a seed that misses it is left out of the comparisons",
        _enough(n_pass, len(per_seed)),
        {"limit_2_over_eta": limit, "seeds_passed": n_pass, "seeds_usable": len(per_seed),
         "left_out": _left_out(runs, "large_lr"), "per_seed": per_seed},
    )


def _enough(n_pass: float, n: int) -> bool:
    return n_pass >= MIN_SEEDS and n_pass >= SHARE * n


def _in_regime(pairs: dict[int, Pair], checks: list[RegimeCheck]) -> tuple[dict[int, Pair], dict[str, int]]:
    """The pairs whose seed passed every check, and {reason: seeds left out} (each seed under its first miss)."""
    kept: dict[int, Pair] = {}
    left: dict[str, int] = {}
    for seed, pr in pairs.items():
        miss = next((c.id for c in checks if not c.measured["per_seed"].get(seed, {}).get("passed", False)), None)
        if miss is None:
            kept[seed] = pr
        else:
            why = f"seed out of the regime ({miss})"
            left[why] = left.get(why, 0) + 1
    return kept, left


def _pairs(runs: Runs, flatter: str, other: str, lr_ref: float) -> dict[int, Pair]:
    p, q, ref = _usable(runs, flatter), _usable(runs, other), _usable(runs, "large_lr")
    return {seed: Pair(p[seed], q[seed], ref[seed], lr_ref) for seed in sorted(set(p) & set(q) & set(ref))}


def window_check(cid: str, what: str, pairs: dict[int, Pair], before: bool = False) -> RegimeCheck:
    per_seed = {}
    for seed, pr in pairs.items():
        if before:
            ratio = pr.loss_be / pr.loss_start
        else:
            ratio = pr.loss_common / pr.loss_be
        per_seed[seed] = {"loss_at_step_1": pr.loss_start, "loss_at_breakeven": pr.loss_be,
                          "lowest_common_loss": pr.loss_common, "ratio": ratio,
                          "passed": bool(np.isfinite(ratio) and ratio <= WINDOW)}
    n_pass = sum(v["passed"] for v in per_seed.values())
    if before:
        cond = (f"{what}: a stretch before the break-even point to compare at matched training loss: the training "
                f"loss at break-even is at most {WINDOW:g} x the loss after the first update, in at least {SHARE:.0%} of "
                f"the paired seeds (and >= {MIN_SEEDS}); a seed that misses it is left out of the comparison")
    else:
        cond = (f"{what}: both runs get past the break-even point in training loss: the lowest loss both reach is at "
                f"most {WINDOW:g} x the loss at break-even, in at least {SHARE:.0%} of the paired seeds (and >= "
                f"{MIN_SEEDS}); a seed that misses it is left out of the comparison")
    return RegimeCheck(cid, cond, _enough(n_pass, len(per_seed)),
                       {"seeds_passed": n_pass, "seeds_paired": len(per_seed), "per_seed": per_seed})


def _ratio_test(values: dict[int, float], excluded: int, names: tuple[str, str]) -> Verdict:
    """Claim mean log-ratio > 0 with at least MIN_LOG (ratio MIN_RATIO), paired over seeds."""
    return paired_difference(values, {k: 0.0 for k in values}, direction="greater", min_effect=MIN_LOG,
                             excluded=excluded, names=names)


def _magnitude(quantity: str, v: Verdict, source: str) -> Magnitude:
    """A ratio from a verdict on its log (the paper publishes no number)."""
    return magnitude(quantity, v, None, source, math.exp)


def decide(kind: str, runs: Runs, s: Setting) -> list[Claim]:
    """The claims of one network kind from its trajectories (role -> seed -> Trajectory, or why the run is left out)."""
    be = breakeven_check(kind, runs, s)
    lr_pairs = _pairs(runs, "large_lr", "small_lr", s.lr_large)
    b_pairs = _pairs(runs, "small_batch", "large_lr", s.lr_large)
    lr_what = f"eta {s.lr_small:g} vs {s.lr_large:g} at batch {s.batch}{s.label}"
    b_what = f"batch {s.batch_small} vs {s.batch} at eta {s.lr_large:g}{s.label}"
    win_lr = window_check(f"{kind}_lr_window", lr_what, lr_pairs)
    win_b = window_check(f"{kind}_batch_window", b_what, b_pairs)
    win_before = window_check(f"{kind}_lr_window_before", lr_what, lr_pairs, before=True)
    lr_kept, lr_out = _in_regime(lr_pairs, [be, win_lr])
    b_kept, b_out = _in_regime(b_pairs, [be, win_b])
    comparisons = (
        _Comparison(kind, "lr", lr_kept, [be, win_lr], merge_counts(_left_out(runs, "small_lr", "large_lr"), lr_out),
                    f"A larger learning rate ({s.lr_large:g} vs {s.lr_small:g}, batch {s.batch})",
                    f"eta {s.lr_small:g}", f"eta {s.lr_large:g}", s.label),
        _Comparison(kind, "batch", b_kept, [be, win_b], merge_counts(_left_out(runs, "small_batch", "large_lr"), b_out),
                    f"A smaller batch ({s.batch_small} vs {s.batch}, eta {s.lr_large:g})",
                    f"batch {s.batch}", f"batch {s.batch_small}", s.label),
    )
    claims = [claim for cmp in comparisons for claim in
              (*(_lower_claim(cmp, metric) for metric in ("hessian_lambda_1", "K_lambda_1")), _conditioning_claim(cmp))]
    claims.append(_separation_claim(kind, runs, lr_pairs, s, [be, win_lr, win_before]))
    return claims


@dataclass(frozen=True)
class _Comparison:
    """One comparison of a network kind: P (named p_name) is predicted flatter than Q (q_name), paired by seed."""

    kind: str
    what: str  # "lr" or "batch"
    pairs: dict[int, Pair]
    regime: list[RegimeCheck]  # break-even passed, and the matched-progress window
    left: dict[str, int]  # runs left out, by reason
    subject: str  # the statement's subject
    q_name: str
    p_name: str
    label: str  # "", " (with batch norm)" or " (LSTM)"


def _lower_claim(c: _Comparison, metric: str) -> Claim:
    """P gives a lower `metric` after break-even: its maximum attained, and at matched training loss."""
    n_left, sym = sum(c.left.values()), SYMBOL[metric]
    peak = {seed: pr.log_ratio_peak(metric) for seed, pr in c.pairs.items()}
    after = {seed: pr.log_ratio_at_loss(metric, pr.after_levels) for seed, pr in c.pairs.items()}
    names = (f"log({sym} {c.q_name} / {c.p_name})", "0")
    parts = {"maximum attained": _ratio_test(peak, n_left, names),
             "at matched training loss after break-even": _ratio_test(after, n_left, names)}
    v = with_exclusions(all_of(parts, what="both the maximum attained and the value at matched loss",
                               excluded=n_left), c.left)
    return Claim(
        f"{c.kind}_{c.what}_lower_{metric}",
        f"{c.subject} gives a lower {sym} after the break-even point{c.label}: a lower maximum attained value "
        f"(held at two consecutive probe points, up to the training loss both runs reach) and lower values at "
        f"matched training loss after the break-even point, each by a factor of at least {MIN_RATIO:g}.",
        v,
        {"log_ratio_max_attained": summarize(list(peak.values())),
         "log_ratio_at_matched_loss_after_breakeven": summarize(list(after.values())),
         "log_ratio_at_equal_last_step (not tested)":
             summarize([pr.log_ratio_last(metric) for pr in c.pairs.values()])},
        figure=f"{c.kind}_trajectories", regime=c.regime,
        magnitude=[_magnitude(f"{sym} ratio {c.q_name} / {c.p_name}, maximum attained", parts["maximum attained"], FIG1),
                   _magnitude(f"{sym} ratio {c.q_name} / {c.p_name}, at matched training loss after break-even",
                              parts["at matched training loss after break-even"], FIG1)],
    )


def _conditioning_claim(c: _Comparison) -> Claim:
    """P gives better conditioning of K (lambda_k / lambda_1) at matched training loss after break-even."""
    cond = {seed: pr.log_ratio_at_loss("K_condition_k", pr.after_levels, flatter_larger=True)
            for seed, pr in c.pairs.items()}
    v = with_exclusions(_ratio_test(cond, sum(c.left.values()), (f"log(condition {c.p_name} / {c.q_name})", "0")), c.left)
    bn_clause = (" With batch norm this is the paper's point that a small learning rate still gives bad "
                 "conditioning." if c.kind == "bn" and c.what == "lr" else "")
    return Claim(
        f"{c.kind}_{c.what}_conditioning",
        f"{c.subject} gives better conditioning of K after the break-even point{c.label}: lambda_k^K / lambda_1^K "
        f"larger by a factor of at least {MIN_RATIO:g} at matched training loss.{bn_clause}",
        v, {"log_ratio_at_matched_loss_after_breakeven": summarize(list(cond.values()))},
        figure=f"{c.kind}_conditioning", regime=c.regime,
        magnitude=[_magnitude(f"lambda_k^K / lambda_1^K ratio {c.p_name} / {c.q_name}, at matched training loss "
                              "after break-even", v, FIG_COND)],
    )


def _separation_claim(kind: str, runs: Runs, lr_pairs: dict[int, Pair], s: Setting, regime: list[RegimeCheck]) -> Claim:
    """The effect becomes visible after the break-even point: before it the runs share the path (at matched loss)."""
    lr_pairs, out = _in_regime(lr_pairs, regime)
    left = merge_counts(_left_out(runs, "small_lr", "large_lr"), out)
    before = {seed: pr.log_ratio_at_loss("hessian_lambda_1", pr.before_levels) for seed, pr in lr_pairs.items()}
    after = {seed: pr.log_ratio_at_loss("hessian_lambda_1", pr.after_levels) for seed, pr in lr_pairs.items()}
    v = with_exclusions(paired_difference(after, before, direction="greater", min_effect=MIN_LOG,
                                          excluded=sum(left.values()), names=("after", "before")), left)
    return Claim(
        f"{kind}_lr_separation",
        f"The learning rate's effect on lambda_1^H becomes visible after the break-even point{s.label}: at matched "
        f"training loss, log(lambda_1^H at eta {s.lr_small:g} / at eta {s.lr_large:g}) is larger after the "
        f"break-even point than before it, by at least log {MIN_RATIO:g}.",
        v, {"log_ratio_before": summarize(list(before.values())), "log_ratio_after": summarize(list(after.values()))},
        figure=f"{kind}_progress", regime=regime,
        magnitude=[_magnitude("growth of the lambda_1^H ratio across the break-even point (after / before)", v,
                              "Jastrzebski et al. 2020, Fig. 1: the curves coincide early and part after the break-even "
                              "point; the text gives no number")],
    )


@dataclass(frozen=True)
class BreakevenConfig(ScaledConfig):
    """Every choice of the reproduction, by scale (tests shrink it: tests/tiny_configs.py)."""

    data: Mapping[str, Any]  # the sweeps' data section
    models: Mapping[str, Mapping[str, Any]]  # network kind ("plain", "bn", "rnn") -> its model section
    lrs: tuple[float, float]  # the small and the large learning rate (x bn_lr_factor for the BN net)
    batch: int  # the learning rates are compared at this batch ...
    batches: tuple[int, ...]  # ... and these batch sizes at the larger learning rate
    bn_lr_factor: float
    points: int  # probe (and log) points along each run
    subset: int  # training examples the probes measure on
    measure_batch: int
    k: int  # eigenvalues of K computed (lambda_k / lambda_1 is its conditioning)
    # the budget: `steps` updates (every batch size alike) or `epochs`
    steps: int | None = None
    epochs: float | None = None
    # the probes' batch-norm mode: "train", each measurement batch normalized with its own statistics. Without
    # batch norm both modes define the same quantities; "eval" gets per-example gradients by a vmap over single
    # examples instead of Jacobian rows of whole batches (for the LSTM's step loop, 30x faster)
    bn_mode: str = "train"
    # per network kind, fields that differ from the ones above (a kind with its own data, learning rates, budget)
    kinds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def kind(self, kind: str) -> BreakevenConfig:
        """The configuration `kind` runs under: this one with the kind's own fields."""
        own = dict(self.kinds.get(kind, {}))
        known = {f.name for f in fields(self)} - {"models", "kinds"}
        if set(own) - known:
            raise ValueError(f"breakeven config, kind {kind}: unknown field(s) {', '.join(sorted(set(own) - known))} "
                             f"(expected some of {', '.join(sorted(known))})")
        return replace(self, **own, kinds={})

    @classmethod
    def quick(cls, opts: Options) -> BreakevenConfig:
        # Tuned on the regime checks (break-even passed, matched-progress windows), see the notes in analyze.
        # The plain net keeps the paper's pair 0.01 / 0.1. The BN net's lambda_1^H in raw parameters starts at
        # half the plain net's and its effective learning rate falls as its weights grow, so within the budget
        # only a 3x larger pair (0.03 / 0.3) brings it to 2/eta. Batch 256 rather than 128: with the noise of
        # batch 128 the BN net's lambda_1^H settles at 0.6-0.8 x 2/eta (mini-batch noise lowers the stable
        # sharpness), short of the 0.9 the break-even check asks. 4,096 updates for every run: long enough
        # for the small learning rate to get past the larger one's break-even point in training loss (with
        # 2,048, one seed in ten fell short of the lr_window check: its common loss 0.915 x the break-even loss).
        # The small batch is 32, an 8x step in eta / B like the learning rates' 10x (the paper's Conjecture 1 is in
        # the noise, eta / B); with 64 (4x) the batch effects sat on the minimal ratio (lambda_1^H ratio 1.19-1.32)
        # and the two seed sets of the agreement bench split on them (bench/RESULTS.md, 2026-12-01). The change
        # was made after that bench, for that reason; the regime checks pass with either.
        return cls(
            data=opts.data_spec("mnist1d"),
            models={"plain": {"name": "conv1d", "width": 0.5}, "bn": {"name": "conv1d", "width": 0.5, "norm": "batch"},
                    "rnn": RNN_QUICK["model"]}, kinds={"rnn": RNN_QUICK["own"]},
            lrs=(0.01, 0.1), batch=256, batches=(32, 256), bn_lr_factor=3.0,
            steps=4096, points=20, subset=500, measure_batch=125, k=10,
        )

    @classmethod
    def paper(cls, opts: Options) -> BreakevenConfig:
        return cls(
            data=opts.data_spec("cifar10", ("cifar10", "cifar100")),
            models={"plain": {"name": "simple_cnn"}, "bn": {"name": "resnet", "depth": 32, "norm": "batch"}},
            lrs=(0.01, 0.1), batch=128, batches=(32, 128), bn_lr_factor=1.0,
            epochs=20, points=40, subset=2500, measure_batch=125, k=20,
        )


# The recurrent kind at quick scale (the paper also trained an LSTM): an LSTM (width 0.25: embedding 8, hidden 32)
# on first_marker, which of 4 marker tokens comes first in a sequence of 12 (the label needs the order and a memory
# across the sequence), with its own data, learning rates and budget; the same probes, checks and claims.
# Chosen on the regime checks alone (break-even passed, the windows after and before it), 3 seeds unless stated,
# costs in CPU seconds on one thread for the kind's 15 runs at 5 seeds (the budget: ~180, 90 s on 2 cores):
#   length 16, lr 0.03/0.3, 1,024 steps (1): break-even passed and both windows after it, but the window before it
#     failed in 2 of 3 seeds (loss at break-even 0.94, 0.97 x the loss at step 1, asked <= 0.9; 0.81 in the third):
#     lambda_1^H jumps to 2/eta as SGD leaves the chance-level plateau, before the loss has moved; ~190 s
#   length 16, lr 0.02/0.2, 1,024 steps (1): the same, before-window failed in 3 of 3 (0.94-0.95); ~180 s
#   length 12, lr 0.02/0.2, 1,024 steps (1): before-window passed (0.83-0.88), the window after break-even failed in
#     1 seed (0.93: the small learning rate too slow to get 10% past the loss at break-even); ~135 s
#   length 12, lr 0.03/0.3, 1,024 steps (2): before-window failed in 1 seed (0.92); ~135 s
#   length 12, lr 0.02/0.2, 1,536 steps (2): every check passed in seeds 0-4 (break-even at steps 70-151, 5-7
#     points near 2/eta; after-window 0.66-0.87, batch window 0.60-0.69, before-window 0.74-0.85); ~160 s. Chosen.
#     On seeds 5-9 (the seed-agreement bench's) every check but one seed's before-window (0.90, just above) passed.
#   length 12, lr 0.02/0.2, 2,048 steps (2): every check passed (before-window 0.82-0.88); ~190 s, over the budget
#   length 10, lr 0.02/0.2, 1,536 steps (2), seeds 0-9: lambda_1^H only just reaches 2/eta (at most 0.96-2.2 x),
#     break-even not passed in 1 of 10 seeds (3 points near), the window after it failed in 4 of 10 (0.93-1.09); ~130 s
# With the small batch 32 (since 2026-12-01; the checks are per seed, 80% of the seeds must pass), seeds 0-9:
#   length 12, lr 0.02/0.2, 1,536 steps: every check passed in seeds 0-4; in seeds 5-9 one seed's before-window 0.90
#     (4 of 5 pass: that seed is left out of the separation claim). Kept.
#   length 12, lr 0.015/0.15, 1,536 steps: the window after break-even failed in 2 of seeds 0-4 (0.97, 0.97); ~80 s
#   length 12, lr 0.015/0.15, 2,048 steps: break-even not passed in 1 of seeds 0-4 (a spike to 1.7 x 2/eta at step
#     83 that did not stay); every other check passed in all 10; ~95 s wall a set on 2 cores
#   length 12, lr 0.02/0.2, 2,048 steps: break-even not passed in 1 of seeds 5-9 (0.92 x); the rest passed; ~95 s
# (1) the first version of the model's step, 27% slower a step; (2) the present one. All with 20% of the training
# labels replaced: the rule itself is learnt exactly, and without noise the training loss, and lambda_1^H with it,
# fell to ~0 one or two probe points after lambda_1^H reached 2/eta (a loop of our own before this study's runs:
# length 16, forget bias 1, lr 0.1-3, one seed, 12 points; below a loss of 0.015 lambda_1^H was 0.02-0.6 x 2/eta
# and falling), while the paper compares runs in an early phase at non-zero loss. The model's forget-gate bias
# log(length) rather than 1 was chosen in that loop too: with 1, lr 0.1 sat ~300 steps on the chance plateau.
# Batch 256 (64), as the conv nets. Probes on 250 examples in "eval" mode (no batch norm: the same quantities,
# 30x faster than "train" for this model).
RNN_QUICK: dict[str, Any] = {
    "model": {"name": "lstm", "width": 0.25},
    "own": {
        "data": {"name": "first_marker", "label_noise": 0.2, "options": {"markers": 4, "distractors": 8, "length": 12}},
        "lrs": (0.02, 0.2), "batch": 256, "batches": (32, 256), "steps": 1536,
        "points": 20, "subset": 250, "measure_batch": 125, "bn_mode": "eval",
    },
}
LABELS = {"plain": "", "bn": " (with batch norm)", "rnn": " (LSTM)"}


# -- the study -------------------------------------------------------------------------------------
class Breakeven(Study):
    name = "breakeven"
    title = "The break-even point on SGD trajectories (Jastrzebski et al. 2020)"
    citation = "S. Jastrzebski, M. Szymczak, S. Fort, D. Arpit, J. Tabor, K. Cho, K. Geras. ICLR 2020."

    def config(self, opts: Options) -> BreakevenConfig:
        return BreakevenConfig.of(opts)

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        out = []
        for kind, model in self.config(opts).models.items():
            c = self.config(opts).kind(kind)
            probes = [
                {"instrument": "hessian_top", "points": c.points, "subset": c.subset,
                 "batch_size": c.measure_batch, "bn_mode": c.bn_mode, "options": {"tol": 1e-3}},
                {"instrument": "gradient_covariance", "points": c.points, "subset": c.subset,
                 "batch_size": c.measure_batch, "bn_mode": c.bn_mode, "options": {"k": c.k}},
            ]
            factor = c.bn_lr_factor if kind == "bn" else 1.0
            lo, hi = (round(lr * factor, 12) for lr in c.lrs)
            base = {
                "data": c.data, "model": model,
                "optim": {"name": "sgd", "lr": hi},
                # the budget: `steps` updates (every batch size alike) or `epochs`
                "train": {"batch_size": c.batch, "device": opts.device,
                          **({"steps": c.steps, "epochs": None} if c.steps else {"epochs": c.epochs})},
                "log": {"log_points": c.points},
                "probes": probes,
                **opts.seeding(self.default_seeds),
            }
            out.append(SweepSpec.model_validate({**base, "name": f"breakeven-{kind}-lr", "grid": {"optim.lr": [lo, hi]}}))
            # the batch sizes at the larger learning rate: its run at `batch` is the lr sweep's, the reference of both
            out.append(SweepSpec.model_validate({**base, "name": f"breakeven-{kind}-batch",
                                                 "grid": {"train.batch_size": c.batches}}))
        return out

    def _setting(self, c: BreakevenConfig, kind: str) -> Setting:
        factor = c.bn_lr_factor if kind == "bn" else 1.0
        lo, hi = (round(lr * factor, 12) for lr in c.lrs)
        small = min(b for b in c.batches if b != c.batch)
        return Setting(lo, hi, c.batch, small, LABELS.get(kind, f" ({kind})"))

    def _read(self, ctx: Analysis, kind: str, c: BreakevenConfig, s: Setting) -> dict[str, dict[int, Trajectory | str]]:
        """role -> seed -> Trajectory (or the reason the run is left out), from the store."""
        model, data = c.models[kind], c.data["name"]
        norm = model.get("norm", "none")
        mine = {r.run_id(): r for r in ctx.runs
                if r.model.name == model["name"] and r.model.norm == norm and r.data.name == data}.values()
        want = {"small_lr": (s.lr_small, s.batch), "large_lr": (s.lr_large, s.batch),
                "small_batch": (s.lr_large, s.batch_small)}
        out: dict[str, dict[int, Trajectory | str]] = {role: {} for role in ROLES}
        for r in mine:
            role = next((k for k, (lr, b) in want.items() if math.isclose(r.optim.lr, lr) and r.train.batch_size == b), None)
            if role is None:
                continue
            why = ctx.exclusion(r)
            out[role][r.seeds.init] = why if why is not None else self._trajectory(ctx, r)
        return out

    @staticmethod
    def _trajectory(ctx: Analysis, r) -> Trajectory | str:
        steps, h = ctx.series(r, "hessian_lambda_1")
        if not len(steps):
            return "no probe measurements"
        ls, lv = ctx.series(r, "train_loss")
        loss_at = dict(zip(ls.tolist(), lv.tolist()))
        values = {}
        for m in METRICS:
            s, v = ctx.series(r, m)
            at = dict(zip(s.tolist(), v.tolist()))
            values[m] = np.array([at.get(x, np.nan) for x in steps.tolist()])
        # the loop evaluates the training loss at every probe step; interpolate in case one is missing
        loss = np.array([loss_at.get(x, np.nan) for x in steps.tolist()])
        if np.isnan(loss).any() and len(ls):
            loss = np.where(np.isnan(loss), np.interp(steps, ls, lv), loss)
        return Trajectory(steps, loss, values)

    def analyze(self, ctx: Analysis) -> None:
        own_notes: list[str] = []  # after the quick scale's general note
        for kind in self.config(ctx.opts).models:
            c = self.config(ctx.opts).kind(kind)
            s = self._setting(c, kind)
            runs = self._read(ctx, kind, c, s)
            claims = decide(kind, runs, s)
            for claim in claims:
                ctx.add_claim(claim)
            self._figures(ctx, kind, s, runs)
            be = next(r for r in claims[0].regime if r.id == f"{kind}_breakeven_passed")
            if not be.passed:
                ctx.notes.append(
                    f"{kind}{s.label}: the break-even point was not passed (lambda_1^H of the run at eta {s.lr_large:g}, "
                    f"batch {s.batch}, reached {REACH:g} x 2/eta and stayed near it in {be.measured['seeds_passed']} of "
                    f"{be.measured['seeds_usable']} usable seeds), so none of its claims could be tested: they are "
                    "untested, not failed.")
            if kind == "rnn" and ctx.opts.scale == "quick":
                own_notes.append(self._rnn_note(c, s))
        if ctx.opts.scale == "quick":
            ctx.notes.insert(0,
                "Quick scale is not the paper's setting: for the plain and bn claims, a 1-D conv net (width 0.5) on "
                "MNIST-1D instead of SimpleCNN "
                "and ResNet-32 on CIFAR-10, 4,096 updates per run, batch 256 (64 for the small batch) instead of 128, "
                "probes on 500 training examples. The plain net keeps the paper's learning rates 0.01 and 0.1; the "
                "batch-norm net uses 0.03 and 0.3, because at 0.1 its lambda_1^H stays near 0.6 x 2/eta within the "
                "budget (break-even not passed), and batch 256 because with batch 128 its lambda_1^H settles at "
                "0.6-0.8 x 2/eta. The batch sizes are compared at the larger learning rate, where break-even is "
                "passed. The larger learning rate's runs go beyond the paper's early phase (65% training accuracy); "
                "comparisons use only training-loss levels both runs reach.")
        ctx.notes.extend(own_notes)

    @staticmethod
    def _rnn_note(c: BreakevenConfig, s: Setting) -> str:
        d = c.data
        o = d.get("options", {})
        task = (f"first_marker ({o['markers']} marker tokens among {o['distractors']} others, sequences of "
                f"{o['length']}; the label is the marker that comes first)"
                if d["name"] == "first_marker" and {"markers", "distractors", "length"} <= set(o) else d["name"])
        return (
            f"Beyond convolutions (the paper also trained an LSTM): the rnn claims are those of an LSTM (width "
            f"{c.models['rnn'].get('width', 1.0):g}) on the generated sequence task {task}, with "
            f"{d.get('label_noise', 0.0):.0%} of the training labels replaced by another class: the rule itself is "
            "learnt exactly, and in trials without that noise the training loss and lambda_1^H fell to about 0 one or "
            "two probe points after lambda_1^H reached 2/eta, while the paper compares runs in an early phase at "
            "non-zero loss. "
            f"Plain SGD at eta {s.lr_small:g} and {s.lr_large:g} (batch {s.batch}) and batch {s.batch_small} at eta "
            f"{s.lr_large:g}, {f'{c.steps:,} updates' if c.steps else f'{c.epochs:g} epochs'} per run, probes on "
            f"{c.subset} training examples. This configuration was "
            "chosen on the regime checks alone: with sequences of 16 the LSTM's lambda_1^H jumps to 2/eta as it "
            "leaves the chance-level plateau, before the loss has moved, and the window before break-even is too "
            "short; with 1,024 updates the smaller learning rate did not always get 10% past the loss at break-even.")

    # -- figures -----------------------------------------------------------------------------------
    def _figures(self, ctx: Analysis, kind: str, s: Setting, runs) -> None:
        groups = ((f"eta {s.lr_small:g}, batch {s.batch}", _usable(runs, "small_lr")),
                  (f"eta {s.lr_large:g}, batch {s.batch}", _usable(runs, "large_lr")),
                  (f"eta {s.lr_large:g}, batch {s.batch_small}", _usable(runs, "small_batch")))
        limit = 2.0 / s.lr_large
        fig, axes = new_figure(1, 2)
        for ax, metric in zip(axes[0], ("hessian_lambda_1", "K_lambda_1")):
            for name, trajs in groups:
                _band_steps(ax, trajs, metric, name)
            if metric == "hessian_lambda_1":
                ax.axhline(limit, ls="--", color="gray", lw=1, label=f"2/eta for eta {s.lr_large:g}")
                ax.axhline(REACH * limit, ls=":", color="gray", lw=1, label=f"{REACH:g} x 2/eta")
            ax.set_xscale("log")  # steps >= 1 only: step 0 (the shared initialization) has no place on a log axis
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())  # no overlapping "6 x 10^0" minor labels
            ax.set_xlabel("step (log scale, from 1)")
            ax.set_ylabel(SYMBOL[metric])
            ax.legend(fontsize=7, frameon=False)
        ctx.add_figure(f"{kind}_trajectories", fig,
                       f"lambda_1^H and lambda_1^K along training{s.label}; mean and sd over seeds, at equal steps.")
        fig, ax = new_figure()
        for name, trajs in groups:
            _band_steps(ax, trajs, "K_condition_k", name)
        ax.set_xscale("log")
        ax.set_xlabel("step (log scale, from 1)")
        ax.set_ylabel("lambda_k^K / lambda_1^K")
        ax.legend(fontsize=7, frameon=False)
        ctx.add_figure(f"{kind}_conditioning", fig, f"Conditioning of K along training{s.label} (higher is better conditioned).")
        # matched progress: the metrics against the training loss (the comparison the claims make)
        fig, axes = new_figure(1, 3)
        be = [breakeven_index(t, s.lr_large) for t in _usable(runs, "large_lr").values()]
        loss_be = [float(t.train_loss[i]) for t, i in zip(_usable(runs, "large_lr").values(), be) if i is not None]
        for ax, metric in zip(axes[0], ("hessian_lambda_1", "K_lambda_1", "K_condition_k")):
            for name, trajs in groups:
                for j, t in enumerate(trajs.values()):
                    idx = t.after_init
                    ax.plot(t.train_loss[idx], t.values[metric][idx], lw=0.8, alpha=0.6,
                            color=f"C{[g[0] for g in groups].index(name)}", label=name if j == 0 else None)
            if loss_be:
                ax.axvline(float(np.median(loss_be)), ls=":", color="gray", lw=1, label="break-even (median)")
            if metric == "hessian_lambda_1":
                ax.axhline(limit, ls="--", color="gray", lw=1, label=f"2/eta for eta {s.lr_large:g}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())  # no overlapping "6 x 10^0" minor labels
            ax.invert_xaxis()
            ax.set_xlabel("training loss (decreasing)")
            ax.set_ylabel(SYMBOL[metric])
        axes[0][0].legend(fontsize=6, frameon=False)
        ctx.add_figure(f"{kind}_progress", fig,
                       f"lambda_1^H, lambda_1^K and K's conditioning against the training loss{s.label}, one line per "
                       "seed: runs compared at matched progress; the dotted line marks the break-even point.")


def _band_steps(ax, trajs: dict[int, Trajectory], metric: str, label: str) -> None:
    """Mean and sd over seeds at the probe steps >= 1 that every seed shares."""
    ts = [t for _, t in sorted(trajs.items())]
    if not ts:
        return
    steps = ts[0].step[ts[0].after_init]
    for t in ts[1:]:
        steps = np.intersect1d(steps, t.step)
    if not len(steps):
        return
    ys = np.array([[t.values[metric][t.step == x][0] for x in steps] for t in ts])
    line_with_band(ax, steps, ys, label)
