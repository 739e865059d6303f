"""epsilon_sharpness against hand-computable maxima of separable/convex quadratics (float64)."""

import itertools

import pytest
import torch
from torch import nn

from batchscope.curvature.sharpness import epsilon_sharpness


class Params(nn.Module):
    """A 'model' whose outputs are its own parameters: the loss is then any function of the weights."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def quadratic(c: torch.Tensor, m: torch.Tensor):
    """Mean over the batch of f(w) = 0.5 sum_i c_i (w_i - m_i)^2 (every row of the batch is w)."""

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (0.5 * c * (out - m) ** 2).sum(-1).mean()

    return loss_fn


DATA = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
W = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
M = torch.tensor([0.1, 0.5, 2.5, 0.0], dtype=torch.float64)
C = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)


def f(w: torch.Tensor) -> float:
    return float((0.5 * C * (w - M) ** 2).sum())


def test_full_space_matches_corner_maximum():
    eps = 0.05
    res = epsilon_sharpness(Params(W), quadratic(C, M), DATA, eps=eps)
    # separable and convex in each coordinate: the maximum over |y_i| <= eps(|w_i| + 1) is at the
    # corner moving every coordinate away from m_i
    half = eps * (W.abs() + 1)
    f_max = float((0.5 * C * ((W - M).abs() + half) ** 2).sum())
    f0 = f(W)
    assert res.loss == pytest.approx(f0, rel=1e-14)
    assert res.max_loss == pytest.approx(f_max, rel=1e-12)
    assert res.sharpness == pytest.approx(100 * (f_max - f0) / (1 + f0), rel=1e-10)
    torch.testing.assert_close(res.box, half, rtol=1e-15, atol=0)
    torch.testing.assert_close(res.y_max, torch.sign(W - M) * half, rtol=1e-12, atol=1e-15)
    assert res.subspace_dim is None and res.subspace is None
    assert 1 <= res.iterations <= 10 and res.fevals >= 1


def test_at_exact_minimum_zero_start_stalls_random_start_finds_corner():
    eps = 0.1
    model = Params(M)  # w = m: the gradient is exactly zero at y = 0
    res0 = epsilon_sharpness(model, quadratic(C, M), DATA, eps=eps)
    assert res0.loss == 0.0 and res0.sharpness == 0.0
    res = epsilon_sharpness(model, quadratic(C, M), DATA, eps=eps, y0="random", seed=3)
    # every corner is a maximum: 0.5 sum c_i (eps(|m_i| + 1))^2
    f_max = float((0.5 * C * (eps * (M.abs() + 1)) ** 2).sum())
    assert res.max_loss == pytest.approx(f_max, rel=1e-10)
    assert res.sharpness == pytest.approx(100 * f_max, rel=1e-10)


def test_subspace_matches_enumerated_corners():
    n, p, eps = 6, 3, 1e-3
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    m = w + 2.0 * torch.randn(n, generator=g, dtype=torch.float64)  # far from the minimum: the gradient leads
    c = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    loss_fn = quadratic(c, m)
    res = epsilon_sharpness(Params(w), loss_fn, DATA, eps=eps, subspace_dim=p, seed=7)
    A = res.subspace
    assert A.shape == (n, p) and res.subspace_dim == p
    half = eps * ((torch.linalg.pinv(A) @ w).abs() + 1)
    torch.testing.assert_close(res.box, half, rtol=1e-10, atol=0)

    def fy(y: torch.Tensor) -> float:
        return float((0.5 * c * (w + A @ y - m) ** 2).sum())

    # convex in y: the maximum over the box is at one of its 2^p corners
    corners = [torch.tensor(s, dtype=torch.float64) * half for s in itertools.product((-1.0, 1.0), repeat=p)]
    f_max = max(fy(y) for y in corners)
    f0 = fy(torch.zeros(p, dtype=torch.float64))
    assert res.max_loss == pytest.approx(f_max, rel=1e-12)
    assert res.sharpness == pytest.approx(100 * (f_max - f0) / (1 + f0), rel=1e-8)
    # seeded: same seed, same subspace; another seed, another one
    again = epsilon_sharpness(Params(w), loss_fn, DATA, eps=eps, subspace_dim=p, seed=7, max_iter=1)
    other = epsilon_sharpness(Params(w), loss_fn, DATA, eps=eps, subspace_dim=p, seed=8, max_iter=1)
    assert torch.equal(again.subspace, A) and not torch.equal(other.subspace, A)


def _mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    return model, nn.functional.cross_entropy, (x, y)


def test_max_iter_is_honored():
    model, loss_fn, data = _mlp_problem()
    short = epsilon_sharpness(model, loss_fn, data, eps=0.5, max_iter=2)
    long = epsilon_sharpness(model, loss_fn, data, eps=0.5, max_iter=30)
    assert short.iterations == 2
    assert "ITERATIONS" in short.message.upper()
    assert long.iterations > 2
    # the same deterministic iterates, stopped later: at least as high
    assert long.max_loss >= short.max_loss > short.loss


def test_model_restored_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3)).double()
    model.train()
    model[1].running_mean.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    for bn_mode in ("eval", "train"):
        epsilon_sharpness(model, nn.functional.cross_entropy, (x, y), eps=1e-2, subspace_dim=5, bn_mode=bn_mode)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules()) and model[1].track_running_stats
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_invalid_arguments():
    model, loss_fn, data = _mlp_problem()
    with pytest.raises(ValueError, match="eps"):
        epsilon_sharpness(model, loss_fn, data, eps=0.0)
    with pytest.raises(ValueError, match="subspace_dim"):
        epsilon_sharpness(model, loss_fn, data, subspace_dim=10_000)
    with pytest.raises(ValueError, match="y0"):
        epsilon_sharpness(model, loss_fn, data, y0="middle")
