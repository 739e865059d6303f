"""The statistics that decide every verdict: paired comparisons over seeds, equivalence, trends, correlations,
and whether two samples share one distribution.

Every test builds a confidence interval (CI) and reads the verdict off it, the same way everywhere:

- ``holds``: the whole CI lies on the claimed side of the threshold (0, or the stated margin);
- ``fails``: the whole CI lies on the other side;
- ``inconclusive``: anything else, including too few valid samples (fewer than ``min_n``, never
  fewer than 3) -- so too few runs or too wide an interval can never give ``holds``;
- ``untested``: the run was not in the regime where the paper's claim can be tested (a
  `RegimeCheck` failed, see `gate`), whatever the interval says.

A claimed effect may also state a minimal size in advance (``min_effect``): it then holds only when
the CI excludes no effect *and* the estimate is at least that large, and fails when the whole CI lies
below that size (the effect, if any, is too small to be the paper's).

Non-finite values (a diverged run, a run the study set to NaN because it missed its fitting
criterion) are dropped with their partner and counted in ``n_excluded``, together with whatever
count the caller passes as ``excluded``. Pure numpy/scipy: no torch, no store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy import stats as _st

Outcome = Literal["holds", "fails", "inconclusive", "untested"]
OUTCOMES: tuple[str, ...] = ("holds", "fails", "inconclusive", "untested")
MIN_N = 3  # below this a sample sd says almost nothing (t with 1 dof): no verdict is ever drawn

__all__ = [
    "OUTCOMES",
    "RegimeCheck",
    "Summary",
    "Verdict",
    "all_of",
    "gate",
    "correlation",
    "equivalence",
    "exclude",
    "jsonable",
    "paired_difference",
    "same_distribution",
    "summarize",
    "trend",
]


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """A claim's outcome, the rule that produced it, and the numbers it was read from."""

    verdict: Outcome
    rule: str
    test: str
    estimate: float | None
    ci: tuple[float | None, float | None]
    n: int
    n_excluded: int = 0
    confidence: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in OUTCOMES:
            raise ValueError(f"verdict must be one of {OUTCOMES}, got {self.verdict!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: NaN and infinities become None, numpy types become Python ones."""
        return jsonable(
            {
                "verdict": self.verdict,
                "rule": self.rule,
                "test": self.test,
                "estimate": self.estimate,
                "ci": list(self.ci),
                "n": self.n,
                "n_excluded": self.n_excluded,
                "confidence": self.confidence,
                "details": self.details,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        """Inverse of `to_dict` (None stands for a missing number)."""
        lo, hi = d.get("ci") or (None, None)
        return cls(
            verdict=d["verdict"],
            rule=d["rule"],
            test=d.get("test", ""),
            estimate=d.get("estimate"),
            ci=(lo, hi),
            n=int(d["n"]),
            n_excluded=int(d.get("n_excluded", 0)),
            confidence=d.get("confidence"),
            details=dict(d.get("details") or {}),
        )


class Summary(NamedTuple):
    """Mean, sample sd (ddof=1), standard error and count of the finite values; arrays when per column."""

    mean: Any
    std: Any
    sem: Any
    n: Any

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with keys mean, std, sem, n."""
        return jsonable(self._asdict())


@dataclass
class RegimeCheck:
    """A condition under which a paper's claim can be tested at all, measured on the runs.

    `condition` states the requirement with its threshold in words; `measured` holds the numbers it
    was read from; `passed` is computed by the study from them. A claim whose check did not pass is
    `untested` (never `fails`), with `condition` and `measured` shown as the reason.
    """

    id: str
    condition: str
    passed: bool
    measured: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.passed = bool(self.passed)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"id": self.id, "condition": self.condition, "passed": self.passed, "measured": self.measured})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegimeCheck:
        return cls(d["id"], d["condition"], bool(d["passed"]), dict(d.get("measured") or {}))


def gate(verdict: Verdict, checks: Sequence[RegimeCheck]) -> Verdict:
    """`verdict`, or `untested` when any regime check failed; the verdict the data alone would give is
    kept in details["verdict_if_tested"] and the failed checks in details["untested_because"]."""
    failed = [c for c in checks if not c.passed]
    if not failed or verdict.verdict == "untested":  # idempotent: a verdict read back is not gated twice
        return verdict
    details = {**verdict.details, "verdict_if_tested": verdict.verdict,
               "untested_because": [f"{c.id}: {c.condition}" for c in failed]}
    return Verdict("untested", verdict.rule, verdict.test, verdict.estimate, verdict.ci, verdict.n,
                   verdict.n_excluded, verdict.confidence, details)


def jsonable(obj: Any) -> Any:
    """`obj` made JSON-safe: numpy to Python, NaN/inf to None, tuples to lists, objects with to_dict expanded."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot make {type(obj).__name__} JSON-safe")


# -- helpers for error bars and exclusion ----------------------------------------------------------


def summarize(values: Any, axis: int | None = None) -> Summary:
    """Mean, sd, sem and n of the finite values (all of them, or per column with axis=0 for seeds x points)."""
    v = np.asarray(values, dtype=float)
    ax = axis
    if ax is None:
        v, ax = v.ravel(), 0
    ok = np.isfinite(v)
    n = ok.sum(axis=ax)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, v, 0.0).sum(axis=ax) / n
        dev = np.where(ok, v - np.expand_dims(mean, ax), 0.0)
        # sd is undefined for one value: NaN, not 0, so no error bar pretends to a spread
        std = np.where(n > 1, np.sqrt(np.abs((dev**2).sum(axis=ax) / (n - 1))), np.nan)
        sem = std / np.sqrt(n)
    if axis is None:
        return Summary(float(mean), float(std), float(sem), int(n))
    return Summary(mean, std, sem, n)


def exclude(values: Any, ok_mask: Any) -> tuple[np.ndarray, int]:
    """(values where ok_mask is true, number left out); rows along the first axis."""
    v = np.asarray(values)
    m = np.asarray(ok_mask, dtype=bool)
    if m.ndim != 1 or v.ndim == 0 or len(m) != len(v):
        raise ValueError(f"ok_mask must be 1-D with one entry per value: {m.shape} vs values {v.shape}")
    return v[m], int((~m).sum())


# -- input checks ----------------------------------------------------------------------------------


def _check_conf(confidence: float) -> float:
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return float(confidence)


def _check_min_n(min_n: int, floor: int = MIN_N) -> int:
    if min_n < floor:
        raise ValueError(f"min_n must be >= {floor} (fewer samples never support a verdict), got {min_n}")
    return int(min_n)


def _check_excluded(excluded: int) -> int:
    if int(excluded) != excluded or excluded < 0:
        raise ValueError(f"excluded must be a count >= 0 of runs left out before the test, got {excluded}")
    return int(excluded)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _vector(name: str, v: Any) -> np.ndarray:
    arr = np.asarray(v, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per seed (1-D), got shape {arr.shape}")
    return arr


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray, int, list[Any] | None]:
    """Align two conditions: sequences by position, mappings {seed: value} by key (unmatched keys counted)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [k for k in a if k in b]
        try:
            keys = sorted(keys)
        except TypeError:
            pass
        unpaired = len(set(a) ^ set(b))
        x = np.array([a[k] for k in keys], dtype=float)
        y = np.array([b[k] for k in keys], dtype=float)
        return x, y, unpaired, keys
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        raise ValueError("pass both conditions as sequences (paired by position) or both as {seed: value} mappings")
    x, y = _vector("a", a), _vector("b", b)
    if len(x) != len(y):
        raise ValueError(f"paired samples need equal lengths (one value per seed): a has {len(x)}, b has {len(y)}")
    return x, y, 0, None


def _t_interval(d: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """(mean, lo, hi, se) of the Student-t interval for the mean of d (n >= 2)."""
    n = len(d)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return mean, mean - half, mean + half, se


def _read(lo: float, hi: float, *, above: float | None = None, below: float | None = None) -> Outcome:
    """holds if the CI is above `above` (or below `below`); fails if it is entirely on the other side."""
    if above is not None:
        return "holds" if lo > above else "fails" if hi < above else "inconclusive"
    assert below is not None
    return "holds" if hi < below else "fails" if lo > below else "inconclusive"


def _read_effect(lo: float, hi: float, estimate: float, *, direction: int, null: float, min_effect: float) -> Outcome:
    """The verdict for a claimed effect of sign `direction` (+1 or -1) of at least `min_effect` beyond `null`:
    holds iff the CI excludes `null` on the claimed side and the estimate is at least `min_effect` beyond it;
    fails iff the whole CI lies short of `null + direction * min_effect` (reversed, absent or too small)."""
    lo_, hi_, est = (lo - null, hi - null, estimate - null) if direction > 0 else (null - hi, null - lo, null - estimate)
    if lo_ > 0 and est >= min_effect:
        return "holds"
    if hi_ < min_effect:
        return "fails"
    return "inconclusive"


def _check_min_effect(min_effect: float) -> float:
    if not (math.isfinite(min_effect) and min_effect >= 0):
        raise ValueError(f"min_effect must be a finite number >= 0, got {min_effect}")
    return float(min_effect)


def _read_band(lo: float, hi: float, margin: float) -> Outcome:
    """holds if the CI lies inside (-margin, margin); fails if it lies entirely outside the band."""
    if -margin < lo and hi < margin:
        return "holds"
    if lo >= margin or hi <= -margin:
        return "fails"
    return "inconclusive"


def _pct(confidence: float) -> str:
    return f"{100 * confidence:g}%"


# -- tests -----------------------------------------------------------------------------------------


def paired_difference(
    a: Sequence[float] | Mapping[Any, float],
    b: Sequence[float] | Mapping[Any, float],
    *,
    direction: Literal["greater", "less"],
    confidence: float = 0.95,
    min_n: int = MIN_N,
    excluded: int = 0,
    margin: float = 0.0,
    relative: bool = False,
    names: tuple[str, str] = ("a", "b"),
    min_effect: float = 0.0,
) -> Verdict:
    """Claim "a > b" (or "a < b") on seed-paired samples: Student-t CI of the mean paired difference.

    d_i = a_i - b_i (relative: (a_i - b_i) / |b_i|). "greater" holds iff the whole two-sided CI
    exceeds +margin (a one-sided test at (1 - confidence) / 2) and fails iff it lies wholly below
    +margin; "less" mirrors this at -margin. A margin > 0 claims an effect of at least that size,
    so a precise effect smaller than the margin fails. `min_effect` (stated in advance) further asks
    the mean difference to exceed the threshold by at least that much to hold, and fails the claim
    when the whole CI falls short of it. Pairs with a non-finite value are dropped and counted; with
    mappings {seed: value}, seeds present in only one condition are counted too.
    """
    _check_choice("direction", direction, ("greater", "less"))
    min_effect = _check_min_effect(min_effect)
    confidence, min_n = _check_conf(confidence), _check_min_n(min_n)
    excluded = _check_excluded(excluded)
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    x, y, unpaired, keys = _pair(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (x - y) / np.abs(y) if relative else x - y
    ok = np.isfinite(d)
    d = d[ok]
    n, nonfinite = len(d), int((~ok).sum())
    na, nb = names
    diff = f"({na} - {nb}) / |{nb}|" if relative else f"{na} - {nb}"
    thr = margin if direction == "greater" else (-margin if margin else 0.0)  # no "-0" in the rule
    side = ">" if direction == "greater" else "<"
    size = "" if not min_effect else (
        f" and the mean is {side} {thr + (min_effect if direction == 'greater' else -min_effect):g} "
        f"(the minimal effect, {min_effect:g}, stated in advance)")
    short = "on the other side" if not min_effect else f"short of the minimal effect {min_effect:g}"
    rule = (
        f"paired t over seeds: holds if the {_pct(confidence)} CI of mean({diff}) is entirely {side} {thr:g}{size}, "
        f"fails if entirely {short}; otherwise, or with fewer than {min_n} valid pairs, inconclusive"
    )
    details: dict[str, Any] = {
        "direction": direction,
        "margin": margin,
        "min_effect": min_effect,
        "relative": relative,
        "differences": d.tolist(),
        "conditions": {na: summarize(x[ok]).to_dict(), nb: summarize(y[ok]).to_dict()},
        "excluded_by_caller": int(excluded),
        "non_finite": nonfinite,
        "unpaired": unpaired,
    }
    if keys is not None:
        details["seeds"] = [k for k, good in zip(keys, ok) if good]
    estimate, lo, hi = (float(d.mean()) if n else None), math.nan, math.nan
    verdict: Outcome = "inconclusive"
    if n >= 2:
        estimate, lo, hi, se = _t_interval(d, confidence)
        t = (estimate - thr) / se if se > 0 else math.copysign(math.inf, estimate - thr) if estimate != thr else 0.0
        # one-sided p-value in the claimed direction, for readers who want it
        details["p_one_sided"] = float(_st.t.sf(t, n - 1) if direction == "greater" else _st.t.cdf(t, n - 1))
        if n >= min_n:
            verdict = _read_effect(lo, hi, estimate, direction=1 if direction == "greater" else -1, null=thr,
                                   min_effect=min_effect)
    return Verdict(
        verdict, rule, "paired t-interval", estimate, (lo, hi), n,
        int(excluded) + nonfinite + unpaired, confidence, details,
    )


def equivalence(
    a: Sequence[float] | Mapping[Any, float],
    b: Sequence[float] | Mapping[Any, float],
    *,
    margin: float,
    paired: bool = True,
    confidence: float = 0.90,
    min_n: int = MIN_N,
    excluded: int = 0,
    relative: bool = False,
    names: tuple[str, str] = ("a", "b"),
) -> Verdict:
    """Claim "no difference within ±margin" by TOST: the CI of the mean difference (paired t, or Welch).

    Holds iff the CI at `confidence` (0.90 = two one-sided tests at 5%) lies inside (-margin, margin);
    fails iff it lies entirely outside that band; inconclusive otherwise or with too few samples.
    Unpaired: each group is cleaned of non-finite values on its own and needs min_n values.
    """
    confidence, min_n = _check_conf(confidence), _check_min_n(min_n)
    excluded = _check_excluded(excluded)
    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"equivalence needs a finite margin > 0, got {margin}")
    na, nb = names
    diff = f"({na} - {nb}) / |{nb}|" if relative else f"{na} - {nb}"
    details: dict[str, Any] = {"margin": margin, "paired": paired, "relative": relative, "excluded_by_caller": int(excluded)}
    lo = hi = math.nan
    estimate: float | None = None
    verdict: Outcome = "inconclusive"
    if paired:
        x, y, unpaired, _ = _pair(a, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = (x - y) / np.abs(y) if relative else x - y
        ok = np.isfinite(d)
        d, nonfinite = d[ok], int((~ok).sum())
        n = len(d)
        details.update({"conditions": {na: summarize(x[ok]).to_dict(), nb: summarize(y[ok]).to_dict()},
                        "differences": d.tolist(), "non_finite": nonfinite, "unpaired": unpaired})
        n_ex = nonfinite + unpaired
        if n >= 2:
            estimate, lo, hi, _ = _t_interval(d, confidence)
        elif n == 1:
            estimate = float(d[0])
        test = "TOST, paired t-interval"
        unit = "valid pairs"
    else:
        if relative:
            raise ValueError("relative=True is defined for paired samples only")
        x = _vector("a", list(a.values()) if isinstance(a, Mapping) else a)
        y = _vector("b", list(b.values()) if isinstance(b, Mapping) else b)
        n_ex = int((~np.isfinite(x)).sum() + (~np.isfinite(y)).sum())
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        n = min(len(x), len(y))
        details.update({"conditions": {na: summarize(x).to_dict(), nb: summarize(y).to_dict()}, "non_finite": n_ex})
        if n >= 2:
            va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
            estimate = float(x.mean() - y.mean())
            se = math.sqrt(va + vb)
            # Welch-Satterthwaite degrees of freedom; any dof works when se is 0 (a point interval)
            dof = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1)) if se > 0 else 1.0
            half = float(_st.t.ppf(0.5 + confidence / 2, dof)) * se
            lo, hi = estimate - half, estimate + half
            details["dof"] = float(dof)
        test = "TOST, Welch t-interval"
        unit = "values per group"
    if n >= min_n:
        verdict = _read_band(lo, hi, margin)
    rule = (
        f"equivalence (TOST): holds if the {_pct(confidence)} CI of mean({diff}) lies inside ±{margin:g}, "
        f"fails if entirely outside ±{margin:g}; otherwise, or with fewer than {min_n} {unit}, inconclusive"
    )
    return Verdict(verdict, rule, test, estimate, (lo, hi), n, int(excluded) + n_ex, confidence, details)


def same_distribution(
    a: Sequence[float],
    b: Sequence[float],
    *,
    margin: float,
    confidence: float = 0.95,
    censored_at: float | None = None,
    min_n: int = MIN_N,
    excluded: int = 0,
    names: tuple[str, str] = ("a", "b"),
) -> Verdict:
    """Claim "a and b are samples of one distribution": the two-sample Kolmogorov-Smirnov distance D (the
    largest gap between their empirical CDFs) and a distribution-free CI for the distance of the true CDFs.

    The CI: with probability >= confidence, each empirical CDF lies within e = sqrt(log(4 / alpha) / (2 n)) of
    its true CDF everywhere (Dvoretzky-Kiefer-Wolfowitz with Massart's constant; alpha = 1 - confidence, half
    to each sample), so the true distance is within e_a + e_b of D. An equivalence test, like every rule here:
    holds iff the CI lies below `margin` (any difference is smaller than the tolerance, with confidence);
    fails iff it lies above `margin`; inconclusive otherwise, or with fewer than min_n values in a sample.
    The KS test of exact equality is reported (`ks_p`) but does not decide: an approximation (an SDE for SGD)
    is not claimed exact, and with enough values that test rejects any real difference, however small.

    Censoring (`censored_at`, e.g. escapes not seen within a step limit common to both samples): NaN and values
    above it are kept as censored, larger than every observed value, so D and the test compare min(X, cap),
    which is exact: a common cap maps equal distributions to equal ones. Beyond the cap the true CDFs differ by
    at most the larger censored fraction, so the CI's upper end covers that too. Without `censored_at`,
    non-finite values are dropped and counted.
    """
    confidence, min_n = _check_conf(confidence), _check_min_n(min_n)
    excluded = _check_excluded(excluded)
    if not (0 < margin < 1):
        raise ValueError(f"same_distribution needs a margin in (0, 1) on the KS distance, got {margin}")
    x, y = _vector("a", a), _vector("b", b)
    if censored_at is None:
        n_ex = int((~np.isfinite(x)).sum() + (~np.isfinite(y)).sum())
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        cens = (np.zeros(len(x), bool), np.zeros(len(y), bool))
    else:
        n_ex = 0
        cens = (~np.isfinite(x) | (x > censored_at), ~np.isfinite(y) | (y > censored_at))
        x, y = np.where(cens[0], np.inf, x), np.where(cens[1], np.inf, y)
    na, nb = names
    n = min(len(x), len(y))
    alpha = 1 - confidence
    details: dict[str, Any] = {
        "margin": margin, "censored_at": censored_at, "n": {na: len(x), nb: len(y)}, "non_finite": n_ex,
        "excluded_by_caller": int(excluded),
        "censored_fraction": {na: float(cens[0].mean()) if len(x) else None, nb: float(cens[1].mean()) if len(y) else None},
    }
    estimate: float | None = None
    lo = hi = math.nan
    verdict: Outcome = "inconclusive"
    if n >= 1:
        res = _st.ks_2samp(x, y)
        estimate, p = float(res.statistic), float(res.pvalue)
        ea, eb = (math.sqrt(math.log(4 / alpha) / (2 * k)) for k in (len(x), len(y)))
        tail = max(float(cens[0].mean()) + ea, float(cens[1].mean()) + eb)  # the CDFs' largest possible gap past the cap
        lo, hi = max(0.0, estimate - ea - eb), min(1.0, max(estimate + ea + eb, tail if censored_at is not None else 0.0))
        details.update({"ks_p": p, "dkw_half_widths": {na: ea, nb: eb},
                        "where": float(getattr(res, "statistic_location", math.nan))})
        if n >= min_n:
            verdict = "holds" if hi < margin else "fails" if lo > margin else "inconclusive"
    rule = (
        f"two-sample Kolmogorov-Smirnov distance between the CDFs: holds if its {_pct(confidence)} CI (DKW) lies below "
        f"{margin:g}, fails if it lies above {margin:g}; otherwise, or with fewer than {min_n} values in a sample, "
        f"inconclusive (the KS test of exact equality is reported, not decisive)"
    )
    return Verdict(verdict, rule, "two-sample KS, DKW interval", estimate, (lo, hi), n, int(excluded) + n_ex, confidence,
                   details)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho; 0 when y is constant (no monotone association), NaN never."""
    rx, ry = _st.rankdata(x), _st.rankdata(y)
    sx, sy = rx.std(), ry.std()
    if sy == 0:
        return 0.0
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc**2).sum())


