"""The runs of an advice, as specs: the reference run at B0, the branches from its checkpoints, the recipe arms.

Every run is an ordinary stored run (a sweep of them trains only what is not done, and resumes what was
interrupted), so an advice that stops half way picks up where it stopped. A branch is a warm start from one
of the reference's checkpoints (`train.warm_start`): the model's weights, a fresh optimizer.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import BatchscopeError
from ..spec import RunSpec, validate_run
from .fit import LR_RULES, lr_for, rule_for

_TARGET = re.compile(r"^\s*(train_loss|test_loss|train_acc|test_acc|train_error|test_error)\s*(<=|>=|=)?\s*([0-9.eE+-]+)\s*$")
_LOWER_IS_BETTER = ("train_loss", "test_loss", "train_error", "test_error")


@dataclass(frozen=True)
class Target:
    """What "reached" means: a metric and its threshold (losses and errors at or below it, accuracies at or above)."""

    metric: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Target:
        m = _TARGET.match(text)
        if m is None:
            raise BatchscopeError(
                f"target {text!r}: expected METRIC<=VALUE or METRIC>=VALUE with METRIC one of train_loss, test_loss, "
                "train_acc, test_acc, train_error, test_error (e.g. 'train_loss<=0.3' or 'test_error<=0.25')"
            )
        metric, op, value = m.group(1), m.group(2), float(m.group(3))
        lower = metric in _LOWER_IS_BETTER
        if op is not None and op != "=" and (op == "<=") != lower:
            raise BatchscopeError(f"target {text!r}: {metric} is reached {'at or below' if lower else 'at or above'} its value")
        if metric.endswith(("acc", "error")) and not 0 < value < 1:
            raise BatchscopeError(f"target {text!r}: an accuracy or error is a fraction between 0 and 1")
        return cls(metric, value)

    @property
    def stored(self) -> str:
        """The stored metric the target reads (errors are 1 - accuracy)."""
        return self.metric.replace("_error", "_acc")

    def value(self, stored_value: float) -> float:
        """The stored metric turned into a number that falls as training goes on (losses, errors)."""
        return 1.0 - stored_value if self.metric.endswith("acc") or self.metric.endswith("error") else stored_value

    @property
    def level(self) -> float:
        """The threshold on the falling scale of `value`."""
        return 1.0 - self.threshold if self.metric.endswith("acc") else self.threshold

    def __str__(self) -> str:
        return f"{self.metric} {'<=' if self.metric in _LOWER_IS_BETTER else '>='} {self.threshold:g}"


@dataclass
class AdviseOptions:
    """How an advice is measured. Defaults are the quick settings; every one is stated in the report."""

    target: str | None = None
    """METRIC<=VALUE or METRIC>=VALUE (see `Target`); None: the training loss B0 reaches in half the spec's budget."""
    b0: int | None = None
    """The small reference batch (default: the spec's train.batch_size)."""
    lr: float | None = None
    """B0's learning rate (default: the spec's optim.lr, or the best of `reference_lrs`)."""
    reference_lrs: tuple[float, ...] = ()
    """Learning rates tried at B0 when `lr` is not given (a sweep's optim.lr axis): the reference is the one that
    reaches the target in the fewest steps (no target: the lowest final training loss)."""
    doublings: int = 6
    """Branches at B0 x 2^k for k = 0..doublings (capped at the training set)."""
    lr_rule: str = "auto"
    """linear, sqrt, none, or auto: the optimizer's (linear for sgd and lars, sqrt for adam, adamw and lamb)."""
    lr_grid: tuple[float, ...] = (1.0, 0.5)
    """Multipliers of the rule's learning rate tried at every larger batch; the best (fewest steps) is kept."""
    checkpoints: int = 4
    """At most this many of the reference's checkpoints (epoch 0, 1/8, 1/4 and 1/2 of the first epoch, and every power of
    2 of epochs, before the target) branch."""
    window: float = 1.0
    """Epochs of examples the B0 branch trains from a checkpoint; its loss there is the window's loss. A reference
    that reaches the target sooner than in two windows gets windows of half its examples to the target."""
    cap: float = 8.0
    """Larger batches get up to cap x window examples to reach the window's loss."""
    tolerance: float = 0.05
    """CBS(t): the largest batch whose loss after the window is within (1 + tolerance) x B0's (Merrill et al.)."""
    noise_pairs: int = 50
    noise_examples: int = 4096
    curvature: bool = False
    """Also the curvature-weighted B_noise (2 Hessian-vector products over the examples per pair)."""
    move_to: int | None = None
    """B1 for the recipe check (default: the recommended batch, at least 4 x B0)."""
    log_points: int = 30

    def check(self) -> None:
        if self.lr_rule not in (*LR_RULES, "auto"):
            raise BatchscopeError(f"lr rule {self.lr_rule!r}: expected auto, {', '.join(LR_RULES)}")
        if not self.lr_grid or any(m <= 0 for m in self.lr_grid):
            raise BatchscopeError(f"lr grid {self.lr_grid}: expected positive multipliers")
        for name in ("doublings", "checkpoints", "noise_pairs", "noise_examples"):
            if getattr(self, name) < (2 if name in ("doublings", "noise_pairs") else 1):
                raise BatchscopeError(f"{name}: expected at least {2 if name in ('doublings', 'noise_pairs') else 1}, "
                                      f"got {getattr(self, name)}")
        if self.window <= 0 or self.cap < 1 or self.tolerance <= 0:
            raise BatchscopeError("window > 0, cap >= 1 and tolerance > 0 expected")
        if self.b0 is not None and self.b0 < 1 or self.lr is not None and self.lr <= 0:
            raise BatchscopeError(f"b0 and lr: expected positive values, got {self.b0}, {self.lr}")
        if self.target is not None:
            Target.parse(self.target)


