"""Probes: curvature and gradient-noise instruments measured along a training trajectory.

A probe measures one instrument of `batchscope.curvature` on a fixed measurement subset (the first
`subset` training examples, in batches of `batch_size`, batch norm per `bn_mode`) at the steps its
schedule names, and returns metrics stored with the run's own metrics at that step:

* in `train_run`, through `probes_for(run_spec)` (callbacks of the training loop);
* in a user's own loop, through `TrajectoryProbes` (call `.step(step, model, loss_fn, data)` every step);
* in a Lightning or HuggingFace Trainer, through the callbacks of `batchscope.integrations`.

Metric names (stable: studies read them from the store). `<label>` is `options.label` where set (to
tell apart two probes of one instrument), appended as `_<label>` to every name of that probe.

=====================  =================================================================  =============================
instrument             metrics                                                            options (defaults)
=====================  =================================================================  =============================
hessian_top            hessian_lambda_1 .. hessian_lambda_<k> (largest first), Lanczos   k=1, tol=1e-4, max_iter=None,
                       hessian_matvecs (Hessian-vector products spent),                   warm_start=True, seed=0,
                       hessian_converged (1.0 / 0.0)                                       hvp_method="auto"
hessian_trace          hessian_trace, hessian_trace_se (standard error)                   samples=100, method="hutch++",
                                                                                          seed=0, hvp_method="auto"
gradient_covariance    K_lambda_1, K_trace, K_condition_k (lambda_k / lambda_1 of K)       k=10, centered=False
noise_scale            B_simple; B_noise with curvature=True (examples)                    method="per_example",
                                                                                          curvature=False, ...
sharpness              sharpness_eps<eps> (full space), sharpness_eps<eps>_p<p> (random   eps=1e-3, subspace_dim=None,
                       p-dim subspace); eps written with %g, e.g. sharpness_eps0.001      max_iter=10, seed=0, y0="zero"
grad_norm              grad_norm (|grad f| on the subset)                                  (none)
every instrument       probe_seconds_<instrument>: seconds this measurement took          label=None
=====================  =================================================================  =============================

Units: Hessian eigenvalues and traces in loss units per parameter unit^2, K in loss^2 per parameter
unit^2, noise scales in examples, sharpness in percent of (1 + loss), seconds in wall-clock seconds.
`hessian_top` warm-starts Lanczos from the previous measurement point's eigenvectors (the top
eigenvector moves little between nearby points, so fewer products are needed).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from .curvature._batch import concat, leading_size, select, split
from .curvature._core import Batch, BatchLoss, LossFn, Objective, Wrt, select_parameters
from .curvature.hessian import hessian_eigenvalues, hessian_trace
from .curvature.noise import gradient_covariance, gradient_noise_scale
from .curvature.sharpness import epsilon_sharpness
from .data import Dataset
from .errors import SpecError
from .factories import loss_for
from .sinks import Sink, flush_all
from .spec import ProbeSpec, RunSpec
from .store import Store

__all__ = ["Probe", "TrajectoryProbes", "available_probes", "probe_metrics", "probes_for", "schedule_steps"]

HVP = Literal["auto", "double_backward", "forward_over_reverse"]


# -- options of each instrument (validated at construction, so a sweep's preflight catches them) ---
class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.=+-]{1,40}$")
    """Suffix `_<label>` of this probe's metric names."""


class HessianTopOptions(_Options):
    k: int = Field(1, ge=1)
    tol: float = Field(1e-4, gt=0)
    max_iter: int | None = Field(None, ge=1)
    warm_start: bool = True
    seed: int = 0
    hvp_method: HVP = "auto"


class HessianTraceOptions(_Options):
    samples: int = Field(100, ge=3)
    method: Literal["hutch++", "hutchinson"] = "hutch++"
    seed: int = 0
    hvp_method: HVP = "auto"


class CovarianceOptions(_Options):
    k: int = Field(10, ge=1)
    centered: bool = False


