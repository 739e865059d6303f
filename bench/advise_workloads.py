"""User factories of the advice validation's linear least-squares workload (bench/bench_advise.py), and its noise
scales in closed form.

Data: x ~ N(0, I_d), y = x . w* + sigma * eps with |w*| = 1. Model: a linear map with a bias. Loss: MSE, so example
i's loss is l_i = (x_i . w + b - y_i)^2 and, writing z_i = (x_i, 1) and r_i = z_i . theta - y_i,
  g_i = 2 r_i z_i,   G = mean_i g_i,   Sigma = mean_i (g_i - G)(g_i - G)^T,   H = 2 mean_i z_i z_i^T,
  B_simple = tr(Sigma) / |G|^2,   B_noise = tr(H Sigma) / (G^T H G)   (McCandlish et al. 2018, their eqs. 2.8 and 2.9).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def lsq_data(dim: int = 32, n_train: int = 4096, n_test: int = 1024, sigma: float = 0.5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(dim)
    w /= np.linalg.norm(w)
    x = rng.standard_normal((n_train + n_test, dim)).astype(np.float32)
    y = (x @ w + sigma * rng.standard_normal(n_train + n_test)).astype(np.float32)[:, None]
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


def lsq_model(input_shape: tuple[int, ...] = (32,)) -> nn.Module:
    return nn.Linear(int(np.prod(input_shape)), 1)


def closed_form_noise(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """B_simple and B_noise of the MSE of `model` on (x, y), exactly, in float64."""
    z = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    theta = torch.cat([model.weight.detach().double().reshape(-1), model.bias.detach().double().reshape(-1)])
    r = z @ theta - y.double().reshape(-1)
    g = 2 * r[:, None] * z
    G = g.mean(0)
    d = g - G
    sigma = d.T @ d / len(x)
    H = 2 * z.T @ z / len(x)
    return {"b_simple": float(torch.trace(sigma) / (G @ G)), "b_noise": float(torch.trace(H @ sigma) / (G @ H @ G))}
