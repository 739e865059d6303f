"""Loss landscape pictures: linear interpolation between two solutions (Goodfellow et al. 2015; Keskar et
al. 2017, Fig. 3) and 1-D/2-D slices along filter-normalized random directions (Li et al. 2018).

Every value is the loss (or accuracy) over all of `data`, each batch weighted by its size, with the
model in measurement mode (`bn_mode`). The user's model is never modified.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._batch import BatchSizeFn
from ._core import BatchLoss, BNMode, Data, LossFn, MeasurementInfo, Objective, Wrt

Params = Mapping[str, Tensor] | Tensor | nn.Module
_METRICS = ("loss", "accuracy")


# -- shared machinery -------------------------------------------------------------------------
def _check_metrics(metrics: Sequence[str]) -> tuple[bool, bool]:
    bad = [m for m in metrics if m not in _METRICS]
    if bad:
        raise ValueError(f"metrics: unknown {bad}; expected a subset of {_METRICS}")
    return "loss" in metrics, "accuracy" in metrics


def _evaluate(obj: Objective, params: dict[str, Tensor], want_accuracy: bool) -> tuple[float, float | None]:
    """Data-averaged loss and accuracy at `params` (trainable weights, optionally buffers overriding obj.consts).

    Accuracy is argmax over dim 1 of the outputs == targets, over all target elements; it is None
    (undefined) when targets are floating, outputs lack a class dimension (outputs.ndim != targets.ndim + 1),
    or the batches go through `batch_loss` (no outputs and targets to compare).
    """
    defined = want_accuracy and obj.pairs

    def part(batch, n: int) -> tuple[float, int, int]:
        nonlocal defined
        if not obj.pairs:
            return n * float(obj.batch_loss(params, batch)), 0, 0
        x, y = batch
        out = obj.outputs(params, x)
        if defined and (y.is_floating_point() or out.ndim != y.ndim + 1):
            defined = False
        if not defined:
            return n * float(obj.loss_fn(out, y)), 0, 0  # type: ignore[misc]
        return n * float(obj.loss_fn(out, y)), int((out.argmax(dim=1) == y).sum()), y.numel()  # type: ignore[misc]

    with torch.no_grad():
        total, correct, count = obj.accumulate(part)
    return total / obj.n_examples, (correct / count if defined else None)


def _as_vector(obj: Objective, v: Mapping[str, Tensor] | Tensor, what: str) -> Tensor:
    """A direction or weight vector given flat or as a dict of named parameters, as a flat vector."""
    if isinstance(v, Tensor):
        if v.ndim != 1 or v.numel() != obj.n_params:
            raise ValueError(f"{what}: expected a flat vector of {obj.n_params} entries, got shape {tuple(v.shape)}")
        return v.detach().to(device=obj.device, dtype=obj.dtype)
    missing = [n for n in obj.names if n not in v]
    if missing:
        raise ValueError(f"{what}: missing parameters {missing}")
    return obj.flatten([v[n].detach() for n in obj.names])


# -- interpolation ----------------------------------------------------------------------------
@dataclass
class InterpolationResult:
    """Loss and accuracy over all of `data` at theta(alpha) = (1 - alpha) theta_a + alpha theta_b."""

    alphas: Tensor  # (m,) float64
    loss: Tensor | None  # (m,) float64: data-averaged loss
    accuracy: Tensor | None  # (m,) float64 fraction in [0, 1]; None if not asked or undefined
    interpolated_buffers: list[str]  # buffers given in both endpoints and interpolated with alpha
    info: MeasurementInfo


def interpolate(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    params_a: Params,
    params_b: Params,
    alphas: Sequence[float] | Tensor | None = None,
    *,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
    metrics: Sequence[str] = _METRICS,
) -> InterpolationResult:
    """Loss/accuracy along the line through two solutions (alphas=None: Keskar's 25 points in [-1, 2]).

    `params_a`/`params_b` are flat vectors (the trainable parameters in `model.named_parameters()`
    order), dicts of named parameters, state_dicts, or modules (their state_dict). Non-trainable
    entries (buffers such as batch-norm running statistics, frozen parameters) come from `model`
    unless given: given in both endpoints, floating ones are interpolated with the same alpha (as
    Keskar's code does with whole state_dicts) and integer ones (num_batches_tracked) taken from
    `params_a`; given in only one is an error. Interpolated running variances can turn negative for
    alpha outside [0, 1] (then bn_mode="eval" gives nan): bn_mode="train" uses batch statistics instead.
    With `wrt`, flat vectors hold the selected parameters only, and the others stay at the model's values.
    """
    want_loss, want_acc = _check_metrics(metrics)
    with Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method="double_backward",
                   batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt, distributed=distributed) as obj:
        theta_a, extra_a = _endpoint(obj, params_a, "params_a")
        theta_b, extra_b = _endpoint(obj, params_b, "params_b")
        lonely = sorted(set(extra_a) ^ set(extra_b))
        if lonely:
            raise ValueError(f"params_a, params_b: non-trainable entries {lonely} given for one endpoint only")
        mixed = [n for n in extra_a if extra_a[n].is_floating_point()]
        if alphas is None:
            alphas = torch.linspace(-1.0, 2.0, 25, dtype=torch.float64)
        alphas_t = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
        losses, accs = [], []
        for alpha in alphas_t.tolist():
            theta = (1.0 - alpha) * theta_a + alpha * theta_b
            consts = {n: (1.0 - alpha) * extra_a[n] + alpha * extra_b[n] for n in mixed}
            consts.update({n: t for n, t in extra_a.items() if n not in consts})
            loss, acc = _evaluate(obj, {**consts, **obj.unflatten(theta)}, want_acc)
            losses.append(loss)
            accs.append(acc)
        return InterpolationResult(
            alphas=alphas_t,
            loss=torch.tensor(losses, dtype=torch.float64) if want_loss else None,
            accuracy=torch.tensor(accs, dtype=torch.float64) if want_acc and accs and accs[0] is not None else None,
            interpolated_buffers=mixed,
            info=obj.info(n_alphas=len(losses)),
        )


def _endpoint(obj: Objective, params: Params, what: str) -> tuple[Tensor, dict[str, Tensor]]:
    """(flat trainable weights, given non-trainable entries cast like the model's own) of one endpoint."""
    if isinstance(params, nn.Module):
        params = params.state_dict()
    if isinstance(params, Tensor):
        return _as_vector(obj, params, what), {}
    # state_dict keys also name tied parameters under their second name: known, and ignored
    known = set(obj.names) | set(obj.consts) | set(obj.model.state_dict())
    unknown = [n for n in params if n not in known]
    if unknown:
        raise ValueError(f"{what}: entries {unknown} are neither parameters nor buffers of the model")
    # parameters outside `wrt` stay at the model's values: only the selected ones move
    fixed = set(obj.fixed)
    extra = {n: params[n].detach().to(device=obj.device, dtype=obj.consts[n].dtype)
             for n in obj.consts if n in params and n not in fixed}
    return _as_vector(obj, params, what), extra


# -- random slices ----------------------------------------------------------------------------
@dataclass
class SliceResult:
    """Loss (and accuracy) over all of `data` on a grid theta0 + a d_1 (+ b d_2), indexed [i] or [i, j]."""

    coords: tuple[Tensor, ...]  # one (steps,) float64 grid per direction
    loss: Tensor | None  # (steps,) or (steps, steps) float64, loss[i, j] at coords[0][i], coords[1][j]
    accuracy: Tensor | None  # same shape, fraction in [0, 1]; None if not asked or undefined
    directions: Tensor  # (dims, n_params) in the model's dtype, as used
    filter_normalized: bool
    info: MeasurementInfo


def _filter_normalize(obj: Objective, direction: Tensor) -> Tensor:
    """Li et al.'s filter normalization of a flat direction against obj.theta0 (their ignore='biasbn' default).

    For every parameter with >= 2 dimensions, each filter (slice along dim 0: a conv output
    channel, a linear layer's row) is rescaled to the norm of the same filter of the weights
    (d * |w| / (|d| + 1e-10), as in their code); 1-D parameters (biases, batch-norm scales and
    shifts) are zeroed, so the picture shows the weights' landscape only.
    """
    out = []
    weights = obj.unflatten(obj.theta0)
    for name, d in obj.unflatten(direction).items():
        if d.ndim <= 1:
            out.append(torch.zeros_like(d))
            continue
        w = weights[name].reshape(d.shape[0], -1)
        df = d.reshape(d.shape[0], -1)
        out.append(df * (w.norm(dim=1, keepdim=True) / (df.norm(dim=1, keepdim=True) + 1e-10)))
    return obj.flatten(out)


def landscape_slice(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    dims: int = 1,
    *,
    steps: int = 21,
    span: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    filter_normalize: bool = True,
    directions: Sequence[Mapping[str, Tensor] | Tensor] | None = None,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
    metrics: Sequence[str] = _METRICS,
) -> SliceResult:
    """Loss/accuracy on a 1-D or 2-D grid (steps points per axis over `span`) around the model's weights.

    Directions are i.i.d. N(0, 1) (drawn on the CPU from `seed`, so they do not depend on the device),
    filter-normalized as in Li et al. 2018 unless `filter_normalize=False` (then raw Gaussian, biases
    included). Given `directions` (flat vectors or dicts of named parameters, one per dim) are used
    exactly as given. Buffers come from the model.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims: expected 1 or 2, got {dims}")
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    want_loss, want_acc = _check_metrics(metrics)
    with Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method="double_backward",
                   batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt, distributed=distributed) as obj:
        if directions is not None:
            if len(directions) != dims:
                raise ValueError(f"directions: expected {dims}, got {len(directions)}")
            dirs = torch.stack([_as_vector(obj, d, f"directions[{i}]") for i, d in enumerate(directions)])
        else:
            gen = torch.Generator().manual_seed(obj.same_on_all_ranks(seed))
            raw = [torch.randn(obj.n_params, generator=gen, dtype=obj.dtype).to(obj.device) for _ in range(dims)]
            dirs = torch.stack([_filter_normalize(obj, d) if filter_normalize else d for d in raw])
        coords = torch.linspace(span[0], span[1], steps, dtype=torch.float64)
        grid = list(itertools.product(coords.tolist(), repeat=dims))  # row-major: [i, j] = (coords[i], coords[j])
        losses, accs = [], []
        for point in grid:
            theta = obj.theta0.clone()
            for c, d in zip(point, dirs):
                theta += c * d
            loss, acc = _evaluate(obj, obj.unflatten(theta), want_acc)
            losses.append(loss)
            accs.append(acc)
        shape = (steps,) * dims
        return SliceResult(
            coords=(coords,) * dims,
            loss=torch.tensor(losses, dtype=torch.float64).reshape(shape) if want_loss else None,
            accuracy=(
                torch.tensor(accs, dtype=torch.float64).reshape(shape) if want_acc and accs[0] is not None else None
            ),
            directions=dirs,
            filter_normalized=filter_normalize and directions is None,
            info=obj.info(dims=dims, steps=steps, span=tuple(span), seed=seed),
        )

