"""Lanczos, power iteration, trace estimators and SLQ on explicit symmetric matrices with known spectra."""

import math

import pytest
import torch

from batchscope.curvature.density import broaden, make_grid, slq
from batchscope.curvature.lanczos import lanczos, power_iteration
from batchscope.curvature.trace import hutchinson, hutchpp, rademacher

f64 = torch.float64


def with_spectrum(eigs: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense symmetric matrix with the given eigenvalues and random eigenvectors (columns of V)."""
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), generator=g, dtype=f64))
    return (V * eigs) @ V.t(), V


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# clustered (gaps 1e-3 relative), negative, and a dense bulk near zero
CLUSTERED = torch.cat([
    torch.tensor([10.0, 9.99, 9.98, 4.0, -7.0, -6.99], dtype=f64),
    torch.linspace(-1.0, 1.0, 114, dtype=f64),
])


@pytest.mark.parametrize("which", ["top", "bottom", "magnitude"])
@pytest.mark.parametrize("spectrum", ["diagonal", "clustered", "random"])
def test_lanczos_matches_eigvalsh(which, spectrum):
    if spectrum == "diagonal":
        eigs = torch.arange(1, 81, dtype=f64) - 30.5  # negative and positive, evenly spaced
        A = torch.diag(eigs[torch.randperm(80, generator=gen(3))])
    else:
        eigs = CLUSTERED if spectrum == "clustered" else torch.randn(100, generator=gen(4), dtype=f64)
        A, _ = with_spectrum(eigs)
    true = torch.linalg.eigvalsh(A)
    k = 5
    expected = {"top": true.flip(0)[:k], "bottom": true[:k], "magnitude": true[true.abs().argsort(descending=True)][:k]}
    res = lanczos(lambda v: A @ v, A.shape[0], k, which, tol=1e-10, generator=gen())
    assert res.converged
    scale = float(true.abs().max())
    torch.testing.assert_close(res.eigenvalues, expected[which], atol=1e-8 * scale, rtol=0)
    # Ritz vectors: unit norm, and the reported residual is the true one
    X = res.eigenvectors
    torch.testing.assert_close(X.norm(dim=1), torch.ones(k, dtype=f64))
    true_res = (X @ A - res.eigenvalues[:, None] * X).norm(dim=1)
    torch.testing.assert_close(res.residuals, true_res, atol=1e-9 * scale, rtol=1e-3)
    assert (res.residuals <= 1e-10 * scale * 1.0001).all()


def test_lanczos_is_faster_than_dimension_on_separated_top():
    eigs = torch.cat([torch.tensor([50.0, 30.0, 20.0], dtype=f64), torch.rand(997, generator=gen(5), dtype=f64)])
    A, _ = with_spectrum(eigs)
    res = lanczos(lambda v: A @ v, 1000, 3, "top", tol=1e-6, generator=gen())
    assert res.converged and res.iterations < 40
    torch.testing.assert_close(res.eigenvalues, eigs[:3], atol=1e-4, rtol=0)


def test_warm_start_with_true_top_vector_converges_at_once():
    A, V = with_spectrum(CLUSTERED)
    cold = lanczos(lambda v: A @ v, 120, 1, "top", tol=1e-8, generator=gen())
    warm = lanczos(lambda v: A @ v, 120, 1, "top", tol=1e-8, v0=V[:, 0])
    assert warm.converged and warm.iterations <= 2 < cold.iterations
    assert abs(float(warm.eigenvalues[0]) - 10.0) < 1e-10
    # a slightly perturbed warm start (the next step of a training run) still saves most of the work
    # at the default tolerance
    cold = lanczos(lambda v: A @ v, 120, 1, "top", tol=1e-4, generator=gen())
    nudged = lanczos(lambda v: A @ v, 120, 1, "top", tol=1e-4, v0=V[:, 0] + 1e-3 * torch.randn(120, generator=gen(), dtype=f64))
    assert nudged.converged and nudged.iterations < cold.iterations / 2


def test_breakdown_restarts_outside_invariant_subspace():
    # e_1 spans an invariant subspace holding one eigenvalue: Lanczos must restart to find the top 3
    A = torch.diag(torch.arange(1.0, 11.0, dtype=f64))
    e1 = torch.zeros(10, dtype=f64)
    e1[0] = 1
    res = lanczos(lambda v: A @ v, 10, 3, "top", tol=1e-10, v0=e1, generator=gen())
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([10.0, 9.0, 8.0], dtype=f64))
    zero = lanczos(lambda v: 0 * v, 10, 2, "top", tol=1e-10, generator=gen())
    assert zero.converged and zero.eigenvalues.tolist() == [0.0, 0.0]


def test_float32_operator_and_sparse_checks():
    A, _ = with_spectrum(CLUSTERED)
    A32 = A.float()
    res = lanczos(lambda v: A32 @ v, 120, 3, "top", tol=1e-5, dtype=torch.float32, generator=gen(), check_every=3)
    assert res.converged and res.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, torch.tensor([10.0, 9.99, 9.98], dtype=f64), atol=1e-4, rtol=0)


def test_max_iter_reports_not_converged():
    A, _ = with_spectrum(CLUSTERED)
    res = lanczos(lambda v: A @ v, 120, 3, "top", tol=1e-12, max_iter=6, generator=gen())
    assert not res.converged and res.iterations == 6


def test_power_iteration_reaches_top_with_a_gap():
    eigs = torch.cat([torch.tensor([10.0, 5.0], dtype=f64), torch.rand(98, generator=gen(6), dtype=f64)])
    A, _ = with_spectrum(eigs)
    res = power_iteration(lambda v: A @ v, 100, 2, tol=1e-10, max_iter=200, generator=gen())
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, eigs[:2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [{"k": 0}, {"k": 121}, {"which": "largest"}, {"tol": 0.0}])
def test_lanczos_argument_errors(bad):
    A, _ = with_spectrum(CLUSTERED)
    kw = {"k": 1, "which": "top", "tol": 1e-4} | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name}:") as e:
        lanczos(lambda v: A @ v, 120, **kw)
    assert "\n" not in str(e.value)


# -- trace --------------------------------------------------------------------------------------

def outlier_matrix(n: int = 60) -> torch.Tensor:
    """A few large eigenvalues over a small bulk of both signs: the shape of a network Hessian."""
    eigs = torch.cat([torch.tensor([40.0, 25.0, 12.0, 8.0], dtype=f64), 0.3 * torch.randn(n - 4, generator=gen(7), dtype=f64)])
    return with_spectrum(eigs)[0]


def test_hutchinson_is_unbiased_and_its_stderr_is_calibrated():
    A = outlier_matrix()
    exact = float(A.trace())
    # per-probe variance of z^T A z for Rademacher z
    sd1 = math.sqrt(2 * (float((A**2).sum()) - float((A.diag() ** 2).sum())))
    z, var = [], []
    for seed in range(200):
        est = hutchinson(lambda v: A @ v, 60, 20, generator=gen(seed))
        assert est.samples == 20
        var.append(est.stderr**2 / (sd1**2 / 20))
        z.append((est.trace - exact) / (sd1 / math.sqrt(20)))
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.25  # unbiased: mean of 200 standard normals
    assert 0.8 < float(z.std()) < 1.2
    assert 0.85 < sum(var) / len(var) < 1.15  # the squared stderr is an unbiased variance estimate


def test_hutchpp_beats_hutchinson_on_outliers_and_is_calibrated():
    A = outlier_matrix()
    exact = float(A.trace())
    errs_pp, errs_h, inside = [], [], 0
    for seed in range(100):
        pp = hutchpp(lambda v: A @ v, 60, 30, generator=gen(seed))
        h = hutchinson(lambda v: A @ v, 60, 30, generator=gen(seed))
        errs_pp.append(pp.trace - exact)
        errs_h.append(h.trace - exact)
        inside += abs(pp.trace - exact) <= 2 * pp.stderr
    def rms(e):
        return float(torch.tensor(e).pow(2).mean().sqrt())

    assert rms(errs_pp) < rms(errs_h) / 5
    assert 80 <= inside <= 100  # about 95% within two standard errors


def test_hutchpp_with_budget_over_dimension_is_exact():
    A = outlier_matrix()
    est = hutchpp(lambda v: A @ v, 60, 60, generator=gen())
    assert est.stderr == 0.0 and est.samples == 60
    assert abs(est.trace - float(A.trace())) < 1e-12 * float(A.abs().max())


def test_trace_estimates_are_reproducible():
    A = outlier_matrix()
    a = hutchpp(lambda v: A @ v, 60, 30, generator=gen(3))
    b = hutchpp(lambda v: A @ v, 60, 30, generator=gen(3))
    c = hutchpp(lambda v: A @ v, 60, 30, generator=gen(4))
    assert a == b and a.trace != c.trace


def test_rademacher_entries():
    z = rademacher(3, 1000, generator=gen(), dtype=f64, device="cpu")
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(float(z.mean())) < 0.1


# -- density ------------------------------------------------------------------------------------

def test_slq_moments_are_exact_per_probe_and_match_the_spectrum():
    A = outlier_matrix()
    n = 60
    nodes, weights = slq(lambda v: A @ v, n, 30, 8, generator=gen(2))
    Z = rademacher(30, n, generator=gen(2), dtype=f64, device="cpu")  # the same probes
    for z, t, w in zip(Z, nodes, weights):
        assert abs(float(w.sum()) - 1) < 1e-12
        # Gauss quadrature with 8 nodes integrates polynomials up to degree 15 exactly
        torch.testing.assert_close((w * t).sum(), z @ A @ z / n)
        torch.testing.assert_close((w * t**3).sum(), z @ A @ A @ A @ z / n)
    m1 = torch.stack([(w * t).sum() for t, w in zip(nodes, weights)])
    m2 = torch.stack([(w * t**2).sum() for t, w in zip(nodes, weights)])
    for m, exact in ((m1, A.trace() / n), (m2, (A @ A).trace() / n)):
        assert abs(float(m.mean() - exact)) < 4 * float(m.std()) / math.sqrt(30)


def test_broadened_density_integrates_to_one_and_sits_on_the_eigenvalues():
    eigs = torch.tensor([-2.0, 0.0, 0.5, 3.0, 10.0], dtype=f64).repeat_interleave(6)
    A, _ = with_spectrum(eigs)
    nodes, weights = slq(lambda v: A @ v, 30, 2, 30, generator=gen())
    sigma = 0.01
    grid = make_grid(nodes, sigma, 4000)
    rho = broaden(nodes, weights, grid, sigma)
    assert abs(float(torch.trapezoid(rho, grid)) - 1) < 1e-12
    near = (grid[:, None] - eigs.unique()[None, :]).abs().min(1).values <= 4 * sigma
    assert float(torch.trapezoid(rho * near, grid)) > 0.99
    # each distinct eigenvalue carries 1/5 of the mass (6 of 30 each), up to probe noise
    for lam in eigs.unique():
        mass = float(torch.trapezoid(rho * ((grid - lam).abs() <= 4 * sigma), grid))
        assert 0.05 < mass < 0.4
