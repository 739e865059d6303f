"""batchscope: the science and practice of batch size in deep learning.

The instruments (Hessian spectrum, epsilon-sharpness, gradient covariance and noise scale,
landscape slices) work on any PyTorch model; `batchscope` on the command line trains, sweeps
and reproduces the papers.
"""

__version__ = "0.1.0"

from .curvature import (  # noqa: E402
    HessianOperator,
    epsilon_sharpness,
    gradient_covariance,
    gradient_noise_scale,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    interpolate,
    landscape_slice,
)

__all__ = [
    "HessianOperator",
    "__version__",
    "epsilon_sharpness",
    "gradient_covariance",
    "gradient_noise_scale",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "interpolate",
    "landscape_slice",
]
