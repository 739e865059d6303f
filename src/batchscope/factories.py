"""From a spec to the objects of a run: its device, data, model, loss, epoch plan and logged steps.

One module for every path that builds a run (the trainers, preflight, the executors, the studies and the
time estimate), so that each builds it the same way. It sits below training: it knows specs, data and
models, and nothing that trains or stores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Dataset, load_dataset
from .errors import BatchscopeError
from .models import build_model
from .spec import DataSpec, LossSpec, RunSpec, budget_multiplier, is_factory, validate_run
from .userfactories import build_user_model, load_user_data, user_loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BatchscopeError(f"train.device: unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BatchscopeError(f"train.device: {name!r} asked for, but torch sees no CUDA device")
    return dev


def _load(d: DataSpec) -> Dataset:
    if is_factory(d.name):
        return _user_data(d)
    return load_dataset(
        d.name, path=d.path, n_train=d.n_train, n_test=d.n_test, seed=d.seed, label_noise=d.label_noise, **d.options
    )


def _user_data(d: DataSpec) -> Dataset:
    """A user's data as it returned it (not standardized), then the data section's subsets and label noise."""
    from .data.preprocess import add_label_noise

    ds = load_user_data(d.name, d.options, path=d.path, seed=d.seed).subset(d.n_train, d.n_test)
    if d.label_noise > 0:
        if ds.y_train.dim() != 1 or ds.y_train.is_floating_point():
            raise BatchscopeError(f"data {d.name!r}: label_noise needs class labels of shape (N,), got y_train of shape "
                                  f"{tuple(ds.y_train.shape)} and dtype {ds.y_train.dtype}")
        ds = add_label_noise(ds, d.label_noise, d.seed)
    return ds


@functools.lru_cache(maxsize=4)
def _load_cached(key: str, device: str, dtype: str) -> Dataset:
    return _load(DataSpec.model_validate_json(key)).to(torch.device(device), getattr(torch, dtype))


def dataset_for(spec: RunSpec, device: torch.device) -> Dataset:
    """The run's data on its device, shared between the runs of a sweep that use the same data."""
    return _load_cached(spec.data.model_dump_json(), str(device), spec.train.dtype)


def forget_datasets() -> None:
    """Drop the data sets `dataset_for` holds (the --nproc launcher: its workers load their own)."""
    _load_cached.cache_clear()


def train_size(data: DataSpec | Mapping[str, Any]) -> int:
    """Training examples of a data section (a DataSpec or its dict), as a run on it counts them."""
    d = data if isinstance(data, DataSpec) else validate_run({"data": dict(data)}).data
    return _train_size(d.model_dump_json())


@functools.lru_cache(maxsize=None)
def _train_size(key: str) -> int:
    # a count, not the tensors: loaded once per distinct data section, then only the number is kept
    return _load(DataSpec.model_validate_json(key)).n_train


def model_for(spec: RunSpec, ds: Dataset, device: torch.device) -> nn.Module:
    """The architecture (or the user's model), initialized from the run's init seed alone."""
    m = spec.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seeds.init)
        if is_factory(m.name):
            model = build_user_model(m.name, m.options, input_shape=tuple(ds.input_shape), num_classes=ds.num_classes)
            return model.to(device=device, dtype=getattr(torch, spec.train.dtype))
        model = build_model(
            m.name,
            input_shape=tuple(ds.input_shape),
            num_classes=ds.num_classes,
            width=m.width,
            depth=m.depth,
            norm=m.norm,
            ghost_size=m.ghost_size,
            dropout=m.dropout,
        )
    return model.to(device=device, dtype=getattr(torch, spec.train.dtype))


