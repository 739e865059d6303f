"""Hessian- and Gauss-Newton-vector products of a softmax cross-entropy loss, with the output block fused.

For logits z = f(theta) and L = CE(z, y), the Hessian-vector product splits at the output:

    H v = J^T H_z (J v) + sum_k (dL/dz_k) (d^2 z_k / d theta^2) v,      H_z = diag(p) - p p^T per row,

and the Gauss-Newton product is the first term alone. The plain double-backward product differentiates
the backward pass of log-softmax a second time, keeping its graph (several tensors of the logits' size)
alive across both passes. Here the output block is applied in closed form, outside autograd, to rows
of the logits: H_z u = p * u - p <p, u> (never a (V, V) matrix), and the model is differentiated once
forward and once backward:

1. one forward pass with forward-mode AD gives z and u = J v together, both on the autograd tape;
2. p = softmax(z), g = dL/dz and w = H_z u are computed from (z, u) without a graph;
3. one backward pass of the pair (z, u) with cotangents (w, g) gives J^T w + (d/dtheta <J v, g>),
   and <J v, g> differentiated with g held fixed is exactly sum_k g_k (d^2 z_k) v: the whole H v.
   For the Gauss-Newton product the cotangent of u is dropped (its backward is skipped).

Autograd cannot differentiate some forward-mode formulas (softmax's in torch 2.x: the attention of a
transformer), so there is a reverse-over-reverse order with the same fused output block: forward z;
a = J^T g with g a leaf (the gradient, graph kept); one backward of <a, v> gives sum_k g_k d^2 z_k v
and, as its derivative in g, J v; one more backward of z gives J^T H_z J v. That is one backward more
than the plain double-backward product, but no pass goes through the loss's graph, and on a large
vocabulary it measured faster than both (bench/bench_crossentropy.py).
`cross_entropy_hvp(method="auto")` tries reverse over forward and falls back on an error;
`objective_hvp(method="auto")` times both on the first product and keeps the faster.

`cross_entropy_hvp` works on any functional model f(params, x) -> logits; `objective_hvp` applies it to
a `batchscope.curvature.Objective` whose loss is `torch.nn.functional.cross_entropy`, summing batches
with the Objective's weights, so it is a drop-in for `Objective.hvp` on classification and language
models (`class_dim=-1` for (batch, time, vocab) logits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._core import Objective, weighted

__all__ = ["cross_entropy_hvp", "objective_hvp", "softmax_hessian_product"]

Curvature = Literal["hessian", "ggn"]
Reduction = Literal["mean", "sum"]
Method = Literal["auto", "reverse_over_forward", "reverse_over_reverse"]


def softmax_hessian_product(p: Tensor, u: Tensor, class_dim: int = -1) -> Tensor:
    """(diag(p) - p p^T) u along `class_dim`, row by row, without forming the matrix: p * (u - <p, u>)."""
    return p * (u - (p * u).sum(class_dim, keepdim=True))


class _Output:
    """F.cross_entropy(z, y) at fixed logits z (class dimension `class_dim`), without a graph: the loss,
    g = dL/dz, and u -> H_z u by the softmax block."""

    def __init__(self, z: Tensor, y: Tensor, class_dim: int, reduction: Reduction, ignore_index: int,
                 label_smoothing: float) -> None:
        self.class_dim = class_dim
        zc = z.detach().movedim(class_dim, -1)  # (..., C): rows of logits
        n_classes = zc.shape[-1]
        keep = y != ignore_index
        one = torch.ones((), dtype=z.dtype, device=z.device)
        scale = one / keep.sum().clamp(min=1).to(z.dtype) if reduction == "mean" else one
        logp = torch.log_softmax(zc, dim=-1)
        y_safe = torch.where(keep, y, torch.zeros_like(y)).unsqueeze(-1)
        self.rowscale = keep.to(z.dtype).unsqueeze(-1) * scale  # 0 on ignored rows
        nll = -(1.0 - label_smoothing) * logp.gather(-1, y_safe)
        if label_smoothing:
            nll = nll - label_smoothing / n_classes * logp.sum(-1, keepdim=True)
        self.loss = float((nll * self.rowscale).sum())
        self.p = logp.exp_()  # in place: logp is not needed any more (one logits-sized tensor fewer)
        del logp
        # g = p - q, q the target distribution: one-hot, smoothed towards uniform by label_smoothing
        g = self.p.sub(label_smoothing / n_classes) if label_smoothing else self.p.clone()
        g.scatter_add_(-1, y_safe, torch.full(y_safe.shape, -(1.0 - label_smoothing), dtype=z.dtype, device=z.device))
        self.g = g.mul_(self.rowscale).movedim(-1, class_dim)

    def hessian_product(self, u: Tensor) -> Tensor:
        uc = u.detach().movedim(self.class_dim, -1)
        w = self.p * uc  # p * (u - <p, u>) * rowscale, with one temporary of the logits' size
        torch.sub(uc, w.sum(-1, keepdim=True), out=w)
        return w.mul_(self.p).mul_(self.rowscale).movedim(-1, self.class_dim)


def cross_entropy_hvp(
    fn: Callable[[dict[str, Tensor], Tensor], Tensor],
    params: dict[str, Tensor],
    v: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    curvature: Curvature = "hessian",
    method: Method = "auto",
    class_dim: int = 1,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[dict[str, Tensor], float]:
    """(H v, loss) for L(params) = F.cross_entropy(fn(params, x), y, ...), H its Hessian ("hessian") or
    Gauss-Newton matrix ("ggn"), with the softmax block applied in closed form.

    `class_dim` is the logits' class dimension: 1 as `F.cross_entropy` expects ((N, C) or (N, C, d...)),
    or -1 for (batch, time, vocab) logits with (batch, time) targets. `method`: "reverse_over_forward"
    (one forward-mode pass and one backward), "reverse_over_reverse" (forward, backward, double backward,
    backward: for models whose forward-mode formulas autograd cannot differentiate, softmax attention
    among them in torch 2.x), or "auto" (the first, falling back to the second on such an error).
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature: expected 'hessian' or 'ggn', got {curvature!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    if method not in ("auto", "reverse_over_forward", "reverse_over_reverse"):
        raise ValueError(f"method: expected 'auto', 'reverse_over_forward' or 'reverse_over_reverse', got {method!r}")
    grads, loss, _ = _dispatch(fn, params, v, x, y, curvature, method, (class_dim, reduction, ignore_index, label_smoothing))
    return grads, loss


def _dispatch(fn, params, v, x, y, curvature, method, opts) -> tuple[dict[str, Tensor], float, str]:
    """(H v, loss, the method used)."""
    names = list(params)
    if method != "reverse_over_reverse":
        try:
            grads, loss = _rev_over_fwd(fn, params, v, x, y, names, curvature, opts)
            method = "reverse_over_forward"
        except RuntimeError:  # a forward-mode formula autograd cannot differentiate, or none at all
            if method != "auto":
                raise
            method = "reverse_over_reverse"
    if method == "reverse_over_reverse":
        grads, loss = _rev_over_rev(fn, params, v, x, y, names, curvature, opts)
    out = {n: (torch.zeros_like(params[n]) if gr is None else gr.detach()) for n, gr in zip(names, grads)}
    return out, loss, method


def _rev_over_fwd(fn, params, v, x, y, names, curvature, opts):
    """One forward pass with forward-mode AD on the tape gives z and u = J v; one backward of (z, u) with
    cotangents (H_z u, g) gives J^T H_z u + d<J v, g>/dtheta (g fixed) = H v."""
    leaves = [params[n].detach().requires_grad_(True) for n in names]
    with torch.enable_grad(), fwAD.dual_level():
        dual = {n: fwAD.make_dual(t, v[n].to(t.dtype)) for n, t in zip(names, leaves)}
        z, u = fwAD.unpack_dual(fn(dual, x))
        if u is None:  # the logits do not depend on params along v
            u = torch.zeros_like(z)
        out = _Output(z, y, *opts)
        w = out.hessian_product(u)
        if curvature == "hessian" and u.requires_grad:
            outs, cots = (z, u), (w, out.g)
        else:
            outs, cots = (z,), (w,)
        grads = torch.autograd.grad(outs, leaves, grad_outputs=cots, allow_unused=True)
    return grads, out.loss


def _rev_over_rev(fn, params, v, x, y, names, curvature, opts):
    """Forward z; a = J^T g with g a leaf (first backward, graph kept); one backward of <a, v> gives
    (d<a, v>/dtheta, d<a, v>/dg) = (sum_k g_k d^2 z_k v, J v); then J^T H_z (J v) by a backward of z."""
    leaves = [params[n].detach().requires_grad_(True) for n in names]
    with torch.enable_grad():
        z = fn(dict(zip(names, leaves)), x)
        out = _Output(z, y, *opts)
        g = out.g.detach().requires_grad_(True)
        a = torch.autograd.grad(z, leaves, grad_outputs=g, create_graph=True, allow_unused=True)
        used = [i for i, ai in enumerate(a) if ai is not None and ai.requires_grad]
        wrt = ([leaves[i] for i in range(len(leaves))] if curvature == "hessian" else []) + [g]
        res = torch.autograd.grad([a[i] for i in used], wrt, grad_outputs=[v[names[i]].to(leaves[i].dtype) for i in used],
                                  allow_unused=True, retain_graph=True)
        u = res[-1] if res[-1] is not None else torch.zeros_like(z)
        jtw = torch.autograd.grad(z, leaves, grad_outputs=out.hessian_product(u), allow_unused=True)
    if curvature == "ggn":
        return jtw, out.loss
    return [s if t is None else (t if s is None else s + t) for s, t in zip(res[:-1], jtw)], out.loss


def objective_hvp(
    obj: Objective,
    v: Tensor,
    theta: Tensor | None = None,
    *,
    curvature: Curvature = "hessian",
    method: Method = "auto",
    class_dim: int = 1,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """H v (or G v) of an `Objective` whose loss_fn is `F.cross_entropy` with mean reduction (with
    these `ignore_index` and `label_smoothing`), summed over its batches with its weights: the fused
    counterpart of `Objective.hvp`. Use inside `with obj:` (measurement mode). Counts a product in
    `obj.matvecs`. With method="auto" the first product times both orders on the largest batch (after a
    warm-up of each) and keeps the faster for this Objective and curvature, as `Objective` picks its own
    HVP method: which wins depends on the model (on a 50k-vocabulary embedding LM on one CPU thread,
    reverse over reverse; see bench/bench_crossentropy.py)."""
    theta = obj.theta0 if theta is None else theta
    params = obj.unflatten(theta.detach())
    vd = obj.unflatten(v.detach())
    opts = (class_dim, "mean", ignore_index, label_smoothing)
    picks = obj.__dict__.setdefault("_ce_hvp_methods", {})
    auto = method == "auto"
    if auto:  # resolved on the first product, then kept for this Objective and curvature
        method = picks.get(curvature) or _pick(obj, params, vd, curvature, opts)
        picks[curvature] = method
    if not obj.pairs:
        raise ValueError("objective_hvp: needs (inputs, targets) batches and loss_fn=F.cross_entropy, not batch_loss")

    def part(batch: Any, n: int) -> tuple[Tensor]:
        x, y = batch
        hv, _, _ = _dispatch(obj.outputs, params, vd, x, y, curvature, method, opts)
        return (weighted(obj.flatten(hv[k] for k in obj.names), n),)

    (out,) = obj.accumulate(part)  # the one loop over the data (streamed or kept; summed over ranks)
    obj.matvecs += 1
    return (out / obj.n_examples).to(obj.dtype)


def _pick(obj: Objective, params, vd, curvature, opts) -> str:
    """The faster of the two orders on the largest batch (one warm-up and one timed product each); reverse
    over reverse where the other fails."""
    _, (x, y) = obj.data.representative()
    sync = torch.cuda.synchronize if obj.device.type == "cuda" else (lambda: None)
    best, best_t = "reverse_over_reverse", float("inf")
    for name in ("reverse_over_forward", "reverse_over_reverse"):
        try:
            for _ in range(2):
                sync()
                t = time.perf_counter()
                _dispatch(obj.outputs, params, vd, x, y, curvature, name, opts)
                sync()
                t = time.perf_counter() - t
        except RuntimeError:  # a forward-mode formula autograd cannot differentiate (softmax attention)
            continue
        if t < best_t:
            best, best_t = name, t
    return best
