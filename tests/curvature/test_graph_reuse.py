"""Hessian-vector products with each batch's gradient graph kept (issue 18): the same products, the budget kept."""

import pytest
import torch
import torch.nn.functional as F

import batchscope
from batchscope.curvature import Objective


def _cnn_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).double()
    model.train()
    x, y = torch.randn(50, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (50,))
    model(x)  # running statistics that are not the defaults
    batches = [(x[:20], y[:20]), (x[20:35], y[20:35]), (x[35:], y[35:])]  # unequal batches
    return model, batches


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_kept_graphs_give_the_same_products(bn_mode):
    model, batches = _cnn_and_data()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with Objective(model, F.cross_entropy, batches, bn_mode=bn_mode, graph_budget=None) as plain:
        want = [plain.hvp(v), plain.hvp(2 * v)]
    with Objective(model, F.cross_entropy, batches, bn_mode=bn_mode) as kept:
        got = [kept.hvp(v), kept.hvp(2 * v)]
        assert kept.notes["graph_reuse"].startswith("on")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # and against the dense Hessian of the data-averaged loss
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = dict(model.named_buffers())
    n_total = sum(len(y) for _, y in batches)

    def f(theta):
        params = dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        from batchscope.curvature._core import measurement_mode
        with measurement_mode(model, bn_mode):
            return sum(F.cross_entropy(torch.func.functional_call(model, {**params, **buffers}, (x,)), y) * len(y)
                       for x, y in batches) / n_total

    H = torch.autograd.functional.hessian(f, flat)
    torch.testing.assert_close(got[0], H @ v, rtol=1e-10, atol=1e-12)


def test_the_budget_decides_and_is_kept():
    model, batches = _cnn_and_data()
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with Objective(model, F.cross_entropy, batches, graph_budget=1 << 30) as big:
        want = big.hvp(v)
        need = big.notes["graph_bytes"]
    assert 0 < need <= 1 << 30
    with Objective(model, F.cross_entropy, batches, graph_budget=int(need * 1.1)) as enough:
        torch.testing.assert_close(enough.hvp(v), want, rtol=1e-12, atol=1e-14)
        assert enough.notes["graph_reuse"].startswith("on") and enough.notes["graph_bytes"] <= int(need * 1.1)
    with Objective(model, F.cross_entropy, batches, graph_budget=int(need * 0.9)) as short:
        torch.testing.assert_close(short.hvp(v), want, rtol=1e-12, atol=1e-14)  # streamed instead
        assert short.notes["graph_reuse"].startswith("off")
    with pytest.raises(ValueError, match="graph_budget"):
        Objective(model, F.cross_entropy, batches, graph_budget=-1)


def test_instruments_use_kept_graphs_and_give_the_same_eigenvalues():
    model, batches = _cnn_and_data()
    a = batchscope.hessian_eigenvalues(model, F.cross_entropy, batches, k=2, tol=1e-10)
    b = batchscope.hessian_eigenvalues(model, F.cross_entropy, batches, k=2, tol=1e-10, graph_budget=None)
    assert a.info.extra["graph_reuse"].startswith("on") and b.info.extra["graph_reuse"] == "off: no budget"
    assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-10)


def test_a_streamed_loader_keeps_no_graphs_unless_asked():
    model, batches = _cnn_and_data()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    auto = batchscope.hessian_eigenvalues(model, F.cross_entropy, loader, k=1, tol=1e-10)
    asked = batchscope.hessian_eigenvalues(model, F.cross_entropy, loader, k=1, tol=1e-10, graph_budget=1 << 30)
    assert auto.info.extra["graph_reuse"].startswith("off: streamed")
    assert asked.info.extra["graph_reuse"].startswith("on")
    assert auto.eigenvalues == pytest.approx(asked.eigenvalues, rel=1e-10)
