"""Keskar et al.'s rules on made-up numbers (no training): every claim holds with the effect present and
does not hold with it absent or reversed; every regime check passes and fails on the numbers it reads,
and a failed check makes its claims `untested`; excluded runs are counted with their reason."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from batchscope.studies import Options
from batchscope.studies.keskar import (
    ALPHAS,
    DIST_MIN_LOG,
    GAP_MIN_POINTS,
    HESSIAN_MIN_LOG,
    LINE_MIN_LOG,
    SHARP_MIN_LOG,
    TREND_MIN_RHO,
    KeskarConfig,
    decide,
    published_ratios,
    regime_checks,
    why_excluded,
)

SB, LB = 32, 400
SIZES = [32, 64, 128, 400, 1000]
SEEDS = [0, 1, 2, 3, 4]
# the regime thresholds the rules read (the rest of the config plans the sweep)
CFG = replace(KeskarConfig.quick(Options()), fit_acc=0.99, patience=10, min_delta=1e-4, max_grad_ratio=0.1,
              min_usable=0.8)
PAIR_CLAIMS = ["gap", "sharper_eps0.001", "sharper_eps0.0005", "sharper_eps0.001_p100", "hessian_top", "distance", "line"]
TREND_CLAIMS = ["acc_trend", "sharp_trend"]
ALL_CLAIMS = PAIR_CLAIMS + TREND_CLAIMS


def _t(b: int) -> float:
    """0 at SB, 1 at LB, beyond 1 for larger batches (log scale)."""
    return math.log(b / SB) / math.log(LB / SB)


def make(effect: float = 1.0, *, seed: int = 0):
    """Runs and lines with Keskar's effects scaled by `effect` (+1 present, 0 absent, -1 reversed)."""
    rng = np.random.default_rng(seed)
    rng_h = np.random.default_rng(seed + 1000)
    runs = []
    for s in SEEDS:
        for b in SIZES:
            t = _t(b)
            runs.append({
                "batch": b, "seed": s, "status": "done",
                "train_acc": 0.999, "train_loss": 0.005, "plateau": True, "grad_ratio": 0.03,
                "test_acc": 0.80 - effect * 0.03 * t + rng.normal(0, 0.002),
                "distance": 20.0 * math.exp(-effect * math.log(4) * t) * (1 + rng.normal(0, 0.02)),
                "epochs": 100.0, "steps": 1000.0,
                **{k: base * math.exp(effect * math.log(20) * t) * (1 + rng.normal(0, 0.05))
                   for k, base in (("sharp_eps0.001", 2.0), ("sharp_eps0.0005", 0.8), ("sharp_eps0.001_p100", 0.2))},
                # its own noise stream, so that the other made-up numbers stay as they were
                "lambda1": 5.0 * math.exp(effect * math.log(8) * t) * (1 + rng_h.normal(0, 0.05)),
            })
            for k in ("_eps0.001", "_eps0.0005", "_eps0.001_p100"):  # the gradient's part: 5% of each sharpness
                runs[-1][f"lin{k}"] = 0.05 * runs[-1][f"sharp{k}"]
    lines = {}
    i0, i1 = int(np.argmin(abs(ALPHAS))), int(np.argmin(abs(ALPHAS - 1)))
    for s in SEEDS:
        row = np.full(len(ALPHAS), 0.01)
        r_sb = 0.05 * (1 + rng.normal(0, 0.05))
        r_lb = 0.05 * math.exp(effect * math.log(10)) * (1 + rng.normal(0, 0.05))
        row[[i0 - 2, i0 + 2]] += r_sb
        row[[i1 - 2, i1 + 2]] += r_lb
        lines[s] = {"train_loss": row.tolist()}
    return runs, lines


def verdicts(runs, lines, cfg=CFG):
    claims, info = decide(runs, lines, sb=SB, lb=LB, cfg=cfg)
    return {c.id: c for c in claims}, info


