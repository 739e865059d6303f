"""VGG-style nets: VGG-11 with its three-layer classifier (Kaur et al. 2023) and Keskar et al. (2017) C2/C4 (VGG-16-like)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from batchscope.models.blocks import (
    NormSpec,
    conv_norm_act,
    dropout_layers,
    he_init,
    linear_norm_act,
    max_pool_2x2,
    scaled,
)

POOL = "M"
VGG11: tuple[int | str, ...] = (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL)
VGG16: tuple[int | str, ...] = (
    64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL,
)  # fmt: skip


def vgg_features(
    config: Sequence[int | str],
    input_shape: tuple[int, ...],
    width: float,
    norm: NormSpec,
    dropout: float = 0.0,
    first_dropout: float | None = None,
) -> tuple[nn.Sequential, int]:
    """3x3 conv-norm-ReLU stack from `config` (ints = channels, "M" = 2x2 max pool), then global average pool.

    (B, C, H, W) -> (B, channels); returns the stack and its output channel count. Pools that would take a
    side below 1 pixel are skipped, and the final average pool is a no-op on 32x32 input (map already 1x1).
    Dropout follows every conv not directly followed by a pool, as in the model Keskar et al. used: `first_dropout`
    after the first conv (None: `dropout`), `dropout` after the others.
    """
    channels, height, width_px = input_shape
    layers: list[nn.Module] = []
    first = True
    for i, item in enumerate(config):
        if item == POOL:
            pool, height, width_px = max_pool_2x2(height, width_px)
            layers += pool
            continue
        out_channels = scaled(int(item), width)
        layers.append(conv_norm_act(norm, channels, out_channels, 3))
        channels = out_channels
        if i + 1 < len(config) and config[i + 1] != POOL:
            layers += dropout_layers(first_dropout if first and first_dropout is not None else dropout)
        first = False
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


def build_vgg11(*, input_shape: tuple[int, ...], num_classes: int, width: float, norm: NormSpec) -> nn.Module:
    """VGG-11 as Kaur et al. (2023) used it, (B, C, H, W) -> (B, classes): 8 conv(-norm)-ReLU layers, global
    pool, then the classifier FC 512 - ReLU - FC 512 - ReLU - FC (hidden units scaled by `width`), no dropout.

    The classifier's hidden layers carry no norm layer, with or without batch norm in the conv stack (the
    authors' classifier is plain linear-ReLU); only Kaur et al.'s study builds this model.
    """
    features, channels = vgg_features(VGG11, input_shape, width, norm)
    hidden = scaled(512, width)
    classifier = nn.Sequential(
        nn.Linear(channels, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    return he_init(nn.Sequential(features, classifier))


def build_keskar_deep(
    *, input_shape: tuple[int, ...], num_classes: int, width: float, norm: NormSpec, dropout: float
) -> nn.Module:
    """Keskar C2/C4, (B, C, H, W) -> (B, classes): VGG-16 convs, dropout, FC 512, norm, ReLU, dropout, FC.

    `dropout` is the classifier's rate (the authors' 0.5, before and after FC 512). The conv stack's rates keep the
    authors' proportions to it: 0.6 x `dropout` after the first conv and 0.8 x after every other conv not followed
    by a pool (their 0.3 and 0.4), so dropout = 0.5 is their net and 0 a net without dropout.
    """
    features, channels = vgg_features(VGG16, input_shape, width, norm, 0.8 * dropout, first_dropout=0.6 * dropout)
    hidden = scaled(512, width)
    classifier = nn.Sequential(
        *dropout_layers(dropout),
        linear_norm_act(norm, channels, hidden, dropout),
        nn.Linear(hidden, num_classes),
    )
    return he_init(nn.Sequential(features, classifier))