class NoiseScaleOptions(_Options):
    method: Literal["per_example", "two_batch"] = "per_example"
    curvature: bool = False
    curvature_rank: int | None = Field(None, ge=1)
    small_batch: int = Field(32, ge=1)
    big_batch: int = Field(256, ge=2)
    n_pairs: int = Field(100, ge=2)
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> NoiseScaleOptions:
        if self.method == "two_batch" and self.small_batch >= self.big_batch:
            raise ValueError("small_batch must be < big_batch")
        return self


class SharpnessOptions(_Options):
    eps: float = Field(1e-3, gt=0)
    subspace_dim: int | None = Field(None, ge=1)
    max_iter: int = Field(10, ge=1)
    seed: int = 0
    y0: Literal["zero", "random"] = "zero"


class GradNormOptions(_Options):
    pass


# -- the instruments --------------------------------------------------------------------------
Measured = tuple[dict[str, float], int]  # metrics (unlabelled names), Hessian-vector products spent


def _hessian_top(p: Probe, model: nn.Module, loss_fn: LossFn | None, data: list[Batch]) -> Measured:
    o: HessianTopOptions = p.options  # type: ignore[assignment]
    v0 = p._v0 if o.warm_start else None
    if v0 is not None and v0.shape[-1] != _n_params(model, p.wrt):
        v0 = None  # a different model (user loop): nothing to warm-start from
    res = hessian_eigenvalues(model, loss_fn, data, k=o.k, which="top", tol=o.tol, max_iter=o.max_iter, v0=v0,
                              seed=o.seed, bn_mode=p.spec.bn_mode, hvp_method=p._hvp_method, **p.objective)
    p._v0 = res.eigenvectors.detach()
    p._remember_hvp(res.info.hvp_method)
    m = {f"hessian_lambda_{i + 1}": float(v) for i, v in enumerate(res.eigenvalues)}
    m.update(hessian_matvecs=float(res.iterations), hessian_converged=float(res.converged))
    return m, res.iterations


def _hessian_trace(p: Probe, model: nn.Module, loss_fn: LossFn | None, data: list[Batch]) -> Measured:
    o: HessianTraceOptions = p.options  # type: ignore[assignment]
    res = hessian_trace(model, loss_fn, data, samples=o.samples, method=o.method, seed=o.seed,
                        bn_mode=p.spec.bn_mode, hvp_method=p._hvp_method, **p.objective)
    p._remember_hvp(res.info.hvp_method)
    return {"hessian_trace": res.trace, "hessian_trace_se": res.stderr}, res.info.matvecs


def _covariance(p: Probe, model: nn.Module, loss_fn: LossFn | None, data: list[Batch]) -> Measured:
    o: CovarianceOptions = p.options  # type: ignore[assignment]
    res = gradient_covariance(model, loss_fn, data, k=o.k, centered=o.centered, bn_mode=p.spec.bn_mode,
                              **p.objective)
    return {"K_lambda_1": res.lambda_1, "K_trace": res.trace, "K_condition_k": res.condition_k}, 0


def _noise_scale(p: Probe, model: nn.Module, loss_fn: LossFn | None, data: list[Batch]) -> Measured:
    o: NoiseScaleOptions = p.options  # type: ignore[assignment]
    res = gradient_noise_scale(model, loss_fn, data, method=o.method, small_batch=o.small_batch,
                               big_batch=o.big_batch, n_pairs=o.n_pairs, curvature=o.curvature,
                               curvature_rank=o.curvature_rank, bn_mode=p.spec.bn_mode, seed=o.seed,
                               **p.objective)
    m = {"B_simple": res.b_simple}
    if o.curvature:
        m["B_noise"] = math.nan if res.b_noise is None else res.b_noise
    return m, res.info.matvecs


def _sharpness_name(o: SharpnessOptions) -> str:
    return f"sharpness_eps{o.eps:g}" + ("" if o.subspace_dim is None else f"_p{o.subspace_dim}")


