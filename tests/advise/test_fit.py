"""The numbers of advice against closed forms, and each rule both ways."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.advise.core import preconditioned_sharpness
from batchscope.advise.fit import combine, critical_batch, crossing, fit_tradeoff, lr_for, stability_limit, value_at
from batchscope.advise.plan import AdviseOptions, Target
from batchscope.errors import BatchscopeError


def test_crossing_interpolates_in_log_loss():
    # loss halves between x=0 and x=10: log-linear, so 1/sqrt(2) is crossed at x=5
    assert crossing([(0, 1.0), (10, 0.5)], 2**-0.5) == pytest.approx(5.0)
    assert crossing([(0, 1.0), (10, 0.5)], 0.4) is None
    assert crossing([(0, 1.0), (5, math.nan), (10, 0.1)], 0.5) is None  # diverged first
    assert crossing([(0, 0.3), (10, 0.2)], 0.5) == 0.0
    assert value_at([(0, 1.0), (10, 0.25)], 5) == pytest.approx(0.5)
    assert value_at([(0, 1.0), (10, 0.25)], 11) is None


@pytest.mark.parametrize("s_min,e_min", [(50.0, 5000.0), (10.0, 40000.0)])
def test_fit_tradeoff_recovers_the_hyperbola(s_min, e_min):
    b = np.array([16, 32, 64, 128, 256, 512, 1024], dtype=float)
    t = fit_tradeoff(b, s_min + e_min / b)
    assert t.s_min == pytest.approx(s_min, rel=1e-6)
    assert t.e_min == pytest.approx(e_min, rel=1e-6)
    assert t.b_crit == pytest.approx(e_min / s_min, rel=1e-6)
    # (S/S_min - 1)(E/E_min - 1) = 1 at every batch
    for bb in b:
        assert (t.steps(bb) / t.s_min - 1) * (t.examples(bb) / t.e_min - 1) == pytest.approx(1.0, rel=1e-6)


def test_fit_tradeoff_interval_covers_under_multiplicative_noise():
    rng = np.random.default_rng(0)
    b = np.array([16, 32, 64, 128, 256, 512, 1024], dtype=float)
    covered, trials = 0, 200
    for _ in range(trials):
        s = (40 + 8000 / b) * np.exp(rng.normal(0, 0.1, b.size))
        lo, hi = fit_tradeoff(b, s).b_crit_interval()
        covered += lo <= 200 <= hi
    assert covered / trials >= 0.85  # nominal 95%, from the fit's linearized covariance on 7 points


def test_fit_tradeoff_refuses_too_few_or_bad_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_tradeoff([16, 32], [10, 6])
    with pytest.raises(ValueError, match="positive"):
        fit_tradeoff([16, 32, 64], [10, 0, 3])


def test_combine_adds_segments():
    b = np.array([16, 64, 256, 1024], dtype=float)
    t1, t2 = fit_tradeoff(b, 10 + 160 / b), fit_tradeoff(b, 20 + 4000 / b)
    run = combine([(2.0, t1), (1.0, t2)])
    assert run.s_min == pytest.approx(40.0, rel=1e-5)
    assert run.e_min == pytest.approx(4320.0, rel=1e-5)
    assert run.b_crit == pytest.approx(108.0, rel=1e-5)


def test_critical_batch_both_ways():
    losses = {16: 1.0, 32: 1.02, 64: 1.04, 128: 1.2, 256: 1.01}
    assert critical_batch(losses, 1.0, 0.05) == 64  # 256 is within, but only after 128 was not
    assert critical_batch({16: 1.0, 32: 1.5}, 1.0, 0.05) == 16
    assert critical_batch({16: None, 32: 1.0}, 1.0, 0.05) is None
    assert critical_batch({16: 1.0, 32: 1.0, 64: 1.0}, 1.0, 0.05) == 64


def test_lr_rules_and_limits():
    assert lr_for(0.1, 32, 128, "linear") == pytest.approx(0.4)
    assert lr_for(0.1, 32, 128, "sqrt") == pytest.approx(0.2)
    assert lr_for(0.1, 32, 128, "none") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr rule"):
        lr_for(0.1, 32, 64, "cubic")
    assert stability_limit("sgd", 0.1) == pytest.approx(20.0)
    assert stability_limit("sgd", 0.1, momentum=0.9) == pytest.approx(38.0)
    assert stability_limit("adam", 1e-3, beta1=0.9) == pytest.approx(38000.0)


def test_target_parsing():
    assert Target.parse("train_loss<=0.3") == Target("train_loss", 0.3)
    t = Target.parse("test_error<=0.25")
    assert (t.stored, t.level, t.value(0.8)) == ("test_acc", 0.25, pytest.approx(0.2))
    t = Target.parse("test_acc>=0.9")
    assert (t.level, t.value(0.95)) == (pytest.approx(0.1), pytest.approx(0.05))
    for bad in ("loss<0.3", "train_acc<=0.5", "test_acc>=1.5", "train_loss"):
        with pytest.raises(BatchscopeError, match="target"):
            Target.parse(bad)
    with pytest.raises(BatchscopeError, match="lr grid"):
        AdviseOptions(target=None, lr_grid=(1.0, -1.0)).check()


def test_preconditioned_sharpness_against_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 2, (40,))
    loss = nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def f(theta):
        out, i = {}, 0
        for k in names:
            n = params[k].numel()
            out[k] = theta[i:i + n].view_as(params[k])
            i += n
        return loss(torch.func.functional_call(model, out, (x,)), y)

    H = torch.autograd.functional.hessian(f, flat)
    g = torch.stack([torch.autograd.functional.jacobian(
        lambda t, i=i: loss(torch.func.functional_call(model, dict(zip(names, _split(t, params))), (x[i:i + 1],)), y[i:i + 1]),
        flat) for i in range(40)])
    G = g.mean(0)
    batch = 8
    v = G**2 + ((g**2).mean(0) - G**2) / batch
    d = (v.sqrt() + 1e-8).rsqrt()
    dense = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).max().item()
    got = preconditioned_sharpness(model, loss, [(x[:20], y[:20]), (x[20:], y[20:])], batch, tol=1e-10)
    assert got == pytest.approx(dense, rel=1e-6)


def _split(theta, params):
    out, i = [], 0
    for p in params.values():
        out.append(theta[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


def test_cli_lr_rules_are_the_rules_the_code_accepts():
    from batchscope import cli
    from batchscope.advise.fit import LR_RULES

    assert [r.value for r in cli.LrRule] == ["auto", *LR_RULES]
