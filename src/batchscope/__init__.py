"""batchscope: the science and practice of batch size in deep learning.

The instruments (Hessian spectrum, epsilon-sharpness, gradient covariance and noise scale,
landscape slices) work on any PyTorch model; `batchscope` on the command line trains, sweeps
and reproduces the papers.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version: pyproject.toml's, as installed (`pip install -e .` writes it into the metadata)
    __version__ = version("batchscope")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

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
    "TrajectoryProbes",
    "__version__",
    "advise",
    "epsilon_sharpness",
    "gradient_covariance",
    "gradient_noise_scale",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "interpolate",
    "landscape_slice",
]


def __getattr__(name: str):
    # The probes need the store and the specs: import them on first use, so `import batchscope` stays the instruments.
    if name == "TrajectoryProbes":
        from .probes import TrajectoryProbes

        return TrajectoryProbes
    if name == "advise":  # the package batchscope.advise, callable as the function advise(spec, target, ...)
        import importlib

        return importlib.import_module(".advise", __name__)
    raise AttributeError(f"module 'batchscope' has no attribute {name!r}")
