"""Li & Li's rules on stored numbers, no simulation or training: every claim holds with the effect present,
and does not hold with it absent or reversed; every regime check passes and fails on the right inputs, and a
failed check makes its claims `untested`."""

import math
from dataclasses import replace

import numpy as np
import pytest

from batchscope import diffusion as dif
from batchscope.studies import Options
from batchscope.studies.lili import LiLi, decide_simulations, decide_training, decide_weak, raised_updates

SEEDS = [0, 1, 2, 3, 4]
C = LiLi().config(Options(scale="quick"))
SIM_CLAIMS = ("minimum_exponential", "saddle_linear", "minimum_vs_saddle", "batch_sharp", "sharp_vs_flat", "batch_saddle")
TRAIN_CLAIMS = ("raise_settles", "raise_generalizes", "raise_beats_large")


# -- made-up simulation numbers ------------------------------------------------------------------------


def _grid(means, eta_curv, noise=0.02, seed=0, se_log=0.03, escaped=1.0):
    """seeds x grid numbers around `means` (one row per seed), multiplicative noise."""
    rng = np.random.default_rng(seed)
    means = np.asarray(means, dtype=float)
    m = means[None, :] * np.exp(noise * rng.standard_normal((len(SEEDS), len(means))))
    return {"mean": m, "se_log": np.full(m.shape, se_log), "escaped": np.full(m.shape, escaped),
            "eta_curv": np.full(m.shape, eta_curv)}


def _functions():
    """The SDE's escape steps for each use, as functions of the grid variable."""
    mn, sh, sd = C.minimum, C.sharp, C.saddle
    return {
        "minimum": lambda ie: dif.kramers_escape_steps(mn.dV, mn.w, 1 / ie, mn.sigma, mn.batch),
        "saddle": lambda e: dif.saddle_escape_steps(sd.gamma, sd.r, e, sd.sigma, sd.batch),
        "sharp": lambda m: dif.kramers_escape_steps(mn.dV, sh.w, sh.eta, sh.sigma, int(m)),
        "saddle_batch": lambda m: dif.saddle_escape_steps(sd.gamma, sd.r, sd.batch_eta, sd.sigma, int(m)),
    }


def sde_sims(**override):
    """Numbers as the SDE predicts them (the effects present), with 2% noise; `override` replaces a use's
    mean escape steps by a function of its grid variable (or, for flat_vs_sharp, a (flat, sharp) pair)."""
    mn, sh, sd = C.minimum, C.sharp, C.saddle
    f = {**_functions(), **{k: v for k, v in override.items() if k != "flat_vs_sharp"}}
    grids = {"minimum": mn.inv_eta, "saddle": sd.etas, "sharp": sh.batches, "saddle_batch": sd.batches}
    curv = {"minimum": 1 / min(mn.inv_eta) * 4 * mn.dV / mn.w ** 2, "saddle": max(sd.etas) * sd.gamma,
            "sharp": sh.eta * 4 * mn.dV / sh.w ** 2, "saddle_batch": sd.batch_eta * sd.gamma}
    out = {k: _grid([f[k](x) for x in grids[k]], curv[k], seed=i) for i, k in enumerate(grids)}
    pair = override.get("flat_vs_sharp") or (
        dif.kramers_escape_steps(mn.dV, mn.w, sh.eta, sh.sigma, sh.vs_flat_batch),
        dif.kramers_escape_steps(mn.dV, sh.w, sh.eta, sh.sigma, sh.vs_flat_batch))
    out["flat_vs_sharp"] = _grid(pair, curv["sharp"], seed=9)
    return out


def sim_verdicts(sims):
    return {c.id: c.verdict.verdict for c in decide_simulations(C, sims, SEEDS)}


def sim_claims(sims):
    return {c.id: c for c in decide_simulations(C, sims, SEEDS)}


def test_simulation_claims_hold_as_the_sde_predicts():
    claims = sim_claims(sde_sims())
    assert set(claims) == set(SIM_CLAIMS)
    for cid, c in claims.items():
        assert c.verdict.verdict == "holds", (cid, c.verdict.details)
        assert all(r.passed for r in c.regime), cid
        assert c.magnitude and c.magnitude[0].published is not None and "SDE" in c.magnitude[0].source
        assert not c.own


