"""hessian_eigenvalues / hessian_trace / hessian_density / HessianOperator against the dense Hessian.

The reference Hessian (`helpers.dense_hessian`, shared with test_noise.py) is built independently of
`Objective`'s own loss: a deep copy of the model put into the measurement configuration by hand,
called through `functional_call`, differentiated twice by `torch.autograd.functional.hessian`
(float64 throughout).
"""

import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from batchscope.curvature._core import Objective
from batchscope.curvature.hessian import (
    HessianOperator,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)
from helpers import dense_hessian

f64 = torch.float64
loss_fn = nn.functional.cross_entropy


def make_model(kind: str, bn: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)]
    else:
        layers = [nn.Conv2d(1, 2, 3)] + ([nn.BatchNorm2d(2)] if bn else []) + [
            nn.Tanh(), nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)
        ]
    model = nn.Sequential(*layers).to(f64)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # running statistics unlike any batch's, so eval and train modes give different Hessians
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model.train()
    model[-1].eval()  # mixed flags, which must come back as they were
    return model


def make_data(kind: str, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (4,) if kind == "mlp" else (1, 6, 6)
    return [(torch.randn(s, *shape, generator=g, dtype=f64), torch.randint(0, 3, (s,), generator=g)) for s in sizes]


def snapshot(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    return state, flags


def assert_restored(model: nn.Module, snap) -> None:
    state, flags = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


CASES = [(kind, bn, mode) for kind in ("mlp", "cnn") for bn in (False, True) for mode in ("eval", "train")
         if bn or mode == "eval"]


@pytest.mark.parametrize("kind,bn,bn_mode", CASES)
def test_eigenvalues_and_trace_match_dense_hessian(kind, bn, bn_mode):
    model = make_model(kind, bn)
    data = make_data(kind, [12, 7, 9])
    snap = snapshot(model)
    H = dense_hessian(model, loss_fn, data, bn_mode)
    true = torch.linalg.eigvalsh(H)
    scale = float(true.abs().max())
    n = H.shape[0]
    kw = {"bn_mode": bn_mode, "tol": 1e-9}
    top = hessian_eigenvalues(model, loss_fn, data, k=3, which="top", **kw)
    bottom = hessian_eigenvalues(model, loss_fn, data, k=3, which="bottom", **kw)
    assert top.converged and bottom.converged
    np.testing.assert_allclose(top.eigenvalues, true.flip(0)[:3].numpy(), atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(bottom.eigenvalues, true[:3].numpy(), atol=1e-5 * scale, rtol=0)
    # the eigenvectors are eigenvectors of this H, in the flat parameter order
    X = top.eigenvectors
    assert X.shape == (3, n) and X.dtype == f64
    assert float((X @ H - torch.tensor(top.eigenvalues, dtype=f64)[:, None] * X).norm(dim=1).max()) < 1e-6 * scale
    assert top.info.matvecs == top.iterations and top.info.bn_mode == bn_mode and top.info.n_params == n
    assert top.info.n_examples == 28 and top.info.dtype == "torch.float64"

    exact = float(H.trace())
    for method, samples in (("hutch++", 30), ("hutchinson", 30)):
        est = hessian_trace(model, loss_fn, data, samples, method=method, bn_mode=bn_mode, seed=3)
        assert est.samples == samples and est.info.matvecs == samples
        assert 0 < est.stderr and abs(est.trace - exact) <= 4 * est.stderr
    full = hessian_trace(model, loss_fn, data, n, bn_mode=bn_mode)
    assert full.stderr == 0 and abs(full.trace - exact) < 1e-10 * scale * n
    assert_restored(model, snap)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_unequal_batches_weigh_by_size(kind):
    """In eval mode, a list of unequal batches must measure exactly the loss over their concatenation."""
    model = make_model(kind, bn=True)
    data = make_data(kind, [3, 11, 6])
    whole = (torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    H = dense_hessian(model, loss_fn, [whole], "eval")
    true = torch.linalg.eigvalsh(H)
    scale = float(true.abs().max())
    split = hessian_eigenvalues(model, loss_fn, data, k=2, tol=1e-10)
    joined = hessian_eigenvalues(model, loss_fn, whole, k=2, tol=1e-10)
    np.testing.assert_allclose(split.eigenvalues, true.flip(0)[:2].numpy(), atol=1e-8 * scale, rtol=0)
    np.testing.assert_allclose(split.eigenvalues, joined.eigenvalues, atol=1e-8 * scale, rtol=0)
    n = H.shape[0]
    assert abs(hessian_trace(model, loss_fn, data, n).trace - float(H.trace())) < 1e-10 * scale * n


def test_magnitude_and_warm_start():
    model = make_model("mlp", bn=True)
    data = make_data("mlp", [20])
    true = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data, "eval"))
    mag = hessian_eigenvalues(model, loss_fn, data, k=4, which="magnitude", tol=1e-9)
    expected = true[true.abs().argsort(descending=True)][:4]
    np.testing.assert_allclose(mag.eigenvalues, expected.numpy(), atol=1e-5 * float(true.abs().max()), rtol=0)
    cold = hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-6)
    warm = hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-6, v0=cold.eigenvectors)
    assert warm.converged and warm.iterations <= 3 < cold.iterations
    # several previous eigenvectors as a warm start for k = 3
    cold3 = hessian_eigenvalues(model, loss_fn, data, k=3, tol=1e-6)
    warm3 = hessian_eigenvalues(model, loss_fn, data, k=3, tol=1e-6, v0=cold3.eigenvectors)
    assert warm3.converged and warm3.iterations < cold3.iterations
    np.testing.assert_allclose(warm3.eigenvalues, cold3.eigenvalues, rtol=1e-6)


