"""interpolate and landscape_slice against independent evaluations of the model (float64)."""

import copy

import pytest
import torch
from torch import nn

from batchscope.curvature.landscape import interpolate, landscape_slice

F64 = torch.float64


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).double()
    net[1].running_mean.uniform_(-0.3, 0.3)  # buffers that differ between the two solutions
    net[1].running_var.uniform_(0.5, 1.5)
    return net


def data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 1, 6, 6, generator=g, dtype=F64)
    y = torch.randint(0, 4, (20,), generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


def reference(model: nn.Module, batches, mode: str = "eval") -> tuple[float, float]:
    """Data-averaged loss and accuracy by plain forward passes of a copy of the model."""
    m = copy.deepcopy(model).train(mode == "train")
    n = sum(x.shape[0] for x, _ in batches)
    with torch.no_grad():
        loss = sum(x.shape[0] / n * float(nn.functional.cross_entropy(m(x), y)) for x, y in batches)
        acc = sum(int((m(x).argmax(1) == y).sum()) for x, y in batches) / n
    return loss, acc


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- interpolate -----------------------------------------------------------------------------------
def test_interpolate_endpoints_and_midpoint():
    a, b, batches = bn_net(0), bn_net(1), data()
    sa, sb = state(a), state(b)
    res = interpolate(a, nn.functional.cross_entropy, batches, sa, sb, [0.0, 0.5, 1.0])
    for i, model in ((0, a), (2, b)):
        loss, acc = reference(model, batches)
        assert float(res.loss[i]) == pytest.approx(loss, rel=1e-13)
        assert float(res.accuracy[i]) == pytest.approx(acc, abs=1e-15)
    # alpha = 0.5: the model whose whole state_dict (weights and BN statistics) is the average
    mid = bn_net(2)
    mid.load_state_dict({k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa})
    loss, acc = reference(mid, batches)
    assert float(res.loss[1]) == pytest.approx(loss, rel=1e-12)
    assert float(res.accuracy[1]) == pytest.approx(acc, abs=1e-15)
    assert set(res.interpolated_buffers) == {"1.running_mean", "1.running_var"}
    assert all(torch.equal(v, state(a)[k]) for k, v in sa.items())  # model untouched


def test_interpolate_flat_vectors_take_buffers_from_model():
    a, b, batches = bn_net(0), bn_net(1), data()
    flat_a = torch.cat([p.detach().reshape(-1) for p in a.parameters()])
    flat_b = torch.cat([p.detach().reshape(-1) for p in b.parameters()])
    res = interpolate(a, nn.functional.cross_entropy, batches, flat_a, flat_b, [1.0], bn_mode="train")
    # b's weights with a's buffers; in train mode the buffers do not matter anyway
    loss, _ = reference(b, batches, mode="train")
    assert float(res.loss[0]) == pytest.approx(loss, rel=1e-12)
    assert res.interpolated_buffers == []
    assert len(interpolate(a, nn.functional.cross_entropy, batches, a, b).alphas) == 25  # Keskar's default grid


def test_interpolate_rejects_one_sided_buffers_and_unknown_keys():
    a, b, batches = bn_net(0), bn_net(1), data()
    params_b = dict(b.named_parameters())  # no buffers for b, while a's state_dict has them
    with pytest.raises(ValueError, match="one endpoint"):
        interpolate(a, nn.functional.cross_entropy, batches, state(a), params_b, [0.5])
    with pytest.raises(ValueError, match="neither"):
        interpolate(a, nn.functional.cross_entropy, batches, {**state(a), "bogus": torch.zeros(1)}, state(b), [0.5])


def test_interpolate_regression_has_no_accuracy():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 1, dtype=F64)
    res = interpolate(model, nn.functional.mse_loss, (x, y), model, nn.Linear(3, 1).double(), [0.0])
    assert res.accuracy is None
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x), y))
    assert float(res.loss[0]) == pytest.approx(expected, rel=1e-14)


# -- landscape_slice -----------------------------------------------------------------------------
def test_slice_1d_center_and_filter_normalization():
    model, batches = bn_net(0), data()
    before = state(model)
    res = landscape_slice(model, nn.functional.cross_entropy, batches, dims=1, steps=5, seed=3)
    loss, acc = reference(model, batches)
    assert res.loss.shape == (5,) and float(res.coords[0][2]) == 0.0
    assert float(res.loss[2]) == pytest.approx(loss, rel=1e-13)
    assert float(res.accuracy[2]) == pytest.approx(acc, abs=1e-15)
    # per-filter norms of the direction equal the weights'; 1-D parameters (bias, BN) are zero
    offset, d = 0, res.directions[0]
    for name, p in model.named_parameters():
        part = d[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if p.ndim == 1:
            assert torch.count_nonzero(part) == 0, name
        else:
            torch.testing.assert_close(
                part.reshape(p.shape[0], -1).norm(dim=1), p.detach().reshape(p.shape[0], -1).norm(dim=1),
                rtol=1e-9, atol=0,
            )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert res.filter_normalized


def test_slice_2d_grid_matches_direct_evaluation():
    model, batches = bn_net(0), data()
    res = landscape_slice(model, nn.functional.cross_entropy, batches, dims=2, steps=3, span=(-0.5, 1.0), seed=1)
    assert res.loss.shape == (3, 3) and res.accuracy.shape == (3, 3) and res.directions.shape[0] == 2
    a, b = float(res.coords[0][0]), float(res.coords[1][2])  # (-0.5, 1.0)
    moved = copy.deepcopy(model)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.nn.utils.vector_to_parameters(theta + a * res.directions[0] + b * res.directions[1], moved.parameters())
    loss, _ = reference(moved, batches)
    assert float(res.loss[0, 2]) == pytest.approx(loss, rel=1e-12)
    # seeded and reproducible; given directions are used exactly
    again = landscape_slice(
        model, nn.functional.cross_entropy, batches, dims=2, steps=3, span=(-0.5, 1.0), directions=list(res.directions)
    )
    torch.testing.assert_close(again.loss, res.loss, rtol=0, atol=0)
    assert not again.filter_normalized


def test_slice_raw_directions_and_bad_arguments():
    model, batches = bn_net(0), data()
    res = landscape_slice(
        model, nn.functional.cross_entropy, batches, steps=1, span=(0.0, 0.0), filter_normalize=False,
        metrics=("loss",),
    )
    assert res.accuracy is None and torch.count_nonzero(res.directions) == res.directions.numel()
    with pytest.raises(ValueError, match="dims"):
        landscape_slice(model, nn.functional.cross_entropy, batches, dims=3)
    with pytest.raises(ValueError, match="metrics"):
        landscape_slice(model, nn.functional.cross_entropy, batches, metrics=("loss", "f1"))
