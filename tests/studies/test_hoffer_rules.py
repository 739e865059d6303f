"""Hoffer et al.'s rules on stored numbers (no training): every claim can hold, and can fail to hold; every
regime check can pass and fail, and a failed one makes its claims `untested`."""

import math

import numpy as np
import pytest

from batchscope.randomwalk import record_steps
from batchscope.studies.hoffer import (
    DIFFUSION_MIN_DECADES,
    DIFFUSION_MIN_POINTS,
    FIT_ACC,
    LADDER,
    MIN_EFFECT,
    WALK_GAP_FRACTION,
    WALK_START,
    Measured,
    WalkNumbers,
    decide,
    high_lr_window,
    theory_beta,
)

SEEDS = range(5)
# test accuracy along the ladder with the paper's shape: a gap, closed step by step (points)
PRESENT = {"SB": 74.0, "LB": 66.0, "+LR": 69.0, "+GBN": 71.0, "+RA": 74.0}


def _measured(acc=PRESENT, train_acc=None, updates=None, window=None, excluded=None, noise=0.3, walk=None) -> Measured:
    """5 seeds; a per-seed offset shared by all steps (same init and test set) plus a little independent noise."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1.0, len(SEEDS))
    m = Measured()
    for label in LADDER:
        m.test_acc[label] = {s: (acc[label] + shared[s] + rng.normal(0, noise)) / 100 for s in SEEDS}
        m.train_acc[label] = {s: (train_acc or {}).get(label, 1.0) for s in SEEDS}
        m.train_loss[label] = {s: 0.01 for s in SEEDS}
        m.updates[label] = {s: (updates or {}).get(label, 3750 if label == "SB" else 3840 if label == "+RA" else 240)
                            for s in SEEDS}
        m.excluded[label] = dict((excluded or {}).get(label, {}))
    for label in ("SB", "LB"):
        m.windows[label] = {s: (window or _window)(label, s) for s in SEEDS}
    m.walk = walk or _walk()
    return m


def _walk(potential="log2", flat="sqrt", steps=1 << 17, left=0, noise=0.02) -> WalkNumbers:
    """The walk's numbers, 5 seeds: mean distances shaped as asked, times 2% independent noise per point.
    Shapes: Sinai's (log t)^2, free diffusion's sqrt t, a power law t^0.3, (log t)^3.5 (a power of log t
    that grows almost as fast as free diffusion over the window), or stuck (a constant)."""
    t = record_steps(steps, 60).astype(float)
    shapes = {"log2": 0.05 * np.log(t) ** 2, "sqrt": 0.08 * np.sqrt(t), "t0.3": 0.1 * t**0.3,
              "log3.5": 0.002 * np.log(t) ** 3.5, "stuck": np.full_like(t, 5.0)}
    rng = np.random.default_rng(7)
    curve = lambda shape: shapes[shape] * np.exp(rng.normal(0, noise, len(t)))
    return WalkNumbers(t, {s: curve(potential) for s in SEEDS}, {s: curve(flat) for s in SEEDS},
                       {s: left if s == 0 else 0 for s in SEEDS}, length=0.1, time_unit=1.0, hurst=0.5, walkers=512)


def _window(label, s, growth="log", t=None):
    t = np.geomspace(125 if label == "SB" else 8, 2500 if label == "SB" else 160, 30) if t is None else t
    rng = np.random.default_rng(100 + s)
    shape = {"log": np.log(t), "sqrt": np.sqrt(t), "flat": np.zeros_like(t)}[growth]
    scale = 10 / np.ptp(shape) if np.ptp(shape) else 0.0
    return t, 5 + scale * shape + rng.normal(0, 0.05, len(t))


def _claims(m: Measured) -> dict:
    return {c.id: c for c in decide(m, sb=32, lb=512, margin=0.0096)}


def _v(m: Measured, cid: str) -> str:
    return _claims(m)[cid].verdict.verdict


# -- the paper's effects present: every claim holds, every regime check passes ------------------------------


def test_all_present_all_hold_and_every_check_passes():
    claims = _claims(_measured())
    assert {c: claims[c].verdict.verdict for c in claims} == dict.fromkeys(
        ["ladder_LB", "ladder_LR", "ladder_GBN", "ladder_RA", "gap_closed", "log_diffusion", "random_potential_ultraslow"],
        "holds")
    for c in claims.values():
        assert c.regime and all(r.passed for r in c.regime)
        assert c.magnitude and all(mag.source for mag in c.magnitude)
        assert not c.own  # every claim here is the paper's


def test_magnitudes_in_points_beside_the_papers():
    claims = _claims(_measured())
    lb = claims["ladder_LB"].magnitude[0]
    assert lb.published == pytest.approx(0.96)  # F1: 99.23 - 98.27
    assert lb.measured == pytest.approx(8.0, abs=1.0)
    assert "unconfirmed" in lb.source
    assert claims["ladder_GBN"].magnitude[0].published == pytest.approx(0.06)
    assert claims["gap_closed"].magnitude[0].published == pytest.approx(0.02)


# -- each ladder step: absent and reversed never hold; below the minimal effect never holds ------------------


@pytest.mark.parametrize("cur", ["LB", "+LR", "+GBN", "+RA"])
@pytest.mark.parametrize("kind", ["absent", "reversed", "too_small"])
def test_ladder_step_absent_reversed_or_too_small_does_not_hold(cur, kind):
    prev = LADDER[LADDER.index(cur) - 1]
    acc = dict(PRESENT)
    claimed = +1 if cur != "LB" else -1  # cur claimed above prev (LB: below SB)
    step = {"absent": 0.0, "reversed": -3.0, "too_small": 0.5 * 100 * MIN_EFFECT[cur]}[kind]
    acc[cur] = acc[prev] + claimed * step
    noise = 0.3 if kind != "too_small" else 0.001  # a precise effect, smaller than the minimal one
    v = _v(_measured(acc, noise=noise), f"ladder_{cur.lstrip('+')}")
    assert v != "holds"
    if kind in ("reversed", "too_small"):
        assert v == "fails"


# -- the closed gap ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ra", [66.0, 71.0, 80.0])  # gap left as LB's, half closed, overshot by 6 points
def test_gap_not_closed_does_not_hold(ra):
    acc = {**PRESENT, "+RA": ra}
    assert _v(_measured(acc), "gap_closed") != "holds"
    assert _v(_measured(acc), "gap_closed") == "fails"


# -- log t diffusion: a model comparison against sqrt t ------------------------------------------------------


@pytest.mark.parametrize("sb,lb", [("sqrt", "sqrt"), ("flat", "flat"), ("log", "sqrt"), ("sqrt", "log")])
def test_diffusion_sqrt_or_no_growth_does_not_hold(sb, lb):
    m = _measured(window=lambda label, s: _window(label, s, sb if label == "SB" else lb))
    v = _v(m, "log_diffusion")
    assert v != "holds"
    if "sqrt" in (sb, lb):
        assert v == "fails"  # sqrt t fits better: reversed


def test_diffusion_magnitude_is_the_residual_ratio():
    c = _claims(_measured())["log_diffusion"]
    ratio = [mag for mag in c.magnitude if mag.quantity.startswith("RSS") and "SB" in mag.quantity][0]
    assert ratio.measured > 2 and ratio.published is None


# -- the random walk on a random potential: a power of log t against a power law, and the control ------------


def test_walk_with_sinai_growth_holds_with_its_exponents_beside_the_theory():
    c = _claims(_measured())["random_potential_ultraslow"]
    assert c.verdict.verdict == "holds" and all(r.passed for r in c.regime)
    mag = lambda start: [m for m in c.magnitude if m.quantity.startswith(start)][0]
    k = mag("k,")
    assert k.published == 2.0 and k.measured == pytest.approx(2.0, abs=0.05)  # fitted on exact (log t)^2 data
    assert k.ci[0] < k.measured < k.ci[1] and "2H" in k.source
    assert mag("beta of the flat control").measured == pytest.approx(0.5, abs=0.02)
    assert mag("beta of the flat control").published == 0.5
    assert mag("beta, ").published == pytest.approx(theory_beta(_walk()), abs=1e-3)
    assert c.figure == "random_potential"


@pytest.mark.parametrize("potential", ["sqrt", "t0.3", "log3.5", "stuck"])
def test_walk_without_ultraslow_growth_does_not_hold(potential):
    # free diffusion; a plain power law; a power of log t that is not slow (beta ~ 0.44 over the window); no growth
    c = _claims(_measured(walk=_walk(potential=potential)))["random_potential_ultraslow"]
    assert c.verdict.verdict != "holds"
    parts = c.verdict.details["parts"]
    if potential in ("sqrt", "t0.3"):  # a power law fits better: the model comparison fails
        assert c.verdict.verdict == "fails" and parts["power of log t fits better"]["verdict"] == "fails"
    if potential == "log3.5":  # the shape is right, the slowdown too small
        assert parts["power of log t fits better"]["verdict"] == "holds"
        assert parts["exponent far below the control's"]["verdict"] == "fails"


def test_walk_theory_exponent_and_minimal_gap_come_from_the_window_alone():
    w = _walk()
    b = theory_beta(w)
    t = w.steps[w.steps >= WALK_START * w.time_unit]
    # the local exponent of (log t)^2 is 2 / log t: the fitted one lies between its values at the window's ends
    assert 2 / np.log(t[-1]) < b < 2 / np.log(t[0])
    c = _claims(_measured(walk=w))["random_potential_ultraslow"]
    assert c.measured["min_beta_gap"] == pytest.approx(WALK_GAP_FRACTION * (0.5 - b))
    assert theory_beta(_walk(potential="sqrt")) == b  # the data do not enter


@pytest.mark.parametrize("flat", ["t0.3", "stuck"])
def test_walk_whose_control_does_not_diffuse_is_untested(flat):
    c = _claims(_measured(walk=_walk(flat=flat)))["random_potential_ultraslow"]
    assert c.verdict.verdict == "untested"
    assert any("walk_control_diffuses" in why for why in c.verdict.details["untested_because"])
    check = [r for r in c.regime if r.id == "walk_control_diffuses"][0]
    assert not check.passed


def test_walk_too_short_or_leaving_its_field_is_untested():
    short = _claims(_measured(walk=_walk(steps=5000)))["random_potential_ultraslow"]  # window 121..5000: 1.6 decades
    assert short.verdict.verdict == "untested"
    assert [r.id for r in short.regime if not r.passed] == ["walk_left_initial_basin"]
    left = _claims(_measured(walk=_walk(left=3)))["random_potential_ultraslow"]
    assert left.verdict.verdict == "untested" and left.verdict.details["verdict_if_tested"] == "holds"
    assert [r.id for r in left.regime if not r.passed] == ["walk_inside_field"]
    stuck = _claims(_measured(walk=_walk(potential="stuck")))["random_potential_ultraslow"]
    basin = [r for r in stuck.regime if r.id == "walk_left_initial_basin"][0]
    assert basin.passed  # a constant distance of 5 is 50 l0: the walkers left, then stopped
    w = _walk()
    w.potential = {s: d * 0.01 for s, d in w.potential.items()}  # never farther than ~0.1 l0 at the window's start
    near = _claims(_measured(walk=w))["random_potential_ultraslow"]
    assert near.verdict.verdict == "untested"
    assert [r.id for r in near.regime if not r.passed] == ["walk_left_initial_basin"]


# -- regime checks --------------------------------------------------------------------------------------


def test_lb_not_fitting_the_training_set_makes_its_claims_untested():
    m = _measured(train_acc={"LB": FIT_ACC - 0.05})
    claims = _claims(m)
    for cid in ("ladder_LB", "ladder_LR"):  # the claims comparing LB with another run
        v = claims[cid].verdict
        assert v.verdict == "untested"
        assert v.details["verdict_if_tested"] == "holds"
        assert any("fits_training_set_LB" in why for why in v.details["untested_because"])
    assert claims["ladder_GBN"].verdict.verdict == "holds"  # not gated on LB
    check = [r for r in claims["ladder_LB"].regime if r.id == "fits_training_set_LB"][0]
    assert not check.passed and check.measured["train_acc_mean"] == pytest.approx(FIT_ACC - 0.05)


def test_sb_not_fitting_makes_the_gap_and_its_closing_untested():
    claims = _claims(_measured(train_acc={"SB": 0.9}))
    assert claims["ladder_LB"].verdict.verdict == "untested"
    assert claims["gap_closed"].verdict.verdict == "untested"
    # a claim that would fail is untested too, never fails
    claims = _claims(_measured({**PRESENT, "LB": 80.0}, train_acc={"SB": 0.9}))
    assert claims["ladder_LB"].verdict.verdict == "untested"
    assert claims["ladder_LB"].verdict.details["verdict_if_tested"] == "fails"


def test_regime_adaptation_without_sbs_updates_is_untested():
    claims = _claims(_measured(updates={"+RA": 240}))
    assert claims["ladder_RA"].verdict.verdict == "untested"
    assert claims["gap_closed"].verdict.verdict == "untested"
    check = [r for r in claims["gap_closed"].regime if r.id == "ra_matches_sb_updates"][0]
    assert not check.passed and check.measured["ratio"] == pytest.approx(240 / 3750)


@pytest.mark.parametrize("t", [np.geomspace(125, 125 * 10 ** (DIFFUSION_MIN_DECADES / 2), 30),
                               np.geomspace(125, 2500, DIFFUSION_MIN_POINTS - 2)])
def test_short_or_sparse_diffusion_window_is_untested(t):
    m = _measured(window=lambda label, s: _window(label, s, "log", t if label == "SB" else None))
    c = _claims(m)["log_diffusion"]
    assert c.verdict.verdict == "untested"
    sb = [r for r in c.regime if r.id == "diffusion_window_SB"][0]
    lb = [r for r in c.regime if r.id == "diffusion_window_LB"][0]
    assert not sb.passed and lb.passed


def test_missing_fitted_runs_fail_the_window_check():
    m = _measured()
    m.windows["LB"] = {}
    assert _v(m, "log_diffusion") == "untested"


def test_high_lr_window_keeps_points_after_the_first_epoch_and_before_the_drop():
    steps = np.array([0, 1, 2, 5, 8, 16, 50, 100, 160, 170, 200, 240])
    lr = np.array([0.0, .1, .1, .1, .1, .1, .1, .1, .1, .01, .01, .001])
    dist = np.arange(len(steps), dtype=float)
    t, d = high_lr_window(steps, dist, lr, per_epoch=8)
    assert t.tolist() == [8, 16, 50, 100, 160]
    assert d.tolist() == [4, 5, 6, 7, 8]
    t, _ = high_lr_window(steps, dist, np.where(steps > 0, 0.1, 0.0), per_epoch=8)  # no drop: to the end
    assert t[-1] == 240


# -- exclusions ------------------------------------------------------------------------------------------


def test_excluded_runs_are_counted_with_their_reason():
    m = _measured(excluded={"LB": {"diverged": 1}})
    m.test_acc["LB"][4] = math.nan
    m.train_acc["LB"][4] = math.nan
    v = _claims(m)["ladder_LB"].verdict
    assert v.n == 4 and v.n_excluded == 1
    assert v.details["excluded_reasons"] == {"diverged": 1}