def test_every_claim_holds_with_the_effect_present_and_all_checks_pass():
    claims, info = verdicts(*make(1.0))
    assert set(claims) == set(ALL_CLAIMS)
    assert all(c.passed for c in info["checks"].values())
    for cid in ALL_CLAIMS:
        assert claims[cid].verdict.verdict == "holds", (cid, claims[cid].verdict)
        assert not claims[cid].own
        assert claims[cid].regime, cid  # every claim is gated
        assert claims[cid].magnitude, cid


@pytest.mark.parametrize("effect", [0.0, -1.0], ids=["absent", "reversed"])
def test_no_claim_holds_with_the_effect_absent_or_reversed(effect):
    claims, _ = verdicts(*make(effect, seed=1))
    for cid in ALL_CLAIMS:
        assert claims[cid].verdict.verdict != "holds", (cid, claims[cid].verdict)
    if effect < 0:  # reversed: the CI lies wholly on the wrong side
        for cid in ALL_CLAIMS:
            assert claims[cid].verdict.verdict == "fails", (cid, claims[cid].verdict)


def test_an_effect_smaller_than_the_stated_minimum_does_not_hold():
    # a precise effect just below each minimum: holds would need the minimal size
    runs, lines = make(1.0)
    small = {
        "sharp_eps0.001": math.exp(SHARP_MIN_LOG["sharper_eps0.001"] * 0.5),
        "sharp_eps0.0005": math.exp(SHARP_MIN_LOG["sharper_eps0.0005"] * 0.5),
        "sharp_eps0.001_p100": math.exp(SHARP_MIN_LOG["sharper_eps0.001_p100"] * 0.5),
    }
    for r in runs:
        lbish = r["batch"] == LB
        for k, ratio in small.items():
            r[k] = 1.0 * (ratio if lbish else 1.0)
            r["lin" + k[len("sharp"):]] = 0.0
        r["lambda1"] = 5.0 * (math.exp(HESSIAN_MIN_LOG * 0.5) if lbish else 1.0)
        r["distance"] = 10.0 * (1.0 if lbish else math.exp(DIST_MIN_LOG * 0.5))
        r["test_acc"] = 0.8 - (GAP_MIN_POINTS / 200 if lbish else 0.0)
    for s in lines:
        row = np.full(len(ALPHAS), 0.01)
        i0, i1 = int(np.argmin(abs(ALPHAS))), int(np.argmin(abs(ALPHAS - 1)))
        row[[i0 - 2, i0 + 2]] += 0.05
        row[[i1 - 2, i1 + 2]] += 0.05 * math.exp(LINE_MIN_LOG * 0.5)
        lines[s] = {"train_loss": row.tolist()}
    claims, _ = verdicts(runs, lines)
    for cid in PAIR_CLAIMS:
        assert claims[cid].verdict.verdict != "holds", cid


def test_minimal_effects_come_from_the_papers_numbers():
    # a tenth of the log of the smallest published LB/SB ratio per metric
    assert math.exp(SHARP_MIN_LOG["sharper_eps0.001"]) == pytest.approx((258.75 / 29.85) ** 0.1)  # C3
    assert math.exp(SHARP_MIN_LOG["sharper_eps0.0005"]) == pytest.approx((227.31 / 7.08) ** 0.1)  # C1
    assert math.exp(SHARP_MIN_LOG["sharper_eps0.001_p100"]) == pytest.approx((72.99 / 6.05) ** 0.1)  # C4
    assert math.exp(DIST_MIN_LOG) == pytest.approx(3 ** 0.1)
    assert GAP_MIN_POINTS == 0.2 and TREND_MIN_RHO == 0.5
    assert published_ratios({"F1": (1.23, 205.14)})["F1"] == pytest.approx(166.78, rel=1e-3)


