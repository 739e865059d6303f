"""The break-even study's rules on synthetic trajectories (no training): every claim holds with the effect
present and does not hold with it absent or reversed; every regime check passes and fails as stated,
and a failed check makes its claims `untested`."""

from __future__ import annotations

import numpy as np
import pytest

from batchscope.studies.breakeven import (
    LEVELS,
    MIN_RATIO,
    NEAR,
    REACH,
    SHARE,
    STAY,
    Setting,
    Trajectory,
    breakeven_index,
    decide,
    peak_until,
)

STEPS = np.unique(np.r_[0, np.round(np.geomspace(1, 2048, 20))])
L0, LINF, LBE = 2.5, 0.2, 1.7  # training loss: at init, asymptote, at the reference run's break-even point
ETA_LO, ETA_HI = 0.01, 0.1
LIMIT = 2 / ETA_HI
S = Setting(ETA_LO, ETA_HI, 128, 32)
SEEDS = range(5)
# the speed of each run along the same loss curve: the larger lr ten times faster than the smaller one
RATE = {"small_lr": 5e-4, "large_lr": 5e-3, "small_batch": 6e-3}


def _loss(rate):
    return LINF + (L0 - LINF) * np.exp(-rate * STEPS)


def _h_ref(loss, plateau=0.97):
    """lambda_1^H of the reference run against its training loss: climbs to plateau x 2/eta at LBE, stays there."""
    c = np.log((plateau * LIMIT) / 5.0) / np.log(L0 / LBE)  # 5 at the start, plateau x limit at LBE
    return np.where(loss <= LBE, plateau * LIMIT, plateau * LIMIT * (loss / LBE) ** (-c))


def _after(loss, a):
    """(LBE / loss)^a after the break-even point (loss below LBE), 1 before it."""
    return np.where(loss < LBE, (LBE / np.minimum(loss, LBE)) ** a, 1.0)


def _traj(role, seed, *, a=0.0, a_cond=None, before=1.0, plateau=0.97, h_step0=None, rate=None, h=None):
    """A synthetic trajectory. For the flatter-predicted comparisons, `a` > 0 makes the other run sharper after
    break-even (the paper's effect), 0 removes it, < 0 reverses it; `before` scales the other run before it."""
    rng = np.random.default_rng(100 * seed + ROLE_ID[role])
    loss = _loss(RATE[role] if rate is None else rate)
    base = _h_ref(loss, plateau) if h is None else h(loss)
    if role == "small_lr":  # sharper than the reference after break-even when a > 0
        hh = base * _after(loss, a) * np.where(loss < LBE, 1.0, before)
        cond = 0.3 / _after(loss, a if a_cond is None else a_cond)
    elif role == "small_batch":  # breaks even earlier, at a lower lambda_1^H, and stays flatter when a > 0
        hh = (_h_ref(loss, plateau * 2.0 ** (-a)) if h is None else base) / _after(loss, a)
        cond = 0.3 * _after(loss, a if a_cond is None else a_cond)
    else:
        hh, cond = base, np.full_like(loss, 0.3)
    noise = np.exp(0.02 * rng.standard_normal() + 0.01 * rng.standard_normal(len(STEPS)))
    hh = hh * noise
    if h_step0 is not None:
        hh = hh.copy()
        hh[0] = h_step0
    return Trajectory(STEPS, loss, {"hessian_lambda_1": hh, "K_lambda_1": 0.8 * hh, "K_trace": 5 * hh,
                                    "K_condition_k": cond * noise})


ROLE_ID = {"small_lr": 1, "large_lr": 2, "small_batch": 3}


def _runs(a_lr=1.5, a_b=1.5, a_cond_lr=None, a_cond_b=None, before=1.0, **ref):
    return {
        "small_lr": {s: _traj("small_lr", s, a=a_lr, a_cond=a_cond_lr, before=before) for s in SEEDS},
        "large_lr": {s: _traj("large_lr", s, **ref) for s in SEEDS},
        "small_batch": {s: _traj("small_batch", s, a=a_b, a_cond=a_cond_b) for s in SEEDS},
    }


def _verdicts(runs, kind="plain"):
    return {c.id.removeprefix(f"{kind}_"): c for c in decide(kind, runs, S)}


CLAIMS = ["lr_lower_hessian_lambda_1", "lr_lower_K_lambda_1", "lr_conditioning",
          "batch_lower_hessian_lambda_1", "batch_lower_K_lambda_1", "batch_conditioning", "lr_separation"]