def _sharpness(p: Probe, model: nn.Module, loss_fn: LossFn | None, data: list[Batch]) -> Measured:
    o: SharpnessOptions = p.options  # type: ignore[assignment]
    res = epsilon_sharpness(model, loss_fn, data, eps=o.eps, subspace_dim=o.subspace_dim, max_iter=o.max_iter,
                            seed=o.seed, y0=o.y0, bn_mode=p.spec.bn_mode, **p.objective)
    return {_sharpness_name(o): res.sharpness}, 0


def _grad_norm(p: Probe, model: nn.Module, loss_fn: LossFn | None, data: list[Batch]) -> Measured:
    with Objective(model, loss_fn, data, bn_mode=p.spec.bn_mode, hvp_method="double_backward", **p.objective) as obj:
        _, g = obj.loss_and_grad()
    return {"grad_norm": float(torch.linalg.vector_norm(g.double()))}, 0


@dataclass(frozen=True)
class _Instrument:
    options: type[_Options]
    metrics: Callable[[Any], list[str]]  # unlabelled metric names for validated options
    measure: Callable[[Probe, nn.Module, LossFn | None, list[Batch]], Measured]


_INSTRUMENTS: dict[str, _Instrument] = {
    "hessian_top": _Instrument(
        HessianTopOptions,
        lambda o: [f"hessian_lambda_{i + 1}" for i in range(o.k)] + ["hessian_matvecs", "hessian_converged"],
        _hessian_top,
    ),
    "hessian_trace": _Instrument(HessianTraceOptions, lambda o: ["hessian_trace", "hessian_trace_se"], _hessian_trace),
    "gradient_covariance": _Instrument(
        CovarianceOptions, lambda o: ["K_lambda_1", "K_trace", "K_condition_k"], _covariance
    ),
    "noise_scale": _Instrument(
        NoiseScaleOptions, lambda o: ["B_simple"] + (["B_noise"] if o.curvature else []), _noise_scale
    ),
    "sharpness": _Instrument(SharpnessOptions, lambda o: [_sharpness_name(o)], _sharpness),
    "grad_norm": _Instrument(GradNormOptions, lambda o: ["grad_norm"], _grad_norm),
}


def available_probes() -> list[str]:
    """Names of the instruments a `ProbeSpec` may name (metric names: `probe_metrics` and the module doc)."""
    return sorted(_INSTRUMENTS)


def probe_metrics(probe: ProbeSpec | str, options: dict[str, Any] | None = None) -> list[str]:
    """The metric names a probe records (including its `probe_seconds_<instrument>`)."""
    spec = probe if isinstance(probe, ProbeSpec) else _as_spec(probe, {"options": options or {}}, "probe")
    return Probe(spec).metric_names


def schedule_steps(spec: ProbeSpec, total: int, epoch_ends: Sequence[int] = ()) -> set[int]:
    """Steps (0 = initial weights, up to `total` updates) at which a probe measures."""
    if spec.schedule == "log":
        return {0} | {int(round(s)) for s in np.geomspace(1, max(total, 1), spec.points) if s <= total}
    if spec.schedule == "every":
        return set(range(0, total + 1, spec.every or 1))
    return {0} | {int(e) for e in epoch_ends if 0 <= e <= total}