def test_a_weak_trend_does_not_hold():
    # no relation with the batch size, only noise: the mean per-seed rho is far from the minimal 0.5
    runs, lines = make(1.0)
    rng = np.random.default_rng(3)
    for r in runs:
        r["sharp_eps0.001"] = 2.0 * (1 + rng.normal(0, 0.3))
        r["test_acc"] = 0.8 + rng.normal(0, 0.01)
    claims, _ = verdicts(runs, lines)
    assert claims["sharp_trend"].verdict.verdict != "holds"
    assert claims["acc_trend"].verdict.verdict != "holds"


def test_magnitudes_stand_beside_the_papers():
    claims, _ = verdicts(*make(1.0))
    m = claims["sharper_eps0.001"].magnitude[0]
    assert m.published == pytest.approx(166.8, abs=0.1) and m.measured == pytest.approx(20, rel=0.1)
    assert claims["sharper_eps0.001"].magnitude[1].published == (8.7, 223.5)
    d = claims["distance"].magnitude[0]
    assert d.published == (3.0, 10.0) and d.measured == pytest.approx(4, rel=0.1)
    g = claims["gap"].magnitude[0]
    assert g.published == pytest.approx(0.22) and g.measured == pytest.approx(3, rel=0.1)
    assert claims["line"].magnitude[0].measured == pytest.approx(10, rel=0.1)


@pytest.mark.parametrize("network, gap, sharp, half", [
    ("F1", 0.22, 205.14 / 1.23, 42.90 / 0.61), ("C2", 1.98, 925.32 / 8.68, 175.31 / 2.07),
    ("C3", 3.13, 258.75 / 29.85, None), ("C4", 5.27, 421.84 / 12.83, None),
])
def test_magnitudes_are_the_chosen_networks(network, gap, sharp, half):
    # Tables 2 and 3, the network's row; eps = 5e-4 is published for F1, C1 and C2 only
    claims, _ = verdicts(*make(1.0), cfg=replace(CFG, network=network))
    g = claims["gap"].magnitude[0]
    assert g.published == pytest.approx(gap) and g.source.startswith(f"Table 2, {network} (")
    s = claims["sharper_eps0.001"].magnitude[0]
    assert s.published == pytest.approx(sharp, abs=0.05) and s.source.endswith(f", {network}")
    h = claims["sharper_eps0.0005"].magnitude[0]
    if half is None:
        assert h.published is None and h.source.endswith(f"not published for {network}")
    else:
        assert h.published == pytest.approx(half, abs=0.05)
    # the range over the networks and the verdicts (minimal effects from every network's numbers) do not change
    assert claims["gap"].magnitude[1].published == (0.22, 5.27)
    assert claims["sharper_eps0.001"].verdict.verdict == "holds"


# -- regime checks ----------------------------------------------------------------------------------


def _set(runs, batch, n, **values):
    """Change the first n runs of a batch size."""
    for r in [r for r in runs if r["batch"] == batch][:n]:
        r.update(values)


def test_fit_check_passes_with_one_odd_seed_and_fails_with_two():
    runs, lines = make(1.0)
    _set(runs, SB, 1, train_acc=0.95)
    checks = regime_checks(runs, sb=SB, lb=LB, cfg=CFG)
    assert checks["sb_lb_fit"].passed  # 4 of 5 fitted
    claims, _ = verdicts(runs, lines)
    assert claims["gap"].verdict.verdict == "holds"
    assert claims["gap"].verdict.details["excluded_reasons"] == {"missed the fitting criterion": 1}
    assert claims["gap"].verdict.n_excluded >= 1
    _set(runs, SB, 2, train_acc=0.95)
    checks = regime_checks(runs, sb=SB, lb=LB, cfg=CFG)
    assert not checks["sb_lb_fit"].passed
    assert checks["sb_lb_fit"].measured["SB"]["fitted"] == "3/5"


