"""The random walk on a random potential (Hoffer et al.'s model) against closed forms on tiny cases."""

import math

import numpy as np
import pytest
import torch

from batchscope import randomwalk as rw


@pytest.mark.parametrize("batch,sigma", [(1, 1.0), (4, 2.0)])
def test_flat_control_has_the_exact_mean_squared_distance(batch, sigma):
    # independent steps of variance eta^2 sigma^2 / m: E x_t^2 = t eta^2 sigma^2 / m exactly
    walk = rw.Walk(eta=0.1, sigma=sigma, batch=batch, n_walkers=16000, steps=300, points=6)
    res = rw.simulate_walks(walk, [0])[0]
    expected = rw.flat_msd(walk, res.steps)
    assert expected[-1] == pytest.approx(300 * 0.1**2 * sigma**2 / batch)
    se = expected * math.sqrt(2 / walk.n_walkers)  # a sum of many steps is nearly Gaussian: Var(x^2) = 2 E[x^2]^2
    assert np.all(np.abs(res.flat_mean_sq - expected) < 5 * se)
    # a scale error of 10% (or the batch ignored) would be far outside
    assert np.all(np.abs(res.flat_mean_sq[-2:] - 1.1 * expected[-2:]) > 3 * se[-2:])
    # E|x_t| of a Gaussian: sqrt(2 / pi) times the rms
    assert res.flat_mean_abs[-1] == pytest.approx(math.sqrt(2 / math.pi * expected[-1]), rel=0.03)


@pytest.mark.parametrize("hurst", [0.3, 0.5, 0.75])
def test_fbm_potential_increments_have_variance_s2_dx_to_the_2h(hurst):
    half, dx, s = 256, 0.5, 1.3
    v = rw.fbm_potential(400, half, dx, hurst, s, torch.Generator().manual_seed(1))
    assert v.shape == (400, 2 * half + 1) and v.dtype == torch.float64
    assert torch.all(v[:, half] == 0)  # pinned at the origin
    for lag in (1, 4, 16, 64):
        measured = float((v[:, lag:] - v[:, :-lag]).square().mean())
        expected = s**2 * (lag * dx) ** (2 * hurst)
        assert measured == pytest.approx(expected, rel=0.08), lag
    # the sign of the increments' correlation tells H from 1/2: negative below, positive above, none at 1/2
    d = v.diff(dim=1)
    rho = float((d[:, 1:] * d[:, :-1]).mean() / d.square().mean())
    assert rho == pytest.approx(2 ** (2 * hurst - 1) - 1, abs=0.02)


def test_fbm_potential_is_seeded():
    a = rw.fbm_potential(3, 50, 1.0, 0.5, 1.0, torch.Generator().manual_seed(4))
    b = rw.fbm_potential(3, 50, 1.0, 0.5, 1.0, torch.Generator().manual_seed(4))
    c = rw.fbm_potential(3, 50, 1.0, 0.5, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_step_on_a_linear_potential_moves_by_eta_times_the_slope():
    # V = g x: the SGD step without noise is x - eta g, whatever the cell
    g, dx, eta, half = 0.7, 0.1, 0.05, 20
    x = (torch.arange(2 * half + 1, dtype=torch.float64) - half) * dx
    drift = rw.drift_table((g * x).expand(3, -1).clone(), dx, eta)
    assert torch.isnan(drift[:, 0]).all() and torch.isnan(drift[:, -1]).all()
    u = torch.tensor([[half + 0.3], [half - 5.5], [half + 12.0]], dtype=torch.float64)
    after = rw.step_walkers(u.clone(), drift, torch.zeros(3, 1, dtype=torch.float64))
    assert torch.allclose((after - u) * dx, torch.full((3, 1), -eta * g, dtype=torch.float64))
    # in an end cell the walker becomes NaN: it has left its field
    assert torch.isnan(rw.step_walkers(torch.tensor([[0.5]], dtype=torch.float64), drift[:1], torch.zeros(1, 1))).all()


def test_walkers_in_a_v_shaped_well_reach_the_boltzmann_distance():
    # V = g |x| confines; the stationary density of the Langevin limit is exp(-V / T), T = eta sigma^2 / (2 m):
    # E|x| = T / g. Here T / g = 0.5, five noise steps (a = 0.1), and a drift of 0.01 a step: within 5%.
    walk = rw.Walk(eta=0.1, sigma=1.0, batch=1, dx=1.0, n_walkers=2000, steps=3000, points=40)
    assert walk.temperature == pytest.approx(0.05)
    half, dx, g = 100, walk.dx * walk.step_rms, 0.1
    x = (torch.arange(2 * half + 1, dtype=torch.float64) - half) * dx
    res = rw.simulate_on((g * x.abs()).expand(walk.n_walkers, -1).clone(), walk, [0])[0]
    late = res.steps >= 1000  # relaxation takes ~(T / g) / (eta g) = 50 steps
    assert res.left_field == 0
    assert res.mean_abs[late].mean() == pytest.approx(walk.temperature / g, rel=0.05)
    assert res.flat_mean_abs[-1] > 5 * res.mean_abs[-1]  # the same noise on a flat potential keeps spreading


def test_walk_on_the_random_potential_is_slower_than_free_diffusion():
    # Sinai: the distance grows like (log t)^2, so its local exponent d log|x| / d log t falls (2 / log t);
    # the flat control's stays at 1/2
    walk = rw.Walk(n_walkers=256, steps=1 << 14, points=30)
    res = rw.simulate_walks(walk, [0])[0]
    late = res.steps >= 300
    beta = np.polyfit(np.log(res.steps[late]), np.log(res.mean_abs[late]), 1)[0]
    beta_flat = np.polyfit(np.log(res.steps[late]), np.log(res.flat_mean_abs[late]), 1)[0]
    assert beta_flat == pytest.approx(0.5, abs=0.03)
    assert beta < 0.42 and res.mean_abs[-1] < 0.75 * res.flat_mean_abs[-1]
    assert res.left_field == 0


def test_groups_are_deterministic_and_do_not_depend_on_their_batchmates():
    walk = rw.Walk(n_walkers=16, steps=700, points=10, chunk=64)
    one = rw.simulate_walks(walk, [3])[0]
    again = rw.simulate_walks(walk, [3])[0]
    mixed = rw.simulate_walks(walk, [5, 3])
    for key in ("mean_abs", "mean_sq", "flat_mean_abs", "flat_mean_sq"):
        np.testing.assert_array_equal(getattr(one, key), getattr(again, key))
        np.testing.assert_array_equal(getattr(one, key), getattr(mixed[1], key))
        assert not np.array_equal(getattr(one, key), getattr(mixed[0], key))
    assert one.steps[0] == 1 and one.steps[-1] == 700 and np.all(np.diff(one.steps) > 0)


def test_walkers_reaching_the_end_of_their_field_are_counted():
    walk = rw.Walk(n_walkers=50, steps=2000, points=10, reach=0.05)  # a field a few cells wide
    res = rw.simulate_walks(walk, [0])[0]
    assert res.left_field > 0
    assert np.all(np.isfinite(res.flat_mean_abs))


def test_bad_walks_are_refused():
    with pytest.raises(ValueError, match="hurst"):
        rw.Walk(hurst=1.0)
    with pytest.raises(ValueError):
        rw.Walk(batch=2000, n_examples=1000)
    with pytest.raises(ValueError, match="grid points"):
        rw.Walk(sinai_length=1.0, dx=0.001)
    with pytest.raises(ValueError, match="values must be"):
        rw.simulate_on(torch.zeros(3, 11, dtype=torch.float64), rw.Walk(n_walkers=2), [0])
