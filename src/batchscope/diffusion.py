"""SGD as a diffusion (Li and Li 2017): SGD on small finite-sum potentials, many trajectories at once.

The problems are finite sums f(x) = (1/N) sum_i f_i(x) with f_i(x) = V(x) + <z_i, x>: every example
sees the same potential V and adds a fixed offset z_i to the gradient. The offsets of the N examples
have mean exactly 0 and population covariance exactly sigma^2 I (`noise_table`), so f = V and the
per-example gradient noise has covariance sigma^2 I. One SGD step with a minibatch B of m examples is

    x <- x - eta * (grad V(x) + mean_{i in B} z_i),

with the minibatch drawn from the N examples -- not a Gaussian shortcut. Two samplings:

- ``replace=True`` (default, what the SDE models): m indices drawn independently and uniformly, so
  the minibatch noise has covariance exactly sigma^2 / m;
- ``replace=False``: m distinct examples (Floyd's algorithm), independently at every step, so the
  covariance is sigma^2 / m * (N - m) / (N - 1) (the finite-population correction).

Either way the minibatches of successive steps are independent (no epoch reshuffling, whose noise sums
to zero over an epoch and is not the white noise of the SDE).

`simulate` runs many independent trajectories of many settings together, vectorized with torch:
the Python loop is over steps only. Each setting draws its minibatches from its own generator (seeded
by the setting's seed), for its own trajectories only, so its result does not depend on which other
settings it is simulated with. A trajectory's escape step is the first step k (1-based) after which
the iterate is outside the region (past the barrier of a minimum, out of a ball around a saddle);
escapes not seen within `max_steps` are censored (NaN).

Closed forms to compare with (the SDE dX = -grad V dt + sqrt(eta / m) sigma dW, time t = k eta):
`quadratic_stationary_variance`, `kramers_escape_steps`, `arrhenius_slope`, `saddle_escape_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

EULER_GAMMA = 0.5772156649015329
DTYPE = torch.float64

__all__ = [
    "POTENTIALS",
    "Setting",
    "arrhenius_slope",
    "kramers_escape_steps",
    "mean_escape",
    "minibatch_noise",
    "minibatch_variance",
    "noise_table",
    "positions",
    "quadratic_stationary_variance",
    "saddle_escape_steps",
    "simulate",
]


# -- the finite sum ---------------------------------------------------------------------------------


def noise_table(n: int, dim: int, sigma: float, seed: int = 0) -> Tensor:
    """The N per-example gradient offsets z_i, (n, dim) float64: mean exactly 0, population covariance
    (1/N) sum z_i z_i^T exactly sigma^2 I. In 1-D they are the standardized normal quantiles (no seed);
    in more dimensions, seeded Gaussian draws, centred and whitened."""
    if n < max(2, dim + 1):
        raise ValueError(f"noise_table needs n > dim and n >= 2 examples, got n={n}, dim={dim}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if dim == 1:
        from scipy.stats import norm

        z = torch.as_tensor(norm.ppf((np.arange(n) + 0.5) / n), dtype=DTYPE)[:, None]
    else:
        z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    z = z - z.mean(0)
    cov = z.T @ z / n
    evals, evecs = torch.linalg.eigh(cov)
    z = z @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T)  # population covariance exactly I
    return z * sigma


def _draw_distinct(n: int, m: int, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """shape + (m,) indices, m distinct values in [0, n) per row, each m-subset equally likely (Floyd)."""
    out = torch.empty(*shape, m, dtype=torch.long)
    for j, top in enumerate(range(n - m, n)):
        t = torch.randint(0, top + 1, shape, generator=gen)
        if j:
            taken = (out[..., :j] == t[..., None]).any(-1)
            t = torch.where(taken, torch.full_like(t, top), t)
        out[..., j] = t
    return out


def minibatch_noise(table: Tensor, batch: int, shape: tuple[int, ...], gen: torch.Generator, replace: bool = True) -> Tensor:
    """shape + (dim,): the mean offset of a minibatch of `batch` examples drawn from `table`, one per entry."""
    n = table.shape[0]
    if not 1 <= batch <= n:
        raise ValueError(f"batch must be in [1, {n}], got {batch}")
    if batch == n and not replace:
        return torch.zeros(*shape, table.shape[1], dtype=table.dtype)  # the full batch: no noise
    idx = torch.randint(0, n, (*shape, batch), generator=gen) if replace else _draw_distinct(n, batch, shape, gen)
    if table.shape[1] == 1:  # torch.take on a flat table is the fastest gather
        return torch.take(table[:, 0].contiguous(), idx).mean(-1, keepdim=True)
    return table[idx].mean(-2)


def minibatch_variance(sigma: float, batch: int, n: int, replace: bool = True) -> float:
    """Variance (per coordinate) of the minibatch mean: sigma^2 / m, times (N - m) / (N - 1) without replacement."""
    v = sigma**2 / batch
    return v if replace else v * (n - batch) / (n - 1)


# -- potentials ------------------------------------------------------------------------------------


class Potential:
    """V, where SGD starts, and when it has left. Parameters arrive as (T, 1) tensors, one row per trajectory.

    `grad` is the reference definition; `step` is the same SGD step with per-trajectory constants
    folded in by `prepare` (fewer tensor operations per step: the step loop is the cost)."""

    dim: int = 1
    params: tuple[str, ...] = ()

    def grad(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def start(self, p: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def prepare(self, p: dict[str, Tensor], eta: Tensor) -> dict[str, Tensor]:
        """Per-trajectory constants for `step` (every value has one row per trajectory); an "offset"
        is added to every kick."""
        return {**p, "eta": eta}

    def step(self, x: Tensor, c: dict[str, Tensor], kick: Tensor) -> Tensor:
        """x - eta grad V(x) - eta * noise, given kick = -eta * noise + c.get("offset", 0)."""
        return x - c["eta"] * self.grad(x, c) + kick

    def exited(self, x: Tensor, c: dict[str, Tensor]) -> Tensor:
        return torch.zeros(x.shape[0], dtype=torch.bool)


class CliffWell(Potential):
    """A quadratic well with a cliff beyond its barrier, in 1-D: a minimum at x = w with curvature
    h = 4 dV / w^2, a barrier top at x = 0 with curvature -h and height dV, and the potential falling
    away beyond it:

        V(x) = h (x - w)^2 / 2 for x >= w / 2,   dV - h x^2 / 2 for x < w / 2   (C^1-smooth),

    so grad V(x) = h (|x - w / 2| - w / 2). A smaller w is a sharper well of the same depth. SGD starts
    at the minimum; escape: the first step with x <= 0 (past the barrier top). Quadratic on the inner
    side, so SGD in the well is stable wherever eta h < 2.
    """

    dim = 1
    params = ("dV", "w")

    def grad(self, x, p):
        h, w = 4 * p["dV"] / p["w"] ** 2, p["w"]
        return h * ((x - w / 2).abs() - w / 2)

    def start(self, p):
        return p["w"].clone()

    def prepare(self, p, eta):
        eh = eta * 4 * p["dV"] / p["w"] ** 2
        return {"-eh": -eh, "half": p["w"] / 2, "offset": eh * p["w"] / 2}

    def step(self, x, c, kick):
        # kick includes the constant eta h w / 2 ("offset"): x - eta h (|x - w/2| - w/2) - eta noise
        return torch.addcmul(x + kick, c["-eh"], (x - c["half"]).abs_())

    def exited(self, x, c):
        return x[:, 0] <= 0


class Saddle(Potential):
    """V(x, y) = -gamma x^2 / 2 + h y^2 / 2, a saddle at the origin with negative curvature -gamma.
    SGD starts at the saddle; escape: the first step with ||(x, y)|| >= r."""

    dim = 2
    params = ("gamma", "h", "r")

    def grad(self, x, p):
        return torch.cat([-p["gamma"] * x[:, :1], p["h"] * x[:, 1:]], dim=1)

    def start(self, p):
        return torch.zeros(p["gamma"].shape[0], 2, dtype=DTYPE)

    def prepare(self, p, eta):
        return {"a": torch.cat([1 + eta * p["gamma"], 1 - eta * p["h"]], dim=1), "r2": p["r"][:, 0] ** 2}

    def step(self, x, c, kick):
        return torch.addcmul(kick, c["a"], x)

    def exited(self, x, c):
        return x.square().sum(1) >= c["r2"]


class Quadratic(Potential):
    """V(x) = h x^2 / 2 in 1-D, starting at 0, never left (for the stationary variance)."""

    dim = 1
    params = ("h",)

    def grad(self, x, p):
        return p["h"] * x

    def start(self, p):
        return torch.zeros(p["h"].shape[0], 1, dtype=DTYPE)

    def prepare(self, p, eta):
        return {"a": 1 - eta * p["h"]}

    def step(self, x, c, kick):
        return torch.addcmul(kick, c["a"], x)


POTENTIALS: dict[str, Potential] = {"cliff_well": CliffWell(), "saddle": Saddle(), "quadratic": Quadratic()}


# -- settings and the simulation --------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One simulation cell: a potential, step size, batch, noise, and a group of trajectories."""

    potential: str
    params: dict[str, float] = field(hash=False)
    eta: float
    batch: int
    sigma: float
    n_examples: int = 1000
    n_traj: int = 512
    max_steps: int = 100_000
    seed: int = 0
    replace: bool = True
    table_seed: int = 0

    def __post_init__(self) -> None:
        pot = POTENTIALS.get(self.potential)
        if pot is None:
            raise ValueError(f"unknown potential {self.potential!r} (available: {', '.join(POTENTIALS)})")
        if set(self.params) != set(pot.params):
            raise ValueError(f"{self.potential} needs parameters {pot.params}, got {tuple(self.params)}")
        if not (self.eta > 0 and self.n_traj > 0 and self.max_steps > 0 and 1 <= self.batch <= self.n_examples):
            raise ValueError(f"bad setting {self}")

    def to_dict(self) -> dict:
        return asdict(self)


