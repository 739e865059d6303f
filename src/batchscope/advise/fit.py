"""The numbers of batch-size advice, as pure functions of measured curves (no training here).

* `crossing`: the examples (or steps) at which a logged loss curve first reaches a target, interpolated.
* `fit_tradeoff`: McCandlish et al.'s (2018) steps/examples trade-off (S/S_min - 1)(E/E_min - 1) = 1, i.e.
  S(B) = S_min + E_min / B, fitted to measured (B, S) pairs; B_crit = E_min / S_min, with a standard error.
* `combine`: the trade-off of a whole run from the trade-offs of its segments (each fitted on branches from
  one checkpoint): S and E add over segments, so S_min and E_min do.
* `critical_batch`: Merrill et al.'s (2025) critical batch size at one checkpoint: the largest batch whose
  loss, after the same number of examples, stays within a tolerance of the small batch's.
* `lr_for`: the learning-rate rule for a larger batch (linear for SGD-like updates, square root for Adam-like).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit

Curve = Sequence[tuple[float, float]]  # (examples or steps, loss), increasing in the first


def crossing(curve: Curve, target: float) -> float | None:
    """The first x at which the curve's y is <= target, linear in log y between the two logged points around
    it (losses fall roughly exponentially between evaluations); None if it never gets there."""
    prev: tuple[float, float] | None = None
    for x, y in curve:
        if not math.isfinite(y):
            return None  # diverged before reaching the target
        if y <= target:
            if prev is None or prev[1] <= 0 or y <= 0 or prev[1] == y:
                return float(x)
            a, b = math.log(prev[1]), math.log(y)
            frac = (a - math.log(target)) / (a - b) if target > 0 else 1.0
            return float(prev[0] + min(max(frac, 0.0), 1.0) * (x - prev[0]))
        prev = (x, y)
    return None


def value_at(curve: Curve, x: float) -> float | None:
    """The curve's y at x, linear in log y between logged points; None outside the logged range or past a
    non-finite value."""
    prev: tuple[float, float] | None = None
    for cx, cy in curve:
        if not math.isfinite(cy):
            return None
        if cx >= x:
            if cx == x or prev is None:
                return float(cy) if cx == x else None
            if prev[1] > 0 and cy > 0:
                t = (x - prev[0]) / (cx - prev[0])
                return float(math.exp((1 - t) * math.log(prev[1]) + t * math.log(cy)))
            return float(prev[1] + (x - prev[0]) / (cx - prev[0]) * (cy - prev[1]))
        prev = (cx, cy)
    return None


@dataclass(frozen=True)
class Tradeoff:
    """S(B) = s_min + e_min / B (steps to a target at batch B); B_crit = e_min / s_min. Standard errors from the
    fit's covariance (log parameters, delta method); `log_b_crit_se` gives B_crit's interval as
    exp(log B_crit +- z se). `n` batch sizes were fitted; `rms` is the fit's residual in log S."""

    s_min: float
    e_min: float
    b_crit: float
    log_b_crit_se: float
    log_s_min_se: float
    log_e_min_se: float
    n: int
    rms: float

    def steps(self, batch: float) -> float:
        return self.s_min + self.e_min / batch

    def examples(self, batch: float) -> float:
        return batch * self.steps(batch)

    def b_crit_interval(self, z: float = 1.96) -> tuple[float, float]:
        w = z * self.log_b_crit_se
        if not w < 700:  # exp overflows: the fit does not bound B_crit
            return 0.0, math.inf
        return self.b_crit * math.exp(-w), self.b_crit * math.exp(w)