def test_every_claim_holds_with_the_effect_present_and_every_check_passes():
    claims = _verdicts(_runs())
    assert set(claims) == set(CLAIMS)
    for cid, c in claims.items():
        assert all(r.passed for r in c.regime), (cid, [(r.id, r.measured) for r in c.regime if not r.passed])
        assert c.verdict.verdict == "holds", (cid, c.verdict.details)
        assert c.magnitude and all(m.measured and m.measured > MIN_RATIO for m in c.magnitude), (cid, c.magnitude)
        assert all(m.published is None and m.source for m in c.magnitude)
        assert not c.own


def test_the_breakeven_statement_is_a_regime_check_not_a_claim():
    claims = decide("plain", _runs(), S)
    assert not any("reached" in c.id or "breakeven_passed" in c.id for c in claims)
    assert all(any(r.id == "plain_breakeven_passed" for r in c.regime) for c in claims)


@pytest.mark.parametrize("a", [0.0, -1.5], ids=["absent", "reversed"])
def test_lr_claims_do_not_hold_without_the_effect(a):
    claims = _verdicts(_runs(a_lr=a))
    for cid in ("lr_lower_hessian_lambda_1", "lr_lower_K_lambda_1", "lr_conditioning", "lr_separation"):
        assert claims[cid].verdict.verdict != "holds", cid
        assert claims[cid].verdict.verdict == "fails", cid  # the regime is fine, so the data decides: it fails
    assert claims["batch_lower_hessian_lambda_1"].verdict.verdict == "holds"


@pytest.mark.parametrize("a", [0.0, -1.5], ids=["absent", "reversed"])
def test_batch_claims_do_not_hold_without_the_effect(a):
    claims = _verdicts(_runs(a_b=a))
    for cid in ("batch_lower_hessian_lambda_1", "batch_lower_K_lambda_1", "batch_conditioning"):
        assert claims[cid].verdict.verdict != "holds", cid
    assert claims["lr_lower_hessian_lambda_1"].verdict.verdict == "holds"


@pytest.mark.parametrize("a", [0.0, -1.5], ids=["absent", "reversed"])
def test_conditioning_claims_alone_do_not_hold_without_their_effect(a):
    claims = _verdicts(_runs(a_cond_lr=a, a_cond_b=a))
    assert claims["lr_conditioning"].verdict.verdict != "holds"
    assert claims["batch_conditioning"].verdict.verdict != "holds"
    assert claims["lr_lower_hessian_lambda_1"].verdict.verdict == "holds"


def test_a_small_effect_below_the_minimal_ratio_does_not_hold():
    # the small-lr run ends up only ~8% sharper: real but short of the stated ratio 1.25
    claims = _verdicts(_runs(a_lr=0.15, a_cond_lr=0.15))
    for cid in ("lr_lower_hessian_lambda_1", "lr_lower_K_lambda_1", "lr_conditioning"):
        assert claims[cid].verdict.verdict != "holds", cid


def test_separation_needs_the_gap_to_open_at_breakeven():
    # absent: the small-lr run is twice as sharp as the reference at every matched loss, before and after
    # break-even alike: lambda_1^H is lower for the larger lr, but nothing happens at the break-even point
    runs = _runs()
    runs["small_lr"] = {s: _traj("small_lr", s, a=0.0, h=lambda loss: 2.0 * _h_ref(loss)) for s in SEEDS}
    claims = _verdicts(runs)
    assert claims["lr_lower_hessian_lambda_1"].verdict.verdict == "holds"
    assert claims["lr_separation"].verdict.verdict != "holds"
    # reversed: the gap is there before break-even and closes after it
    runs["small_lr"] = {s: _traj("small_lr", s, a=0.0, before=2.0) for s in SEEDS}
    assert _verdicts(runs)["lr_separation"].verdict.verdict != "holds"


# -- the regime checks -----------------------------------------------------------------------------
def test_breakeven_not_reached_makes_every_claim_untested():
    claims = _verdicts(_runs(plateau=0.7))  # the case: the peak is 0.7 of 2/eta
    for cid, c in claims.items():
        check = next(r for r in c.regime if r.id == "plain_breakeven_passed")
        assert not check.passed
        assert c.verdict.verdict == "untested", cid
        assert "verdict_if_tested" in c.verdict.details and c.verdict.details["untested_because"]


def test_step_zero_does_not_count_for_breakeven():
    # lambda_1^H above 2/eta at the initialization only, then never near it: not passed
    runs = _runs(plateau=0.7, h_step0=1.5 * LIMIT)
    t = runs["large_lr"][0]
    assert t.values["hessian_lambda_1"][0] > LIMIT and breakeven_index(t, ETA_HI) is None
    assert all(c.verdict.verdict == "untested" for c in decide("plain", runs, S))
    assert np.isnan(peak_until(Trajectory([0], [1.0], {"m": [5.0]}), "m", 2.0))  # step 0 alone has no peak


