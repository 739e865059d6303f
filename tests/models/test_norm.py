"""Ghost batch norm against nn.BatchNorm applied chunk by chunk, and under torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from batchscope.errors import ModelError
from batchscope.models import GhostBatchNorm1d, GhostBatchNorm2d, norm_layer

C = 3
# (ghost class, reference class, per-sample shape)
KINDS = [
    pytest.param(GhostBatchNorm1d, nn.BatchNorm1d, (C,), id="1d"),
    pytest.param(GhostBatchNorm1d, nn.BatchNorm1d, (C, 5), id="1d-seq"),
    pytest.param(GhostBatchNorm2d, nn.BatchNorm2d, (C, 4, 3), id="2d"),
]


def _pair(ghost_cls, bn_cls, ghost_size: int, momentum: float | None = 0.1):
    """A ghost BN and a plain BN in float64 with the same random affine params and running stats."""
    torch.manual_seed(0)
    bn = bn_cls(C, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(3)
    gbn = ghost_cls(C, ghost_size=ghost_size, momentum=momentum).double()
    gbn.load_state_dict(bn.state_dict())
    return gbn, bn


def _input(batch: int, sample_shape: tuple[int, ...]) -> torch.Tensor:
    # Per-chunk offsets so that chunk statistics differ clearly from whole-batch ones.
    x = torch.randn(batch, *sample_shape, dtype=torch.float64)
    return x + torch.arange(batch, dtype=torch.float64).reshape(-1, *[1] * len(sample_shape)) / 3


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


def _assert_same_buffers(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", KINDS)
@pytest.mark.parametrize("ghost_size", [8, 100])
def test_one_chunk_equals_batchnorm(ghost_cls, bn_cls, shape, ghost_size):
    gbn, bn = _pair(ghost_cls, bn_cls, ghost_size)
    x = _input(8, shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, ref = gbn(x), bn(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gbn.weight.grad, bn.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gbn.bias.grad, bn.bias.grad, rtol=1e-12, atol=1e-12)
    _assert_same_buffers(_buffers(gbn), _buffers(bn))


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", KINDS)
@pytest.mark.parametrize(
    "batch, ghost_size, momentum",
    [(16, 4, 0.1), (16, 4, None), (10, 4, 0.3), (11, 4, 0.1), (10, 8, None)],
    ids=["quarters", "quarters-cma", "uneven", "uneven-3", "uneven-cma"],
)
def test_chunks_equal_sequential_batchnorm(ghost_cls, bn_cls, shape, batch, ghost_size, momentum):
    gbn, bn = _pair(ghost_cls, bn_cls, ghost_size, momentum)
    x = _input(batch, shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = gbn(x)
    # Reference: nn.BatchNorm applied to each consecutive chunk in turn (Hoffer et al.'s implementation).
    ref = torch.cat([bn(chunk) for chunk in x_ref.split(ghost_size)])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gbn.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gbn.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-10)
    _assert_same_buffers(_buffers(gbn), _buffers(bn))
    # Not just whole-batch BN in disguise.
    assert not torch.allclose(out, nn.functional.batch_norm(x.detach(), None, None, gbn.weight, gbn.bias, True))


def test_chunk_statistics_differ_from_whole_batch():
    gbn = GhostBatchNorm1d(C, ghost_size=2, affine=False).double()
    x = torch.tensor([[0.0] * C, [2.0] * C, [10.0] * C, [14.0] * C], dtype=torch.float64)
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)[:, None].expand(4, C)
    torch.testing.assert_close(gbn(x), expected, rtol=0, atol=1e-4)  # eps=1e-5 pulls |x| slightly below 1
    # Running mean after two momentum-0.1 updates from 0: 0.9*(0.1*1) + 0.1*12.
    torch.testing.assert_close(gbn.running_mean, torch.full((C,), 0.09 + 1.2, dtype=torch.float64))
    assert int(gbn.num_batches_tracked) == 2


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", KINDS)
def test_eval_uses_running_stats(ghost_cls, bn_cls, shape):
    gbn, bn = _pair(ghost_cls, bn_cls, ghost_size=2)
    gbn(_input(8, shape))  # change the running stats first
    bn.load_state_dict(gbn.state_dict())
    gbn.eval(), bn.eval()
    x = _input(8, shape)
    before = _buffers(gbn)
    torch.testing.assert_close(gbn(x), bn(x), rtol=1e-12, atol=1e-12)
    # Per-sample: a sample's output does not depend on the rest of the batch.
    torch.testing.assert_close(gbn(x[:1]), gbn(x)[:1], rtol=1e-12, atol=1e-12)
    _assert_same_buffers(_buffers(gbn), before)


@pytest.mark.parametrize("ghost_cls, bn_cls, shape", KINDS)
def test_train_without_tracking_updates_nothing(ghost_cls, bn_cls, shape):
    gbn, bn = _pair(ghost_cls, bn_cls, ghost_size=3)
    gbn.track_running_stats = False
    before = _buffers(gbn)
    x = _input(8, shape)
    out = gbn(x)
    _assert_same_buffers(_buffers(gbn), before)
    # Still normalizes by chunk statistics (plain BN per chunk with no running stats).
    bn.track_running_stats = False
    torch.testing.assert_close(out, torch.cat([bn(c) for c in x.split(3)]), rtol=1e-10, atol=1e-10)


def test_no_running_buffers_uses_chunk_stats_in_eval():
    gbn = GhostBatchNorm2d(C, ghost_size=2, track_running_stats=False).double().eval()
    ref = nn.BatchNorm2d(C, track_running_stats=False).double().eval()
    x = _input(6, (C, 2, 2))
    assert gbn.running_mean is None
    torch.testing.assert_close(gbn(x), torch.cat([ref(c) for c in x.split(2)]), rtol=1e-10, atol=1e-10)


def test_is_a_batchnorm_with_batchnorm_state():
    gbn = GhostBatchNorm2d(4, ghost_size=32, momentum=0.2)
    assert isinstance(gbn, _BatchNorm) and isinstance(gbn, nn.BatchNorm2d)
    assert gbn.state_dict().keys() == nn.BatchNorm2d(4).state_dict().keys()
    assert (gbn.ghost_size, gbn.momentum, gbn.eps, gbn.affine, gbn.track_running_stats) == (32, 0.2, 1e-5, True, True)
    assert "ghost_size=32" in repr(gbn)


def test_one_value_last_chunk_raises_like_batchnorm():
    gbn = GhostBatchNorm1d(C, ghost_size=4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        gbn(torch.randn(9, C))
    gbn2d = GhostBatchNorm2d(C, ghost_size=4)
    assert gbn2d(torch.randn(9, C, 2, 2)).shape == (9, C, 2, 2)  # 4 values per channel: fine


def _func_model(ghost_size: int) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        GhostBatchNorm2d(4, ghost_size=ghost_size),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5, bias=False),
        GhostBatchNorm1d(5, ghost_size=ghost_size),
    ).double()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False  # batch-statistics loss that leaves buffers alone
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own jvp setup
@pytest.mark.parametrize("ghost_size", [3, 64])
def test_functional_call_grad_jvp_vmap(ghost_size):
    model = _func_model(ghost_size)
    x = torch.randn(11, 2, 3, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    before = _buffers(model)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (functional_call(model, p, (x,)) ** 2 * torch.arange(5.0, dtype=torch.float64)).sum()

    g = grad(loss)(params)
    model.zero_grad()
    loss(dict(model.named_parameters())).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(g[k], p.grad, rtol=1e-10, atol=1e-10)

    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    _, directional = jvp(loss, (params,), (tangent,))
    expected = sum((g[k] * tangent[k]).sum() for k in params)
    torch.testing.assert_close(directional, expected, rtol=1e-8, atol=1e-8)

    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    batched = vmap(loss)(stacked)
    torch.testing.assert_close(batched[1], loss({k: 2 * v for k, v in params.items()}), rtol=1e-10, atol=1e-10)
    _assert_same_buffers(_buffers(model), before)


@pytest.mark.parametrize(
    "args, message",
    [
        (("group", 4, 2, 8, 0.1), "norm 'group'"),
        (("batch", 4, 3, 8, 0.1), "norm dims 3"),
        (("ghost", 4, 2, 0, 0.1), "ghost_size 0"),
        (("batch", 4, 1, 8, 0.0), "bn_momentum 0.0"),
    ],
)
def test_norm_layer_rejects_bad_options(args, message):
    with pytest.raises(ModelError, match=message) as info:
        norm_layer(*args)
    assert "\n" not in str(info.value)


def test_norm_layer_kinds():
    assert isinstance(norm_layer("none", 4, 2, 8, 0.1), nn.Identity)
    bn = norm_layer("batch", 4, 1, 8, 0.2)
    assert type(bn) is nn.BatchNorm1d and bn.momentum == 0.2
    gbn = norm_layer("ghost", 4, 2, 8, 0.2)
    assert type(gbn) is GhostBatchNorm2d and (gbn.ghost_size, gbn.momentum, gbn.num_features) == (8, 0.2, 4)
