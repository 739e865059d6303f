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

`simulate_sde` runs the SDE itself, dX = -grad V dt + sqrt(eta / m) sigma dW (time t = k eta), on the same
potentials by Euler-Maruyama with a step a fraction of eta, and reports its escapes in SGD steps (t / eta), so
the two escape-time distributions compare directly (Li and Li's weak approximation); `sde_positions` gives
its iterates.

Closed forms to compare with: `quadratic_stationary_variance` (SGD), `sde_stationary_variance` (the SDE and its
Euler-Maruyama chain), and the SDE's `kramers_escape_steps`, `arrhenius_slope`, `saddle_escape_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    "sde_positions",
    "sde_seed",
    "sde_stationary_variance",
    "simulate",
    "simulate_sde",
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
    eta = _column(settings, lambda s: s.eta)
    c = pot.prepare(p, eta)
    c["-eta"] = -eta

    def kicks(counts: list[int], c: dict[str, Tensor]) -> Tensor:
        k = torch.cat(
            [minibatch_noise(tables[g], s.batch, (chunk, counts[g]), gens[g], s.replace)
             for g, s in enumerate(settings) if counts[g]],
            dim=1,
        ).mul_(c["-eta"])
        return k.add_(c["offset"]) if "offset" in c else k

    return _escape_loop(pot, settings, pot.start(p), c, chunk, 1, kicks)


def _escape_loop(pot: Potential, settings: Sequence[Setting], x: Tensor, c: dict[str, Tensor], chunk: int,
                 substeps: int, kicks: Callable[[list[int], dict[str, Tensor]], Tensor]) -> list[np.ndarray]:
    """Steps every trajectory until it has left the region or reached its setting's max_steps. A step is `substeps`
    calls of `pot.step`, and the exit is checked after each whole step; kicks(counts, c) gives the next chunk's
    (chunk * substeps, active trajectories, dim) kicks, `counts` the active trajectories of each setting in order."""
    owner = torch.cat([torch.full((s.n_traj,), g, dtype=torch.long) for g, s in enumerate(settings)])
    limit = torch.cat([torch.full((s.n_traj,), int(s.max_steps), dtype=torch.long) for s in settings])
    where = torch.arange(len(owner))  # each active trajectory's index in the output
    exit_step = torch.full((len(owner),), math.nan, dtype=DTYPE)
    step = 0
    while len(where):
        counts = torch.bincount(owner, minlength=len(settings)).tolist()
        kick = kicks(counts, c)
        hit = torch.empty(chunk, len(where), dtype=torch.bool)
        for k in range(chunk):
            for j in range(k * substeps, (k + 1) * substeps):
                x = pot.step(x, c, kick[j])
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
    eta = _column([setting], lambda s: s.eta)

    def kicks(c: dict[str, Tensor]) -> Tensor:
        k = minibatch_noise(table, setting.batch, (256, setting.n_traj), gen, setting.replace).mul_(-eta)
        return k.add_(c["offset"]) if "offset" in c else k

    return _record(setting, steps, eta, 1, kicks)


def sde_positions(setting: Setting, steps: Sequence[int], substeps: int = 10) -> Tensor:
    """`positions` for the SDE of `setting` (see `simulate_sde`): X at t = k eta for each k in `steps`."""
    pot = POTENTIALS[setting.potential]
    gen = torch.Generator().manual_seed(sde_seed(setting.seed))
    scale = _column([setting], lambda s: _sde_noise(s, substeps))

    def kicks(c: dict[str, Tensor]) -> Tensor:
        k = torch.randn(256 * substeps, setting.n_traj, pot.dim, generator=gen, dtype=DTYPE).mul_(scale)
        return k.add_(c["offset"]) if "offset" in c else k

    return _record(setting, steps, _column([setting], lambda s: s.eta / substeps), substeps, kicks)


def _record(setting: Setting, steps: Sequence[int], dt: Tensor, substeps: int,
            kicks: Callable[[dict[str, Tensor]], Tensor]) -> Tensor:
    """Runs `setting`'s trajectories in chunks of 256 steps of `substeps` moves of size dt and keeps the iterates
    after the given whole steps; kicks(c) gives a chunk's (256 * substeps, n_traj, dim) kicks."""
    pot = POTENTIALS[setting.potential]
    p = {k: _column([setting], lambda s, k=k: s.params[k]) for k in pot.params}
    c = pot.prepare(p, dt)
    x = pot.start(p)
    want = set(int(s) for s in steps)
    out, k = {}, 0
    if 0 in want:
        out[0] = x.clone()
    while k < max(want):
        kick = kicks(c)
        for j in range(256):
            for i in range(j * substeps, (j + 1) * substeps):
                x = pot.step(x, c, kick[i])
            k += 1
            if k in want:
                out[k] = x.clone()
    return torch.stack([out[int(s)] for s in steps])


# -- the SDE ----------------------------------------------------------------------------------------


def sde_seed(seed: int) -> int:
    """The seed of the SDE's Gaussian stream for a setting's seed: another stream than the SGD's minibatches
    (seeded with `seed` itself), so SGD and SDE samples of one setting are independent. Derived by hashing,
    not by an offset: torch seeds its Mersenne Twister from the low 32 bits only (seed + 2**32 is seed)."""
    return int(np.random.SeedSequence([int(seed), 0x5DE]).generate_state(1)[0])


def _sde_noise(s: Setting, substeps: int) -> float:
    """Standard deviation of one Euler-Maruyama increment, per coordinate: sqrt(eta s2 dt), dt = eta / substeps,
    s2 the variance of SGD's minibatch noise (sigma^2 / m with replacement)."""
    return s.eta * math.sqrt(minibatch_variance(s.sigma, s.batch, s.n_examples, s.replace) / substeps)


def simulate_sde(settings: Sequence[Setting], substeps: int = 10, chunk: int = 32) -> list[np.ndarray]:
    """Escape steps of the SDE that approximates each SGD setting to first order (Li and Li):

        dX = -grad V(X) dt + sqrt(eta s2) dW,   time t = k eta,

    s2 the per-coordinate variance of the setting's minibatch noise (sigma^2 / m with replacement; the
    finite-population correction without), started where SGD starts. Euler-Maruyama with dt = eta / substeps,
    Gaussian increments from the setting's own stream (`sde_seed`). The exit is checked at every whole step
    t = k eta, where SGD's iterate x_k approximates X(k eta): the escape step k counts as SGD's does (checking at
    every substep would record the continuous first passage instead, which is shorter: the path crosses the
    barrier top and comes back between steps). Censored at max_steps (NaN). Settings run together as in
    `simulate`; deterministic given the settings' seeds, `substeps` and `chunk` (here in steps, of substeps
    moves each: chunk x substeps x trajectories Gaussian draws at a time).
    """
    if substeps < 1 or chunk < 1:
        raise ValueError(f"substeps and chunk must be >= 1, got {substeps}, {chunk}")
    out: list[np.ndarray | None] = [None] * len(settings)
    kinds: dict[str, list[int]] = {}
    for i, s in enumerate(settings):
        kinds.setdefault(s.potential, []).append(i)
    for kind, idx in kinds.items():
        group = [settings[i] for i in idx]
        pot = POTENTIALS[kind]
        gens = [torch.Generator().manual_seed(sde_seed(s.seed)) for s in group]
        p = {k: _column(group, lambda s, k=k: s.params[k]) for k in pot.params}
        c = pot.prepare(p, _column(group, lambda s: s.eta / substeps))
        c["scale"] = _column(group, lambda s: _sde_noise(s, substeps))

        def kicks(counts: list[int], c: dict[str, Tensor], group=group, gens=gens, dim=pot.dim) -> Tensor:
            k = torch.cat([torch.randn(chunk * substeps, counts[g], dim, generator=gens[g], dtype=DTYPE)
                           for g in range(len(group)) if counts[g]], dim=1).mul_(c["scale"])
            return k.add_(c["offset"]) if "offset" in c else k

        for i, r in zip(idx, _escape_loop(pot, group, pot.start(p), c, chunk, substeps, kicks)):
            out[i] = r
    return out  # type: ignore[return-value]


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


def sde_stationary_variance(
    eta: float, h: float, sigma: float, batch: int, substeps: int | None = None, n: int | None = None, replace: bool = True
) -> float:
    """Stationary variance of the SDE on h x^2 / 2 (an Ornstein-Uhlenbeck process), eta s2 / (2 h), s2 the minibatch
    noise variance. With `substeps`, that of its Euler-Maruyama chain with dt = eta / substeps:
    x' = (1 - dt h) x + sqrt(eta s2 dt) N gives eta s2 / (h (2 - dt h)) (substeps = 1: SGD's, with Gaussian noise)."""
    s2 = minibatch_variance(sigma, batch, n or 2**62, replace)
    dt_h = 0.0 if substeps is None else eta * h / substeps
    return eta * s2 / (h * (2 - dt_h))


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