def trend(
    x: Sequence[float],
    y_by_seed: Any,
    *,
    direction: Literal["increasing", "decreasing"],
    method: Literal["spearman", "slope"] = "spearman",
    confidence: float = 0.95,
    min_n: int = MIN_N,
    min_points: int = 3,
    excluded: int = 0,
    min_effect: float = 0.0,
) -> Verdict:
    """Claim "y rises (falls) with x": one Spearman rho (or OLS slope) per seed, t-interval over seeds.

    y_by_seed is seeds x len(x), NaN where a run is missing or excluded; each seed's statistic uses
    its finite points, and a seed with fewer than `min_points` of them is dropped. Holds iff the CI
    of the mean per-seed statistic is entirely on the claimed side of 0; fails iff entirely on the
    other. With `min_effect`, the mean statistic must also be at least that large in the claimed
    direction (e.g. |rho| >= 0.5), and a CI wholly short of it fails. n counts seeds used;
    n_excluded counts runs (cells) left out. Transform x yourself (e.g. log batch size); Spearman
    does not care.
    """
    _check_choice("direction", direction, ("increasing", "decreasing"))
    min_effect = _check_min_effect(min_effect)
    _check_choice("method", method, ("spearman", "slope"))
    confidence, min_n = _check_conf(confidence), _check_min_n(min_n)
    excluded = _check_excluded(excluded)
    if min_points < 2:
        raise ValueError(f"min_points must be >= 2, got {min_points}")
    xv = _vector("x", x)
    y = np.asarray(y_by_seed, dtype=float)
    if y.ndim == 1:
        y = y[None, :]
    if y.ndim != 2 or y.shape[1] != len(xv):
        raise ValueError(f"y_by_seed must be seeds x len(x) = (*, {len(xv)}), got shape {y.shape}")
    if not np.all(np.isfinite(xv)) or len(np.unique(xv)) < 2:
        raise ValueError("x must be finite with at least two distinct values")
    rhos, slopes, dropped_runs, dropped_seeds = [], [], 0, 0
    for row in y:
        ok = np.isfinite(row)
        if ok.sum() < min_points or len(np.unique(xv[ok])) < 2:
            dropped_runs += int(row.size)  # the seed's finite runs are unused too
            dropped_seeds += 1
            continue
        dropped_runs += int((~ok).sum())
        rhos.append(_spearman(xv[ok], row[ok]))
        slopes.append(_slope(xv[ok], row[ok]))
    stat = np.array(rhos if method == "spearman" else slopes)
    n = len(stat)
    estimate: float | None = float(stat.mean()) if n else None
    lo = hi = math.nan
    verdict: Outcome = "inconclusive"
    if n >= 2:
        estimate, lo, hi, _ = _t_interval(stat, confidence)
        if n >= min_n:
            verdict = _read_effect(lo, hi, estimate, direction=1 if direction == "increasing" else -1, null=0.0,
                                   min_effect=min_effect)
    what = "Spearman rho of y with x" if method == "spearman" else "OLS slope of y on x"
    side = ">" if direction == "increasing" else "<"
    size = "" if not min_effect else f" and the mean is {side} {min_effect if side == '>' else -min_effect:g} (minimal effect)"
    short = "on the other side" if not min_effect else f"short of the minimal effect {min_effect:g}"
    rule = (
        f"trend over seeds: one {what} per seed; holds if the {_pct(confidence)} t-CI of their mean is entirely "
        f"{side} 0{size}, fails if entirely {short}; otherwise, or with fewer than {min_n} seeds, inconclusive"
    )
    details = {
        "direction": direction,
        "method": method,
        "x": xv.tolist(),
        "per_seed_spearman": rhos,
        "per_seed_slope": slopes,
        "mean_by_x": summarize(y, axis=0).mean,
        "seeds_dropped": dropped_seeds,
        "excluded_by_caller": int(excluded),
        "min_effect": min_effect,
    }
    return Verdict(verdict, rule, f"per-seed {method}, t-interval", estimate, (lo, hi), n,
                   int(excluded) + dropped_runs, confidence, details)