def test_minimum_exponential_absent_reversed_or_polynomial():
    k = dif.arrhenius_slope(C.minimum.dV, C.minimum.sigma, C.minimum.batch)
    # T proportional to 1/eta (linear): rises with 1/eta, but is not exponential
    assert sim_verdicts(sde_sims(minimum=lambda ie: 50.0 * ie))["minimum_exponential"] != "holds"
    # a steep polynomial: T proportional to 1/eta^4 rises a lot, yet a power law fits exactly
    assert sim_verdicts(sde_sims(minimum=lambda ie: 0.05 * ie**4))["minimum_exponential"] != "holds"
    # reversed: exponentially falling in 1/eta
    assert sim_verdicts(sde_sims(minimum=lambda ie: 1e4 * ie * math.exp(-k * ie)))["minimum_exponential"] != "holds"
    # absent: no dependence at all
    assert sim_verdicts(sde_sims(minimum=lambda ie: 3000.0))["minimum_exponential"] != "holds"


def test_minimum_exponential_slope_must_be_a_tenth_of_the_sdes():
    # exactly exponential, but with a slope a twentieth of the SDE's: not the paper's effect
    k = dif.arrhenius_slope(C.minimum.dV, C.minimum.sigma, C.minimum.batch)
    v = sim_verdicts(sde_sims(minimum=lambda ie: 30 * ie * math.exp(k / 20 * ie)))
    assert v["minimum_exponential"] != "holds"


def test_saddle_linear_absent_reversed():
    assert sim_verdicts(sde_sims(saddle=lambda e: 500.0))["saddle_linear"] != "holds"  # absent
    assert sim_verdicts(sde_sims(saddle=lambda e: 1e4 * e))["saddle_linear"] != "holds"  # reversed
    assert sim_verdicts(sde_sims(saddle=lambda e: math.exp(0.05 / e)))["saddle_linear"] != "holds"  # exponential


def test_minimum_vs_saddle_absent_reversed():
    # absent: the minimum escapes like the saddle (about linear)
    assert sim_verdicts(sde_sims(minimum=lambda ie: 20.0 * ie))["minimum_vs_saddle"] != "holds"
    # reversed: the saddle much steeper than the minimum
    v = sim_verdicts(sde_sims(minimum=lambda ie: 20.0 * ie, saddle=lambda e: 1e-3 / e**4))
    assert v["minimum_vs_saddle"] != "holds"


def test_batch_sharp_absent_reversed_or_wrong_size():
    sh, mn = C.sharp, C.minimum
    kappa = 2 * mn.dV / (sh.eta * sh.sigma ** 2)
    assert sim_verdicts(sde_sims(sharp=lambda m: 2000.0))["batch_sharp"] != "holds"  # absent
    assert sim_verdicts(sde_sims(sharp=lambda m: 2000.0 * math.exp(-kappa * m)))["batch_sharp"] != "holds"  # reversed
    # rises with m, as "by construction" would have it, but 3x steeper than the SDE: not the diffusion's dependence
    assert sim_verdicts(sde_sims(sharp=lambda m: 10.0 * math.exp(3 * kappa * m)))["batch_sharp"] != "holds"
    assert sim_verdicts(sde_sims(sharp=lambda m: 10.0 * math.exp(kappa / 3 * m)))["batch_sharp"] != "holds"


def test_sharp_vs_flat_absent_reversed():
    assert sim_verdicts(sde_sims(flat_vs_sharp=(1000.0, 1000.0)))["sharp_vs_flat"] != "holds"  # absent
    assert sim_verdicts(sde_sims(flat_vs_sharp=(250.0, 1000.0)))["sharp_vs_flat"] != "holds"  # reversed
    assert sim_verdicts(sde_sims(flat_vs_sharp=(1000.0, 10.0)))["sharp_vs_flat"] != "holds"  # 100x: not the SDE's 4


def test_batch_saddle_absent_reversed():
    assert sim_verdicts(sde_sims(saddle_batch=lambda m: 400.0))["batch_saddle"] != "holds"  # absent
    assert sim_verdicts(sde_sims(saddle_batch=lambda m: 400.0 / math.log(2 + m)))["batch_saddle"] != "holds"  # reversed
    assert sim_verdicts(sde_sims(saddle_batch=lambda m: 100.0 * m))["batch_saddle"] != "holds"  # linear in m: too strong


