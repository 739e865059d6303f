"""The functional optimizers against torch.optim, step by step, and LARS and LAMB against the papers' update
equations."""

import copy
import functools

import numpy as np
import pytest
import torch
from torch import Tensor

from batchscope.spec import OptimSpec
from batchscope.train.optim import Hyper, adam_step, clip_grads, init_state, optimizer_step, sam_perturbation


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


# -- AdamW against torch.optim.AdamW, on a small model ----------------------------------------------


def _adamw_gaps(spec: OptimSpec, dtype, make_ref, variant=None, steps=8) -> list[float]:
    """Our optimizer and torch's (`make_ref(params)`) on the same small net, each following its own
    gradients, with an lr that changes every step: the largest weight difference after each step.
    `variant(params, grads, state, hp, lr)` replaces ours when given."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)
    x, y = torch.randn(16, 5, dtype=dtype), torch.randint(0, 3, (16,))
    ref_net = copy.deepcopy(net)
    ref = make_ref(ref_net.parameters())
    ours = [p.detach().clone() for p in net.parameters()]
    hp, state = Hyper.from_spec(spec, torch.device("cpu"), dtype), init_state(spec, ours)
    gaps = []
    for k in range(steps):
        lr = spec.lr * (1 + k) / 4
        ref.param_groups[0]["lr"] = lr
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref_net(x), y).backward()
        ref.step()
        net_k = copy.deepcopy(net)
        with torch.no_grad():
            for p, q in zip(net_k.parameters(), ours):
                p.copy_(q)
        grads = list(torch.autograd.grad(torch.nn.functional.cross_entropy(net_k(x), y), list(net_k.parameters())))
        (variant or functools.partial(optimizer_step, spec))(ours, grads, state, hp, torch.tensor(lr, dtype=dtype))
        gaps.append(max(float((a - b.detach()).abs().max()) for a, b in zip(ours, ref_net.parameters())))
    return gaps


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "kw", [dict(weight_decay=0.0), dict(weight_decay=0.1), dict(weight_decay=0.05, betas=(0.8, 0.95), eps=1e-4)]
)
def test_adamw_matches_torch_adamw_step_by_step(dtype, tol, kw):
    spec = OptimSpec(name="adamw", lr=2e-2, **kw)
    make = lambda ps: torch.optim.AdamW(ps, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    gaps = _adamw_gaps(spec, dtype, make)
    assert max(gaps) <= tol, gaps  # after every step


def test_adamw_test_tells_coupled_decay_and_another_eps_placement_apart():
    spec = OptimSpec(name="adamw", lr=2e-2, weight_decay=0.1, eps=1e-3)
    make = lambda ps: torch.optim.AdamW(ps, lr=spec.lr, eps=spec.eps, weight_decay=spec.weight_decay)
    assert max(_adamw_gaps(spec, torch.float64, make)) <= 1e-12
    # weight decay inside the moments (Adam's L2) instead of decoupled
    assert _adamw_gaps(spec, torch.float64, make, variant=functools.partial(adam_step, spec))[-1] > 1e-4

    def eps_before_correction(params, grads, state, hp, lr):  # Kingma & Ba's "efficient" form: eps not rescaled
        state["t"].add_(1)
        c1, c2 = 1 - hp.beta1 ** state["t"], 1 - hp.beta2 ** state["t"]
        for p, g, m, v in zip(params, grads, state["m"], state["v"]):
            p.mul_(1 - lr * hp.weight_decay)
            m.mul_(hp.beta1).add_((1 - hp.beta1) * g)
            v.mul_(hp.beta2).add_((1 - hp.beta2) * g * g)
            p.sub_(lr * c2.sqrt() / c1 * m / (v.sqrt() + hp.eps))

    assert _adamw_gaps(spec, torch.float64, make, variant=eps_before_correction)[-1] > 1e-6


# -- LARS and LAMB against the papers' update equations ---------------------------------------------
# The references are transcribed separately from the papers, in numpy with plain ifs: LARS, You et al. 2017,
# Algorithm 1 (local lr eta ||w|| / (||g|| + wd ||w||), velocity v <- m v + lr_t lambda (g + wd w), w <- w - v),
# with 1-D tensors excluded; LAMB, You et al. 2020, Algorithm 2 with phi the identity. A trust ratio with a
# zero norm is 1. Keyword switches give the mistakes the tests must catch.


def _problem(start: str):
    """A 2-layer net y = W2 tanh(W1 x + b1) + b2 under squared error, with layer norms far apart (||W1|| ~ 10,
    ||W2|| ~ 0.2), plus a 2-D tensor D that the loss ignores (always ||D|| = ||grad D|| = 0). start "zero_w2":
    W2 = 0, so ||W2|| = 0 and W1's and b1's gradients are 0 at the first step."""
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    ws = [2.0 * rnd(6, 4), 0.5 * rnd(6), 0.05 * rnd(3, 6), 0.1 * rnd(3), torch.zeros(2, 2, dtype=torch.float64)]
    if start == "zero_w2":
        ws[2] = torch.zeros(3, 6, dtype=torch.float64)
    x, y = rnd(10, 4), rnd(10, 3)

    def grad_fn(params: list[Tensor]) -> list[Tensor]:
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        w1, b1, w2, b2, _ = ps
        loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).sum(1).mean()
        return [gr if gr is not None else torch.zeros_like(p) for gr, p in
                zip(torch.autograd.grad(loss, ps, allow_unused=True), ps)]

    return ws, grad_fn


_LRS = [0.5, 0.5, 0.3, 0.2, 0.1, 0.05]  # a schedule: LARS's velocity carries the lr it was taken with


def _ours(spec: OptimSpec, start: str, lrs=_LRS) -> list[np.ndarray]:
    ws, grad_fn = _problem(start)
    hp, state = Hyper.from_spec(spec, torch.device("cpu"), torch.float64), init_state(spec, ws)
    for lr in lrs:
        optimizer_step(spec, ws, grad_fn(ws), state, hp, torch.tensor(lr * spec.lr, dtype=torch.float64))
    return [w.numpy() for w in ws]


def _lars_reference(spec: OptimSpec, start: str, lrs=_LRS, wd_in_denominator=True, eta=True, adapt_1d=False,
                    at_zero=1.0, lr_in_velocity=True) -> list[np.ndarray]:
    tw, grad_fn = _problem(start)
    ws = [t.numpy().copy() for t in tw]
    vel = [np.zeros_like(w) for w in ws]
    m, wd = spec.momentum, spec.weight_decay
    for lr in lrs:
        gamma = lr * spec.lr
        gs = [g.numpy() for g in grad_fn([torch.from_numpy(w) for w in ws])]
        for i, (w, g) in enumerate(zip(ws, gs)):
            if w.ndim >= 2 or adapt_1d:
                wn, gn = float(np.linalg.norm(w)), float(np.linalg.norm(g))
                if wn > 0 and gn > 0:
                    local = (spec.trust_coefficient if eta else 1.0) * wn / (gn + (wd * wn if wd_in_denominator else 0.0))
                else:
                    local = at_zero
                step = local * (g + wd * w)
            else:
                step = g
            vel[i] = m * vel[i] + (gamma * step if lr_in_velocity else step)
            ws[i] = w - (vel[i] if lr_in_velocity else gamma * vel[i])
    return ws


def _lamb_reference(spec: OptimSpec, start: str, lrs=_LRS, wd_in_ratio=True, bias_correction=True, at_zero=1.0):
    tw, grad_fn = _problem(start)
    ws = [t.numpy().copy() for t in tw]
    ms, vs = [np.zeros_like(w) for w in ws], [np.zeros_like(w) for w in ws]
    (b1, b2), eps, wd = spec.betas, spec.eps, spec.weight_decay
    for t, lr in enumerate(lrs, start=1):
        gs = [g.numpy() for g in grad_fn([torch.from_numpy(w) for w in ws])]
        for i, (w, g) in enumerate(zip(ws, gs)):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g**2
            m_hat = ms[i] / (1 - b1**t) if bias_correction else ms[i]
            v_hat = vs[i] / (1 - b2**t) if bias_correction else vs[i]
            adam = m_hat / (np.sqrt(v_hat) + eps)
            r = adam + wd * w
            wn, rn = float(np.linalg.norm(w)), float(np.linalg.norm(r if wd_in_ratio else adam))
            ratio = wn / rn if wn > 0 and rn > 0 else at_zero
            ws[i] = w - lr * spec.lr * ratio * r
    return ws


def _gap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def test_problem_has_the_zero_norms_it_claims():
    ws, grad_fn = _problem("zero_w2")
    gs = grad_fn(ws)
    assert float(ws[2].norm()) == 0 and float(gs[0].norm()) == 0 and float(gs[1].norm()) == 0
    assert float(ws[4].norm()) == 0 and float(gs[4].norm()) == 0 and float(gs[2].norm()) > 0
    ws, _ = _problem("generic")
    assert float(ws[0].norm()) > 20 * float(ws[2].norm())  # layer norms far apart: a per-tensor ratio matters


LARS_SPECS = [
    dict(momentum=0.9, weight_decay=0.0, trust_coefficient=0.02),
    dict(momentum=0.9, weight_decay=5e-2, trust_coefficient=0.02),
    dict(momentum=0.0, weight_decay=1e-3, trust_coefficient=0.001),
]


@pytest.mark.parametrize("start", ["generic", "zero_w2"])
@pytest.mark.parametrize("kw", LARS_SPECS)
def test_lars_follows_the_papers_update(start, kw):
    spec = OptimSpec(name="lars", lr=1.0, **kw)
    ours = _ours(spec, start)
    assert all(np.isfinite(w).all() for w in ours)
    assert _gap(ours, _lars_reference(spec, start)) <= 1e-12


def test_lars_test_catches_a_wrong_trust_ratio():
    spec = OptimSpec(name="lars", lr=1.0, momentum=0.9, weight_decay=5e-2, trust_coefficient=0.02)
    for start in ("generic", "zero_w2"):
        ours = _ours(spec, start)
        assert _gap(ours, _lars_reference(spec, start)) <= 1e-12
        for wrong in (dict(wd_in_denominator=False), dict(eta=False), dict(adapt_1d=True), dict(lr_in_velocity=False)):
            assert _gap(ours, _lars_reference(spec, start, **wrong)) > 1e-6, (start, wrong)
    # the zero-norm convention: ratio 0 (W2 = 0 would never move), or eta, instead of 1
    ours = _ours(spec, "zero_w2")
    for at_zero in (0.0, spec.trust_coefficient):
        assert _gap(ours, _lars_reference(spec, "zero_w2", at_zero=at_zero)) > 1e-6, at_zero


LAMB_SPECS = [
    dict(weight_decay=0.0),
    dict(weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6),
    dict(weight_decay=0.1, eps=1e-3),
]


@pytest.mark.parametrize("start", ["generic", "zero_w2"])
@pytest.mark.parametrize("kw", LAMB_SPECS)
def test_lamb_follows_the_papers_update(start, kw):
    spec = OptimSpec(name="lamb", lr=0.05, **kw)
    ours = _ours(spec, start)
    assert all(np.isfinite(w).all() for w in ours)
    assert _gap(ours, _lamb_reference(spec, start)) <= 1e-12


def test_lamb_test_catches_a_wrong_trust_ratio():
    spec = OptimSpec(name="lamb", lr=0.05, weight_decay=0.1, eps=1e-3)
    for start in ("generic", "zero_w2"):
        ours = _ours(spec, start)
        assert _gap(ours, _lamb_reference(spec, start)) <= 1e-12
        for wrong in (dict(wd_in_ratio=False), dict(bias_correction=False)):
            assert _gap(ours, _lamb_reference(spec, start, **wrong)) > 1e-6, (start, wrong)
    # W2 = 0: ratio 0 would leave it at 0 for good; with weight decay 0, W1's first r is 0 and any ratio gives 0
    assert _gap(_ours(spec, "zero_w2"), _lamb_reference(spec, "zero_w2", at_zero=0.0)) > 1e-6


def _one_step(spec: OptimSpec, w: list[Tensor], g: list[Tensor]) -> list[Tensor]:
    p = [t.clone() for t in w]
    hp = Hyper.from_spec(spec, torch.device("cpu"), torch.float64)
    optimizer_step(spec, p, g, init_state(spec, p), hp, torch.tensor(spec.lr, dtype=torch.float64))
    return p


def test_lars_and_lamb_scale_each_tensor_by_its_own_ratio():
    """One step from rest, by hand: LARS moves a weight matrix by lr eta ||w|| / ||g|| * g (no decay, no
    momentum yet), LAMB's first r is sign(g) (|m_hat| / sqrt(v_hat) = 1 at t = 1 with eps ~ 0), so each tensor
    moves by lr ||w|| in norm, whatever its gradient's scale."""
    f64 = functools.partial(torch.tensor, dtype=torch.float64)
    w = [torch.full((2, 2), 3.0, dtype=torch.float64), torch.full((3, 1), 0.1, dtype=torch.float64)]
    g = [f64([[1.0, -2.0], [0.5, 0.0]]), f64([[1e-3], [2e-3], [-1e-3]])]
    p = _one_step(OptimSpec(name="lars", lr=0.5, momentum=0.9, trust_coefficient=0.01), w, g)
    for a, b, gi in zip(p, w, g):
        torch.testing.assert_close(b - a, 0.5 * 0.01 * b.norm() / gi.norm() * gi, rtol=1e-14, atol=0)
    p = _one_step(OptimSpec(name="lamb", lr=0.5, eps=1e-300), w, g)
    for a, b, gi in zip(p, w, g):
        r = torch.sign(gi)
        torch.testing.assert_close(b - a, 0.5 * b.norm() / r.norm() * r, rtol=1e-14, atol=0)
        assert abs(float((b - a).norm()) - 0.5 * float(b.norm())) < 1e-12
