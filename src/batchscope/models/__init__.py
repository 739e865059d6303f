"""Model zoo for batch-size studies: MLP, Keskar C1-C4, SimpleCNN, CIFAR ResNet, VGG-11, MNIST-1D conv, LSTM; ghost BN."""

from batchscope.models.norm import NORM_KINDS, GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, norm_layer
from batchscope.models.registry import available_models, build_model

__all__ = [
    "NORM_KINDS",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "available_models",
    "build_model",
    "norm_layer",
]