@dataclass(frozen=True)
class Loss:
    """A run's loss: `fn(outputs, targets)` is the mean over the batch (what updates descend and probes measure),
    `total(outputs, targets)` the sum over its examples (evaluation adds them up over chunks of the data)."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    total: Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    if out.dim() > 2 and out.shape[:-1] == y.shape:  # token-level: classes along the last dimension
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def _cross_entropy_total(out: Tensor, y: Tensor) -> Tensor:
    if out.dim() == 2:  # the classification sum itself, so that built-in runs keep their numbers to the last bit
        return F.cross_entropy(out, y, reduction="sum")
    return _cross_entropy(out, y) * y.shape[0]


def _mse(out: Tensor, y: Tensor) -> Tensor:
    if out.shape != y.shape and out.numel() == y.numel():  # (N, 1) outputs for (N,) targets: no broadcasting
        out = out.reshape(y.shape)
    return F.mse_loss(out, y)


def _per_example_mean(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda out, y: fn(out, y) * y.shape[0]


def loss_for(spec: RunSpec | LossSpec) -> Loss:
    """The run's loss (a user's is imported here)."""
    s = spec.loss if isinstance(spec, RunSpec) else spec
    if s.name == "cross_entropy":
        return Loss(s.name, _cross_entropy, _cross_entropy_total)
    if s.name == "mse":
        return Loss(s.name, _mse, _per_example_mean(_mse))
    fn = user_loss(s.name, s.options)
    return Loss(s.name, fn, _per_example_mean(fn))


def correct(out: Tensor, y: Tensor) -> Tensor | None:
    """Examples classified right, summed over the batch (token-level: each example's fraction of tokens right), or
    None where accuracy means nothing: targets that are not integer labels scored by the outputs' last dimension."""
    if y.is_floating_point() or out.shape[:-1] != y.shape:
        return None
    hits = out.argmax(-1) == y
    return hits.sum() if y.dim() == 1 else hits.flatten(1).double().mean(1).sum()


def check_objective(spec: RunSpec, model: nn.Module, ds: Dataset) -> None:
    """What the data, model and loss must agree on, checked on two training examples in eval mode (so no state
    changes): the loss gives a scalar on the model's outputs; accuracy exists for a stopping rule on it; inputs are
    floats for adversarial training. One line on failure, naming what disagrees."""
    loss = loss_for(spec)
    dev = next(iter(model.parameters())).device
    x, y = ds.x_train[:2].to(dev), ds.y_train[:2].to(dev)
    if spec.train.adversarial is not None and not x.is_floating_point():
        raise BatchscopeError(f"train.adversarial: needs float inputs; data {spec.data.name!r} has {x.dtype} inputs")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
            if not isinstance(out, Tensor):
                raise BatchscopeError(f"model {spec.model.name!r}: returned {type(out).__name__} from forward; expected a tensor")
            try:
                value = loss.fn(out, y)
            except BatchscopeError:
                raise
            except Exception as err:
                raise BatchscopeError(
                    f"loss {loss.name!r}: on outputs of shape {tuple(out.shape)} and targets of shape {tuple(y.shape)} "
                    f"({y.dtype}) raised {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                ) from err
    finally:
        model.train(training)
    if not value.is_floating_point():
        raise BatchscopeError(f"loss {loss.name!r}: returned a {value.dtype} tensor; expected a floating point scalar")
    if spec.train.stop.metric == "train_acc" and correct(out, y) is None:
        raise BatchscopeError(f"train.stop.metric: train_acc needs class labels the outputs score; outputs of shape "
                              f"{tuple(out.shape)} and targets of shape {tuple(y.shape)} ({y.dtype}) have no accuracy")


def epoch_plan(spec: RunSpec, n_train: int) -> list[tuple[int, int]]:
    """(batch size, updates) for each epoch, the last one possibly partial."""
    t = spec.train
    mult = budget_multiplier(spec)

    def batch_at(epoch: int) -> int:
        if t.full_batch:
            return n_train
        b = t.batch_size
        for start, size in t.batch_schedule:
            if epoch >= start:
                b = size
        return min(b, n_train)

    def per_epoch(b: int) -> int:
        return n_train // b if t.drop_last else math.ceil(n_train / b)

    plan: list[tuple[int, int]] = []
    if t.steps is not None:
        left = t.steps * mult
        while left > 0:
            b = batch_at(len(plan))
            k = min(per_epoch(b), left)
            plan.append((b, k))
            left -= k
    else:
        total = t.epochs * mult
        full = int(math.floor(total))
        for e in range(full):
            b = batch_at(e)
            plan.append((b, per_epoch(b)))
        frac = total - full
        if frac > 1e-9:
            b = batch_at(full)
            k = max(1, round(frac * per_epoch(b)))
            plan.append((b, k))
    if not plan or any(k <= 0 for _, k in plan):
        raise BatchscopeError(
            f"train: batch size {t.batch_size} with drop_last leaves no update on {n_train} training examples"
        )
    return plan


def log_steps(plan: list[tuple[int, int]], spec: RunSpec) -> set[int]:
    """Steps after which metrics are taken: 0, log-spaced ones, and every epoch end."""
    total = sum(k for _, k in plan)
    steps = {0, total}
    if spec.log.log_points > 0:
        steps |= {int(round(s)) for s in np.geomspace(1, total, spec.log.log_points)}
    if spec.log.every_epoch:
        steps |= set(np.cumsum([k for _, k in plan]).tolist())
    return steps
