"""Declarative specs: one training run (`RunSpec`) and a grid of them (`SweepSpec`), in TOML or YAML.

A run is a pure function of its spec: the run id is a hash of the validated spec with every
default filled in, so the same spec always names the same stored run. Labels (`name`, `tags`)
do not enter the hash.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A user's factory: "package.module:callable" (the callable may be an attribute path, e.g. Class.build).
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_factory(name: str) -> bool:
    """Whether a model, data or loss name is a user's "package.module:callable" rather than a built-in name."""
    return ":" in name


def _check_factory(name: str) -> str:
    if is_factory(name) and not _FACTORY.fullmatch(name):
        raise ValueError(f"{name!r}: a user's factory is written 'package.module:callable'")
    return name


class DataSpec(_Spec):
    name: str = "mnist1d"
    """Built-in data set or file format (see `batchscope.data.available_datasets()`), or a user's data factory,
    "package.module:callable", called with `options` as keyword arguments (and `seed`, `path` where it takes them).
    It returns a `batchscope.data.Dataset`; tensors or arrays (x_train, y_train, x_test, y_test), as a tuple or a
    dict with those keys (and optionally num_classes); or (train, test) map-style torch Datasets of (x, y) pairs,
    as a tuple or a dict with keys train and test. A user's data is used as given: not standardized."""
    path: str | None = None
    """Directory (or file) holding a user's copy of MNIST / Fashion-MNIST / CIFAR-10/100; a user's factory gets it
    as its `path` argument."""
    n_train: int | None = Field(None, gt=0)
    n_test: int | None = Field(None, gt=0)
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    """Seed of the data set itself (split, synthetic generation, label noise; MNIST-1D generation takes
    options.data_seed); not of the data order, which is seeds.data."""
    augment: bool = False
    """Random crop with padding (and horizontal flips where they keep the label), as batched tensor ops."""
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _factory_name(cls, v: str) -> str:
        return _check_factory(v)


# ModelSpec's settings of the built-in architectures, with their defaults: a user's model takes `options` instead.
_ARCHITECTURE_SETTINGS = {"width": 1.0, "depth": None, "norm": "none", "ghost_size": 128, "dropout": 0.0}