@pytest.mark.parametrize("use, claims", [
    ("minimum", ("minimum_exponential", "minimum_vs_saddle")),
    ("saddle", ("saddle_linear", "minimum_vs_saddle")),
    ("sharp", ("batch_sharp",)),
    ("flat_vs_sharp", ("sharp_vs_flat",)),
    ("saddle_batch", ("batch_saddle",)),
])
def test_simulation_regime_checks(use, claims):
    # too few escaped in one group: untested
    sims = sde_sims()
    sims[use]["escaped"][0, -1] = 0.6
    got = sim_claims(sims)
    for cid in claims:
        assert got[cid].verdict.verdict == "untested", cid
        assert got[cid].verdict.details["verdict_if_tested"] == "holds"
        (bad,) = [r for r in got[cid].regime if not r.passed]
        assert bad.id == f"{use}_escaped" and bad.measured["min_escaped_fraction"] == pytest.approx(0.6)
    assert all(got[cid].verdict.verdict == "holds" for cid in SIM_CLAIMS if cid not in claims)
    # a step too large against the curvature: out of the diffusion regime, untested
    sims = sde_sims()
    sims[use]["eta_curv"][:, 0] = 0.4
    got = sim_claims(sims)
    for cid in claims:
        assert got[cid].verdict.verdict == "untested", cid
        assert [r.id for r in got[cid].regime if not r.passed] == [f"{use}_diffusion"]
    # passing values pass
    for cid in claims:
        assert all(r.passed for r in sim_claims(sde_sims())[cid].regime)


def test_grid_resolution_check():
    sims = sde_sims()
    sims["minimum"]["se_log"][:] = 0.2  # the groups too noisy for this grid to tell exponential from power law
    got = sim_claims(sims)
    c = got["minimum_exponential"]
    assert c.verdict.verdict == "untested"
    assert [r.id for r in c.regime if not r.passed] == ["minimum_grid_resolves_exponential"]
    assert got["minimum_vs_saddle"].verdict.verdict == "holds"  # does not depend on it


def test_censored_groups_are_counted_as_excluded():
    sims = sde_sims()
    sims["sharp"]["mean"][1, -1] = np.nan  # a group with too few escaped: left out of the means
    v = sim_claims(sims)["batch_sharp"].verdict
    assert v.n_excluded >= 1 and "too few trajectories escaped (censored group)" in v.details["excluded_reasons"]


# -- made-up escape steps for E, the weak approximation -------------------------------------------------


def _escape_law(name, n, rng, scale=1.0):
    """Escape steps (groups x trajectories) shaped like the SGD's: memoryless from the well (mean ~1,300 steps),
    from the saddle (log(1 / Z^2) + c) / (2 gamma eta) with Z normal (mean ~1,000 steps); `scale` stretches them."""
    shape = (len(SEEDS), n)
    if name == "well":
        t = rng.exponential(1300.0, shape)
    else:
        t = (8.73 - np.log(rng.standard_normal(shape) ** 2)) / (2 * C.saddle.gamma * C.weak.saddle_eta)
    return np.ceil(np.maximum(t, 0.0) * scale)


def weak_numbers(sde_scale=1.0, seed=0, n=None, eta_curv=None):
    """E's numbers as the quick scale has them (5 groups of 1,024 trajectories a side), SGD's and the SDE's drawn
    from one law, the SDE's stretched by `sde_scale` (a number, or one per setting); censored (NaN) past each
    setting's step limit."""
    rng = np.random.default_rng(seed)
    n = n or C.sim.n_traj
    wk, sd = C.weak, C.saddle
    caps = {"saddle": sd.max_steps, "well": wk.well_max_steps}
    curv = {"saddle": wk.saddle_eta * sd.gamma, "well": wk.eta * 4 * wk.dV / wk.w ** 2}
    out = {}
    for name, cap in caps.items():
        scale = sde_scale[name] if isinstance(sde_scale, dict) else sde_scale
        sgd, sde = _escape_law(name, n, rng), _escape_law(name, n, rng, scale)
        out[name] = {"sgd": np.where(sgd <= cap, sgd, np.nan), "sde": np.where(sde <= cap, sde, np.nan), "max_steps": cap,
                     "eta_curv": curv[name] if eta_curv is None else eta_curv}
    return out


