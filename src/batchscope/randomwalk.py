"""A random walk on a random potential (Hoffer et al. 2017, Sec. 3): SGD's update on a rough 1-D landscape.

Hoffer et al. explain the logarithmic growth of ||w_t - w_0|| by a walker on a random potential whose
fluctuations grow with distance (Marinari et al. 1983; Bouchaud and Georges 1990): if
E[(V(x) - V(y))^2] grows like |x - y|^alpha, the walker's distance grows like (log t)^(2 / alpha), an
"ultra-slow" diffusion, where a walk on a flat potential grows like sqrt(t).

The potential here is a fractional Brownian motion of Hurst index H (alpha = 2H), piecewise linear on a
grid: E[(V(x) - V(y))^2] = s^2 |x - y|^(2H) at the grid points, V(0) = 0. H = 1/2 is Sinai's random
walk potential (alpha = 1: distance ~ (log t)^2). Every walker has a potential of its own (averages over
walkers are averages over the disorder as well as the noise). The walkers take the Li & Li simulator's
step (`batchscope.diffusion`): minibatch SGD on a finite sum whose per-example gradients are V'(x) plus
fixed offsets of mean 0 and variance sigma^2,

    x <- x - eta * (V'(x) + mean_{i in B} z_i),

and the same minibatches drive a control walker on the flat potential V = 0, whose squared distance has
the closed form E x_t^2 = t eta^2 sigma^2 / m (`flat_msd`).

Scales. Per step the noise moves a walker by a = eta sigma / sqrt(m) (rms); in the limit of small steps
the walk is the Langevin diffusion dX = -V'(X) dtau + sqrt(2 T) dW in time tau = k eta at temperature
T = eta sigma^2 / (2 m) = a^2 / (2 eta). The potential's fluctuation over a length l is s l^H; it equals T at the Sinai length
l0 = (T / s)^(1 / H), the scale below which the walker does not feel the potential. Rescaling x by l0
and time by l0^2 / a^2 steps (`time_unit`) turns that diffusion into one with no parameter left but H, so
the distance is l0 f_H(t / time_unit); for H = 1/2 and long times f(u) ~ b (log u)^2, b of mean 5/6 in
absolute value (Kesten's law for Sinai's walk). `Walk` is given l0 in units of a (`sinai_length`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from .diffusion import DTYPE, minibatch_noise, minibatch_variance, noise_table

__all__ = [
    "Walk",
    "WalkResult",
    "drift_table",
    "fbm_potential",
    "flat_msd",
    "record_steps",
    "simulate_on",
    "simulate_walks",
    "step_walkers",
]

MAX_GRID = 1 << 16  # grid points per walker: a larger field means a setting far outside the intended range


@dataclass(frozen=True)
class Walk:
    """One setting of walkers (a group per seed): the SGD step, the potential, and how long to walk.

    Lengths are in units of the noise's rms step a = eta sigma / sqrt(batch): `sinai_length` sets the
    potential's strength (l0 / a), `dx` its grid spacing; the field reaches `reach` times the
    walkers' typical distance at the last step (the smaller of Sinai's l0 (log t)^(1 / H) and free
    diffusion's a sqrt(t)) on both sides: Kesten's law puts a Sinai walker (H = 1/2) beyond 12 l0 (log t)^2
    with a probability of about 4e-7. Walkers that reach the end anyway are counted (`WalkResult.left_field`).

    The defaults: l0 = a (the potential's rms fluctuation over one noise step equals the temperature, so
    the time unit is one step) and dx = a (the potential varies on the scale of one step)."""

    hurst: float = 0.5
    eta: float = 0.1
    sigma: float = 1.0
    batch: int = 1
    n_examples: int = 1000
    sinai_length: float = 1.0
    dx: float = 1.0
    n_walkers: int = 2048
    steps: int = 1 << 17
    points: int = 60
    reach: float = 12.0
    chunk: int = 256
    table_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.hurst < 1:
            raise ValueError(f"hurst must be in (0, 1), got {self.hurst}")
        if not (self.eta > 0 and self.sigma > 0 and self.sinai_length > 0 and self.dx > 0 and self.reach > 0):
            raise ValueError(f"bad walk {self}")
        if not (1 <= self.batch <= self.n_examples and self.n_walkers > 0 and self.steps >= 1 and self.points >= 2
                and self.chunk >= 1):
            raise ValueError(f"bad walk {self}")
        if self.half_cells > MAX_GRID // 2:
            raise ValueError(f"the walk's field needs {2 * self.half_cells} grid points per walker (at most {MAX_GRID}): "
                             "fewer steps, a coarser dx or a longer sinai_length")

    # -- derived scales ------------------------------------------------------------------------------
    @property
    def step_rms(self) -> float:
        """a: the rms move per step of the noise alone."""
        return self.eta * math.sqrt(minibatch_variance(self.sigma, self.batch, self.n_examples))

    @property
    def temperature(self) -> float:
        """T = eta sigma^2 / (2 m): the Langevin diffusion's temperature (stationary density exp(-V / T))."""
        return self.step_rms**2 / (2 * self.eta)

    @property
    def length(self) -> float:
        """l0, the Sinai length, in x's units."""
        return self.sinai_length * self.step_rms

    @property
    def strength(self) -> float:
        """s, with E[(V(x) - V(y))^2] = s^2 |x - y|^(2H): the fluctuation T over the length l0."""
        return self.temperature / self.length**self.hurst

    @property
    def time_unit(self) -> float:
        """l0^2 / a^2 steps: the time in which the walk's distance scales as l0 f_H(t / time_unit)."""
        return self.sinai_length**2

    @property
    def half_cells(self) -> int:
        """Grid cells on each side of the origin."""
        u = max(self.steps / self.time_unit, math.e)
        sinai = self.sinai_length * math.log(u) ** (1 / self.hurst)
        free = math.sqrt(self.steps)  # the flat walk's rms distance, in units of a
        return int(math.ceil(self.reach * min(sinai, free) / self.dx)) + 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WalkResult:
    """One group's distances at the recorded steps: means over its walkers of |x_t - x_0| and (x_t - x_0)^2,
    on the random potential and on the flat control; and how many walkers reached the end of their field."""

    steps: np.ndarray
    mean_abs: np.ndarray
    mean_sq: np.ndarray
    flat_mean_abs: np.ndarray
    flat_mean_sq: np.ndarray
    left_field: int


