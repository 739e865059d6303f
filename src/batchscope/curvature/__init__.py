"""Curvature and gradient-noise instruments for any PyTorch model.

Every quantity is of the loss averaged over all of `data` (batches weighted by size), measured
with dropout off and batch norm in the mode the caller names (`bn_mode`); the model comes back
exactly as it was given.

Every instrument also takes `batch_loss(model, batch)` (with loss_fn=None) for batches other than
(inputs, targets), such as dicts and HuggingFace `BatchEncoding`s; `batch_size_fn(batch)`; `wrt`, the
parameters measured (the others held fixed); and `distributed=True`, each process passing its shard
of the data. DataLoaders are streamed one batch at a time (see `_core.Batches`). Hessian-vector products at
the model's weights keep each batch's gradient graph when they fit `graph_budget` (see `Objective.hvp`).
`cross_entropy_hvp` and `objective_hvp` apply softmax cross-entropy's output block without forming it.
"""

from ._core import MeasurementInfo, Objective
from .crossentropy import cross_entropy_hvp, objective_hvp, softmax_hessian_product
from .hessian import DensityResult, EigenResult, HessianOperator, TraceResult, hessian_density, hessian_eigenvalues, hessian_trace
from .landscape import InterpolationResult, SliceResult, interpolate, landscape_slice
from .noise import CovarianceResult, NoiseScaleResult, gradient_covariance, gradient_noise_scale
from .sharpness import SharpnessResult, epsilon_sharpness

__all__ = [
    "CovarianceResult",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "InterpolationResult",
    "MeasurementInfo",
    "NoiseScaleResult",
    "Objective",
    "SharpnessResult",
    "SliceResult",
    "TraceResult",
    "cross_entropy_hvp",
    "epsilon_sharpness",
    "gradient_covariance",
    "gradient_noise_scale",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "interpolate",
    "landscape_slice",
    "objective_hvp",
    "softmax_hessian_product",
]
