"""Every architecture builds, runs forward/backward, scales with width, and rejects bad options."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchscope.errors import ModelError
from batchscope.models import GhostBatchNorm1d, GhostBatchNorm2d, available_models, build_model

IMAGE = (3, 16, 16)
SHAPES = {"conv1d": (40,), "mlp": (1, 8, 8), "lstm": (6, 5)}
NAMES = ["conv1d", "keskar_deep", "keskar_shallow", "lstm", "mlp", "resnet", "simple_cnn", "vgg11"]
NORMED = [n for n in NAMES if n != "lstm"]  # the architectures that take batch norm (the LSTM: tests/models/test_lstm.py)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_available_models():
    assert available_models() == NAMES


@pytest.mark.parametrize("norm", ["none", "batch", "ghost"])
@pytest.mark.parametrize("name", NORMED)
def test_forward_backward(name, norm):
    torch.manual_seed(0)
    shape = SHAPES.get(name, IMAGE)
    model = build_model(name, input_shape=shape, num_classes=7, width=0.25, norm=norm, ghost_size=3)
    x = torch.randn(8, *shape)  # ghost chunks 3, 3, 2
    out = model(x)
    assert out.shape == (8, 7)
    nn.functional.cross_entropy(out, torch.arange(8) % 7).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if norm == "none":
        assert not norms
    else:
        assert norms
        ghost = [isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d)) for m in norms]
        assert all(ghost) if norm == "ghost" else not any(ghost)
        assert all(int(m.num_batches_tracked) == (3 if norm == "ghost" else 1) for m in norms)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_scales_with_width(name):
    shape = SHAPES.get(name, IMAGE)
    counts = [_params(build_model(name, input_shape=shape, num_classes=10, width=w)) for w in (0.125, 0.25, 0.5)]
    # Hidden-to-hidden weights grow with width^2; input/output layers only linearly.
    assert counts[0] * 1.8 < counts[1] and counts[1] * 1.8 < counts[2], counts


@pytest.mark.parametrize(
    "depth, published",
    [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6)],  # He et al. 2016, Table 6
)
def test_resnet_parameter_counts_match_paper(depth, published):
    model = build_model("resnet", input_shape=(3, 32, 32), num_classes=10, depth=depth, norm="batch")
    assert abs(_params(model) - published) / published < 0.01


def test_resnet20_exact_count_and_defaults():
    model = build_model("resnet", input_shape=(3, 32, 32), num_classes=10, norm="batch")
    assert _params(model) == 269_722  # convs + FC + BN affine; option-A shortcuts have no parameters
    plain = build_model("resnet", input_shape=(3, 32, 32), num_classes=10)
    assert not any(isinstance(m, _BatchNorm) for m in plain.modules())


def test_unnormalized_resnet_stays_bounded_at_init():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    for depth in (20, 56):
        model = build_model("resnet", input_shape=(3, 16, 16), num_classes=10, depth=depth, width=0.5)
        assert model(x).std() < 10


@pytest.mark.parametrize("name", ["keskar_deep", "keskar_shallow", "resnet", "simple_cnn", "vgg11"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 28, 28), (2, 5, 12)])
def test_image_models_accept_small_and_odd_sizes(name, shape):
    model = build_model(name, input_shape=shape, num_classes=4, width=0.125, norm="batch").eval()
    assert model(torch.randn(2, *shape)).shape == (2, 4)


@pytest.mark.parametrize("shape", [(40,), (1, 40), (2, 17)])
def test_conv1d_shapes(shape):
    model = build_model("conv1d", input_shape=shape, num_classes=10, norm="ghost")
    assert model(torch.randn(5, *shape)).shape == (5, 10)


def test_mlp_structure():
    model = build_model("mlp", input_shape=(40,), num_classes=10, depth=3, width=0.5, dropout=0.2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 256), (256, 256), (256, 256), (256, 10)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2] * 3
    assert build_model("mlp", input_shape=(4,), num_classes=2, depth=0)(torch.randn(3, 4)).shape == (3, 2)
    default = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
    assert sum(isinstance(m, nn.Linear) for m in default.modules()) == 6  # Keskar F1: 5 hidden layers


def _dropouts(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


# keskar_deep at dropout 0.5 is the authors' C2/C4: 0.3 after the first conv, 0.4 after the 7 other convs not
# followed by a pool, 0.5 twice in the classifier
@pytest.mark.parametrize("name, rates", [("keskar_shallow", [0.5] * 2), ("keskar_deep", [0.3] + [0.4] * 7 + [0.5] * 2),
                                         ("mlp", [0.5] * 5)])
def test_dropout_only_when_asked(name, rates):
    kwargs = {"input_shape": (3, 32, 32), "num_classes": 10, "width": 0.125}
    assert _dropouts(build_model(name, **kwargs)) == []
    assert _dropouts(build_model(name, dropout=0.5, **kwargs)) == pytest.approx(rates)


def test_keskar_deep_is_the_papers_c2_c4():
    """papers.md: 3x3 convs with BN and ReLU, 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M, dropout after the convs not
    followed by a pool; then dropout, FC 512, BN, ReLU, dropout, FC classes."""
    model = build_model("keskar_deep", input_shape=(3, 32, 32), num_classes=100, norm="batch", dropout=0.5)
    features, head = model
    kinds = []
    for m in features:
        if isinstance(m, nn.Sequential):  # a conv-norm-ReLU block
            conv, bn, act = m
            assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels and isinstance(act, nn.ReLU)
            kinds.append(conv.out_channels)
        elif isinstance(m, nn.MaxPool2d):
            kinds.append("M")
        elif isinstance(m, nn.Dropout):
            kinds.append(f"d{m.p:g}")
    assert kinds == [64, "d0.3", 64, "M", 128, "d0.4", 128, "M", 256, "d0.4", 256, "d0.4", 256, "M",
                     512, "d0.4", 512, "d0.4", 512, "M", 512, "d0.4", 512, "d0.4", 512, "M"]
    assert model[0](torch.zeros(2, 3, 32, 32)).shape == (2, 512)  # 32 / 2^5 = 1: the map is 1x1 before the pool
    drop, (fc, bn, act, drop2), out = head
    assert isinstance(drop, nn.Dropout) and drop.p == 0.5 and isinstance(drop2, nn.Dropout) and drop2.p == 0.5
    assert (fc.in_features, fc.out_features) == (512, 512) and isinstance(bn, nn.BatchNorm1d) and isinstance(act, nn.ReLU)
    assert (out.in_features, out.out_features) == (512, 100)


def test_vgg11_layout():
    model = build_model("vgg11", input_shape=(3, 32, 32), num_classes=10, norm="batch")
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert [m.in_features for m in model.modules() if isinstance(m, nn.Linear)] == [512, 512, 512]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))  # BN follows


def test_vgg11_classifier_is_the_authors():
    """Kaur et al.'s VGG-11 ends in FC 512 - ReLU - FC 512 - ReLU - FC (no norm, no dropout there), scaled by width."""
    for norm in ("none", "batch"):
        model = build_model("vgg11", input_shape=(3, 32, 32), num_classes=10, norm=norm)
        head = list(model[1])
        assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
        assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [
            (512, 512), (512, 512), (512, 10)]
        assert all(m.bias is not None for m in head if isinstance(m, nn.Linear))
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    half = build_model("vgg11", input_shape=(3, 32, 32), num_classes=10, width=0.5)
    assert [m.out_features for m in half.modules() if isinstance(m, nn.Linear)] == [256, 256, 10]