@pytest.mark.parametrize("change", [{"plateau": False}, {"grad_ratio": 0.3}], ids=["loss improving", "gradient large"])
def test_minimum_check_fails_when_lb_is_not_at_a_minimum(change):
    runs, lines = make(-1.0)  # the data alone would say "fails"
    _set(runs, LB, 2, **change)
    claims, info = verdicts(runs, lines)
    assert not info["checks"]["sb_lb_minimum"].passed
    for cid in PAIR_CLAIMS:
        v = claims[cid].verdict
        assert v.verdict == "untested", cid  # never "fails" outside the regime
        assert v.details["verdict_if_tested"] in ("fails", "inconclusive")
        assert any("sb_lb_minimum" in why for why in v.details["untested_because"])
    # the sweep lost 2 of 5 runs at one size: its trends are untested too
    assert not info["checks"]["sweep_minimum"].passed
    for cid in TREND_CLAIMS:
        assert claims[cid].verdict.verdict == "untested"


def test_sweep_check_fails_when_a_batch_size_misses_the_minimum_and_passes_otherwise():
    runs, lines = make(1.0)
    _set(runs, 1000, 5, grad_ratio=0.5)  # the largest batch never reaches a minimum
    claims, info = verdicts(runs, lines)
    assert not info["checks"]["sweep_minimum"].passed
    assert info["checks"]["sweep_minimum"].measured["usable_fraction_by_batch"]["1000"] == 0.0
    for cid in TREND_CLAIMS:
        assert claims[cid].verdict.verdict == "untested"
        assert claims[cid].verdict.details["excluded_reasons"] == {"gradient not small (not at a minimum)": 5}
    # SB and LB are untouched: their claims are still tested
    assert info["checks"]["sb_lb_minimum"].passed and claims["gap"].verdict.verdict == "holds"
    runs, lines = make(1.0)
    _set(runs, 1000, 1, plateau=False)  # one run of one size: still in the regime, the run counted as excluded
    claims, info = verdicts(runs, lines)
    assert info["checks"]["sweep_minimum"].passed
    assert claims["acc_trend"].verdict.verdict == "holds"
    assert claims["acc_trend"].verdict.details["excluded_reasons"] == {"loss still improving at the epoch cap": 1}


def test_excluded_runs_are_counted_with_their_reason():
    runs, lines = make(1.0)
    _set(runs, LB, 1, status="diverged", train_acc=float("nan"), test_acc=float("nan"))
    claims, info = verdicts(runs, lines)
    assert info["excluded"] == {"diverged": 1}
    v = claims["sharper_eps0.001"].verdict
    assert v.details["excluded_reasons"] == {"diverged": 1} and v.n_excluded == 1 and v.n == 4


def test_why_excluded():
    ok = {"status": "done", "train_acc": 1.0, "plateau": True, "grad_ratio": 0.01}
    assert why_excluded(ok, CFG) is None
    assert why_excluded({**ok, "status": "failed"}, CFG) == "failed"
    assert why_excluded({**ok, "status": "pending"}, CFG) == "not trained"
    assert why_excluded({**ok, "train_acc": 0.5}, CFG) == "missed the fitting criterion"
    assert why_excluded({**ok, "plateau": False}, CFG) == "loss still improving at the epoch cap"
    assert why_excluded({**ok, "grad_ratio": float("nan")}, CFG) == "gradient not small (not at a minimum)"


def _with_first_order(runs, arm: int, share: float, sweep: bool = False):
    """Give the runs of batch `arm` (every batch size with sweep=True) a first-order part of `share` x each sharpness."""
    for r in runs:
        if sweep or r["batch"] == arm:
            for k in ("_eps0.001", "_eps0.0005", "_eps0.001_p100"):
                r[f"lin{k}"] = share * r[f"sharp{k}"]
    return runs