def record_steps(steps: int, points: int) -> np.ndarray:
    """About `points` log-spaced integer steps from 1 to `steps` (distinct, increasing, both ends in)."""
    return np.unique(np.round(np.geomspace(1, steps, points)).astype(np.int64))


def flat_msd(walk: Walk, t) -> np.ndarray:
    """E (x_t - x_0)^2 of the flat control: t independent steps of variance eta^2 sigma^2 / m, exactly."""
    return np.asarray(t, dtype=float) * walk.step_rms**2


def _fgn_eigenvalues(n: int, hurst: float) -> Tensor:
    """Eigenvalues of the 2n-circulant embedding of the autocovariance of unit fractional Gaussian noise,
    gamma(k) = (|k + 1|^2H - 2 |k|^2H + |k - 1|^2H) / 2 (Davies and Harte 1987)."""
    k = torch.arange(n + 1, dtype=DTYPE)
    h2 = 2 * hurst
    gamma = 0.5 * ((k + 1) ** h2 - 2 * k**h2 + (k - 1).abs() ** h2)
    row = torch.cat([gamma, gamma[1:n].flip(0)])  # c_0 .. c_n, c_{n-1} .. c_1
    lam = torch.fft.fft(row).real
    if float(lam.min()) < -1e-9 * float(lam.max()):
        raise ValueError(f"circulant embedding of fGn with H={hurst} is not positive semi-definite at n={n}")
    return lam.clamp_min(0)


def fbm_potential(n_walkers: int, half_cells: int, dx: float, hurst: float, strength: float,
                  gen: torch.Generator) -> Tensor:
    """(n_walkers, 2 half_cells + 1) values of independent fractional Brownian motions at the grid points
    x_j = (j - half_cells) dx, each 0 at x = 0: E[(V(x) - V(y))^2] = strength^2 |x - y|^(2 hurst).

    Fractional Gaussian noise by circulant embedding, exact in distribution; summed from the left end and
    shifted to 0 at the origin (an fBm's increments are stationary, so this is an fBm pinned at 0)."""
    n = 2 * half_cells
    if hurst == 0.5:  # Brownian motion: independent increments (the embedding would be the identity)
        incr = torch.randn(n_walkers, n, generator=gen, dtype=DTYPE).mul_(strength * dx**hurst)
    else:
        lam = _fgn_eigenvalues(n, hurst)
        z = torch.randn(n_walkers, 2 * n, 2, generator=gen, dtype=DTYPE)
        w = torch.fft.fft(torch.view_as_complex(z) * (lam / (2 * n)).sqrt(), dim=1)
        incr = w.real[:, :n] * (strength * dx**hurst)  # the real part of w has the circulant covariance
    v = torch.cat([torch.zeros(n_walkers, 1, dtype=DTYPE), incr.cumsum(1)], dim=1)
    return v - v[:, half_cells : half_cells + 1]


def drift_table(values: Tensor, dx: float, eta: float) -> Tensor:
    """(walkers, cells) drift per step in grid units, -eta V' / dx, of piecewise linear potentials given at
    the grid points (walkers, cells + 1) with spacing dx; NaN in the two end cells, so that a walker
    reaching the end of its field becomes NaN (`step_walkers`) and is counted, never silently clamped."""
    drift = values.diff(dim=1).mul_(-eta / dx**2)
    drift[:, [0, -1]] = math.nan
    return drift


