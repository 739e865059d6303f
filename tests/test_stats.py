"""batchscope.stats: verdicts on clear, opposite and noisy effects; CI coverage; exclusion counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as st

from batchscope.stats import (
    Verdict,
    all_of,
    correlation,
    equivalence,
    exclude,
    paired_difference,
    summarize,
    trend,
)

# 500 simulated draws; a CI at level c covers the truth a Binomial(500, c) number of times, so
# its empirical coverage has SE sqrt(c (1 - c) / 500) (~0.0097 at c = 0.95). 3.5 SE is a miss
# in ~1 of 2000 runs for a correct interval, and the seeds are fixed anyway.
DRAWS = 500


def _tol(c: float) -> float:
    return 3.5 * math.sqrt(c * (1 - c) / DRAWS)


# -- paired_difference -----------------------------------------------------------------------------


def test_paired_clear_effect_holds_and_opposite_fails():
    rng = np.random.default_rng(0)
    base = rng.normal(0.9, 0.05, 5)  # seed-to-seed variation shared by the pair
    sb = base + 0.03 + rng.normal(0, 0.005, 5)
    lb = base
    v = paired_difference(sb, lb, direction="greater", names=("SB", "LB"))
    assert v.verdict == "holds" and v.n == 5 and v.n_excluded == 0
    assert v.ci[0] > 0 and abs(v.estimate - 0.03) < 0.01
    assert "SB - LB" in v.rule and "95%" in v.rule
    assert paired_difference(lb, sb, direction="greater").verdict == "fails"
    assert paired_difference(lb, sb, direction="less").verdict == "holds"
    assert paired_difference(sb, lb, direction="less").verdict == "fails"


def test_paired_matches_scipy_one_sample_t():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 7), rng.normal(0.5, 1, 7)
    v = paired_difference(a, b, direction="greater")
    ref = st.ttest_1samp(a - b, 0.0).confidence_interval(0.95)
    assert v.ci == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert v.details["p_one_sided"] == pytest.approx(st.ttest_1samp(a - b, 0.0, alternative="greater").pvalue)


def test_paired_noise_is_inconclusive():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 6), rng.normal(0, 1, 6)
    v = paired_difference(a, b, direction="greater")
    assert v.ci[0] < 0 < v.ci[1]
    assert v.verdict == "inconclusive"


def test_too_few_pairs_never_hold():
    huge = paired_difference([10.0, 11.0], [0.0, 0.0], direction="greater")
    assert huge.verdict == "inconclusive" and huge.n == 2
    assert huge.ci[0] > 0  # the interval alone would say yes; n does not allow it
    assert paired_difference([10.0, 11.0, 12.0], [0, 0, 0], direction="greater", min_n=4).verdict == "inconclusive"
    one = paired_difference([1.0], [0.0], direction="greater")
    assert one.verdict == "inconclusive" and one.estimate == 1.0
    with pytest.raises(ValueError, match="min_n"):
        paired_difference([1.0, 2.0], [0.0, 0.0], direction="greater", min_n=2)


def test_paired_margin_requires_effect_of_that_size():
    d = 0.5 + np.array([-0.01, 0.0, 0.01, 0.0, 0.005])
    zeros = np.zeros(5)
    assert paired_difference(d, zeros, direction="greater", margin=0.2).verdict == "holds"
    assert paired_difference(d, zeros, direction="greater", margin=1.0).verdict == "fails"
    assert paired_difference(-d, zeros, direction="less", margin=0.2).verdict == "holds"
    assert paired_difference(-d, zeros, direction="less", margin=1.0).verdict == "fails"
    with pytest.raises(ValueError, match="margin"):
        paired_difference(d, zeros, direction="greater", margin=-0.1)


def test_paired_relative():
    b = np.array([1.0, 2.0, 4.0, 8.0])
    v = paired_difference(1.1 * b, b, direction="greater", relative=True)
    assert v.estimate == pytest.approx(0.1) and v.verdict == "holds"


def test_nan_pairs_excluded_and_counted():
    a = [1.0, 1.1, np.nan, 1.2, 1.05, 1.15]
    b = [0.0, 0.1, 0.2, np.inf, 0.05, 0.1]
    v = paired_difference(a, b, direction="greater", excluded=3)
    assert v.n == 4
    assert v.details["non_finite"] == 2 and v.details["excluded_by_caller"] == 3
    assert v.n_excluded == 5
    assert v.verdict == "holds"
    assert json.loads(json.dumps(v.to_dict(), allow_nan=False))["n_excluded"] == 5


def test_mappings_pair_by_seed():
    a = {3: 1.3, 1: 1.1, 2: 1.2, 9: 5.0}
    b = {1: 0.1, 2: 0.2, 3: 0.25, 7: 0.0}
    v = paired_difference(a, b, direction="greater")
    assert v.details["seeds"] == [1, 2, 3]
    assert v.details["differences"] == pytest.approx([1.0, 1.0, 1.05])
    assert v.details["unpaired"] == 2 and v.n_excluded == 2 and v.n == 3


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 2, 3], [1, 2], direction="greater")
    with pytest.raises(ValueError, match="direction"):
        paired_difference([1, 2, 3], [1, 2, 3], direction="bigger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        paired_difference([[1, 2]], [[1, 2]], direction="greater")
    with pytest.raises(ValueError, match="both"):
        paired_difference({0: 1.0}, [1.0], direction="greater")
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1, 2, 3], [0, 0, 0], direction="greater", confidence=95)


def test_t_interval_coverage_and_false_holds_rate():
    rng = np.random.default_rng(123)
    n, mu, conf = 5, 0.3, 0.95
    covered = z_covered = 0
    false_holds = 0
    zq = st.norm.ppf(0.975)
    for _ in range(DRAWS):
        d = rng.normal(mu, 1.0, n)
        v = paired_difference(d + 1.0, np.ones(n), direction="greater")
        covered += v.ci[0] <= mu <= v.ci[1]
        half = zq * d.std(ddof=1) / math.sqrt(n)
        z_covered += d.mean() - half <= mu <= d.mean() + half
        # no true effect: "holds" must be rare (one-sided 2.5%)
        null = rng.normal(0.0, 1.0, n)
        false_holds += paired_difference(null, np.zeros(n), direction="greater").verdict == "holds"
    assert abs(covered / DRAWS - conf) < _tol(conf)
    # The tolerance is tight enough to reject a wrong interval: normal quantiles with n = 5 cover ~88%.
    assert z_covered / DRAWS < conf - _tol(conf)
    assert false_holds / DRAWS < 0.025 + _tol(0.025)


# -- equivalence -----------------------------------------------------------------------------------


def test_equivalence_holds_fails_inconclusive():
    rng = np.random.default_rng(4)
    a = rng.normal(0.8, 0.02, 6)
    v = equivalence(a, a + rng.normal(0, 0.002, 6), margin=0.01, names=("scaled", "base"))
    assert v.verdict == "holds" and "±0.01" in v.rule and "90%" in v.rule
    assert -0.01 < v.ci[0] and v.ci[1] < 0.01
    assert equivalence(a, a + 0.1 + rng.normal(0, 0.002, 6), margin=0.01).verdict == "fails"
    noisy = equivalence(a, a + rng.normal(0, 0.05, 6), margin=0.01)
    assert noisy.verdict == "inconclusive"
    two = equivalence([0.8, 0.8], [0.8, 0.8], margin=0.5)
    assert two.verdict == "inconclusive" and two.n == 2
    with pytest.raises(ValueError, match="margin"):
        equivalence(a, a, margin=0.0)


def test_equivalence_unpaired_matches_welch():
    rng = np.random.default_rng(5)
    a, b = rng.normal(1.0, 0.1, 8), rng.normal(1.02, 0.3, 6)
    v = equivalence(a, b, margin=1.0, paired=False)
    ref = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.90)
    assert v.ci == pytest.approx((ref.low, ref.high), rel=1e-10)
    assert v.verdict == "holds" and v.test.startswith("TOST, Welch")
    far = equivalence(a, b + 5.0, margin=1.0, paired=False)
    assert far.verdict == "fails"
    assert equivalence([1.0, 1.0, np.nan], [1.0, 1.0, 1.0], margin=1.0, paired=False).verdict == "inconclusive"


# -- trend -----------------------------------------------------------------------------------------


def test_trend_decreasing_holds_and_counts_missing_runs():
    rng = np.random.default_rng(6)
    x = np.log([32, 64, 128, 256, 512, 1024])
    y = 0.95 - 0.01 * x + rng.normal(0, 0.003, (5, 6))
    y[0, -1] = np.nan  # one run that missed the fitting criterion
    y[1, 2:] = np.nan  # a seed with only 2 fitted runs: dropped
    v = trend(x, y, direction="decreasing")
    assert v.verdict == "holds" and v.n == 4
    assert v.n_excluded == 1 + 6 and v.details["seeds_dropped"] == 1
    assert trend(x, y, direction="increasing").verdict == "fails"
    s = trend(x, y, direction="decreasing", method="slope")
    assert s.verdict == "holds" and s.ci[0] < -0.01 < s.ci[1]


def test_trend_noise_and_few_seeds_inconclusive():
    rng = np.random.default_rng(7)
    x = np.arange(6.0)
    assert trend(x, rng.normal(0, 1, (6, 6)), direction="increasing").verdict == "inconclusive"
    perfect = np.tile(x, (2, 1))
    assert trend(x, perfect, direction="increasing").verdict == "inconclusive"  # 2 seeds
    with pytest.raises(ValueError, match="seeds x len"):
        trend(x, np.zeros((3, 5)), direction="increasing")
    with pytest.raises(ValueError, match="distinct"):
        trend(np.ones(6), np.zeros((3, 6)), direction="increasing")


# -- correlation -----------------------------------------------------------------------------------


def test_correlation_signs_and_none():
    rng = np.random.default_rng(8)
    x = rng.normal(size=60)
    y = -0.7 * x + rng.normal(0, 0.5, 60)
    assert correlation(x, y, direction="negative").verdict == "holds"
    assert correlation(x, y, direction="positive").verdict == "fails"
    indep = correlation(x, rng.normal(size=60), direction="none", margin=0.5)
    assert indep.verdict == "holds" and indep.confidence == 0.90
    assert correlation(x, y, direction="none", margin=0.3).verdict == "fails"
    assert correlation(x[:4], y[:4], direction="negative").verdict == "inconclusive"  # min_n = 5
    with pytest.raises(ValueError, match="margin"):
        correlation(x, y, direction="none")
    with pytest.raises(ValueError, match="one value per point"):
        correlation(x, y[:-1], direction="negative")


def test_fisher_z_coverage():
    rng = np.random.default_rng(9)
    rho, n, conf = 0.5, 30, 0.95
    cov = np.array([[1, rho], [rho, 1]])
    covered = 0
    for _ in range(DRAWS):
        xy = rng.multivariate_normal([0, 0], cov, n)
        v = correlation(xy[:, 0], xy[:, 1], direction="positive", method="pearson")
        covered += v.ci[0] <= rho <= v.ci[1]
    assert abs(covered / DRAWS - conf) < _tol(conf)


# -- all_of, helpers, serialization ----------------------------------------------------------------


def test_all_of():
    yes = paired_difference([2.0, 2.1, 2.2], [0.0, 0.0, 0.0], direction="greater")
    no = paired_difference([0.0, 0.0, 0.0], [2.0, 2.1, 2.2], direction="greater")
    meh = paired_difference([1.0], [0.0], direction="greater")
    assert all_of({"B=32": yes, "B=256": yes}).verdict == "holds"
    assert all_of([yes, meh]).verdict == "inconclusive"
    combined = all_of({"B=32": yes, "B=256": no, "B=1024": meh}, what="the effect at every batch size")
    assert combined.verdict == "fails" and set(combined.details["parts"]) == {"B=32", "B=256", "B=1024"}
    assert combined.n == 1
    with pytest.raises(ValueError):
        all_of([])


def test_summarize_and_exclude():
    s = summarize([1.0, 2.0, np.nan, 3.0])
    assert (s.mean, s.n) == (2.0, 3) and s.std == pytest.approx(1.0) and s.sem == pytest.approx(1 / math.sqrt(3))
    single = summarize([4.0])
    assert single.n == 1 and math.isnan(single.std) and single.to_dict()["std"] is None
    cols = summarize([[1.0, np.nan], [3.0, 2.0]], axis=0)
    assert cols.mean.tolist() == [2.0, 2.0] and cols.n.tolist() == [2, 1] and math.isnan(cols.std[1])
    kept, n_out = exclude([0.1, 0.2, 0.3], [True, False, True])
    assert kept.tolist() == [0.1, 0.3] and n_out == 1
    with pytest.raises(ValueError, match="one entry per value"):
        exclude([0.1, 0.2], [True])


def test_verdict_json_round_trip():
    v = paired_difference([1.0, np.nan], [0.0, 0.0], direction="greater")  # NaN CI, one excluded
    d = v.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = Verdict.from_dict(json.loads(text))
    assert back.to_dict() == d
    assert back.verdict == "inconclusive" and back.ci == (None, None)
    with pytest.raises(ValueError, match="verdict"):
        Verdict("maybe", "r", "t", None, (None, None), 0)  # type: ignore[arg-type]


# -- minimal effects, regime checks, `untested` --------------------------------------------------------

from batchscope.stats import RegimeCheck, gate  # noqa: E402


def test_min_effect_holds_only_for_an_effect_of_at_least_that_size():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, 8)
    big = paired_difference(base + 2.0 + rng.normal(0, 0.05, 8), base, direction="greater", min_effect=1.0)
    assert big.verdict == "holds" and big.details["min_effect"] == 1.0
    # significant but far smaller than the stated minimum: the paper's effect is not there
    tiny = paired_difference(base + 1e-3 + rng.normal(0, 1e-5, 8), base, direction="greater", min_effect=1.0)
    assert tiny.verdict == "fails"
    # without a minimum the same tiny effect holds: the minimum is what makes the rule able to fail
    assert paired_difference(base + 1e-3 + rng.normal(0, 1e-5, 8), base, direction="greater").verdict == "holds"
    reversed_ = paired_difference(base - 2.0, base, direction="greater", min_effect=1.0)
    assert reversed_.verdict == "fails"
    # "less": mirrored
    assert paired_difference(base - 2.0 + rng.normal(0, 0.05, 8), base, direction="less", min_effect=1.0).verdict == "holds"
    assert paired_difference(base - 0.5 + rng.normal(0, 0.01, 8), base, direction="less", min_effect=1.0).verdict == "fails"
    with pytest.raises(ValueError, match="min_effect"):
        paired_difference(base, base, direction="less", min_effect=-1.0)


def test_min_effect_estimate_above_but_interval_straddling_is_inconclusive():
    # mean 1.2 > 1.0 but the CI reaches below 1.0: holds (CI excludes 0, estimate >= 1); a mean of 0.9 with the
    # CI straddling 1.0 is neither
    d = np.array([0.5, 1.3, 0.9, 1.0, 0.8])
    v = paired_difference(d, np.zeros(5), direction="greater", min_effect=1.0)
    assert v.verdict == "inconclusive" and v.ci[0] > 0 and v.ci[1] > 1.0


def test_trend_min_effect():
    x = np.log([32.0, 64, 128, 256])
    rng = np.random.default_rng(0)
    strong = -x + rng.normal(0, 0.01, (5, 4))
    assert trend(x, strong, direction="decreasing", min_effect=0.5).verdict == "holds"
    weak = np.tile([0.0, -1e-3, 1e-3, -2e-3], (5, 1)) + rng.normal(0, 1e-5, (5, 4))
    assert trend(x, weak, direction="decreasing", min_effect=0.5, method="slope").verdict == "fails"


def test_gate_makes_a_failed_regime_untested_never_fails():
    rng = np.random.default_rng(1)
    v = paired_difference(rng.normal(0, 1, 6) - 5, np.zeros(6), direction="greater")
    assert v.verdict == "fails"
    ok = RegimeCheck("reached", "lambda reaches 0.9 x 2/eta", True, {"ratio": 0.95})
    no = RegimeCheck("reached", "lambda reaches 0.9 x 2/eta", False, {"ratio": 0.69})
    assert gate(v, [ok]).verdict == "fails"
    g = gate(v, [ok, no])
    assert g.verdict == "untested" and g.details["verdict_if_tested"] == "fails"
    assert "lambda reaches 0.9 x 2/eta" in g.details["untested_because"][0]
    held = paired_difference(rng.normal(0, 0.1, 6) + 5, np.zeros(6), direction="greater")
    assert gate(held, [no]).verdict == "untested"  # outside its regime a claim does not hold either
    assert RegimeCheck.from_dict(no.to_dict()) == no


def test_all_of_counts_each_excluded_run_once_and_reports_untested():
    a = paired_difference([1.0, 2, 3, np.nan], [0.0, 0, 0, 0], direction="greater")
    b = paired_difference([1.0, 2, 3, np.nan], [0.5, 0.5, 0.5, 0.5], direction="greater")
    assert a.n_excluded == b.n_excluded == 1
    assert all_of([a, b]).n_excluded == 1  # the same run, left out of both parts
    assert all_of([a, b], excluded=3).n_excluded == 3
    u = gate(a, [RegimeCheck("r", "c", False)])
    assert all_of([a, u]).verdict == "untested"
    assert all_of([paired_difference([-1.0, -1.1, -0.9], [0.0, 0, 0], direction="greater"), u]).verdict == "fails"


# -- same_distribution --------------------------------------------------------------------------------

from batchscope.stats import same_distribution  # noqa: E402


def _exp_distance(ratio: float) -> float:
    """The KS distance between exponential laws with means 1 and `ratio` (the gap peaks at x = r log r / (r - 1))."""
    x = ratio * math.log(ratio) / (ratio - 1)
    return math.exp(-x / ratio) - math.exp(-x)


def test_same_distribution_holds_fails_inconclusive():
    rng = np.random.default_rng(1)  # a fixed draw; under equality the KS test rejects 1 seed in 20 (0 and 5 among them)
    a = rng.exponential(1.0, 5000)
    a2 = rng.exponential(1.0, 5000)
    same = same_distribution(a, a2, margin=0.1)
    assert same.verdict == "holds" and same.ci[0] == 0.0 and same.ci[1] < 0.1
    assert same.estimate == pytest.approx(st.ks_2samp(a, a2).statistic) and same.details["ks_p"] >= 0.05
    # the interval's half-width: DKW with alpha / 2 per sample, sqrt(log(4 / 0.05) / (2 n)) each
    assert same.ci[1] - same.estimate == pytest.approx(2 * math.sqrt(math.log(80) / 10_000))
    b = rng.exponential(1.5, 5000)  # true distance 0.148: beyond the margin, and measured so
    far = same_distribution(a, b, margin=0.1)
    assert _exp_distance(1.5) == pytest.approx(0.148, abs=0.001)
    assert far.verdict == "fails" and far.ci[0] > 0.1
    assert far.estimate == pytest.approx(st.ks_2samp(a, b).statistic) and far.details["ks_p"] < 1e-6
    # a real difference inside the margin (true distance 0.035): the KS test sees it, but the claim is agreement
    # within the margin, which the interval shows: holds
    near = same_distribution(a, rng.exponential(1.1, 5000), margin=0.1)
    assert near.verdict == "holds" and near.details["ks_p"] < 0.05 and near.ci[1] < 0.1
    # a real difference straddling the margin (true distance 0.1 at ratio ~1.33): inconclusive
    mid = same_distribution(a, rng.exponential(1.33, 5000), margin=0.1)
    assert _exp_distance(1.33) == pytest.approx(0.1, abs=0.005)
    assert mid.verdict == "inconclusive" and mid.ci[0] < 0.1 < mid.ci[1]
    # too few values for the interval to reach inside the margin
    assert same_distribution(a[:50], rng.exponential(1.0, 50), margin=0.1).verdict == "inconclusive"
    assert same_distribution(a[:2], a[2:4], margin=0.1).verdict == "inconclusive"  # fewer than MIN_N


def test_same_distribution_interval_covers_the_true_distance():
    # DKW is conservative: the 95% interval covers the true distance at least 95% of the time
    rng = np.random.default_rng(11)
    truth, covered, null_holds = _exp_distance(1.3), 0, 0
    for _ in range(DRAWS):
        v = same_distribution(rng.exponential(1.0, 400), rng.exponential(1.3, 400), margin=0.5)
        covered += v.ci[0] <= truth <= v.ci[1]
        null_holds += same_distribution(rng.exponential(1.0, 400), rng.exponential(1.0, 400), margin=0.5).verdict == "holds"
    assert covered / DRAWS >= 0.95 - _tol(0.95)
    # with no difference it holds whenever the interval's upper end is below the margin: nearly always here
    assert null_holds / DRAWS > 0.95 - _tol(0.95)


def test_same_distribution_censoring():
    rng = np.random.default_rng(2)
    a, b = rng.exponential(1.0, 5000), rng.exponential(1.0, 5000)
    cap = 3.0  # ~5% censored, as NaN (an escape not seen by the step limit)
    ca, cb = np.where(a <= cap, a, np.nan), np.where(b <= cap, b, np.nan)
    v = same_distribution(ca, cb, margin=0.1, censored_at=cap)
    assert v.verdict == "holds" and v.n == 5000 and v.n_excluded == 0
    assert v.estimate == pytest.approx(st.ks_2samp(np.minimum(a, cap + 1), np.minimum(b, cap + 1)).statistic)
    assert v.details["censored_fraction"]["a"] == pytest.approx(math.exp(-cap), abs=0.01)
    # half censored: beyond the cap the laws could differ by up to 0.5, so equality cannot be claimed
    cap = math.log(2)
    heavy = same_distribution(np.where(a <= cap, a, np.nan), np.where(b <= cap, b, np.nan), margin=0.1, censored_at=cap)
    assert heavy.verdict == "inconclusive" and heavy.ci[1] > 0.5
    # without censored_at, non-finite values are dropped and counted
    dropped = same_distribution(ca, cb, margin=0.1)
    assert dropped.n_excluded == int(np.isnan(ca).sum() + np.isnan(cb).sum()) and dropped.n < 5000
    with pytest.raises(ValueError, match="margin"):
        same_distribution(a, b, margin=1.5)