def _column(settings: Sequence[Setting], value) -> Tensor:
    return torch.cat([torch.full((s.n_traj, 1), float(value(s)), dtype=DTYPE) for s in settings])


def simulate(settings: Sequence[Setting], chunk: int = 256) -> list[np.ndarray]:
    """Escape steps of every trajectory of every setting: float arrays (NaN = censored at max_steps).

    Settings of one potential run together, vectorized over all their trajectories; trajectories
    leave the batch once escaped or censored (checked every `chunk` steps). Deterministic given the
    settings' seeds and `chunk`, and a setting's result does not depend on the others.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out: list[np.ndarray | None] = [None] * len(settings)
    kinds: dict[str, list[int]] = {}
    for i, s in enumerate(settings):
        kinds.setdefault(s.potential, []).append(i)
    for kind, idx in kinds.items():
        res = _simulate_kind(POTENTIALS[kind], [settings[i] for i in idx], chunk)
        for i, r in zip(idx, res):
            out[i] = r
    return out  # type: ignore[return-value]


def _simulate_kind(pot: Potential, settings: Sequence[Setting], chunk: int) -> list[np.ndarray]:
    tables = [noise_table(s.n_examples, pot.dim, s.sigma, s.table_seed) for s in settings]
    gens = [torch.Generator().manual_seed(int(s.seed)) for s in settings]
    p = {k: _column(settings, lambda s, k=k: s.params[k]) for k in pot.params}
    x = pot.start(p)
    eta = _column(settings, lambda s: s.eta)
    c = pot.prepare(p, eta)
    c["-eta"] = -eta
    owner = torch.cat([torch.full((s.n_traj,), g, dtype=torch.long) for g, s in enumerate(settings)])
    limit = torch.cat([torch.full((s.n_traj,), int(s.max_steps), dtype=torch.long) for s in settings])
    where = torch.arange(len(owner))  # each active trajectory's index in the output
    exit_step = torch.full((len(owner),), math.nan, dtype=DTYPE)
    step = 0
    while len(where):
        counts = torch.bincount(owner, minlength=len(settings)).tolist()
        kicks = torch.cat(
            [minibatch_noise(tables[g], s.batch, (chunk, counts[g]), gens[g], s.replace)
             for g, s in enumerate(settings) if counts[g]],
            dim=1,
        ).mul_(c["-eta"])
        if "offset" in c:
            kicks.add_(c["offset"])
        hit = torch.empty(chunk, len(where), dtype=torch.bool)
        for k in range(chunk):
            x = pot.step(x, c, kicks[k])
            hit[k] = pot.exited(x, c)
        any_hit = hit.any(0)
        first = step + 1 + hit.to(torch.uint8).argmax(0)  # first step outside, where any
        seen = any_hit & (first <= limit)
        exit_step[where[seen]] = first[seen].to(DTYPE)
        step += chunk
        keep = ~any_hit & (step < limit)
        if not bool(keep.all()):
            x, owner, limit, where = x[keep], owner[keep], limit[keep], where[keep]
            c = {k: v[keep] for k, v in c.items()}
    res, start = [], 0
    for s in settings:
        res.append(exit_step[start : start + s.n_traj].numpy().copy())
        start += s.n_traj
    return res


def positions(setting: Setting, steps: Sequence[int]) -> Tensor:
    """(len(steps), n_traj, dim) iterates of `setting` after each of the given step counts, never
    stopping at an exit (for stationary statistics); the same noise stream as `simulate` with chunk 256."""
    pot = POTENTIALS[setting.potential]
    table = noise_table(setting.n_examples, pot.dim, setting.sigma, setting.table_seed)
    gen = torch.Generator().manual_seed(int(setting.seed))
    p = {k: _column([setting], lambda s, k=k: s.params[k]) for k in pot.params}
    eta = _column([setting], lambda s: s.eta)
    c = pot.prepare(p, eta)
    x = pot.start(p)
    want = set(int(s) for s in steps)
    out, k = {}, 0
    if 0 in want:
        out[0] = x.clone()
    while k < max(want):
        kicks = minibatch_noise(table, setting.batch, (256, setting.n_traj), gen, setting.replace).mul_(-eta)
        if "offset" in c:
            kicks.add_(c["offset"])
        for j in range(256):
            x = pot.step(x, c, kicks[j])
            k += 1
            if k in want:
                out[k] = x.clone()
    return torch.stack([out[int(s)] for s in steps])


# -- estimators and closed forms ---------------------------------------------------------------------


def mean_escape(steps: np.ndarray, max_steps: int, min_escaped: float = 0.5) -> float:
    """Mean escape step of a group of trajectories, with censoring at max_steps.

    All escaped: the sample mean. Some censored: the maximum-likelihood mean of an exponential law
    (total steps at risk / escapes) -- escape from a deep well is memoryless after a short relaxation.
    NaN if fewer than `min_escaped` of the trajectories escaped.
    """
    s = np.asarray(steps, dtype=float)
    ok = np.isfinite(s)
    if not ok.any() or ok.mean() < min_escaped:
        return math.nan
    if ok.all():
        return float(s.mean())
    return float((s[ok].sum() + (~ok).sum() * max_steps) / ok.sum())


def quadratic_stationary_variance(
    eta: float, h: float, sigma: float, batch: int, n: int | None = None, replace: bool = True
) -> float:
    """Stationary variance of SGD on h x^2 / 2 with minibatch noise variance s2 = minibatch_variance:
    x' = (1 - eta h) x - eta xi gives eta^2 s2 / (1 - (1 - eta h)^2) = eta s2 / (h (2 - eta h))."""
    s2 = minibatch_variance(sigma, batch, n or 2**62, replace)
    return eta * s2 / (h * (2 - eta * h))