def correlation(
    x: Sequence[float],
    y: Sequence[float],
    *,
    direction: Literal["positive", "negative", "none"],
    method: Literal["pearson", "spearman"] = "spearman",
    confidence: float | None = None,
    margin: float | None = None,
    min_n: int = 5,
    excluded: int = 0,
) -> Verdict:
    """Claim a sign of the correlation of x and y (or, "none", |r| < margin by TOST), Fisher-z CI.

    For "positive"/"negative" (default confidence 0.95): holds iff the whole CI is on the claimed
    side of 0, fails iff on the other. For "none" (needs margin; default confidence 0.90): holds iff
    the CI lies inside (-margin, margin), fails iff entirely outside. Points are taken as independent
    (e.g. one per run across a grid). Spearman uses the Fieller et al. (1957) variance 1.06 / (n - 3).
    """
    _check_choice("direction", direction, ("positive", "negative", "none"))
    _check_choice("method", method, ("pearson", "spearman"))
    if direction == "none":
        if margin is None or not (0 < margin < 1):
            raise ValueError(f'direction="none" needs a margin in (0, 1) on the correlation, got {margin}')
    elif margin is not None:
        raise ValueError('margin applies to direction="none" only')
    confidence = _check_conf(confidence if confidence is not None else (0.90 if direction == "none" else 0.95))
    min_n = _check_min_n(min_n, floor=4)  # Fisher z needs n > 3
    excluded = _check_excluded(excluded)
    xv, yv = _vector("x", x), _vector("y", y)
    if len(xv) != len(yv):
        raise ValueError(f"x and y need one value per point each: x has {len(xv)}, y has {len(yv)}")
    ok = np.isfinite(xv) & np.isfinite(yv)
    xv, yv, nonfinite = xv[ok], yv[ok], int((~ok).sum())
    n = len(xv)
    details: dict[str, Any] = {"direction": direction, "method": method, "margin": margin, "non_finite": nonfinite,
                               "excluded_by_caller": int(excluded)}
    r: float | None = None
    lo = hi = math.nan
    verdict: Outcome = "inconclusive"
    if n >= 2 and np.ptp(xv) > 0 and np.ptp(yv) > 0:
        r = _spearman(xv, yv) if method == "spearman" else float(np.corrcoef(xv, yv)[0, 1])
        if n > 3:
            # |r| = 1 would give an infinite z; clip so the interval collapses onto ±1 instead
            z = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, r)))
            se = math.sqrt((1.06 if method == "spearman" else 1.0) / (n - 3))
            half = float(_st.norm.ppf(0.5 + confidence / 2)) * se
            lo, hi = math.tanh(z - half), math.tanh(z + half)
            if n >= min_n:
                if direction == "none":
                    verdict = _read_band(lo, hi, float(margin))  # type: ignore[arg-type]
                elif direction == "positive":
                    verdict = _read(lo, hi, above=0.0)
                else:
                    verdict = _read(lo, hi, below=0.0)
    elif n >= 2:
        details["reason"] = "x or y is constant: the correlation is undefined"
    if direction == "none":
        rule = (f"no consistent relation (TOST on {method} r, Fisher z): holds if the {_pct(confidence)} CI of r lies "
                f"inside ±{margin:g}, fails if entirely outside; otherwise, or with fewer than {min_n} points, inconclusive")
    else:
        side = ">" if direction == "positive" else "<"
        rule = (f"{method} correlation, Fisher-z {_pct(confidence)} CI: holds if entirely {side} 0, fails if entirely "
                f"on the other side; otherwise, or with fewer than {min_n} points, inconclusive")
    return Verdict(verdict, rule, f"{method} r, Fisher z", r, (lo, hi), n, int(excluded) + nonfinite, confidence, details)