class ModelSpec(_Spec):
    name: str = "mlp"
    """Built-in architecture (see `batchscope.models.available_models()`), or a user's model factory,
    "package.module:callable", called with `options` as keyword arguments and, where it takes them, `input_shape`
    (one example's shape) and `num_classes` (classes; for float targets, the number of target values per example).
    It returns a `torch.nn.Module`; the run's init seed seeds torch's generator around the call."""
    width: float = Field(1.0, gt=0)
    depth: int | None = Field(None, gt=0)
    norm: Literal["none", "batch", "ghost"] = "none"
    """Batch-norm statistics: "batch" over the whole batch (the global batch, synchronized, on N processes);
    "ghost" over chunks of `ghost_size` (on N processes, each gets whole chunks of every batch)."""
    ghost_size: int = Field(128, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of a user's model factory (the built-in architectures take the settings above)."""

    @field_validator("name")
    @classmethod
    def _factory_name(cls, v: str) -> str:
        return _check_factory(v)

    @model_validator(mode="after")
    def _settings_fit_the_model(self) -> ModelSpec:
        if is_factory(self.name):
            given = [k for k, default in _ARCHITECTURE_SETTINGS.items() if getattr(self, k) != default]
            if given:
                raise ValueError(f"{', '.join(given)}: settings of the built-in architectures; a user's model "
                                 "takes its settings in model.options")
        elif self.options:
            raise ValueError(f"options are a user's model factory's keyword arguments; {self.name} takes "
                             "width, depth, norm, ghost_size and dropout")
        return self


_BUILTIN_LOSSES = ("cross_entropy", "mse")


class LossSpec(_Spec):
    """The loss every update descends, the evaluation reports and the probes measure."""

    name: str = "cross_entropy"
    """cross_entropy: class labels, (N, C) logits and (N,) labels, or token-level, (N, ..., V) logits and (N, ...)
    labels; mse: regression, outputs and float targets with one number of elements per example; or a user's loss,
    "package.module:callable", called as fn(outputs, targets, **options) and returning the mean over the batch as a
    scalar tensor (a pure function of tensors: the fused executor calls it under vmap). Accuracy is reported where the
    targets are integer labels that the outputs' last dimension scores (NaN otherwise, e.g. for regression)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of a user's loss."""

    @model_validator(mode="after")
    def _known(self) -> LossSpec:
        if is_factory(self.name):
            _check_factory(self.name)
        elif self.name not in _BUILTIN_LOSSES:
            raise ValueError(f"{self.name!r}: expected {', '.join(_BUILTIN_LOSSES)} or a user's 'package.module:callable'")
        elif self.options:
            raise ValueError(f"options are a user's loss's keyword arguments; {self.name} takes none")
        return self


class OptimSpec(_Spec):
    name: Literal["sgd", "adam", "adamw", "lars", "lamb"] = "sgd"
    """sgd, adam: torch.optim's (weight decay added to the gradient); adamw: torch.optim.AdamW (weight decay
    decoupled, w <- w (1 - lr wd)); lars (You et al. 2017): SGD with momentum, each weight tensor's step scaled by
    its trust ratio trust_coefficient ||w|| / (||g|| + wd ||w||), with 1-D tensors (biases, norm scales and
    shifts) left out of the ratio and of weight decay; lamb (You et al. 2020): Adam's bias-corrected step plus
    wd w, scaled per tensor by ||w|| / ||step|| (every tensor, as in the paper). A ratio whose norms include a 0
    is 1. See `batchscope.train.optim`."""
    lr: float = Field(0.1, gt=0)
    """Base learning rate, before the scaling rule."""
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    trust_coefficient: float = Field(0.001, gt=0)
    """LARS's eta, the trust coefficient (the paper's 0.001); the other optimizers ignore it."""
    sam_rho: float = Field(0.0, ge=0.0)
    """SAM (Foret et al. 2021) radius on top of the optimizer; 0 turns it off."""
    grad_clip: float | None = Field(None, gt=0)
    """Global gradient-norm clipping before every step (Hoffer et al. used 5.0)."""

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs name='sgd' and momentum > 0")
        return self


class ScheduleSpec(_Spec):
    name: Literal["constant", "step", "cosine"] = "constant"
    milestones: list[float] = Field(default_factory=list)
    """Epochs at which a step schedule multiplies the learning rate by `gamma`."""
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warm-up from 0 to the (scaled) learning rate over this many epochs."""
    scaling: Literal["none", "linear", "sqrt"] = "none"
    """Learning-rate scaling rule: lr * (B / reference_batch) or lr * sqrt(B / reference_batch)."""
    reference_batch: int = Field(256, gt=0)
    min_lr_fraction: float = Field(0.0, ge=0)
    """Cosine schedule ends at this fraction of the peak learning rate."""

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:])) or any(m <= 0 for m in v):
            raise ValueError("milestones must be positive and increasing")
        return v


# Fields added after stores were first written, with their defaults: left out of run ids when at the default.
_LATER_FIELDS = {"train.stop.reduce_lr": None, "train.stop.reductions": 1, "optim.trust_coefficient": 0.001,
                 "train.adversarial": None, "model.options": {}, "loss": {"name": "cross_entropy", "options": {}},
                 "log.checkpoint_steps": [], "train.warm_start.step": None}


def spec_identity(body: dict) -> dict:
    """What identifies a run in a run spec's JSON body: all but its labels (name, tags) and the fields added
    later while at their defaults, so that a spec stored by an older version is the same run."""
    out = copy.deepcopy({k: v for k, v in body.items() if k not in ("name", "tags")})
    for path, default in _LATER_FIELDS.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]
    return out


class StopSpec(_Spec):
    """Stop early when a training metric crosses a threshold, or stops improving."""

    metric: Literal["train_loss", "train_acc"] = "train_loss"
    threshold: float | None = None
    """Stop once train_loss <= threshold (or train_acc >= threshold)."""
    patience: int | None = Field(None, gt=0)
    """Stop after this many evaluations without improvement by at least `min_delta`."""
    min_delta: float = Field(0.0, ge=0)
    reduce_lr: float | None = Field(None, gt=0, lt=1)
    """On a plateau (as `patience` defines it), multiply the learning rate by this factor and go on, up to
    `reductions` times; the plateau after the last reduction stops the run (reduce-on-plateau)."""
    reductions: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _reduce_needs_patience(self) -> StopSpec:
        if self.reduce_lr is not None and self.patience is None:
            raise ValueError("reduce_lr acts on a plateau: set patience too")
        return self


class WarmStartSpec(_Spec):
    """Start from another run's checkpoint (Keskar et al.: small-batch first, then large-batch)."""

    source: dict[str, Any] = Field(default_factory=dict)
    """Overrides (dotted paths) that turn this spec into the source run's spec, e.g. {"train.batch_size": 256}."""
    epoch: int | None = Field(None, ge=0)
    """The source run must list this epoch in `log.checkpoint_epochs`."""
    step: int | None = Field(None, ge=1)
    """Or: the source run must list this step in `log.checkpoint_steps`."""

    @model_validator(mode="after")
    def _one_point(self) -> WarmStartSpec:
        if (self.epoch is None) == (self.step is None):
            raise ValueError("give exactly one of epoch and step")
        return self

    @property
    def tag(self) -> str:
        """The source run's checkpoint this run starts from."""
        return f"epoch_{self.epoch}" if self.epoch is not None else f"step_{self.step}"


class AdversarialSpec(_Spec):
    """Adversarial training (Goodfellow et al. 2015; a remedy in Keskar et al.'s appendix): each update descends
    (1 - mix) x the loss on the batch + mix x the loss on its fast-gradient-sign examples x + eps sign(grad_x loss)."""

    eps: float = Field(..., gt=0)
    """In input units (built-in data are standardized: a fraction of one standard deviation)."""
    mix: float = Field(0.5, gt=0, le=1)


class TrainSpec(_Spec):
    batch_size: int = Field(128, gt=0)
    epochs: float | None = Field(10.0, gt=0)
    steps: int | None = Field(None, gt=0)
    """Budget in updates instead of epochs (set epochs to null)."""
    regime_adaptation: bool = False
    """Hoffer et al.: multiply the budget and the milestones by ceil(B / reference_batch)."""
    full_batch: bool = False
    """Full-batch gradient descent: the batch is the whole training set."""
    drop_last: bool = False
    batch_schedule: list[tuple[float, int]] = Field(default_factory=list)
    """(epoch, batch size) pairs: raise the batch at the start of those epochs (Smith et al.; Li & Li)."""
    warm_start: WarmStartSpec | None = None
    adversarial: AdversarialSpec | None = None
    stop: StopSpec = Field(default_factory=StopSpec)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSpec:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one budget: epochs or steps")
        return self


class SeedSpec(_Spec):
    """Separate random streams, so runs can share an initialization but not a data order."""

    init: int = 0
    data: int = 0
    """Order of the training examples."""
    noise: int = 0
    """Dropout and augmentation."""


class LogSpec(_Spec):
    log_points: int = Field(25, ge=0)
    """Extra evaluations at log-spaced steps (in addition to every epoch)."""
    every_epoch: bool = True
    train_eval_examples: int | None = Field(None, gt=0)
    """Evaluate training metrics on the first n examples (None: all)."""
    checkpoint_epochs: list[int] = Field(default_factory=list)
    checkpoint_steps: list[int] = Field(default_factory=list)
    """Also save the weights after these updates (checkpoint step_N), e.g. inside a first epoch."""
    resume_every_s: float = Field(30.0, ge=0)
    """Write a resume checkpoint at the first epoch end after this many seconds."""


class ProbeSpec(_Spec):
    """A curvature/noise instrument measured along the trajectory on a fixed subset of the training set."""

    instrument: str
    """See `batchscope.probes.available_probes()` (e.g. hessian_top, gradient_covariance, sharpness)."""
    schedule: Literal["log", "every", "epoch"] = "log"
    points: int = Field(20, gt=0)
    """Number of log-spaced steps, for schedule 'log'."""
    every: int | None = Field(None, gt=0)
    """Steps between measurements, for schedule 'every'."""
    subset: int = Field(1000, gt=0)
    """Measure on the first n training examples (the same ones at every step)."""
    batch_size: int | None = Field(None, gt=0)
    """Batches of the subset (with bn_mode 'train' the batch is part of the measurement); None: the training batch size."""
    bn_mode: Literal["eval", "train"] = "eval"
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the instrument (k, tol, eps, ...)."""


class RunSpec(_Spec):
    name: str = "run"
    tags: dict[str, Any] = Field(default_factory=dict)
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    seeds: SeedSpec = Field(default_factory=SeedSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    probes: list[ProbeSpec] = Field(default_factory=list)

    @field_validator("data", "model", "loss", mode="before")
    @classmethod
    def _name_alone(cls, v: Any) -> Any:
        """`model = "pkg.mod:make_model"` is short for `model = {name = "pkg.mod:make_model"}`."""
        return {"name": v} if isinstance(v, str) else v

    def run_id(self) -> str:
        """Stable id: a hash of everything that changes the result (labels excluded)."""
        body = spec_identity(self.model_dump(mode="json"))
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def source_spec(self) -> RunSpec | None:
        """The run this one warm-starts from, or None."""
        ws = self.train.warm_start
        if ws is None:
            return None
        body = self.model_dump(mode="python")
        body["train"]["warm_start"] = None
        for path, value in ws.source.items():
            _set_path(body, path, value)
        return validate_run(body)


class LadderStep(_Spec):
    label: str
    set: dict[str, Any] = Field(default_factory=dict)


class SweepSpec(RunSpec):
    """A base run plus the axes that vary.

    - `grid`: dotted path -> list of values; the lists expand to their product.
      A list-valued setting (milestones) is written as a list of lists.
    - `zip`: groups of dotted paths whose lists vary together (e.g. batch size with learning rate).
    - `ladder`: cumulative interventions; step i applies the overrides of steps 0..i (Hoffer et al.).
    - `seeds_n`: shorthand for seeds.init = seeds.data = seeds.noise = 0..n-1
      (`seeds_offset`..`seeds_offset` + n - 1 with an offset, for a disjoint set of seeds).
    """

    store: str | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    ladder: list[LadderStep] = Field(default_factory=list)
    seeds_n: int | None = Field(None, gt=0)
    seeds_offset: int = Field(0, ge=0)

    def base(self) -> RunSpec:
        return validate_run(self.model_dump(mode="python", include=set(RunSpec.model_fields)))

    def is_grid(self) -> bool:
        return bool(self.grid or self.zip or self.ladder or self.seeds_n)

    def expand(self) -> list[RunSpec]:
        """Every run of the sweep, in a stable order, without duplicates."""
        axes: list[list[dict[str, Any]]] = []
        for path, values in self.grid.items():
            axes.append([{path: v} for v in values])
        for i, group in enumerate(self.zip):
            lengths = {len(v) for v in group.values()}
            if len(lengths) != 1:
                raise SpecError(f"zip[{i}]: the lists must have equal lengths, got {sorted(lengths)}")
            n = lengths.pop()
            axes.append([{p: vals[j] for p, vals in group.items()} for j in range(n)])
        if self.ladder:
            acc: dict[str, Any] = {}
            steps = []
            for step in self.ladder:
                acc = {**acc, **step.set}
                steps.append({**acc, "tags.ladder": step.label})
            axes.append(steps)
        if self.seeds_n:
            axes.append([{"seeds.init": s, "seeds.data": s, "seeds.noise": s, "tags.seed": s}
                         for s in range(self.seeds_offset, self.seeds_offset + self.seeds_n)])
        base = self.base().model_dump(mode="python")
        runs, seen = [], set()
        for combo in itertools.product(*axes) if axes else [()]:
            body = copy.deepcopy(base)
            for overrides in combo:
                seed_axis = "tags.seed" in overrides  # labelled by `seed` alone
                for path, value in overrides.items():
                    _set_path(body, path, value)
                    if not path.startswith("tags.") and not seed_axis:
                        body["tags"][path] = value
            spec = validate_run(body)
            if spec.run_id() not in seen:
                seen.add(spec.run_id())
                runs.append(spec)
        return runs


def _set_path(body: dict, path: str, value: Any) -> None:
    """Set body[a][b][c] = value for path 'a.b.c', refusing unknown fields."""
    keys = path.split(".")
    node = body
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node, dict) or key not in node:
            raise SpecError(f"{path}: unknown setting '{'.'.join(keys[: i + 1])}'")
        node = node[key]
        if node is None:  # e.g. train.warm_start
            raise SpecError(f"{path}: '{'.'.join(keys[: i + 1])}' is not set in the base spec")
    last = keys[-1]
    free_dict = keys[0] in ("tags",) or (len(keys) >= 2 and keys[-2] in ("options", "source"))
    if not isinstance(node, dict) or (last not in node and not free_dict):
        raise SpecError(f"{path}: unknown setting")
    node[last] = value


def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown setting"
    got = f"; got {first['input']!r}" if first["type"] != "extra_forbidden" and not isinstance(first["input"], dict) else ""
    return f"{where}{loc}: {msg}{got}{more}"


def validate_run(body: dict) -> RunSpec:
    try:
        return RunSpec.model_validate(body)
    except ValidationError as err:
        raise SpecError(_format_error(err, "spec: ")) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read a TOML (.toml) or YAML (.yaml/.yml) spec file; one-line SpecError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file (expected a .toml or .yaml file)")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            body = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            body = yaml.safe_load(text) or {}
        else:
            raise SpecError(f"{path}: unknown spec format '{path.suffix}' (expected .toml, .yaml or .yml)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        detail = str(err).splitlines()[0]
        raise SpecError(f"{path}: not valid {path.suffix[1:].upper()}: {detail}") from None
    if not isinstance(body, dict):
        raise SpecError(f"{path}: expected a mapping of settings at the top level")
    try:
        return SweepSpec.model_validate(body)
    except ValidationError as err:
        raise SpecError(_format_error(err, f"{path}: ")) from None


def budget_multiplier(spec: RunSpec) -> int:
    """Regime adaptation (Hoffer et al.): ceil(B / reference) times the small-batch budget, else 1."""
    if not spec.train.regime_adaptation:
        return 1
    return math.ceil(spec.train.batch_size / spec.schedule.reference_batch)
