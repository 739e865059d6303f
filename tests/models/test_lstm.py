"""The LSTM classifier: shapes, its recurrence against torch's nn.LSTM, init, determinism, and the instruments' needs
(per-example gradients under torch.func.vmap, Hessian-vector products by both methods)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import batchscope
from batchscope.curvature._core import Objective
from batchscope.models import build_model


def _lstm(shape=(7, 5), classes=3, width=0.125, seed=0):
    torch.manual_seed(seed)
    return build_model("lstm", input_shape=shape, num_classes=classes, width=width)


@pytest.mark.parametrize("shape", [(7, 5), (12,), (1, 3)])
def test_shapes_and_gradients(shape):
    model = _lstm(shape)
    x = torch.randn(4, *shape)
    out = model(x)
    assert out.shape == (4, 3)
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_width_scales_embedding_and_hidden():
    model = build_model("lstm", input_shape=(16, 12), num_classes=4, width=0.25)
    assert (model.embed.in_features, model.embed.out_features) == (12, 8)
    assert model.hidden == 32 and model.input_gates.out_features == 4 * 32 and model.head.in_features == 32


def test_recurrence_is_torchs_lstm():
    """Same weights in nn.LSTM (gate order i, f, g, o; our single bias is its b_ih + b_hh): same last hidden state."""
    model = _lstm((9, 5), width=0.25).double()
    ref = nn.LSTM(model.embed.out_features, model.hidden, batch_first=True).double()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(model.input_gates.weight)
        ref.weight_hh_l0.copy_(model.hidden_gates.weight)
        ref.bias_ih_l0.copy_(model.input_gates.bias)
        ref.bias_hh_l0.zero_()
    x = torch.randn(6, 9, 5, dtype=torch.float64)
    _, (h, _) = ref(model.embed(x))
    torch.testing.assert_close(model(x), model.head(h[0]))


def test_init_is_seeded_and_sets_the_forget_bias_to_log_length():
    a, b, c = _lstm(seed=0), _lstm(seed=0), _lstm(seed=1)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.hidden_gates.weight, c.hidden_gates.weight)
    h = a.hidden
    bias = a.input_gates.bias
    assert torch.equal(bias[h : 2 * h], torch.full((h,), math.log(7))) and not bias[:h].any() and not bias[2 * h :].any()
    bound = 1 / math.sqrt(h)
    assert a.hidden_gates.weight.abs().max() <= bound and a.input_gates.weight.abs().max() <= bound


def test_per_example_gradients_under_vmap_match_a_loop():
    model = _lstm()
    x, y = torch.randn(5, 7, 5), torch.tensor([0, 1, 2, 1, 0])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        one = grad(loss)(params, x[i], y[i])
        for k in params:
            torch.testing.assert_close(batched[k][i], one[k])


def test_instruments_run_on_the_lstm_and_hvp_methods_agree():
    model = _lstm(width=0.25).double()
    x, y = torch.randn(40, 7, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss_fn = nn.CrossEntropyLoss()
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv = {}
    for method in ("double_backward", "forward_over_reverse"):
        with Objective(model, loss_fn, data, hvp_method=method) as obj:
            hv[method] = obj.hvp(v)
    torch.testing.assert_close(hv["double_backward"], hv["forward_over_reverse"])
    top = batchscope.hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-6)
    assert top.converged and top.eigenvalues[0] > 0
    for mode in ("eval", "train"):  # no batch norm: the two definitions of per-example gradients agree
        K = batchscope.gradient_covariance(model, loss_fn, data, k=3, bn_mode=mode)
        if mode == "eval":
            first = K
        else:
            torch.testing.assert_close(torch.as_tensor(K.eigenvalues), torch.as_tensor(first.eigenvalues))
