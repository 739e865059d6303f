"""Fully connected network: Keskar et al. (2017) F1 kind."""

from __future__ import annotations

import math

from torch import nn

from batchscope.models.blocks import NormSpec, he_init, linear_norm_act, scaled


def build_mlp(
    *, input_shape: tuple[int, ...], num_classes: int, width: float, depth: int, norm: NormSpec, dropout: float
) -> nn.Module:
    """(B, *input_shape) -> flatten -> `depth` x [Linear 512w, norm, ReLU, dropout] -> Linear -> (B, classes)."""
    hidden = scaled(512, width)
    features = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers.append(linear_norm_act(norm, features, hidden, dropout))
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return he_init(nn.Sequential(*layers))
