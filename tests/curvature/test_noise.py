"""gradient_covariance and gradient_noise_scale vs dense per-example loops, closed forms, exact Hessians (float64)."""

import copy

import pytest
import torch
from torch import nn

from batchscope.curvature.noise import gradient_covariance, gradient_noise_scale
from helpers import dense_hessian

F64 = torch.float64


# -- problems ----------------------------------------------------------------------------------
def mlp_problem(bn: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    if bn:  # running statistics unlike any batch's, so eval and train mode differ
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(12, 3, dtype=F64)
    y = torch.randint(0, 3, (12,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    return model, nn.functional.cross_entropy, batches


def linreg_problem(n: int = 40, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ torch.randn(d, generator=g, dtype=F64) + 0.5 * torch.randn(n, generator=g, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()

    return model, loss_fn, X, y


# -- dense references ----------------------------------------------------------------------------
def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def loop_grads(model, loss_fn, batches, bn_mode: str = "eval") -> torch.Tensor:
    """Per-example gradients one at a time with plain autograd: eval = each example alone;
    train = gradient of example j's loss with its batch's statistics (rows of the Jacobian)."""
    m = copy.deepcopy(model)  # train mode would update running statistics: work on a copy
    m.train(bn_mode == "train")
    params = list(m.parameters())
    rows = []
    for x, y in batches:
        if bn_mode == "eval":
            for i in range(x.shape[0]):
                rows.append(flat(torch.autograd.grad(loss_fn(m(x[i : i + 1]), y[i : i + 1]), params)))
        else:
            out = m(x)
            for j in range(x.shape[0]):
                rows.append(flat(torch.autograd.grad(loss_fn(out[j : j + 1], y[j : j + 1]), params, retain_graph=True)))
    return torch.stack(rows)


def dense_noise(G: torch.Tensor, H: torch.Tensor | None = None) -> dict:
    n = G.shape[0]
    g = G.mean(0)
    D = G - g
    S = D.T @ D / n
    out = {"g2": float(g @ g), "trS": float(S.trace())}
    if H is not None:
        out["gHg"] = float(g @ H @ g)
        out["trHS"] = float((H @ S).trace())
    return out


def dense_spectrum(G: torch.Tensor, centered: bool) -> torch.Tensor:
    if centered:
        G = G - G.mean(0)
    K = G.T @ G / G.shape[0]  # the d x d matrix the instrument never forms
    return torch.linalg.eigvalsh(K).flip(0), K


# -- gradient_covariance ---------------------------------------------------------------------------
@pytest.mark.parametrize("centered", [False, True])
def test_covariance_matches_dense_loop_mlp(centered):
    model, loss_fn, batches = mlp_problem()
    G = loop_grads(model, loss_fn, batches)
    ref, K = dense_spectrum(G, centered)  # d = 38 > N = 12: N (or N - 1 centered) non-zero eigenvalues
    k = 4
    res = gradient_covariance(model, loss_fn, batches, k=k, centered=centered, chunk_size=5, return_vectors=True)
    rank = 11 if centered else 12
    assert res.n_examples == 12 and res.rank == rank and res.centered is centered
    torch.testing.assert_close(res.eigenvalues, ref[:k], rtol=1e-10, atol=1e-14)
    assert res.lambda_1 == pytest.approx(float(ref[0]), rel=1e-10)
    assert res.trace == pytest.approx(float(K.trace()), rel=1e-10)
    assert res.condition_k == pytest.approx(float(ref[k - 1] / ref[0]), rel=1e-9)
    assert res.condition_min_nonzero == pytest.approx(float(ref[rank - 1] / ref[0]), rel=1e-8)
    assert float(ref[rank]) < res.zero_tol < float(ref[rank - 1])
    V = res.vectors
    assert V.shape == (k, G.shape[1])
    torch.testing.assert_close(V.norm(dim=1), torch.ones(k, dtype=F64))
    torch.testing.assert_close(V @ K, res.eigenvalues[:, None] * V, rtol=0, atol=1e-12)


def test_covariance_linear_regression_closed_form():
    model, loss_fn, X, y = linreg_problem()
    w = model.weight.detach()[0]
    G = ((X @ w - y)[:, None]) * X  # per-example gradient of 0.5 (w^T x_i - y_i)^2
    K = G.T @ G / X.shape[0]
    ref = torch.linalg.eigvalsh(K).flip(0)
    res = gradient_covariance(model, loss_fn, (X, y), k=3)
    # d = 3 < N = 40: the 40 x 40 Gram matrix has rank 3, the threshold must find it
    assert res.rank == 3
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-11, atol=0)
    assert res.trace == pytest.approx(float(K.trace()), rel=1e-12)
    assert res.condition_min_nonzero == pytest.approx(float(ref[2] / ref[0]), rel=1e-10)
    with pytest.raises(ValueError, match="k"):
        gradient_covariance(model, loss_fn, (X, y), k=4)  # > min(N, d)


def test_covariance_batchnorm_train_mode_uses_batch_statistics():
    model, loss_fn, batches = mlp_problem(bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    G_train = loop_grads(model, loss_fn, batches, "train")
    G_eval = loop_grads(model, loss_fn, batches, "eval")
    for bn_mode, G in (("train", G_train), ("eval", G_eval)):
        ref, K = dense_spectrum(G, centered=False)
        res = gradient_covariance(model, loss_fn, batches, k=5, bn_mode=bn_mode, chunk_size=4)
        torch.testing.assert_close(res.eigenvalues, ref[:5], rtol=1e-10, atol=1e-14)
        assert res.trace == pytest.approx(float(K.trace()), rel=1e-10)
    # the two modes really differ, and nothing leaked into the model
    assert not torch.allclose(G_train, G_eval)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sum_reduced_loss_is_rejected():
    model, _, batches = mlp_problem()
    with pytest.raises(ValueError, match="mean"):
        gradient_covariance(model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), batches, k=2)


# -- gradient_noise_scale: per-example -------------------------------------------------------------
@pytest.mark.parametrize("bn", [False, True])
def test_noise_scale_per_example_matches_dense_hessian(bn):
    model, loss_fn, batches = mlp_problem(bn=bn)
    bn_mode = "train" if bn else "eval"
    G = loop_grads(model, loss_fn, batches, bn_mode)
    H = dense_hessian(model, loss_fn, batches, bn_mode)
    ref = dense_noise(G, H)
    res = gradient_noise_scale(model, loss_fn, batches, bn_mode=bn_mode)
    assert res.method == "per_example" and res.b_simple_se is None
    assert res.grad_norm_sq == pytest.approx(ref["g2"], rel=1e-10)
    assert res.trace_sigma == pytest.approx(ref["trS"], rel=1e-10)
    assert res.b_simple == pytest.approx(ref["trS"] / ref["g2"], rel=1e-9)
    assert res.gHg == pytest.approx(ref["gHg"], rel=1e-9)
    assert res.trace_h_sigma == pytest.approx(ref["trHS"], rel=1e-9)
    assert res.b_noise == pytest.approx(ref["trHS"] / ref["gHg"], rel=1e-8)
    assert res.curvature_rank == 11 and res.sigma_captured == pytest.approx(1.0, rel=1e-12)
    assert res.info.matvecs == 12  # 11 directions of Sigma + G


def test_noise_scale_truncated_curvature_is_top_directions():
    model, loss_fn, batches = mlp_problem()
    G = loop_grads(model, loss_fn, batches)
    H = dense_hessian(model, loss_fn, batches)
    D = G - G.mean(0)
    lam, U = torch.linalg.eigh(D.T @ D / G.shape[0])
    lam, U = lam.flip(0)[:2], U.flip(1)[:, :2]
    approx = float(sum(lam[j] * U[:, j] @ H @ U[:, j] for j in range(2)))
    res = gradient_noise_scale(model, loss_fn, batches, curvature_rank=2)
    assert res.curvature_rank == 2
    assert res.trace_h_sigma == pytest.approx(approx, rel=1e-9)
    assert res.sigma_captured == pytest.approx(float(lam.sum() / (D.T @ D / G.shape[0]).trace()), rel=1e-10)
    assert res.sigma_captured < 1.0


def test_noise_scale_linear_regression_closed_form():
    model, loss_fn, X, y = linreg_problem()
    w = model.weight.detach()[0]
    G = ((X @ w - y)[:, None]) * X
    ref = dense_noise(G, X.T @ X / X.shape[0])  # H = X^T X / N for 0.5 mean squared error
    res = gradient_noise_scale(model, loss_fn, (X, y))
    assert res.b_simple == pytest.approx(ref["trS"] / ref["g2"], rel=1e-11)
    assert res.b_noise == pytest.approx(ref["trHS"] / ref["gHg"], rel=1e-11)
    assert res.curvature_rank == 3
    # without curvature the per-example gradients are streamed through sums instead of a Gram matrix
    streamed = gradient_noise_scale(model, loss_fn, [(X[:15], y[:15]), (X[15:], y[15:])], curvature=False, chunk_size=7)
    assert streamed.b_simple == pytest.approx(ref["trS"] / ref["g2"], rel=1e-11)
    assert streamed.trace_sigma == pytest.approx(ref["trS"], rel=1e-11)
    assert streamed.b_noise is None and streamed.info.matvecs == 0


# -- gradient_noise_scale: two batch sizes -----------------------------------------------------------
def test_two_batch_estimator_is_unbiased_on_linear_regression():
    model, loss_fn, X, y = linreg_problem()
    exact = gradient_noise_scale(model, loss_fn, (X, y))
    est = gradient_noise_scale(
        model, loss_fn, [(X[:25], y[:25]), (X[25:], y[25:])], method="two_batch",
        small_batch=2, big_batch=8, n_pairs=3000, seed=1,
    )
    assert est.method == "two_batch" and est.n_pairs == 3000
    for name in ("grad_norm_sq", "trace_sigma", "gHg", "trace_h_sigma", "b_simple", "b_noise"):
        value, se, truth = getattr(est, name), getattr(est, name + "_se"), getattr(exact, name)
        assert 0 < se < 0.2 * abs(truth), name  # enough pairs for the check to mean something
        assert abs(value - truth) < 4 * se, (name, value, truth, se)


def test_two_batch_rejects_batch_statistics_and_bad_sizes():
    model, loss_fn, batches = mlp_problem(bn=True)
    with pytest.raises(ValueError, match="bn_mode"):
        gradient_noise_scale(model, loss_fn, batches, method="two_batch", bn_mode="train")
    with pytest.raises(ValueError, match="small"):
        gradient_noise_scale(model, loss_fn, batches, method="two_batch", small_batch=8, big_batch=8)
