"""Small convolutional nets: Keskar et al. (2017) C1/C3, Jastrzebski et al. (2020) SimpleCNN, an MNIST-1D conv net."""

from __future__ import annotations

from torch import nn

from batchscope.models.blocks import (
    NormSpec,
    conv_norm_act,
    he_init,
    linear_norm_act,
    max_pool_2x2,
    scaled,
)


def build_keskar_shallow(
    *, input_shape: tuple[int, ...], num_classes: int, width: float, norm: NormSpec, dropout: float
) -> nn.Module:
    """Keskar C1/C3, (B, C, H, W) -> (B, classes): 2 x [conv5x5-64, norm, ReLU, maxpool3/2], FC 384, FC 192, FC.

    `dropout` goes after the ReLU of FC 384 and FC 192 (the paper used 0.5 there).
    """
    channels, height, width_px = input_shape
    conv_channels = scaled(64, width)
    layers: list[nn.Module] = []
    for in_channels in (channels, conv_channels):
        # Pool padding 1 gives ceil(size/2) (TF 'SAME'), so any image size works: 32 -> 16 -> 8.
        layers += [conv_norm_act(norm, in_channels, conv_channels, 5), nn.MaxPool2d(3, stride=2, padding=1)]
        height, width_px = (height + 1) // 2, (width_px + 1) // 2
    fc1, fc2 = scaled(384, width), scaled(192, width)
    layers += [
        nn.Flatten(),
        linear_norm_act(norm, conv_channels * height * width_px, fc1, dropout),
        linear_norm_act(norm, fc1, fc2, dropout),
        nn.Linear(fc2, num_classes),
    ]
    return he_init(nn.Sequential(*layers))


def build_simple_cnn(
    *, input_shape: tuple[int, ...], num_classes: int, width: float, norm: NormSpec
) -> nn.Module:
    """Jastrzebski SimpleCNN, (B, C, H, W) -> (B, classes): conv3x3 32,32,pool, 64,64,pool, FC 128, FC."""
    channels, height, width_px = input_shape
    layers: list[nn.Module] = []
    for stage_channels in (scaled(32, width), scaled(64, width)):
        for _ in range(2):
            layers.append(conv_norm_act(norm, channels, stage_channels, 3))
            channels = stage_channels
        pool, height, width_px = max_pool_2x2(height, width_px)
        layers += pool
    hidden = scaled(128, width)
    # The paper's SimpleCNN has no norm in its classifier; `norm` applies to the convs only.
    layers += [
        nn.Flatten(),
        linear_norm_act(NormSpec(), channels * height * width_px, hidden),
        nn.Linear(hidden, num_classes),
    ]
    return he_init(nn.Sequential(*layers))


def build_conv1d(
    *, input_shape: tuple[int, ...], num_classes: int, width: float, norm: NormSpec
) -> nn.Module:
    """MNIST-1D conv net, (B, L) or (B, C, L) -> (B, classes): 3 x [conv1d k5 s2 32w, norm, ReLU], Linear."""
    layers: list[nn.Module] = []
    if len(input_shape) == 1:
        layers.append(nn.Unflatten(1, (1, input_shape[0])))  # (B, L) -> (B, 1, L)
        input_shape = (1, input_shape[0])
    channels, length = input_shape
    out_channels = scaled(32, width)
    for _ in range(3):
        layers.append(conv_norm_act(norm, channels, out_channels, 5, stride=2, dims=1))
        channels, length = out_channels, (length + 1) // 2  # padding 2, stride 2: ceil(L/2)
    layers += [nn.Flatten(), nn.Linear(channels * length, num_classes)]
    return he_init(nn.Sequential(*layers))