def test_weak_approximation_holds_when_sgd_and_sde_share_one_law():
    c = decide_weak(C, weak_numbers())  # a fixed draw: under one law each KS test rejects 1 draw in 20
    assert c.id == "weak_approximation" and c.verdict.verdict == "holds", c.verdict.details
    assert all(r.passed for r in c.regime) and {r.id for r in c.regime} == {"weak_escaped", "weak_diffusion"}
    assert not c.own
    for name in ("saddle", "well"):
        m = c.measured[name]
        assert m["ks_distance"] < 0.04 and m["ks_p"] >= 0.05 and m["trajectories"] == {"SGD": 5120, "SDE": 5120}
        assert m["ratio_mean_sde_over_sgd"] == pytest.approx(1.0, abs=0.05)
    # the magnitudes: each setting's KS distance beside 0 and its ratio of means beside 1
    assert [mg.published for mg in c.magnitude] == [0.0, 1.0, 0.0, 1.0]
    assert all(mg.measured is not None and mg.ci is not None for mg in c.magnitude)


def test_weak_approximation_fails_for_another_law_and_tolerates_a_small_difference():
    far = decide_weak(C, weak_numbers(sde_scale=1.5))  # the SDE's escapes 1.5x as long: KS distance ~0.15 or more
    assert far.verdict.verdict == "fails"
    for part in far.verdict.details["parts"].values():
        assert part["verdict"] == "fails" and part["ci"][0] > C.rules.weak_ks_margin
    assert far.magnitude[1].measured == pytest.approx(1.5, rel=0.05)
    # a real difference the KS test sees, but within the tolerance (the first-order error the SDE is allowed): the
    # well's escapes 10% longer (KS distance 0.035), the saddle's 1% (its escape steps spread over ~30% of their mean)
    near = decide_weak(C, weak_numbers(sde_scale={"saddle": 1.01, "well": 1.1}))
    assert near.verdict.verdict == "holds"
    assert all(p["details"]["ks_p"] < 0.05 and p["ci"][1] < C.rules.weak_ks_margin
               for p in near.verdict.details["parts"].values())
    # a difference at the tolerance (well 1.33x: KS distance ~0.1): neither holds nor fails
    edge = decide_weak(C, weak_numbers(sde_scale={"saddle": 1.0, "well": 1.33}))
    assert edge.verdict.verdict == "inconclusive"
    # too few trajectories to bound the distance inside the tolerance: never "holds"
    assert decide_weak(C, weak_numbers(n=40)).verdict.verdict == "inconclusive"


def test_weak_approximation_regime_checks():
    nums = weak_numbers()
    nums["well"]["sde"][2, :300] = np.nan  # one SDE group with 71% escaped: too much of its law unseen
    c = decide_weak(C, nums)
    assert c.verdict.verdict == "untested"
    (bad,) = [r for r in c.regime if not r.passed]
    assert bad.id == "weak_escaped" and bad.measured["min_escaped_fraction"] == pytest.approx(1 - 300 / 1024, abs=0.01)
    c = decide_weak(C, weak_numbers(eta_curv=0.4))  # a step too large against the curvature: out of the SDE's regime
    assert c.verdict.verdict == "untested" and c.verdict.details["verdict_if_tested"] == "holds"
    assert [r.id for r in c.regime if not r.passed] == ["weak_diffusion"]


# -- made-up training numbers -----------------------------------------------------------------------


def _runs(rng, loss, train_acc, test_acc, steps, noise=0.004):
    return {s: {"train_loss": loss * math.exp(0.05 * rng.standard_normal()), "train_acc": train_acc,
                "test_acc": test_acc + noise * rng.standard_normal(), "steps": float(steps)} for s in SEEDS}


def training(small=(0.5, 0.88, 0.64), raised=(0.1, 0.98, 0.72), large_updates=(0.05, 0.99, 0.62), plateau=True,
             updates_large=None):
    rng = np.random.default_rng(3)
    t = C.train
    upd = raised_updates(t, 4000)
    values = {
        "small": _runs(rng, *small, steps=2500),
        "raised": _runs(rng, *raised, steps=upd),
        "large": _runs(rng, 0.8, 0.74, 0.52, steps=160),
        "large_updates": _runs(rng, *large_updates, steps=updates_large or upd),
    }
    epochs = np.arange(t.epochs + 1, dtype=float)
    curves = {}
    for s in SEEDS:
        if plateau:  # a noisy plateau: the trend falls 1% per epoch, the scatter is 15%
            loss = 0.6 * np.exp(-0.01 * epochs + 0.15 * rng.standard_normal(len(epochs)))
        else:  # a clean steady descent, 10% per epoch: still optimizing, not noise-limited
            loss = 2.0 * np.exp(-0.1 * epochs + 0.01 * rng.standard_normal(len(epochs)))
        curves[s] = (epochs, loss)
    return values, curves