def test_the_maximum_attained_is_held_at_two_probe_points_not_set_by_one_spike():
    steps, loss = [0, 1, 2, 3, 4, 5], [3.0, 2.5, 2.0, 1.5, 1.0, 0.5]
    one = Trajectory(steps, loss, {"m": [9.0, 1.0, 1.2, 8.0, 1.1, 1.0]})  # one probe on a spike (step 0 never counts)
    two = Trajectory(steps, loss, {"m": [9.0, 1.0, 1.2, 8.0, 7.0, 1.0]})  # the metric stays up for two probes
    assert peak_until(one, "m", 0.5) == pytest.approx(1.2)
    assert peak_until(two, "m", 0.5) == pytest.approx(7.0)
    assert peak_until(two, "m", 1.5) == pytest.approx(1.2)  # only the points up to the first at loss <= 1.5
    assert np.isnan(peak_until(Trajectory([0, 1], [3.0, 1.0], {"m": [1.0, 2.0]}), "m", 1.0))  # one point after init


def test_a_spike_that_does_not_stay_is_not_breakeven():
    def spike(loss):
        h = _h_ref(loss, plateau=0.4)
        i = int(np.argmin(np.abs(loss - LBE)))
        h[i] = 1.0 * LIMIT  # one point at the limit, then back far below NEAR x 2/eta
        return h

    runs = _runs()
    runs["large_lr"] = {s: _traj("large_lr", s, h=spike) for s in SEEDS}
    c = decide("plain", runs, S)[0]
    check = next(r for r in c.regime if r.id == "plain_breakeven_passed")
    assert not check.passed and all(v["points_near"] < STAY for v in check.measured["per_seed"].values())
    assert c.verdict.verdict == "untested"


def test_breakeven_check_states_its_thresholds_and_measures_per_seed():
    c = decide("plain", _runs(), S)[0]
    check = next(r for r in c.regime if r.id == "plain_breakeven_passed")
    assert check.passed
    assert f"{REACH:g} x 2/eta" in check.condition and f"{STAY} consecutive probe points" in check.condition
    assert f"{NEAR:g} x 2/eta" in check.condition
    seeds = check.measured["per_seed"]
    assert len(seeds) == 5 and all(v["max_lambda_over_limit"] >= REACH and v["points_near"] >= STAY for v in seeds.values())
    assert all(v["breakeven_step"] >= 1 for v in seeds.values())


def test_small_lr_run_too_short_leaves_the_lr_claims_untested_only():
    runs = _runs()
    # the small-lr run never gets below the loss at break-even: nothing to compare after it
    runs["small_lr"] = {s: _traj("small_lr", s, a=1.5, rate=1e-4) for s in SEEDS}
    claims = _verdicts(runs)
    for cid in ("lr_lower_hessian_lambda_1", "lr_lower_K_lambda_1", "lr_conditioning", "lr_separation"):
        assert claims[cid].verdict.verdict == "untested", cid
        assert not next(r for r in claims[cid].regime if r.id == "plain_lr_window").passed
    for cid in ("batch_lower_hessian_lambda_1", "batch_conditioning"):
        assert claims[cid].verdict.verdict == "holds", cid


def test_breakeven_at_the_first_step_leaves_separation_untested():
    # the reference run is at the limit from the first update on: no "before" to compare with
    runs = _runs()
    runs["large_lr"] = {s: _traj("large_lr", s, h=lambda loss: np.full_like(loss, 0.97 * LIMIT)) for s in SEEDS}
    claims = _verdicts(runs)
    sep = claims["lr_separation"]
    assert sep.verdict.verdict == "untested"
    assert not next(r for r in sep.regime if r.id == "plain_lr_window_before").passed
    assert all(r.passed for r in claims["lr_lower_hessian_lambda_1"].regime)  # the other claims stay testable
    assert claims["lr_lower_hessian_lambda_1"].verdict.verdict != "untested"


def test_excluded_runs_are_counted_with_their_reason():
    runs = _runs()
    runs["small_lr"][3] = "diverged"
    runs["small_batch"][4] = "failed"
    claims = _verdicts(runs)
    lr = claims["lr_lower_hessian_lambda_1"].verdict
    assert lr.verdict == "holds" and lr.n == 4 and lr.n_excluded == 1
    assert lr.details["excluded_reasons"] == {"diverged": 1}
    b = claims["batch_conditioning"].verdict
    assert b.n == 4 and b.n_excluded == 1 and b.details["excluded_reasons"] == {"failed": 1}


def test_too_few_usable_seeds_never_hold():
    runs = _runs()
    for s in (2, 3, 4):
        runs["large_lr"][s] = "diverged"
    claims = _verdicts(runs)
    assert all(c.verdict.verdict != "holds" for c in claims.values())