def all_of(
    parts: Mapping[str, Verdict] | Iterable[Verdict], *, what: str = "every part", excluded: int | None = None
) -> Verdict:
    """Claim that holds for every part (e.g. "at every batch size"): holds iff all hold, fails if any fails.

    `excluded` is the number of distinct runs left out across the parts, which only the caller knows
    (parts may share runs); without it the largest part's count is used, a lower bound, so that a
    run left out of several parts is never counted more than once.

    An intersection-union test: requiring every part to hold keeps each part's error rate without
    a multiplicity correction. The "fails" side is not corrected: with k parts a spurious failure
    is up to k times likelier than for one.
    """
    items = list(parts.items()) if isinstance(parts, Mapping) else [(str(i), v) for i, v in enumerate(parts)]
    if not items:
        raise ValueError("all_of needs at least one verdict")
    outs = [v.verdict for _, v in items]
    verdict: Outcome = (
        "holds" if all(o == "holds" for o in outs) else "fails" if "fails" in outs
        else "untested" if "untested" in outs else "inconclusive"
    )
    first = items[0][1]
    same = all(v.rule == first.rule for _, v in items)
    each = f"each part: {first.rule}" if same else "each part by its own rule (in details.parts)"
    rule = f"holds if {what} holds, fails if any fails, otherwise inconclusive; {each}"
    return Verdict(
        verdict, rule, "all of (intersection-union)", None, (None, None),
        min(v.n for _, v in items),
        _check_excluded(excluded) if excluded is not None else max(v.n_excluded for _, v in items), first.confidence,
        {"parts": {k: v.to_dict() for k, v in items}},
    )