def train_claims(values, curves, excluded=None):
    return {c.id: c for c in decide_training(C, values, curves, excluded or {})}


def train_verdicts(values, curves):
    return {k: c.verdict.verdict for k, c in train_claims(values, curves).items()}


def test_training_claims_hold_with_the_effects():
    got = train_claims(*training())
    assert set(got) == set(TRAIN_CLAIMS)
    for cid, c in got.items():
        assert c.verdict.verdict == "holds", (cid, c.verdict.details)
        assert all(r.passed for r in c.regime)
        assert c.magnitude and c.magnitude[0].measured is not None
    assert got["raise_settles"].magnitude[0].published == pytest.approx(math.log(512 / 32))


def test_raise_settles_absent_reversed_too_small():
    assert train_verdicts(*training(raised=(0.5, 0.88, 0.72)))["raise_settles"] != "holds"  # absent
    assert train_verdicts(*training(raised=(0.8, 0.85, 0.72)))["raise_settles"] != "holds"  # reversed
    assert train_verdicts(*training(raised=(0.47, 0.9, 0.72)))["raise_settles"] != "holds"  # 6% lower: short of the minimum


def test_raise_generalizes_absent_reversed_too_small():
    assert train_verdicts(*training(raised=(0.1, 0.98, 0.64)))["raise_generalizes"] != "holds"  # absent
    assert train_verdicts(*training(raised=(0.1, 0.98, 0.60)))["raise_generalizes"] != "holds"  # reversed
    assert train_verdicts(*training(raised=(0.1, 0.98, 0.643)))["raise_generalizes"] != "holds"  # 0.3 points: too small


def test_raise_beats_large_absent_reversed():
    assert train_verdicts(*training(large_updates=(0.05, 0.99, 0.72)))["raise_beats_large"] != "holds"  # absent
    assert train_verdicts(*training(large_updates=(0.05, 0.99, 0.76)))["raise_beats_large"] != "holds"  # reversed


def test_noise_limited_check():
    got = train_claims(*training(plateau=False))
    for cid in ("raise_settles", "raise_generalizes"):
        c = got[cid]
        assert c.verdict.verdict == "untested" and c.verdict.details["verdict_if_tested"] == "holds"
        (bad,) = [r for r in c.regime if not r.passed]
        assert bad.id == "small_batch_noise_limited"
        assert bad.measured["fitted_fall_per_epoch_log"] > bad.measured["scatter_log"]
    assert got["raise_beats_large"].verdict.verdict == "holds"
    ok = train_claims(*training())["raise_settles"].regime[0]
    assert ok.passed and ok.measured["fitted_fall_per_epoch_log"] <= ok.measured["scatter_log"]


def test_equal_updates_and_fit_checks():
    got = train_claims(*training(updates_large=160))  # the large arm at equal epochs, not equal updates
    c = got["raise_beats_large"]
    assert c.verdict.verdict == "untested"
    assert [r.id for r in c.regime if not r.passed] == ["large_arm_equal_updates"]
    got = train_claims(*training(large_updates=(0.9, 0.70, 0.55)))  # the large arm does not fit the training set
    c = got["raise_beats_large"]
    assert c.verdict.verdict == "untested"
    assert [r.id for r in c.regime if not r.passed] == ["large_arm_fits"]
    assert got["raise_settles"].verdict.verdict == "holds"


def test_excluded_runs_are_counted_with_their_reason():
    values, curves = training()
    values["raised"][2] = {k: math.nan for k in values["raised"][2]}  # a diverged run: NaN, counted
    got = train_claims(values, curves, {"raised": {"diverged": 1}})
    v = got["raise_generalizes"].verdict
    assert v.n == 4 and v.n_excluded == 1 and v.details["excluded_reasons"] == {"diverged": 1}
    assert v.verdict == "holds"


def test_raised_updates():
    t = replace(C.train, epochs=20, raise_at=14, sb=32, lb=512)
    assert raised_updates(t, 4000) == 14 * 125 + 6 * 8 == 1798