def test_matched_loss_levels_are_inside_the_window():
    from batchscope.studies.breakeven import Pair

    runs = _runs()
    pr = Pair(runs["large_lr"][0], runs["small_lr"][0], runs["large_lr"][0], ETA_HI)
    lv = pr.after_levels
    assert len(lv) == LEVELS and lv[0] == pytest.approx(pr.loss_be) and lv[-1] == pytest.approx(pr.loss_common)
    assert pr.loss_common < pr.loss_be < pr.loss_start


# -- the configuration: a network kind with its own data, learning rates and budget ----------------
def test_the_rnn_kind_runs_its_own_data_and_settings_and_leaves_the_others_alone():
    from batchscope.studies import Options
    from batchscope.studies.breakeven import Breakeven, BreakevenConfig

    opts = Options(scale="quick")
    c = BreakevenConfig.quick(opts)
    sweeps = {sw.name: sw for sw in Breakeven().sweeps(opts)}
    assert set(sweeps) == {f"breakeven-{k}-{w}" for k in ("plain", "bn", "rnn") for w in ("lr", "batch")}
    rnn, own = sweeps["breakeven-rnn-lr"], c.kinds["rnn"]
    assert rnn.model.name == "lstm" and rnn.data.name == "first_marker" and rnn.data.label_noise == own["data"]["label_noise"]
    assert rnn.grid["optim.lr"] == list(own["lrs"]) and rnn.train.steps == own["steps"]
    assert all(p.bn_mode == "eval" and p.points == own["points"] and p.subset == own["subset"] for p in rnn.probes)
    plain = sweeps["breakeven-plain-lr"]
    assert plain.data.name == "mnist1d" and plain.grid["optim.lr"] == list(c.lrs) and plain.train.steps == c.steps
    assert all(p.bn_mode == "train" for p in plain.probes)
    # paper scale has no recurrent kind (its data would be the user's images)
    assert set(BreakevenConfig.paper(Options(scale="paper", data=["cifar10=/nowhere"])).models) == {"plain", "bn"}


def test_a_kind_with_an_unknown_field_is_refused_in_one_line():
    from dataclasses import replace

    from batchscope.studies import Options
    from batchscope.studies.breakeven import BreakevenConfig

    c = replace(BreakevenConfig.quick(Options()), kinds={"rnn": {"lr": (0.1, 1.0)}})
    with pytest.raises(ValueError, match=r"kind rnn: unknown field\(s\) lr \(expected some of .*lrs") as info:
        c.kind("rnn")
    assert "\n" not in str(info.value)
    assert c.kind("plain").lrs == c.lrs


def _spike(loss):
    """lambda_1^H that touches 2/eta at one probe point and falls far below NEAR x 2/eta: break-even not passed."""
    h = _h_ref(loss, plateau=0.4)
    h[int(np.argmin(np.abs(loss - LBE)))] = 1.0 * LIMIT
    return h


def test_a_seed_out_of_the_regime_is_left_out_and_counted():
    # one seed of five misses break-even: the check passes (4 of 5 >= 80%), that seed leaves every comparison
    runs = _runs()
    runs["large_lr"][2] = _traj("large_lr", 2, h=_spike)
    claims = _verdicts(runs)
    check = next(r for r in claims["lr_lower_hessian_lambda_1"].regime if r.id == "plain_breakeven_passed")
    assert check.passed and check.measured["seeds_passed"] == 4 and f"{SHARE:.0%}" in check.condition
    for cid in CLAIMS:
        v = claims[cid].verdict
        assert v.verdict == "holds" and v.n == 4 and v.n_excluded == 1, cid
        assert v.details["excluded_reasons"] == {"seed out of the regime (plain_breakeven_passed)": 1}, cid


def test_too_many_seeds_out_of_the_regime_leave_the_claims_untested():
    # two of five miss break-even (60% < 80%): not testable
    runs = _runs()
    for seed in (1, 3):
        runs["large_lr"][seed] = _traj("large_lr", seed, h=_spike)
    claims = _verdicts(runs)
    assert all(c.verdict.verdict == "untested" for c in claims.values())
    # one seed short of the window after break-even in the lr comparison only: lr claims lose it, batch claims keep it
    runs = _runs()
    runs["small_lr"][0] = _traj("small_lr", 0, a=1.5, rate=1e-4)
    claims = _verdicts(runs)
    assert claims["lr_lower_hessian_lambda_1"].verdict.n == 4 and claims["lr_lower_hessian_lambda_1"].verdict.verdict == "holds"
    assert claims["lr_lower_hessian_lambda_1"].verdict.details["excluded_reasons"] == {
        "seed out of the regime (plain_lr_window)": 1}
    assert claims["batch_lower_hessian_lambda_1"].verdict.n == 5
