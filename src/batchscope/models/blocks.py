"""Shared building blocks: the norm choice, conv/linear-norm-ReLU blocks, width scaling, init."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from batchscope.models.norm import norm_layer


@dataclass(frozen=True)
class NormSpec:
    """Which normalization every block of one model gets: kind in {none, batch, ghost}."""

    kind: str = "none"
    ghost_size: int = 128
    momentum: float = 0.1

    @property
    def enabled(self) -> bool:
        """Whether blocks get a norm layer (and hence drop the redundant bias before it)."""
        return self.kind != "none"

    def layer(self, num_features: int, dims: int) -> nn.Module:
        """A norm layer over `num_features` channels of a 1-D or 2-D feature map."""
        return norm_layer(self.kind, num_features, dims, self.ghost_size, self.momentum)


def scaled(units: int, width: float) -> int:
    """Channel/unit count `units` multiplied by `width`, rounded, at least 1."""
    return max(1, round(units * width))


def dropout_layers(p: float) -> list[nn.Module]:
    """[Dropout(p)] or nothing when p == 0, so dropout-free models hold no Dropout modules."""
    return [nn.Dropout(p)] if p > 0 else []


def conv_norm_act(
    norm: NormSpec,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dims: int = 2,
    act: bool = True,
) -> nn.Sequential:
    """Conv ('same' padding for odd kernels), norm, optional ReLU: (B, Cin, *S) -> (B, Cout, *S/stride)."""
    conv_cls = nn.Conv2d if dims == 2 else nn.Conv1d
    # A bias right before a norm layer is cancelled by its mean subtraction: leave it out.
    conv = conv_cls(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=not norm.enabled
    )
    layers: list[nn.Module] = [conv, norm.layer(out_channels, dims)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def linear_norm_act(norm: NormSpec, in_features: int, out_features: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear, norm, ReLU, then dropout if > 0: (B, in_features) -> (B, out_features)."""
    layers = [nn.Linear(in_features, out_features, bias=not norm.enabled), norm.layer(out_features, 1), nn.ReLU()]
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)], *dropout_layers(dropout))


def max_pool_2x2(height: int, width: int) -> tuple[list[nn.Module], int, int]:
    """A 2x2 stride-2 max pool and the (H, W) after it; no pool once a side is 1 pixel, so small images fit."""
    if min(height, width) < 2:
        return [], height, width
    return [nn.MaxPool2d(2)], height // 2, width // 2


def he_init(model: nn.Module) -> nn.Module:
    """He et al. (2015) normal init (fan_in, ReLU gain) for every conv/linear weight, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
