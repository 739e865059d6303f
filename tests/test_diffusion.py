"""The SGD-on-potentials simulator against closed forms on tiny cases; determinism; censoring."""

import math

import numpy as np
import pytest
import torch

from batchscope import diffusion as dif


def test_noise_table_has_mean_zero_and_covariance_sigma2_exactly():
    for dim in (1, 2, 3):
        z = dif.noise_table(200, dim, 1.7)
        assert z.shape == (200, dim) and z.dtype == torch.float64
        assert torch.allclose(z.mean(0), torch.zeros(dim, dtype=torch.float64), atol=1e-12)
        cov = z.T @ z / 200  # population covariance: the finite sum's
        assert torch.allclose(cov, 1.7**2 * torch.eye(dim, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError):
        dif.noise_table(2, 2, 1.0)


@pytest.mark.parametrize("replace", [True, False])
def test_minibatch_noise_variance_is_sigma2_over_m_with_finite_population_correction(replace):
    # with replacement: sigma^2 / m exactly; without: sigma^2 / m * (N - m) / (N - 1)
    n, m, sigma = 40, 10, 2.0
    table = dif.noise_table(n, 1, sigma)
    draws = dif.minibatch_noise(table, m, (200_000,), torch.Generator().manual_seed(0), replace)[:, 0]
    expected = dif.minibatch_variance(sigma, m, n, replace)
    assert expected == pytest.approx(sigma**2 / m * (1.0 if replace else (n - m) / (n - 1)))
    se = expected * math.sqrt(2 / (len(draws) - 1))  # (~ normal) sampling error of a variance
    assert abs(draws.var().item() - expected) < 5 * se
    assert abs(draws.mean().item()) < 5 * math.sqrt(expected / len(draws))
    # the two formulas are far apart here (factor 30/39): the test tells the samplings apart
    other = dif.minibatch_variance(sigma, m, n, not replace)
    assert abs(draws.var().item() - other) > 20 * se


def test_sampling_without_replacement_draws_distinct_examples_uniformly():
    n, m = 12, 5
    idx = dif._draw_distinct(n, m, (20_000,), torch.Generator().manual_seed(1))
    assert idx.min() >= 0 and idx.max() < n
    assert all(len(set(row)) == m for row in idx[:2000].tolist())
    freq = torch.bincount(idx.flatten(), minlength=n).double() / idx.numel()
    assert torch.allclose(freq, torch.full((n,), 1 / n, dtype=torch.float64), atol=0.01)
    # the full batch without replacement is the full gradient: no noise
    table = dif.noise_table(n, 1, 1.0)
    assert dif.minibatch_noise(table, n, (3,), torch.Generator(), replace=False).abs().max() < 1e-12


@pytest.mark.parametrize("name,params", [
    ("cliff_well", {"dV": 1.0, "w": 1.5}),
    ("saddle", {"gamma": 1.0, "h": 2.0, "r": 1.0}),
    ("quadratic", {"h": 2.0}),
])
def test_fast_step_is_the_sgd_step_of_the_gradient(name, params):
    pot = dif.POTENTIALS[name]
    t = 500
    p = {k: torch.full((t, 1), v, dtype=torch.float64) for k, v in params.items()}
    eta = torch.full((t, 1), 0.1, dtype=torch.float64)
    x = 2 * torch.randn(t, pot.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(t, pot.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = pot.prepare(p, eta)
    kick = -eta * noise + c.get("offset", 0.0)
    assert torch.allclose(pot.step(x.clone(), c, kick), x - eta * (pot.grad(x, p) + noise), atol=1e-12)


def test_cliff_well_has_its_stated_shape():
    pot = dif.POTENTIALS["cliff_well"]
    dv, w = 0.7, 1.3
    p = {"dV": torch.tensor([[dv]], dtype=torch.float64), "w": torch.tensor([[w]], dtype=torch.float64)}
    xs = torch.linspace(-0.5, 2.5, 3001, dtype=torch.float64)[:, None]
    g = torch.cat([pot.grad(x[None], p) for x in xs])[:, 0]
    v = torch.cumulative_trapezoid(g, xs[:, 0])  # V(x) - V(-0.5)
    v = torch.cat([torch.zeros(1, dtype=torch.float64), v])
    i_top, i_min = int(torch.argmin(xs[:, 0].abs())), int(torch.argmin((xs[:, 0] - w).abs()))
    assert float(v[i_top] - v[i_min]) == pytest.approx(dv, rel=1e-4)  # the barrier
    assert float(g[i_top]) == pytest.approx(0, abs=1e-3) and float(g[i_min]) == pytest.approx(0, abs=1e-3)
    h = 4 * dv / w**2
    assert float(pot.grad(torch.tensor([[w + 0.01]], dtype=torch.float64), p)) == pytest.approx(h * 0.01)
    assert float(pot.grad(torch.tensor([[0.01]], dtype=torch.float64), p)) == pytest.approx(-h * 0.01)


@pytest.mark.parametrize("replace", [True, False])
def test_stationary_variance_on_a_quadratic_matches_the_closed_form(replace):
    # x' = (1 - eta h) x - eta xi: Var = eta s2 / (h (2 - eta h)), s2 the minibatch noise variance
    eta, h, sigma, m, n = 0.2, 2.0, 1.5, 8, 50
    s = dif.Setting("quadratic", {"h": h}, eta=eta, batch=m, sigma=sigma, n_examples=n, n_traj=4096, seed=3,
                    replace=replace)
    x = dif.positions(s, [200, 300, 400])[..., 0]  # correlation time 1 / (eta h) = 2.5 steps: independent
    measured = x.var(1).mean().item()
    expected = dif.quadratic_stationary_variance(eta, h, sigma, m, n, replace)
    se = expected * math.sqrt(2 / (s.n_traj - 1)) / math.sqrt(3)
    assert abs(measured - expected) < 5 * se
    assert abs(x.mean().item()) < 5 * math.sqrt(expected / s.n_traj)


def test_simulation_is_deterministic_and_a_setting_does_not_depend_on_its_batchmates():
    a = dif.Setting("cliff_well", {"dV": 1.0, "w": 1.0}, eta=0.1, batch=2, sigma=5.0, n_traj=64, max_steps=3000, seed=7)
    b = dif.Setting("cliff_well", {"dV": 1.0, "w": 2.0}, eta=0.1, batch=4, sigma=5.0, n_traj=32, max_steps=3000, seed=7)
    c = dif.Setting("saddle", {"gamma": 1.0, "h": 1.0, "r": 1.0}, eta=0.05, batch=4, sigma=0.5, n_traj=16, max_steps=3000)
    one = dif.simulate([a], chunk=64)[0]
    again = dif.simulate([a], chunk=64)[0]
    mixed = dif.simulate([b, a, c], chunk=64)
    np.testing.assert_array_equal(one, again)
    np.testing.assert_array_equal(one, mixed[1])
    assert not np.array_equal(mixed[0][:32], one[:32])  # b is another setting
    other_seed = dif.simulate([dif.Setting(**{**a.to_dict(), "seed": 8})], chunk=64)[0]
    assert not np.array_equal(one, other_seed)


def test_saddle_escape_matches_the_sde_formula():
    for eta in (0.01, 0.04):
        s = dif.Setting("saddle", {"gamma": 1.0, "h": 1.0, "r": 1.0}, eta=eta, batch=4, sigma=0.5, n_traj=1000,
                        max_steps=10_000, seed=0)
        steps = dif.simulate([s])[0]
        assert np.isfinite(steps).all()
        pred = dif.saddle_escape_steps(1.0, 1.0, eta, 0.5, 4)
        # sd of the escape time is about 1.1 / (gamma eta): the mean is known to ~1%; the discrete map grows by
        # log(1 + eta gamma) per step rather than eta gamma, up to +2% here
        assert steps.mean() / pred == pytest.approx(1.0, abs=0.05)


def test_escape_from_a_minimum_has_the_arrhenius_slope():
    # log(time to escape) against 1/eta: slope 2 dV m / sigma^2 (the SDE), here 0.32
    dv, w, sigma, m = 1.0, 2.0, 5.0, 4
    inv = np.array([6.0, 9.0, 12.0])
    settings = [dif.Setting("cliff_well", {"dV": dv, "w": w}, eta=1 / i, batch=m, sigma=sigma, n_traj=1000,
                            max_steps=30_000, seed=1) for i in inv]
    t = np.array([dif.mean_escape(r, 30_000) for r in dif.simulate(settings)])
    slope = np.polyfit(inv, np.log(t / inv), 1)[0]
    assert slope / dif.arrhenius_slope(dv, sigma, m) == pytest.approx(1.0, abs=0.1)
    kramers = np.array([dif.kramers_escape_steps(dv, w, 1 / i, sigma, m) for i in inv])
    assert np.all((t / kramers > 0.8) & (t / kramers < 1.5))  # Kramers is asymptotic in the barrier / noise


def test_censoring_at_max_steps_and_the_censored_mean():
    s = dif.Setting("cliff_well", {"dV": 1.0, "w": 2.0}, eta=1 / 14, batch=4, sigma=5.0, n_traj=200, max_steps=300,
                    seed=0)
    steps = dif.simulate([s], chunk=128)[0]
    ok = np.isfinite(steps)
    assert 0 < ok.sum() < len(steps) and np.all(steps[ok] <= 300) and np.all(steps[ok] >= 1)
    # the exponential maximum-likelihood mean under censoring recovers the mean of exponential data
    rng = np.random.default_rng(0)
    x = rng.exponential(100.0, 20_000)
    cens = np.where(x <= 150, x, np.nan)
    assert dif.mean_escape(cens, 150, min_escaped=0.5) == pytest.approx(100.0, rel=0.03)
    assert math.isnan(dif.mean_escape(cens, 150, min_escaped=0.9))  # 78% escaped < 90%
    assert dif.mean_escape(np.array([1.0, 2.0, 3.0]), 10) == 2.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown potential"):
        dif.Setting("nope", {}, eta=0.1, batch=1, sigma=1.0)
    with pytest.raises(ValueError, match="needs parameters"):
        dif.Setting("saddle", {"gamma": 1.0}, eta=0.1, batch=1, sigma=1.0)
    with pytest.raises(ValueError):
        dif.Setting("quadratic", {"h": 1.0}, eta=0.1, batch=2000, sigma=1.0, n_examples=1000)


# -- the SDE (Euler-Maruyama) ---------------------------------------------------------------------------


@pytest.mark.parametrize("substeps", [1, 10])
def test_sde_stationary_variance_on_a_quadratic_matches_the_ou_closed_form(substeps):
    # dX = -h X dt + sqrt(eta s2) dW by Euler-Maruyama with dt = eta / substeps: Var = eta s2 / (h (2 - dt h)),
    # -> eta s2 / (2 h) (Ornstein-Uhlenbeck) as dt -> 0; substeps = 1 is SGD with Gaussian noise
    eta, h, sigma, m = 0.25, 2.0, 1.5, 8  # eta h = 0.5: SGD's variance is 4/3 of the SDE's
    s = dif.Setting("quadratic", {"h": h}, eta=eta, batch=m, sigma=sigma, n_traj=4096, seed=3)
    steps = list(range(200, 1200, 10))  # correlation time 1 / (eta h) = 2 steps: 100 independent snapshots
    x = dif.sde_positions(s, steps, substeps=substeps)[..., 0]
    measured = x.var(1).mean().item()
    expected = dif.sde_stationary_variance(eta, h, sigma, m, substeps)
    se = expected * math.sqrt(2 / (s.n_traj - 1)) / math.sqrt(len(steps))  # 0.22%
    assert abs(measured - expected) < 5 * se
    assert abs(x.mean().item()) < 5 * math.sqrt(expected / (s.n_traj * len(steps)))
    if substeps == 10:  # fine steps: the SDE's, not SGD's (33% higher) nor Euler's at dt = eta
        assert expected == pytest.approx(dif.sde_stationary_variance(eta, h, sigma, m), rel=0.03)
        assert abs(measured - dif.quadratic_stationary_variance(eta, h, sigma, m)) > 50 * se
    else:
        assert expected == pytest.approx(dif.quadratic_stationary_variance(eta, h, sigma, m))


def test_sde_exit_from_a_disc_is_brownian_motions():
    # V = 0 (the saddle with gamma = h = 0): 2-D Brownian motion with variance s2 = eta sigma^2 / m per unit time
    # leaves the disc of radius r after E tau = r^2 / (2 s2), in steps tau / eta = r^2 / (2 d^2), d = eta sigma / sqrt(m)
    # the per-step sd; checked at whole steps only, the boundary moves out by 0.5826 d (Broadie-Glasserman-Kou:
    # -zeta(1/2) / sqrt(2 pi)). sd(tau) / E tau = 1 / sqrt(2), so the mean is known to 0.8% with 8,000 paths.
    eta, sigma, m, r = 0.1, 0.5, 1, 1.0
    s = dif.Setting("saddle", {"gamma": 0.0, "h": 0.0, "r": r}, eta=eta, batch=m, sigma=sigma, n_traj=8000,
                    max_steps=100_000, seed=1)
    steps = dif.simulate_sde([s], substeps=10)[0]
    assert np.isfinite(steps).all() and np.all(steps == np.round(steps)) and steps.min() >= 1
    d = eta * sigma / math.sqrt(m)
    expected = (r + 0.5826 * d) ** 2 / (2 * d**2)
    se = expected / math.sqrt(2 * s.n_traj)
    assert abs(steps.mean() - expected) < 4 * se
    assert abs(steps.mean() - r**2 / (2 * d**2)) > 6 * se  # the test sees the overshoot: it would see a wrong scale
    assert steps.std() / steps.mean() == pytest.approx(1 / math.sqrt(2), abs=0.05)


def test_sde_saddle_escape_matches_its_formula():
    s = dif.Setting("saddle", {"gamma": 1.0, "h": 1.0, "r": 1.0}, eta=0.04, batch=4, sigma=0.5, n_traj=2000,
                    max_steps=10_000, seed=0)
    steps = dif.simulate_sde([s])[0]
    # the mean is known to ~0.6% (sd ~ 1.1 / (gamma eta) = 27 steps); the formula is the SDE's own, asymptotic in
    # log(2 gamma r^2 m / (eta sigma^2)) = 6.7
    assert steps.mean() / dif.saddle_escape_steps(1.0, 1.0, 0.04, 0.5, 4) == pytest.approx(1.0, abs=0.03)


def test_sde_is_deterministic_independent_of_batchmates_and_of_sgds_stream():
    a = dif.Setting("cliff_well", {"dV": 1.0, "w": 1.0}, eta=0.1, batch=2, sigma=5.0, n_traj=64, max_steps=3000, seed=7)
    b = dif.Setting("cliff_well", {"dV": 1.0, "w": 2.0}, eta=0.1, batch=4, sigma=5.0, n_traj=32, max_steps=3000, seed=7)
    c = dif.Setting("saddle", {"gamma": 1.0, "h": 1.0, "r": 1.0}, eta=0.05, batch=4, sigma=0.5, n_traj=16, max_steps=3000)
    one = dif.simulate_sde([a], substeps=4, chunk=16)[0]
    np.testing.assert_array_equal(one, dif.simulate_sde([a], substeps=4, chunk=16)[0])
    np.testing.assert_array_equal(one, dif.simulate_sde([b, a, c], substeps=4, chunk=16)[1])
    assert not np.array_equal(one, dif.simulate_sde([dif.Setting(**{**a.to_dict(), "seed": 8})], substeps=4, chunk=16)[0])
    # the SDE's stream is not SGD's: torch seeds from the low 32 bits, so the derived seeds must differ there
    seeds = [dif.sde_seed(k) for k in range(1000)]
    assert len({x % 2**32 for x in seeds} | set(range(1000))) == 2000
    with pytest.raises(ValueError):
        dif.simulate_sde([a], substeps=0)
