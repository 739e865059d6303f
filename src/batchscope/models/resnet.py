"""CIFAR ResNet (He et al. 2016, section 4.2): depth 6n+2, BasicBlocks, option-A (parameter-free) shortcuts."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from batchscope.models.blocks import NormSpec, conv_norm_act, he_init, scaled


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, zero-pad channels: (B, Cin, H, W) -> (B, Cout, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)  # split as evenly as the (width-scaled) counts allow

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad)) if any(self.pad) else x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class BasicBlock(nn.Module):
    """relu(x' + branch(x)), branch = conv3x3-norm-ReLU-conv3x3-norm: (B, Cin, H, W) -> (B, Cout, H/s, W/s)."""

    def __init__(self, norm: NormSpec, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            conv_norm_act(norm, in_channels, out_channels, 3, stride=stride),
            conv_norm_act(norm, out_channels, out_channels, 3, act=False),
        )
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride) if changes_shape else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.shortcut(x) + self.branch(x))

    @property
    def last_conv(self) -> nn.Module:
        """The residual branch's final convolution."""
        return self.branch[-1][0]


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: stem conv, 3 stages of n blocks (16w, 32w, 64w channels), avg pool, FC."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int, base: int, norm: NormSpec) -> None:
        super().__init__()
        self.stem = conv_norm_act(norm, in_channels, base, 3)
        stages: list[nn.Module] = []
        channels = base
        for stage, stage_channels in enumerate((base, 2 * base, 4 * base)):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(norm, channels, stage_channels, stride))
                channels = stage_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, classes)."""
        return self.fc(self.pool(self.stages(self.stem(x))))


def resnet_depth_ok(depth: int) -> bool:
    """Whether `depth` is a CIFAR ResNet depth 6n+2 with n >= 1."""
    return depth >= 8 and (depth - 2) % 6 == 0


def build_resnet(
    *, input_shape: tuple[int, ...], num_classes: int, width: float, depth: int, norm: NormSpec
) -> nn.Module:
    """CIFAR ResNet-`depth`, (B, C, H, W) -> (B, classes); ResNet-20 at width 1 with BN: 0.27M parameters."""
    blocks_per_stage = (depth - 2) // 6
    model = he_init(CifarResNet(input_shape[0], num_classes, blocks_per_stage, scaled(16, width), norm))
    if not norm.enabled:
        # Without norm layers each block doubles the activation variance at init (2^(3n) overall);
        # shrinking each branch's last conv by 1/sqrt(#blocks) keeps it O(1) (cf. Fixup, Zhang et al. 2019).
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        for block in blocks:
            block.last_conv.weight.data.mul_(len(blocks) ** -0.5)
    return model
