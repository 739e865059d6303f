"""The parameter filter `wrt`: curvature of the loss with respect to the selected parameters only (the others held
fixed) is the dense Hessian's sub-block on those rows and columns; gradient noise uses the selected coordinates
of the per-example gradients."""

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchscope.curvature import (
    gradient_covariance,
    gradient_noise_scale,
    hessian_eigenvalues,
    hessian_trace,
    interpolate,
    landscape_slice,
)
from helpers import dense_hessian

F64 = torch.float64


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (10,), generator=g)
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


def indices(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Positions of the named parameters' entries in the flat vector of all parameters."""
    out, start = [], 0
    for n, p in model.named_parameters():
        if n in names:
            out.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(out)


def selections(model):
    return [
        ("0.*", ["0.weight", "0.bias"]),  # a glob: the first layer, a per-layer spectrum
        (re.compile(r"weight$"), ["0.weight", "2.weight"]),  # a regex: the weights, apart in the flat vector
        (model[2], ["2.weight", "2.bias"]),  # a module
        (["0.bias", model[2]], ["0.bias", "2.weight", "2.bias"]),  # a list of both kinds
    ]


def test_hessian_of_selected_parameters_is_the_dense_sub_block():
    model, data = problem()
    H = dense_hessian(model, F.cross_entropy, data)
    for wrt, names in selections(model):
        idx = indices(model, names)
        block = H[idx][:, idx]
        ref = torch.linalg.eigvalsh(block)
        top = hessian_eigenvalues(model, F.cross_entropy, data, k=2, wrt=wrt, tol=1e-10)
        bottom = hessian_eigenvalues(model, F.cross_entropy, data, k=1, which="bottom", wrt=wrt, tol=1e-10)
        assert top.info.n_params == idx.numel() and top.eigenvectors.shape == (2, idx.numel())
        assert top.eigenvalues == pytest.approx(ref.flip(0)[:2].tolist(), rel=1e-8, abs=1e-12), names
        assert bottom.eigenvalues == pytest.approx([float(ref[0])], rel=1e-8, abs=1e-12), names
        exact = hessian_trace(model, F.cross_entropy, data, samples=idx.numel() + 2, wrt=wrt)  # hutch++: exact
        assert exact.trace == pytest.approx(float(block.trace()), rel=1e-9), names


def test_gradient_noise_of_selected_parameters():
    model, data = problem()
    H = dense_hessian(model, F.cross_entropy, data)
    m = model.eval()
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]),
                                                                   list(m.parameters()))])
            for x, y in data for i in range(x.shape[0])]
    idx = indices(model, ["2.weight", "2.bias"])
    G = torch.stack(rows)[:, idx]
    Hs = H[idx][:, idx]
    g = G.mean(0)
    S = (G - g).T @ (G - g) / G.shape[0]
    res = gradient_noise_scale(model, F.cross_entropy, data, wrt="2.*")
    assert res.b_simple == pytest.approx(float(S.trace() / (g @ g)), rel=1e-9)
    assert res.b_noise == pytest.approx(float((Hs @ S).trace() / (g @ Hs @ g)), rel=1e-8)
    K = gradient_covariance(model, F.cross_entropy, data, k=3, wrt=model[2])
    torch.testing.assert_close(K.eigenvalues, torch.linalg.eigvalsh(G.T @ G / G.shape[0]).flip(0)[:3],
                               rtol=1e-9, atol=1e-14)


def test_landscapes_move_only_the_selected_parameters():
    model, data = problem()
    n_first = sum(p.numel() for p in model[0].parameters())
    sl = landscape_slice(model, F.cross_entropy, data, steps=3, wrt=model[0])
    assert sl.directions.shape == (1, n_first)
    theta = torch.cat([p.detach().reshape(-1) for p in model[0].parameters()])
    line = interpolate(model, F.cross_entropy, data, theta, torch.zeros_like(theta), alphas=[1.0], wrt="0.*")
    moved = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    moved.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved[0].weight.zero_()
        moved[0].bias.zero_()
        ref = sum(x.shape[0] * float(F.cross_entropy(moved(x), y)) for x, y in data) / 10
    assert float(line.loss[0]) == pytest.approx(ref, rel=1e-12)
    # a state_dict endpoint moves the selected entries too, never the others
    other = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    line2 = interpolate(model, F.cross_entropy, data, model.state_dict(), other, alphas=[1.0], wrt="0.*")
    assert float(line2.loss[0]) == pytest.approx(ref, rel=1e-12)


def test_a_filter_that_selects_nothing_says_so():
    model, data = problem()
    with pytest.raises(ValueError, match=r"wrt: 'encoder\.\*' selects no trainable parameter.*'0\.weight'"):
        hessian_trace(model, F.cross_entropy, data, samples=3, wrt="encoder.*")
    with pytest.raises(ValueError, match="wrt: Linear module selects no trainable parameter"):
        hessian_trace(model, F.cross_entropy, data, samples=3, wrt=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="wrt: expected a name pattern"):
        hessian_trace(model, F.cross_entropy, data, samples=3, wrt=[3])
    model[0].weight.requires_grad_(False)  # frozen parameters are held fixed whatever the pattern says
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        hessian_trace(model, F.cross_entropy, data, samples=3, wrt="0.weight")