def fit_tradeoff(batches: Sequence[float], steps: Sequence[float]) -> Tradeoff:
    """Least squares in log S of S(B) = S_min + E_min / B over (B, S) pairs (at least 3 distinct batch sizes).

    In log S every point weighs by its relative error, as steps-to-target noise is multiplicative. Started from
    the closed-form linear fit of S against 1/B (clipped positive)."""
    b = np.asarray(batches, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or len(set(b.tolist())) < 3:
        raise ValueError(f"fit_tradeoff: expected (B, S) pairs over at least 3 batch sizes, got {len(set(b.tolist()))}")
    if np.any(b <= 0) or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError("fit_tradeoff: batch sizes and steps must be positive and finite")
    slope, icpt = np.polyfit(1.0 / b, s, 1)
    p0 = [math.log(max(icpt, s.min() * 0.05)), math.log(max(slope, s.min() * b.min() * 0.05))]

    def model(bb: np.ndarray, log_s: float, log_e: float) -> np.ndarray:
        return np.logaddexp(log_s, log_e - np.log(bb))

    with warnings.catch_warnings():  # a singular covariance (a perfect fit, or S_min at 0) is reported as inf below
        warnings.simplefilter("ignore")
        popt, pcov = curve_fit(model, b, np.log(s), p0=p0, maxfev=20000)
    resid = np.log(s) - model(b, *popt)
    rms = float(np.sqrt(np.mean(resid**2)))
    var_ratio = pcov[0, 0] + pcov[1, 1] - 2 * pcov[0, 1] if np.all(np.isfinite(pcov)) else math.inf
    if not np.all(np.isfinite(pcov)):
        pcov = np.full((2, 2), np.inf)
    ls, le = float(popt[0]), float(popt[1])
    return Tradeoff(
        s_min=math.exp(ls), e_min=math.exp(le), b_crit=math.exp(le - ls),
        log_b_crit_se=math.sqrt(max(var_ratio, 0.0)), log_s_min_se=math.sqrt(max(pcov[0, 0], 0.0)),
        log_e_min_se=math.sqrt(max(pcov[1, 1], 0.0)), n=len(b), rms=rms,
    )


def combine(parts: Sequence[tuple[float, Tradeoff]]) -> Tradeoff:
    """A run's trade-off from its segments' (weight, trade-off) pairs: segment i takes weight_i times the steps
    its branches took, so S_min = sum w_i S_min,i and E_min = sum w_i E_min,i. Errors: the segments' fits are
    independent; log-scale variances combine through the delta method."""
    if not parts:
        raise ValueError("combine: no segments")
    s = sum(w * t.s_min for w, t in parts)
    e = sum(w * t.e_min for w, t in parts)
    var_ls = sum((w * t.s_min * t.log_s_min_se) ** 2 for w, t in parts) / s**2
    var_le = sum((w * t.e_min * t.log_e_min_se) ** 2 for w, t in parts) / e**2
    # S_min and E_min of one segment are correlated; without their covariance, bound B_crit's variance above
    se = math.sqrt(var_ls) + math.sqrt(var_le)
    return Tradeoff(s_min=s, e_min=e, b_crit=e / s, log_b_crit_se=se, log_s_min_se=math.sqrt(var_ls),
                    log_e_min_se=math.sqrt(var_le), n=sum(t.n for _, t in parts), rms=max(t.rms for _, t in parts))


def critical_batch(final_losses: dict[int, float | None], reference: float, tolerance: float) -> int | None:
    """The largest batch whose loss after the window (None: diverged or not logged) is <= (1 + tolerance) x the
    reference's, with every smaller batch within it too (a batch past the critical one does not count after a
    failure); None when even the smallest fails."""
    best = None
    for b in sorted(final_losses):
        loss = final_losses[b]
        if loss is None or not math.isfinite(loss) or loss > (1 + tolerance) * reference:
            break
        best = b
    return best


LR_RULES = ("linear", "sqrt", "none")


def rule_for(optimizer: str) -> str:
    """Goyal et al.'s linear rule for SGD-like updates (sgd, lars); the square-root rule for Adam-like ones
    (adam, adamw, lamb; Malladi et al. 2022)."""
    return "sqrt" if optimizer in ("adam", "adamw", "lamb") else "linear"


def lr_for(lr0: float, b0: int, batch: int, rule: str) -> float:
    if rule not in LR_RULES:
        raise ValueError(f"lr rule {rule!r}: expected one of {', '.join(LR_RULES)}")
    ratio = batch / b0
    return lr0 * (ratio if rule == "linear" else math.sqrt(ratio) if rule == "sqrt" else 1.0)


def stability_limit(optimizer: str, lr: float, momentum: float = 0.0, beta1: float = 0.9) -> float:
    """The sharpness above which the update is unstable on a quadratic (Cohen et al. 2021, 2022): 2/eta for
    gradient descent, (2 + 2 beta) / eta with heavy-ball momentum beta, and (2 + 2 beta_1) / ((1 - beta_1) eta)
    for Adam's preconditioned sharpness."""
    if optimizer in ("adam", "adamw", "lamb"):
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    return (2 + 2 * momentum) / lr