def test_power_method_reaches_top_eigenvalue():
    model = make_model("mlp", bn=False)
    data = make_data("mlp", [30])
    true = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data, "eval"))
    res = hessian_eigenvalues(model, loss_fn, data, k=1, method="power", tol=1e-7, max_iter=500)
    assert res.converged and res.info.extra["method"] == "power"
    assert abs(res.eigenvalues[0] - float(true[-1])) < 1e-3 * float(true.abs().max())


def test_density_moments_and_concentration():
    model = make_model("cnn", bn=True)
    data = make_data("cnn", [10, 6])
    snap = snapshot(model)
    H = dense_hessian(model, loss_fn, data, "eval")
    true = torch.linalg.eigvalsh(H)
    n = H.shape[0]
    d = hessian_density(model, loss_fn, data, num_probes=20, lanczos_steps=6, seed=1)
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1) < 1e-12 and len(d.nodes) == 20
    assert d.info.matvecs == 20 * 6
    for p, exact in ((1, float(H.trace()) / n), (2, float((H @ H).trace()) / n)):
        per_probe = torch.stack([(w * t**p).sum() for t, w in zip(d.nodes, d.weights)])
        assert abs(d.moment(p) - exact) < 4 * float(per_probe.std()) / math.sqrt(20)
    # full-length Lanczos and a narrow kernel: all the mass sits on the true eigenvalues
    spread = float(true.max() - true.min())
    sharp = hessian_density(model, loss_fn, data, num_probes=2, lanczos_steps=n, sigma=1e-3 * spread, grid=20000)
    near = (sharp.grid[:, None] - true[None, :]).abs().min(1).values <= 4e-3 * spread
    assert float(torch.trapezoid(sharp.density * near, sharp.grid)) > 0.99
    assert_restored(model, snap)


def test_scipy_operator_eigsh():
    model = make_model("cnn", bn=True)
    data = make_data("cnn", [8, 8])
    snap = snapshot(model)
    true = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data, "train"))
    op = HessianOperator(model, loss_fn, data, bn_mode="train")
    vals = np.sort(eigsh(op, k=6, which="LA", tol=1e-10)[0])[::-1]
    np.testing.assert_allclose(vals, true.flip(0)[:6].numpy(), atol=1e-7 * float(true.abs().max()), rtol=0)
    assert op.matvecs > 0 and op.info().matvecs == op.matvecs and op.info().bn_mode == "train"
    x = np.random.default_rng(0).standard_normal((op.shape[0], 2))
    np.testing.assert_allclose(op @ x, np.stack([op @ x[:, 0], op @ x[:, 1]], 1), rtol=1e-12, atol=1e-14)
    assert_restored(model, snap)


@pytest.mark.parametrize("call,name", [
    (lambda m, d: hessian_eigenvalues(m, loss_fn, d, k=10_000), "k"),
    (lambda m, d: hessian_eigenvalues(m, loss_fn, d, which="biggest"), "which"),
    (lambda m, d: hessian_eigenvalues(m, loss_fn, d, method="arnoldi"), "method"),
    (lambda m, d: hessian_eigenvalues(m, loss_fn, d, which="bottom", method="power"), "which"),
    (lambda m, d: hessian_trace(m, loss_fn, d, method="exact"), "method"),
    (lambda m, d: hessian_trace(m, loss_fn, d, samples=2), "samples"),
    (lambda m, d: hessian_density(m, loss_fn, d, num_probes=0), "num_probes"),
    (lambda m, d: hessian_eigenvalues(m, loss_fn, []), "data"),
    (lambda m, d: hessian_trace(m, loss_fn, []), "data"),
    (lambda m, d: hessian_eigenvalues(m, loss_fn, d, bn_mode="batch"), "bn_mode"),
])
def test_clear_errors(call, name):
    model = make_model("mlp", bn=False)
    with pytest.raises(ValueError, match=f"^{name}:") as e:
        call(model, make_data("mlp", [5]))
    assert "\n" not in str(e.value)


def test_dense_reference_agrees_with_objective():
    """Guard for the reference itself: the hand-built Hessian equals H v from Objective."""
    model = make_model("cnn", bn=True)
    data = make_data("cnn", [5, 4])
    H = dense_hessian(model, loss_fn, data, "train")
    v = torch.randn(H.shape[0], dtype=f64, generator=torch.Generator().manual_seed(0))
    with Objective(model, loss_fn, data, bn_mode="train") as obj:
        torch.testing.assert_close(obj.hvp(v), H @ v, atol=1e-12, rtol=1e-10)


def test_auto_hvp_pick_is_measured_once_per_setup(monkeypatch):
    """hvp_method="auto" costs about four HVPs to decide; a second call on the same setup reuses it. (With the
    gradient graphs kept, products at the weights need no pick: graph_budget=None streams, as over budget.)"""
    model = make_model("mlp", bn=False)
    data = make_data("mlp", [9])
    calls = []
    original = Objective._pick_hvp_method
    monkeypatch.setattr(Objective, "_pick_hvp_method", lambda self: calls.append(1) or original(self))
    monkeypatch.setattr("batchscope.curvature.hessian._HVP_PICKS", {})
    first = hessian_eigenvalues(model, loss_fn, data, k=1, graph_budget=None)
    second = hessian_trace(model, loss_fn, data, 6, graph_budget=None)
    assert len(calls) == 1 and first.info.hvp_method == second.info.hvp_method != "auto"
    hessian_eigenvalues(model, loss_fn, make_data("mlp", [10]), k=1, graph_budget=None)  # another shape: anew
    assert len(calls) == 2