# -- a probe: one instrument on a schedule ------------------------------------------------------
class Probe:
    """One instrument on a schedule over a fixed subset; a `train_run` callback (see `train.loop.Callback`).

    Cost: `seconds` (wall-clock seconds, all measurements), `matvecs` (Hessian-vector products) and
    `measurements` so far; each measurement also records `probe_seconds_<instrument>` (seconds).
    """

    def __init__(self, spec: ProbeSpec, loss_fn: LossFn = F.cross_entropy, *, train_batch_size: int | None = None,
                 where: str | None = None, batch_loss: BatchLoss | None = None, wrt: Wrt = None) -> None:
        self.where = f"{where} ({spec.instrument})" if where else f"probe {spec.instrument!r}"
        inst = _INSTRUMENTS.get(spec.instrument)
        if inst is None:
            raise SpecError(f"{self.where}: unknown instrument {spec.instrument!r}; available: "
                            f"{', '.join(available_probes())}")
        try:
            self.options = inst.options.model_validate(spec.options)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            msg = "unknown option" if first["type"] == "extra_forbidden" else f"{first['msg']}; got {first['input']!r}"
            raise SpecError(f"{self.where}: options{'.' + loc if loc else ''}: {msg}; "
                            f"accepted options: {', '.join(inst.options.model_fields)}") from None
        self._check(spec)
        self.spec, self.loss_fn, self._inst = spec, loss_fn, inst
        # batch_loss(model, (x, y)) instead of loss_fn(model(x), y); wrt: the parameters measured (curvature's)
        self.wrt = wrt
        self.objective: dict[str, Any] = {"batch_loss": batch_loss, "wrt": wrt}
        self.batch_size = spec.batch_size or train_batch_size  # None: the whole subset in one batch
        suffix = f"_{self.options.label}" if self.options.label else ""
        self._suffix = suffix
        self.metric_names = [n + suffix for n in inst.metrics(self.options)] + [self.seconds_name]
        self.seconds, self.matvecs, self.measurements = 0.0, 0, 0
        self._v0: Tensor | None = None  # hessian_top: the previous point's eigenvectors
        hvp = getattr(self.options, "hvp_method", "auto")
        self._hvp_method: HVP = hvp

    @property
    def seconds_name(self) -> str:
        """Name of the metric holding each measurement's cost in seconds."""
        return f"probe_seconds_{self.spec.instrument}{self._suffix}"

    def _check(self, spec: ProbeSpec) -> None:
        """Combinations the field types cannot express, as one-line SpecErrors."""
        if spec.schedule == "every" and spec.every is None:
            raise SpecError(f"{self.where}: schedule 'every' needs every = <steps between measurements>")
        if spec.schedule != "every" and spec.every is not None:
            raise SpecError(f"{self.where}: every = {spec.every} is set but schedule is {spec.schedule!r}; "
                            "use schedule = 'every'")
        o = self.options
        if isinstance(o, CovarianceOptions) and o.k > spec.subset:
            raise SpecError(f"{self.where}: options.k = {o.k} exceeds subset = {spec.subset} "
                            "(K has at most one non-zero eigenvalue per example)")
        if isinstance(o, NoiseScaleOptions) and o.method == "two_batch" and spec.bn_mode != "eval":
            raise SpecError(f"{self.where}: method 'two_batch' needs bn_mode = 'eval'")

    def _remember_hvp(self, method: str) -> None:
        # "auto" times both HVP implementations on every call; the winner does not change along a run
        if self._hvp_method == "auto" and method:
            self._hvp_method = method  # type: ignore[assignment]

    # -- Callback protocol ------------------------------------------------------------------
    def steps(self, total: int, epoch_ends: list[int]) -> set[int]:
        """The steps at which to measure (0 = the initial weights)."""
        return schedule_steps(self.spec, total, epoch_ends)

    def __call__(self, step: int, epoch: float, model: nn.Module, data: Dataset) -> dict[str, float]:
        """Metrics at this step, measured on the first `subset` training examples of `data`."""
        return self.measure(model, data.x_train, data.y_train)

    # -- measuring --------------------------------------------------------------------------
    def batches(self, x: Tensor, y: Tensor) -> list[Batch]:
        """The measurement subset: the first `subset` examples (all if fewer), in batches of `batch_size`."""
        n = min(self.spec.subset, x.shape[0])
        b = self.batch_size or n
        return list(zip(x[:n].split(b), y[:n].split(b)))

    def subset_batches(self, batch: Any, n: int) -> list[Any]:
        """The measurement subset of one batch of any structure (a dict, a BatchEncoding) holding n examples: its
        first `subset` examples in batches of `batch_size`."""
        m = min(self.spec.subset, n)
        return [piece for _, piece in split(select(batch, n, slice(0, m)), m, self.batch_size or m)]

    def measure(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None) -> dict[str, float]:
        """Measure now on the subset of (x, y); the model, its flags and the caller's random streams are kept."""
        return self.measure_batches(model, self.batches(x, y), loss_fn)

    def measure_batches(self, model: nn.Module, batches: list[Any], loss_fn: LossFn | None = None) -> dict[str, float]:
        """Measure now on these batches (pairs, or any structure the probe's `batch_loss` reads)."""
        dev = next(model.parameters()).device
        t = time.perf_counter()
        # some instruments draw from the global generator (e.g. HVP method timing): keep the caller's stream
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            try:
                loss = None if self.objective["batch_loss"] is not None else loss_fn or self.loss_fn
                metrics, matvecs = self._inst.measure(self, model, loss, batches)
            except ValueError as err:
                raise SpecError(f"{self.where}: {err}") from None
        dt = time.perf_counter() - t
        self.seconds += dt
        self.matvecs += matvecs
        self.measurements += 1
        out = {k + self._suffix: float(v) for k, v in metrics.items()}
        out[self.seconds_name] = dt
        return out