def test_gradient_part_check_fails_when_the_gradient_could_decide_a_sharpness_claim():
    # reversed effect, and SB's sharpness half gradient: without the gradient SB could be half as sharp, so
    # the data's "fails" (LB flatter) could be the gradient's doing
    runs, lines = make(-1.0)
    runs = _with_first_order(runs, SB, 0.5)
    claims, info = verdicts(runs, lines)
    for cid in ("sharper_eps0.001", "sharper_eps0.0005", "sharper_eps0.001_p100"):
        v = claims[cid].verdict
        # the reversed ratio (1/20 between SB and LB) is far from 1.24x even so: decided, tested, fails
        assert info["checks"]["gradient_part" + cid[len("sharper"):]].passed and v.verdict == "fails"
    # an absent effect (ratio 1) with SB's sharpness 30% gradient: the bounds allow ratios on both sides of
    # the minimal effect, so the claims are untested, not `fails`
    runs, lines = make(0.0)
    runs = _with_first_order(runs, SB, 0.3)
    claims, info = verdicts(runs, lines)
    for cid in ("sharper_eps0.001", "sharper_eps0.0005", "sharper_eps0.001_p100"):
        check = info["checks"]["gradient_part" + cid[len("sharper"):]]
        assert not check.passed and check.measured["pairs_decided"] == "0/5"
        v = claims[cid].verdict
        assert v.verdict == "untested" and v.details["verdict_if_tested"] == "fails"
    # claims that do not read the sharpness are still tested (the line's symmetric difference cancels the gradient)
    for cid in ("gap", "distance", "line"):
        assert claims[cid].verdict.verdict in ("fails", "inconclusive"), cid


def test_gradient_part_check_passes_when_the_effect_is_far_beyond_what_the_gradient_can_make():
    # SB's sharpness twice its own size in first-order part (a very flat SB minimum, as measured at quick scale),
    # LB's 5%: SB without its gradient could be up to 3x sharper, and a 20x ratio still clears 1.24x
    runs, lines = make(1.0)
    runs = _with_first_order(runs, SB, 2.0)
    claims, info = verdicts(runs, lines)
    assert info["checks"]["gradient_part_eps0.001"].passed
    assert claims["sharper_eps0.001"].verdict.verdict == "holds"
    # LB's sharpness mostly gradient: the gradient alone could make LB look sharper, so "holds" is not allowed
    runs, lines = make(1.0)
    runs = _with_first_order(runs, LB, 0.99)
    claims, info = verdicts(runs, lines)
    assert not info["checks"]["gradient_part_eps0.001"].passed
    assert claims["sharper_eps0.001"].verdict.verdict == "untested"


def test_gradient_part_sweep_check_both_ways():
    runs, lines = make(1.0)
    claims, info = verdicts(*(_with_first_order(runs, SB, 0.05, sweep=True), lines))
    assert info["checks"]["gradient_part_sweep"].passed and claims["sharp_trend"].verdict.verdict == "holds"
    # no trend, every sharpness 30% gradient: some orders the bounds allow rise, some do not
    runs, lines = make(0.0)
    claims, info = verdicts(*(_with_first_order(runs, SB, 0.3, sweep=True), lines))
    assert not info["checks"]["gradient_part_sweep"].passed
    assert claims["sharp_trend"].verdict.verdict == "untested"


def test_spearman_bounds_equal_the_extremes_of_sampled_values():
    from scipy.stats import spearmanr

    from batchscope.studies.keskar import _spearman_bounds

    rng = np.random.default_rng(3)
    x = np.log([32, 64, 128, 256, 400, 1000])
    for _ in range(5):
        mid = rng.uniform(0, 3, 6)
        half = rng.uniform(0, 0.8, 6)
        lo, hi = _spearman_bounds(x, mid - half, mid + half)
        draws = [spearmanr(x, rng.uniform(mid - half, mid + half)).statistic for _ in range(3000)]
        # sampled values never leave the exact bounds, and reach (close to) them
        assert lo - 1e-12 <= min(draws) and max(draws) <= hi + 1e-12
        assert min(draws) <= lo + 0.15 and max(draws) >= hi - 0.15
    # disjoint intervals in rising order: only one order, rho = 1
    assert _spearman_bounds(x, np.arange(6.0), np.arange(6.0) + 0.5) == pytest.approx((1.0, 1.0))