@dataclass
class Branch:
    """One branch: from the reference's checkpoint `point` (epoch_E or step_S), batch `batch` at learning rate `lr`."""

    point: str
    batch: int
    lr: float
    multiplier: float
    spec: RunSpec
    arm: str = ""  # a recipe arm's name; "" for the batch-size branches
    budget_examples: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def _epochs_budget(spec: RunSpec, n_train: int) -> float:
    if spec.train.epochs is not None:
        return float(spec.train.epochs)
    assert spec.train.steps is not None
    return spec.train.steps * spec.train.batch_size / n_train


def reference_spec(base: RunSpec, opts: AdviseOptions, n_train: int, lr: float | None = None) -> RunSpec:
    """B0 at the spec's learning rate, checkpoints at epoch 0, inside the first epoch and at every power of 2 of epochs
    within the budget; it stops at the
    target when the target is a training metric (test metrics are read from its log)."""
    body = base.model_dump(mode="python")
    b0 = opts.b0 or base.train.batch_size
    epochs = _epochs_budget(base, n_train)
    body["train"].update(batch_size=b0, epochs=epochs, steps=None)
    body["optim"]["lr"] = lr or opts.lr or base.optim.lr
    body["log"]["checkpoint_epochs"] = [0] + [2**i for i in range(0, 30) if 2**i < epochs]
    # inside the first epoch too, so that a run that reaches its target early still has points to branch from
    per_epoch = math.ceil(n_train / b0)
    body["log"]["checkpoint_steps"] = sorted({per_epoch // d for d in (8, 4, 2) if per_epoch // d >= 1} - {per_epoch})
    body["log"]["log_points"] = max(body["log"]["log_points"], opts.log_points)
    body["probes"] = []
    target = Target.parse(opts.target) if opts.target is not None else None
    if target is not None and target.stored.startswith("train_"):
        body["train"]["stop"] = {"metric": target.stored, "threshold": target.threshold}
    body["tags"] = {**body["tags"], "advise": "reference"}
    return validate_run(body)


def _source_overrides(reference: RunSpec, branch_body: dict) -> dict[str, Any]:
    """The dotted overrides that turn a branch's body back into the reference's spec (warm_start.source)."""
    ref = reference.model_dump(mode="python")
    out: dict[str, Any] = {}
    for section in ("train", "optim", "log", "model", "schedule"):
        for key, value in ref[section].items():
            if key == "warm_start":
                continue
            if branch_body[section].get(key) != value:
                out[f"{section}.{key}"] = copy.deepcopy(value)
    return out


def start_at(point: str) -> dict[str, int]:
    """A checkpoint's tag (epoch_E, step_S) as the warm start's field."""
    kind, value = point.split("_")
    return {kind: int(value)}


def branch_spec(reference: RunSpec, point: str, batch: int, lr: float, budget_epochs: float, stop_loss: float | None,
                opts: AdviseOptions, *, tags: dict[str, Any], edit: dict[str, Any] | None = None) -> RunSpec:
    """A warm start from the reference's checkpoint `point`: `batch`, `lr`, `budget_epochs` of examples, stopping
    once the training loss is at or below `stop_loss` (None: trains its whole budget). `edit`: more dotted overrides
    (a recipe arm's, e.g. ghost batch norm or a batch schedule)."""
    body = reference.model_dump(mode="python")
    body["train"].update(batch_size=batch, epochs=budget_epochs, steps=None, regime_adaptation=False,
                         stop={"metric": "train_loss", "threshold": stop_loss} if stop_loss is not None else {})
    body["optim"]["lr"] = lr
    # no warm-up, no decay: a branch measures the batch size at this point of training, at a constant rate
    body["schedule"].update(name="constant", milestones=[], warmup_epochs=0.0, scaling="none")
    body["log"].update(checkpoint_epochs=[], checkpoint_steps=[], log_points=opts.log_points)
    for path, value in (edit or {}).items():
        section, key = path.split(".", 1)
        body[section][key] = value
    body["train"]["warm_start"] = {"source": _source_overrides(reference, body), **start_at(point)}
    body["tags"] = {**{k: v for k, v in reference.tags.items() if k != "advise"}, **tags}
    return validate_run(body)


def batches(b0: int, doublings: int, n_train: int) -> list[int]:
    """B0 x 2^k, k = 0..doublings, below the training set's size (a batch of all of it is gradient descent)."""
    out = [b0 * 2**k for k in range(doublings + 1)]
    return [b for b in out if b <= n_train]


def lr_rule(base: RunSpec, opts: AdviseOptions) -> str:
    return rule_for(base.optim.name) if opts.lr_rule == "auto" else opts.lr_rule


def window_branches(reference: RunSpec, point: str, opts: AdviseOptions, n_train: int, window: float) -> list[Branch]:
    """The B0 branch of a checkpoint (`window` epochs): the window's loss comes from it, so it runs first and alone."""
    b0, lr0 = reference.train.batch_size, reference.optim.lr
    spec = branch_spec(reference, point, b0, lr0, window, None, opts,
                       tags={"advise": "window", "checkpoint": point, "batch": b0, "lr_multiplier": 1.0})
    return [Branch(point, b0, lr0, 1.0, spec, budget_examples=window * n_train)]


def batch_branches(reference: RunSpec, point: str, window_loss: float, opts: AdviseOptions, n_train: int,
                   rule: str, window: float) -> list[Branch]:
    """Every larger batch of a checkpoint at every learning-rate multiplier: up to cap x window examples, stopping at
    the window's loss."""
    b0, lr0 = reference.train.batch_size, reference.optim.lr
    out = []
    for b in batches(b0, opts.doublings, n_train)[1:]:
        for m in opts.lr_grid:
            lr = lr_for(lr0, b0, b, rule) * m
            spec = branch_spec(reference, point, b, lr, window * opts.cap, window_loss, opts,
                               tags={"advise": "branch", "checkpoint": point, "batch": b, "lr_multiplier": m})
            out.append(Branch(point, b, lr, m, spec, budget_examples=window * opts.cap * n_train))
    return out


def recipe_arms(reference: RunSpec, point: str, b1: int, opts: AdviseOptions, n_train: int, window: float) -> list[Branch]:
    """The seeds' recipes for a move from B0 to B1, each a branch from one checkpoint over the same window of
    examples as B0 (2 windows), except "as many updates", which gets B1/B0 times the examples (Hoffer et al.):
      B0 (the comparison), linear and square-root learning-rate scaling (Goyal et al.; Hoffer et al.),
      ghost batch norm at B0 (Hoffer et al.; only for a model with batch norm), as many updates as at B0
      (Hoffer et al.'s regime adaptation), and a late batch increase, B0 then B1 for the second half (Smith et
      al.; Li & Li's late raise)."""
    b0, lr0 = reference.train.batch_size, reference.optim.lr
    w = 2 * window
    ratio = b1 / b0
    rule = lr_rule(reference, opts)
    arms: list[tuple[str, int, float, float, dict[str, Any]]] = [
        ("B0", b0, lr0, w, {}),
        ("linear lr", b1, lr_for(lr0, b0, b1, "linear"), w, {}),
        ("sqrt lr", b1, lr_for(lr0, b0, b1, "sqrt"), w, {}),
        ("as many updates", b1, lr_for(lr0, b0, b1, rule), w * ratio, {}),
        # the batch schedule raises at whole epochs of the branch: the first half at B0, at B0's rate
        ("late increase", b0, lr0, w, {"train.batch_schedule": [(max(1, math.ceil(w / 2)), b1)]}),
    ]
    if reference.model.norm == "batch":
        arms.append(("ghost BN at B0", b1, lr_for(lr0, b0, b1, rule), w, {"model.norm": "ghost", "model.ghost_size": b0}))
    out = []
    for name, b, lr, budget, edit in arms:
        if name == "late increase" and w < 2:
            continue  # a whole epoch at each batch size is the least the schedule can express
        spec = branch_spec(reference, point, b, lr, budget, None, opts,
                           tags={"advise": "recipe", "arm": name, "checkpoint": point, "batch": b}, edit=edit)
        out.append(Branch(point, b, lr, 1.0, spec, arm=name, budget_examples=budget * n_train))
    return out