def test_norm_options_reach_layers():
    model = build_model("simple_cnn", input_shape=IMAGE, num_classes=10, norm="ghost", ghost_size=32, bn_momentum=0.05)
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(layers) == 4 and all(m.ghost_size == 32 and m.momentum == 0.05 for m in layers)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("alexnet", {}, "model 'alexnet': expected one of conv1d, "),
        ("resnet", {"depth": 21}, r"resnet depth 21: expected 6n\+2 \(20, 32, 44, 56, ...\)"),
        ("resnet", {"depth": 2}, "resnet depth 2"),
        ("mlp", {"depth": -1}, "mlp depth -1: expected an integer >= 0"),
        ("vgg11", {"depth": 11}, "depth 11: vgg11 has no depth option"),
        ("mlp", {"norm": "layer"}, "norm 'layer': expected one of none, batch, ghost"),
        ("mlp", {"dropout": 1.0}, r"dropout 1.0: expected a number in \[0, 1\)"),
        ("mlp", {"dropout": -0.1}, "dropout -0.1"),
        ("resnet", {"dropout": 0.5}, "dropout 0.5: resnet has no dropout"),
        ("mlp", {"width": 0}, "width 0: expected a number > 0"),
        ("mlp", {"width": -1.0}, "width -1.0"),
        ("mlp", {"ghost_size": 0}, "ghost_size 0"),
        ("mlp", {"bn_momentum": 1.5}, "bn_momentum 1.5"),
        ("mlp", {"num_classes": 0}, "num_classes 0"),
        ("vgg11", {"input_shape": (32, 32)}, r"vgg11 input_shape \(32, 32\): expected \(C, H, W\)"),
        ("conv1d", {"input_shape": (1, 2, 40)}, r"expected \(L,\) or \(C, L\)"),
        ("lstm", {"input_shape": (3, 8, 8)}, r"lstm input_shape \(3, 8, 8\): expected \(L,\) or \(L, F\)"),
        ("lstm", {"input_shape": (8, 4), "norm": "batch"}, "norm 'batch': lstm has no batch norm; expected none"),
        ("lstm", {"input_shape": (8, 4), "depth": 2}, "depth 2: lstm has no depth option"),
        ("mlp", {"input_shape": (0, 4)}, "mlp input_shape"),
    ],
)
def test_bad_options_raise_one_line_model_error(name, kwargs, message):
    args = {"input_shape": (3, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(ModelError, match=message) as info:
        build_model(name, **args)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
