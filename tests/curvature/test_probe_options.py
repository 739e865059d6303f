"""TrajectoryProbes pass `batch_loss` and `wrt` through to the instruments."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchscope.curvature import gradient_noise_scale, hessian_eigenvalues
from batchscope.probes import TrajectoryProbes


def test_probes_measure_batch_loss_with_respect_to_selected_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    batches = list(zip(x.split(4), y.split(4)))
    probes = TrajectoryProbes(["hessian_top", "noise_scale"], schedule=1, subset=12, batch_size=4, wrt="2.*",
                              batch_loss=lambda m, b: 2.0 * F.cross_entropy(m(b[0]), b[1]))
    first = probes.step(0, model, None, (x, y))
    top = hessian_eigenvalues(model, lambda o, t: 2.0 * F.cross_entropy(o, t), batches, wrt=model[2])
    noise = gradient_noise_scale(model, F.cross_entropy, batches, curvature=False, wrt=model[2])
    assert first["hessian_lambda_1"] == pytest.approx(top.eigenvalues[0], rel=1e-7)
    assert first["B_simple"] == pytest.approx(noise.b_simple, rel=1e-10)  # a constant factor cancels
    assert probes.probes[0]._v0.shape == (1, 18)  # 5 x 3 + 3: the warm start of the selected parameters
    second = probes.step(1, model, None, (x, y))
    assert second["hessian_lambda_1"] == pytest.approx(top.eigenvalues[0], rel=1e-7)
    assert second["hessian_matvecs"] < first["hessian_matvecs"]  # warm-started from the first point