def arrhenius_slope(dV: float, sigma: float, batch: int) -> float:
    """d log(escape time) / d(1/eta) of the SDE: the exponent 2 dV m / (eta sigma^2) divided by 1/eta."""
    return 2 * dV * batch / sigma**2


def kramers_escape_steps(dV: float, w: float, eta: float, sigma: float, batch: int) -> float:
    """SDE (Kramers) mean number of steps for the CliffWell to first reach its barrier top: half the
    Kramers escape time, t = pi / sqrt(h_min |h_top|) * exp(2 dV m / (eta sigma^2)) with
    h_min = |h_top| = 4 dV / w^2; steps = t / eta."""
    h = 4 * dV / w**2
    return math.pi / h * math.exp(arrhenius_slope(dV, sigma, batch) / eta) / eta


def saddle_escape_steps(gamma: float, r: float, eta: float, sigma: float, batch: int) -> float:
    """SDE mean number of steps to leave the ball of radius r around the saddle (unstable direction only):
    X_t ~ sqrt(D / gamma) e^{gamma t} Z with D = eta sigma^2 / (2 m) gives
    t = (1 / (2 gamma)) (log(2 gamma r^2 m / (eta sigma^2)) + Euler's gamma + log 2), steps = t / eta."""
    t = (math.log(2 * gamma * r**2 * batch / (eta * sigma**2)) + EULER_GAMMA + math.log(2)) / (2 * gamma)
    return t / eta