KS = [0, 1, 4, 16, 64]


def make_warm(effect: float = 1.0, *, seed: int = 0):
    """Warm-start runs: LB from SB's weights after k epochs; sharpness falls and accuracy rises with k
    (scaled by `effect`: +1 present, 0 absent, -1 reversed)."""
    rng = np.random.default_rng(seed + 7)
    warm = []
    for s in SEEDS:
        for k in KS:
            t = math.log1p(k) / math.log1p(KS[-1])
            sharp = 40.0 * math.exp(-effect * math.log(10) * t) * (1 + rng.normal(0, 0.05))
            warm.append({
                "batch": LB, "seed": s, "status": "done", "warm": k,
                "train_acc": 0.999, "train_loss": 0.005, "plateau": True, "grad_ratio": 0.03,
                "test_acc": 0.75 + effect * 0.03 * t + rng.normal(0, 0.002),
                "sharp_eps0.001": sharp, "lin_eps0.001": 0.02 * sharp,
            })
    return warm


def warm_verdicts(warm):
    runs, lines = make(1.0)
    claims, info = decide(runs, lines, sb=SB, lb=LB, cfg=CFG, warm=warm)
    return {c.id: c for c in claims}, info


def test_warm_start_claims_hold_with_the_effect_and_not_without():
    claims, info = warm_verdicts(make_warm(1.0))
    assert info["checks"]["warm_minimum"].passed and info["checks"]["gradient_part_warm"].passed
    for cid in ("warm_sharpness", "warm_accuracy"):
        assert claims[cid].verdict.verdict == "holds", (cid, claims[cid].verdict)
    for effect in (0.0, -1.0):
        claims, _ = warm_verdicts(make_warm(effect))
        for cid in ("warm_sharpness", "warm_accuracy"):
            assert claims[cid].verdict.verdict != "holds", (effect, cid)
    claims, _ = warm_verdicts(make_warm(-1.0))
    assert {claims[c].verdict.verdict for c in ("warm_sharpness", "warm_accuracy")} == {"fails"}


def test_warm_start_claims_are_untested_when_the_warm_runs_are_not_at_a_minimum():
    warm = make_warm(1.0)
    for r in warm:
        if r["warm"] == 64:
            r["plateau"] = False  # stopped by the epoch cap, still improving
    claims, info = warm_verdicts(warm)
    assert not info["checks"]["warm_minimum"].passed
    for cid in ("warm_sharpness", "warm_accuracy"):
        v = claims[cid].verdict
        assert v.verdict == "untested" and v.details["verdict_if_tested"] in ("holds", "inconclusive")
    # the sharpness trend is untested when the gradient could decide it, the accuracy trend is not
    warm = make_warm(0.0)
    for r in warm:
        r["lin_eps0.001"] = 0.3 * r["sharp_eps0.001"]
    claims, info = warm_verdicts(warm)
    assert not info["checks"]["gradient_part_warm"].passed
    assert claims["warm_sharpness"].verdict.verdict == "untested"
    assert claims["warm_accuracy"].verdict.verdict != "untested"


# -- the remedies -------------------------------------------------------------------------------------------------
REMEDY_CLAIMS = [f"remedy_{n}_{w}" for n in ("augmentation", "adversarial") for w in ("accuracy", "sharp")]