def _n_params(model: nn.Module, wrt: Wrt = None) -> int:
    return sum(p.numel() for _, p in select_parameters(model, wrt))


def _check_unique(probes: Sequence[Probe]) -> None:
    """Two probes writing one metric name would overwrite each other in the store."""
    owner: dict[str, Probe] = {}
    for p in probes:
        for name in p.metric_names:
            if name in owner:
                raise SpecError(f"{owner[name].where} and {p.where} both record {name!r}; "
                                "set options.label on one of them")
            owner[name] = p


def probes_for(spec: RunSpec, loss_fn: LossFn | None = None) -> list[Probe]:
    """The run's `probes` as training-loop callbacks (validated: a bad probe raises a one-line SpecError),
    measuring `loss_fn`, by default the run's own loss (`spec.loss`)."""
    if loss_fn is None:
        loss_fn = loss_for(spec).fn if spec.probes else F.cross_entropy  # no probes: nothing to import
    # a full-batch run has no batch size of its own: measure the subset in one batch
    batch = None if spec.train.full_batch else spec.train.batch_size
    probes = [Probe(p, loss_fn, train_batch_size=batch, where=f"probes[{i}]") for i, p in enumerate(spec.probes)]
    _check_unique(probes)
    return probes


def _as_spec(item: ProbeSpec | str | dict, defaults: dict[str, Any], where: str) -> ProbeSpec:
    if isinstance(item, ProbeSpec):
        return item
    body = {**defaults, "instrument": item} if isinstance(item, str) else {**defaults, **item}
    try:
        return ProbeSpec.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise SpecError(f"{where}: {loc}: {first['msg']}") from None


# -- probes in a user's own training loop -------------------------------------------------------
UserData = Dataset | tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]


@dataclass
class _Kept:
    """The measured examples of batches that are not (inputs, targets) pairs: one batch of `n` examples."""

    batch: Any
    n: int


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)


