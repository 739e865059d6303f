"""The functional optimizers against torch.optim, step by step."""

import pytest
import torch

from batchscope.spec import OptimSpec
from batchscope.train.optim import Hyper, clip_grads, init_state, optimizer_step, sam_perturbation


def _trajectory_pair(spec: OptimSpec, torch_opt, steps=5):
    torch.manual_seed(0)
    a = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    b = [t.clone().requires_grad_(True) for t in a]
    ref = torch_opt(b)
    hp = Hyper.from_spec(spec, torch.device("cpu"), torch.float64)
    state = init_state(spec, a)
    lr = torch.tensor(spec.lr, dtype=torch.float64)
    for k in range(steps):
        grads = [torch.randn_like(t) * (k + 1) for t in a]
        optimizer_step(spec, a, grads, state, hp, lr)
        for p, g in zip(b, grads):
            p.grad = g.clone()
        ref.step()
    return a, b


@pytest.mark.parametrize(
    "kw",
    [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict(momentum=0.5, weight_decay=1e-2)],
)
def test_sgd_matches_torch(kw):
    spec = OptimSpec(name="sgd", lr=0.05, **kw)
    a, b = _trajectory_pair(
        spec,
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=kw["momentum"], nesterov=kw.get("nesterov", False),
                                   weight_decay=kw.get("weight_decay", 0.0)),
    )
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam_matches_torch(wd):
    spec = OptimSpec(name="adam", lr=1e-2, weight_decay=wd, betas=(0.8, 0.99), eps=1e-6)
    a, b = _trajectory_pair(
        spec, lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    )
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.detach(), rtol=1e-12, atol=1e-12)


def test_clip_grads_bounds_global_norm_and_keeps_small_ones():
    g = [torch.full((3,), 4.0), torch.full((1,), 3.0)]  # norm sqrt(48 + 9)
    clipped = clip_grads(g, 1.0)
    total = torch.sqrt(sum((c**2).sum() for c in clipped))
    assert abs(float(total) - 1.0) < 1e-5
    assert torch.allclose(clipped[0] / clipped[0].norm(), g[0] / g[0].norm())
    small = clip_grads([torch.tensor([0.1, 0.2])], 5.0)
    assert torch.allclose(small[0], torch.tensor([0.1, 0.2]))


def test_sam_perturbation_has_radius_rho_along_gradient():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    e = sam_perturbation(g, 0.05)
    assert torch.allclose(torch.cat(e), torch.tensor([0.03, 0.0, 0.04]))