def step_walkers(u: Tensor, drift: Tensor, kick: Tensor) -> Tensor:
    """One SGD step of every walker, in grid units (u = x / dx + the origin's index): u + drift[cell] + kick,
    with kick = -eta * noise / dx (noise: the minibatch's mean offset)."""
    # truncation is the floor for u >= 0; any u < 1 (and NaN, cast to some integer) is clamped into end cell 0,
    # any u >= cells into the last: either way the walker has reached an end cell
    cell = u.long().clamp_(0, drift.shape[1] - 1)
    return (u + kick).add_(drift.gather(1, cell))


def _seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for a group's potentials and its minibatches."""
    a, b = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint64)
    return int(a), int(b)


def simulate_walks(walk: Walk, seeds: Sequence[int]) -> list[WalkResult]:
    """One group of `walk.n_walkers` walkers per seed, each on a random potential of its own (`fbm_potential`,
    drawn from the seed): see `simulate_on`. A group's result does not depend on the others simulated with
    it, and is deterministic given its seed and `walk`."""
    seeds = [int(s) for s in seeds]
    w, half = walk.n_walkers, walk.half_cells
    dx = walk.dx * walk.step_rms
    drift = torch.empty(len(seeds) * w, 2 * half, dtype=DTYPE)
    for i, s in enumerate(seeds):  # one seed's potentials at a time: only the drift tables are kept
        gen = torch.Generator().manual_seed(_seeds(s)[0])
        drift[i * w : (i + 1) * w] = drift_table(fbm_potential(w, half, dx, walk.hurst, walk.strength, gen), dx, walk.eta)
    return _walk(drift, walk, seeds)


def simulate_on(values: Tensor, walk: Walk, seeds: Sequence[int]) -> list[WalkResult]:
    """Walkers on given potentials: `values` holds one row per walker, the potential at the grid points
    (j - half) dx for j = 0 .. 2 half, dx = walk.dx * a, groups of `walk.n_walkers` rows per seed. Every
    walker starts at x = 0 and takes `walk.steps` SGD steps with minibatches drawn from its seed's generator;
    a flat-potential control walker takes the same minibatches. Distances are recorded at
    `record_steps(walk.steps, walk.points)`. The groups run together, vectorized over all walkers (the loop
    is over steps only). A walker that reaches an end cell of its field is counted in `left_field` and
    left out of its group's means from then on."""
    seeds = [int(s) for s in seeds]
    if values.shape[0] != len(seeds) * walk.n_walkers or values.shape[1] % 2 != 1:
        raise ValueError(f"values must be ({len(seeds)} seeds x {walk.n_walkers} walkers, 2 half + 1 grid points), "
                         f"got {tuple(values.shape)}")
    return _walk(drift_table(values, walk.dx * walk.step_rms, walk.eta), walk, seeds)


def _walk(drift: Tensor, walk: Walk, seeds: list[int]) -> list[WalkResult]:
    """`simulate_on`, given the walkers' drift tables (`drift_table`)."""
    w, g = walk.n_walkers, len(seeds)
    if not seeds:
        return []
    half = drift.shape[1] // 2
    dx = walk.dx * walk.step_rms
    table = noise_table(walk.n_examples, 1, walk.sigma, walk.table_seed)
    gens = [torch.Generator().manual_seed(_seeds(s)[1]) for s in seeds]
    record = record_steps(walk.steps, walk.points)
    where = {int(k): i for i, k in enumerate(record)}
    u = torch.full((g * w, 1), float(half), dtype=DTYPE)
    flat = torch.zeros(g * w, 1, dtype=DTYPE)  # the control's position, in grid units from the origin
    out = {key: np.zeros((g, len(record))) for key in ("abs", "sq", "flat_abs", "flat_sq")}
    k = 0
    while k < walk.steps:
        n = min(walk.chunk, walk.steps - k)
        kicks = torch.cat([minibatch_noise(table, walk.batch, (walk.chunk, w), gen) for gen in gens], dim=1)
        kicks = kicks[:n].mul_(-walk.eta / dx)
        for j in range(n):
            u = step_walkers(u, drift, kicks[j])
            if k + j + 1 in where:  # the control's steps are the kicks alone
                i, d, f = where[k + j + 1], (u - half) * dx, (flat + kicks[: j + 1].sum(0)) * dx
                for key, v in (("abs", d.abs()), ("sq", d.square()), ("flat_abs", f.abs()), ("flat_sq", f.square())):
                    out[key][:, i] = v.view(g, w).nanmean(1).numpy()
        flat = flat + kicks.sum(0)
        k += n
    left = u.isnan().view(g, w).sum(1).tolist()
    return [WalkResult(record.astype(float), out["abs"][i], out["sq"][i], out["flat_abs"][i], out["flat_sq"][i],
                       int(left[i])) for i in range(g)]