class TrajectoryProbes:
    """Probes for your own training loop: call `step(step, model, loss_fn, data)` once per step.

    `probes`: ProbeSpecs (used as given), or instrument names / dicts, which take the schedule and
    subset settings given here (`schedule` may be an int k: every k steps). Step 0 is the initial
    weights, step s the weights after s updates. `log` schedules need `total_steps`; `epoch` schedules
    need `steps_per_epoch` (either may be given later through `plan`, as the Lightning and HuggingFace
    callbacks do). With a `store`, metrics go to run `run_id` (registered if absent, with a spec
    describing the probes); `history` always keeps them in memory as (step, metrics) rows; `sinks`
    (batchscope.sinks: TensorBoard, MLflow) get each measured row (the caller closes them). `batch_loss(model,
    (x, y))` measures that instead of `loss_fn(model(x), y)` (then `step` may take loss_fn=None), e.g. a
    HuggingFace model's `model(input_ids=x, labels=y).loss`; `wrt` measures some parameters only (a name glob,
    a re.Pattern, a module or a list of them; see `batchscope.curvature`).

    `data` is a `Dataset`, a pair of tensors (inputs, targets), or any iterable of such pairs (a
    DataLoader): the probes measure its first `subset` examples. With `batch_loss`, the iterable's batches may
    have any structure (dicts, HuggingFace BatchEncodings): their first `subset` examples are joined into one
    batch (the batches' per-example tensors need equal trailing shapes, e.g. sequences padded to one length).
    An iterable is read only until it has given them, once (while `step` gets that same object), and they are
    kept, so a shuffling loader still gives a fixed subset; probes without a batch size of their own then measure
    in its first batch's size.
    """

    def __init__(
        self,
        probes: Sequence[ProbeSpec | str | dict],
        *,
        schedule: Literal["log", "every", "epoch"] | int = "log",
        points: int = 20,
        every: int | None = None,
        subset: int = 1000,
        batch_size: int | None = None,
        bn_mode: Literal["eval", "train"] = "eval",
        store: Store | None = None,
        run_id: str | None = None,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        sinks: Sequence[Sink] = (),
        batch_loss: BatchLoss | None = None,
        wrt: Wrt = None,
    ) -> None:
        if isinstance(schedule, int) and not isinstance(schedule, bool):
            schedule, every = "every", schedule
        defaults = {"schedule": schedule, "points": points, "every": every, "subset": subset,
                    "batch_size": batch_size, "bn_mode": bn_mode}
        specs = [_as_spec(p, defaults, f"probes[{i}]") for i, p in enumerate(probes)]
        self.probes = [Probe(s, where=f"probes[{i}]", batch_loss=batch_loss, wrt=wrt) for i, s in enumerate(specs)]
        _check_unique(self.probes)
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self._due: list[Callable[[int], bool]] | None = None
        try:
            self.plan(total_steps, steps_per_epoch)
        except SpecError:
            pass  # the length may come through `plan` (a Trainer's callback); else the first `step` says what is missing
        self.history: list[tuple[int, dict[str, float]]] = []
        self.sinks = tuple(sinks)
        self._source: object = None  # the iterable the kept subset was read from
        self._kept: tuple[Tensor, Tensor] | _Kept | None = None
        self.store, self.run_id = store, run_id
        if store is not None:
            if not run_id:
                raise SpecError("run_id: needed to record probes to a store")
            if store.get_run(run_id) is None:
                store.add_run(run_id, {
                    "name": run_id,
                    "kind": "trajectory_probes",
                    "probes": [s.model_dump(mode="json") for s in specs],
                    "total_steps": total_steps,
                    "steps_per_epoch": steps_per_epoch,
                    "tags": {},
                })

    def plan(self, total_steps: int | None, steps_per_epoch: int | None = None) -> None:
        """(Re)compute the steps at which each probe measures, for a run of `total_steps` updates."""
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self._due = [self._schedule(p) for p in self.probes]

    def _schedule(self, p: Probe) -> Callable[[int], bool]:
        s, total, spe = p.spec, self.total_steps, self.steps_per_epoch
        if s.schedule == "epoch" and spe is None:
            raise SpecError(f"{p.where}: schedule 'epoch' needs steps_per_epoch")
        if total is not None:
            ends = [] if spe is None else sorted(set(range(spe, total + 1, spe)) | {total})
            at = p.steps(total, ends)
            return at.__contains__
        if s.schedule == "log":
            raise SpecError(f"{p.where}: schedule 'log' needs total_steps (points are log-spaced in [1, total])")
        k = s.every if s.schedule == "every" else spe
        return lambda step: step % k == 0  # type: ignore[operator]

    def due(self, step: int) -> list[Probe]:
        """The probes that measure at `step`."""
        if self._due is None:
            self.plan(self.total_steps, self.steps_per_epoch)  # the SpecError naming what the schedule needs
        assert self._due is not None
        return [p for p, is_due in zip(self.probes, self._due) if is_due(step)]

    def step(self, step: int, model: nn.Module, loss_fn: LossFn | None, data: UserData,
             epoch: float | None = None) -> dict[str, float]:
        """Measure the probes due at `step` on (the subset of) the training data; their metrics, or {}."""
        due = self.due(step)
        if not due:
            return {}
        kept = self.subset(data)
        metrics: dict[str, float] = {}
        for p in due:
            if isinstance(kept, _Kept):  # batches of another structure, read by batch_loss
                metrics.update(p.measure_batches(model, p.subset_batches(kept.batch, kept.n), loss_fn))
            else:
                metrics.update(p.measure(model, kept[0], kept[1], loss_fn))
        self.history.append((step, metrics))
        if self.store is not None:
            self.store.log_metrics(self.run_id, step, metrics, epoch)
        for sink in self.sinks:
            sink(step, metrics)
        return metrics

    def subset(self, data: UserData) -> tuple[Tensor, Tensor] | _Kept:
        """(inputs, targets) holding at least the measured examples of `data` (each probe takes its first `subset`);
        for batches of another structure (dicts, BatchEncodings; with `batch_loss`), them joined into one."""
        if isinstance(data, Dataset):
            return data.x_train, data.y_train
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            return data[0], data[1]
        if self._kept is None or self._source is not data:
            self._kept, self._source = self._read(data), data
        return self._kept

    def _read(self, data: Iterable[Any]) -> tuple[Tensor, Tensor] | _Kept:
        """The first `subset` examples (the most any probe measures) of an iterable of batches."""
        need = max(p.spec.subset for p in self.probes)
        # a shuffling loader draws its order from the global generator: the caller's stream must not move
        with torch.random.fork_rng(devices=[]):
            if any(p.objective["batch_loss"] is not None for p in self.probes):
                try:
                    peek = iter(data)
                except TypeError:
                    peek = None
                first = next(peek, None) if peek is not None else None
                if first is not None and not _is_pair(first):
                    return self._read_any(first, peek, need)
                if peek is not None:
                    data = itertools.chain([] if first is None else [first], peek)  # one pass over a one-shot iterator
            xs, ys = self._first(data, need)
        for p in self.probes:  # a probe without a batch size measures in the loader's batches
            if p.spec.batch_size is None and p.batch_size is None:
                p.batch_size = xs[0].shape[0]
        return torch.cat(xs)[:need], torch.cat(ys)[:need]

    def _read_any(self, first: Any, rest: Any, need: int) -> _Kept:
        """Batches of any structure, joined into one of at least `need` examples (all if fewer)."""
        parts = [(leading_size(first), first)]
        n = parts[0][0]
        for item in rest:
            if n >= need:
                break  # read no more of the loader than the subset
            parts.append((leading_size(item), item))
            n += parts[-1][0]
        for p in self.probes:  # a probe without a batch size measures in the loader's batches
            if p.spec.batch_size is None and p.batch_size is None:
                p.batch_size = parts[0][0]
        return _Kept(concat(parts), n)

    @staticmethod
    def _first(data: Iterable[tuple[Tensor, Tensor]], need: int) -> tuple[list[Tensor], list[Tensor]]:
        try:
            batches = iter(data)
        except TypeError:
            raise TypeError(f"data: expected a Dataset, a pair of tensors (inputs, targets) or an iterable of them "
                            f"(a DataLoader), got {type(data).__name__}") from None
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        n = 0
        for i, item in enumerate(batches):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)):
                raise TypeError(f"data: batch {i} is a {type(item).__name__}, not a pair of tensors (inputs, targets)")
            x, y = item
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"data: batch {i} has {x.shape[0]} inputs and {y.shape[0]} targets")
            xs.append(x)
            ys.append(y)
            n += x.shape[0]
            if n >= need:
                break  # read no more of the loader than the subset
        if not xs:
            raise ValueError("data: no batches")
        return xs, ys

    def flush(self) -> None:
        """Flush the sinks (e.g. at the end of training; each sink's owner closes it)."""
        flush_all(self.sinks)

    def series(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of one metric from `history`, in the order measured."""
        return [(s, m[name]) for s, m in self.history if name in m]

    @property
    def seconds(self) -> float:
        """Total wall-clock seconds spent measuring, all probes."""
        return sum(p.seconds for p in self.probes)