def make_remedies(gain: float = 0.015, sharp_over_sb: float = 10.0, *, seed: int = 0):
    """LB runs with each remedy, paired with make(1.0)'s runs by seed: test accuracy `gain` above LB's (make's LB:
    0.77, SB 0.80) and eps=1e-3 sharpness `sharp_over_sb` x SB's (make's SB: 2.0, LB 40)."""
    rng = np.random.default_rng(seed + 11)
    out = []
    for name in ("augmentation", "adversarial"):
        for s in SEEDS:
            sharp = 2.0 * sharp_over_sb * (1 + rng.normal(0, 0.05))
            out.append({"batch": LB, "seed": s, "status": "done", "remedy": name, "warm": None,
                        "train_acc": 0.999, "train_loss": 0.005, "plateau": True, "grad_ratio": 0.03,
                        "test_acc": 0.77 + gain + rng.normal(0, 0.002),
                        "sharp_eps0.001": sharp, "lin_eps0.001": 0.02 * sharp})
    return out


def remedy_verdicts(remedies):
    runs, lines = make(1.0)
    claims, info = decide(runs, lines, sb=SB, lb=LB, cfg=CFG, remedies=remedies)
    return {c.id: c for c in claims}, info


def test_remedy_claims_hold_when_accuracy_improves_and_minima_stay_sharp():
    claims, info = remedy_verdicts(make_remedies())
    for n in ("augmentation", "adversarial"):
        assert info["checks"][f"remedy_{n}_minimum"].passed and info["checks"][f"gradient_part_remedy_{n}"].passed
    for cid in REMEDY_CLAIMS:
        assert claims[cid].verdict.verdict == "holds", (cid, claims[cid].verdict)
        assert claims[cid].regime and claims[cid].magnitude and not claims[cid].own
    # the share of the gap closed: gain 1.5 of a 3-point gap
    share = next(m for m in claims["remedy_augmentation_accuracy"].magnitude if "share" in m.quantity)
    assert share.measured == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("gain, sharp, fails, expect", [
    (0.0, 10.0, "accuracy", ("inconclusive", "fails")),  # no improvement: never holds
    (-0.01, 10.0, "accuracy", ("fails",)),  # worse than LB
    (0.015, 1.0, "sharp", ("fails",)),  # as flat as SB: the minima did not stay sharp
    (0.015, 0.5, "sharp", ("fails",)),  # flatter than SB
])
def test_remedy_claims_do_not_hold_without_their_effect(gain, sharp, fails, expect):
    claims, _ = remedy_verdicts(make_remedies(gain, sharp, seed=3))
    for n in ("augmentation", "adversarial"):
        assert claims[f"remedy_{n}_{fails}"].verdict.verdict in expect, claims[f"remedy_{n}_{fails}"].verdict
    other = "sharp" if fails == "accuracy" else "accuracy"
    assert all(claims[f"remedy_{n}_{other}"].verdict.verdict == "holds" for n in ("augmentation", "adversarial"))


def test_remedy_claims_are_untested_when_the_remedy_arm_is_not_at_a_minimum():
    rem = make_remedies()
    for r in rem:
        if r["remedy"] == "adversarial" and r["seed"] in SEEDS[:2]:
            r["train_acc"] = 0.9  # did not fit
    claims, info = remedy_verdicts(rem)
    assert not info["checks"]["remedy_adversarial_minimum"].passed and info["checks"]["remedy_augmentation_minimum"].passed
    assert {claims[f"remedy_adversarial_{w}"].verdict.verdict for w in ("accuracy", "sharp")} == {"untested"}
    assert claims["remedy_adversarial_accuracy"].verdict.n_excluded >= 2  # counted with their reason
    assert {claims[f"remedy_augmentation_{w}"].verdict.verdict for w in ("accuracy", "sharp")} == {"holds"}
    # the gradient could decide "stays sharp" when the first-order part is as large as the effect
    rem = make_remedies(sharp_over_sb=1.5)
    for r in rem:
        r["lin_eps0.001"] = 0.5 * r["sharp_eps0.001"]
    claims, info = remedy_verdicts(rem)
    assert not info["checks"]["gradient_part_remedy_augmentation"].passed
    assert claims["remedy_augmentation_sharp"].verdict.verdict == "untested"
