"""The fused cross-entropy products (batchscope.curvature.crossentropy) against dense float64 references:
`torch.func.hessian` of the loss of the flat parameters for H v, and J^T H_z J built from the dense
Jacobian of the logits and the dense softmax Hessian for the Gauss-Newton product."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from batchscope.curvature._core import Objective
from batchscope.curvature.crossentropy import cross_entropy_hvp, objective_hvp, softmax_hessian_product
from helpers import dense_hessian

f64 = torch.float64


def flat_fn(model: nn.Module):
    """(f(theta, x) on a flat theta, theta0, names, unflatten) for a float64 model."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    buffers = dict(model.named_buffers())
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(theta):
        return {n: t.view(s) for n, t, s in zip(names, theta.split(numels), shapes)}

    def f(theta, x):
        return functional_call(model, {**buffers, **unflatten(theta)}, (x,))

    return f, theta0, unflatten


class TinyLM(nn.Module):
    """Embedding -> tanh -> linear over the vocabulary: (B, T) tokens to (B, T, V) logits."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


def test_softmax_block_matches_the_dense_matrix():
    g = torch.Generator().manual_seed(0)
    z, u = torch.randn(3, 7, generator=g, dtype=f64), torch.randn(3, 7, generator=g, dtype=f64)
    p = z.softmax(-1)
    dense = torch.stack([torch.diag(r) - torch.outer(r, r) for r in p])  # (3, 7, 7)
    torch.testing.assert_close(softmax_hessian_product(p, u), torch.einsum("nij,nj->ni", dense, u))
    # along dim 1 of a (N, C, T) tensor, as F.cross_entropy lays out sequence logits
    torch.testing.assert_close(softmax_hessian_product(p.T.unsqueeze(0), u.T.unsqueeze(0), 1)[0].T,
                               softmax_hessian_product(p, u))


METHODS = ["reverse_over_forward", "reverse_over_reverse"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("curvature,reduction", [("hessian", "mean"), ("ggn", "mean"), ("hessian", "sum")])
def test_classifier_product_matches_dense(curvature, reduction, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(f64)
    x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    f, theta0, unflatten = flat_fn(model)
    loss = lambda t: nn.functional.cross_entropy(f(t, x), y, reduction=reduction)
    if curvature == "hessian":
        dense = torch.func.hessian(loss)(theta0)
    else:
        J = torch.func.jacrev(f)(theta0, x)  # (N, C, P)
        p = f(theta0, x).softmax(-1)
        Hz = torch.stack([torch.diag(r) - torch.outer(r, r) for r in p]) / (x.shape[0] if reduction == "mean" else 1)
        dense = torch.einsum("ncp,ncd,ndq->pq", J, Hz, J)
    v = torch.randn_like(theta0)
    hv, value = cross_entropy_hvp(lambda p_, x_: functional_call(model, p_, (x_,)), unflatten(theta0),
                                  unflatten(v), x, y, curvature=curvature, reduction=reduction, method=method)
    got = torch.cat([hv[n].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, dense @ v, rtol=1e-10, atol=1e-12)
    assert value == pytest.approx(float(loss(theta0)), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sequence_logits_with_ignored_tokens_match_dense(smoothing, method):
    torch.manual_seed(1)
    vocab = 11
    model = TinyLM(vocab, 4).to(f64)
    x = torch.randint(0, vocab, (2, 5))
    y = torch.randint(0, vocab, (2, 5))
    y[0, 1] = y[1, 4] = -100  # ignored positions (padding)
    f, theta0, unflatten = flat_fn(model)

    def loss(t):
        z = f(t, x)
        return nn.functional.cross_entropy(z.reshape(-1, vocab), y.reshape(-1), label_smoothing=smoothing)

    dense = torch.func.hessian(loss)(theta0)
    v = torch.randn_like(theta0)
    hv, value = cross_entropy_hvp(lambda p_, x_: functional_call(model, p_, (x_,)), unflatten(theta0),
                                  unflatten(v), x, y, class_dim=-1, label_smoothing=smoothing, method=method)
    got = torch.cat([hv[n].reshape(-1) for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, dense @ v, rtol=1e-10, atol=1e-12)
    assert value == pytest.approx(float(loss(theta0)), rel=1e-12)


def test_objective_product_over_batches_with_batch_norm_matches_dense():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 3)).to(f64)
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(s, 1, 5, 5, generator=g, dtype=f64), torch.randint(0, 3, (s,), generator=g)) for s in (3, 5)]
    dense = dense_hessian(model, nn.functional.cross_entropy, batches)
    v = torch.randn(dense.shape[0], dtype=f64, generator=g)
    with Objective(model, nn.functional.cross_entropy, batches) as obj:
        fused = objective_hvp(obj, v)
        plain = obj.hvp(v)
        assert obj.matvecs == 2
    torch.testing.assert_close(fused, dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    assert model.training  # the Objective restored the flags


class TinyAttention(nn.Module):
    """One softmax self-attention layer over embeddings, then the vocabulary head: autograd cannot
    differentiate softmax's forward-mode formula, so "auto" must fall back to reverse over reverse."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out(h + a @ v)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_attention_falls_back_and_matches_dense(curvature):
    torch.manual_seed(4)
    vocab = 7
    model = TinyAttention(vocab, 4).to(f64)
    batches = [(torch.randint(0, vocab, (2, 3)), torch.randint(0, vocab, (2, 3))) for _ in range(2)]
    lm_loss = lambda z, y: nn.functional.cross_entropy(z.reshape(-1, vocab), y.reshape(-1))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=f64)
    with Objective(model, lm_loss, batches) as obj:
        with pytest.raises(RuntimeError):  # the reason for the fallback, still there in this torch
            objective_hvp(obj, v, method="reverse_over_forward", class_dim=-1)
        got = objective_hvp(obj, v, curvature=curvature, class_dim=-1)
        # the Gauss-Newton product never differentiates J v, so forward mode works for it: timed, either may win
        want = {"reverse_over_reverse"} if curvature == "hessian" else {"reverse_over_forward", "reverse_over_reverse"}
        assert set(obj._ce_hvp_methods) == {curvature} and obj._ce_hvp_methods[curvature] in want
        if curvature == "hessian":
            torch.testing.assert_close(got, dense_hessian(model, lm_loss, batches) @ v, rtol=1e-10, atol=1e-12)
        else:
            f, theta0, _ = flat_fn(model)
            ref = torch.zeros_like(v)
            for x, _ in batches:
                J = torch.func.jacrev(f)(theta0, x).reshape(-1, vocab, v.numel())  # (tokens, V, P)
                p = f(theta0, x).reshape(-1, vocab).softmax(-1)
                Hz = torch.stack([torch.diag(r) - torch.outer(r, r) for r in p]) / p.shape[0] / len(batches)
                ref += torch.einsum("ncp,ncd,ndq,q->p", J, Hz, J, v)
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_rejects_unknown_options():
    model = nn.Linear(2, 2)
    p = dict(model.named_parameters())
    with pytest.raises(ValueError, match="curvature"):
        cross_entropy_hvp(lambda p_, x_: functional_call(model, p_, (x_,)), p, p, torch.randn(1, 2),
                          torch.tensor([0]), curvature="fisher")
