"""The training loss as a pure function of one flat parameter vector.

Every instrument in `batchscope.curvature` measures f(theta) = sum_b (n_b / N) loss_fn(model(x_b; theta), y_b),
the loss averaged over all of `data` (each batch weighted by its size), with the model in a
measurement configuration (dropout off; batch norm in eval mode or with per-batch statistics).
The user's module is never mutated: parameters and buffers are copied, calls go through
`torch.func.functional_call`, and the train/eval flags are restored on exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.modules.batchnorm import _BatchNorm

BNMode = Literal["eval", "train"]
HVPMethod = Literal["auto", "double_backward", "forward_over_reverse"]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def as_batches(data: Batch | Iterable[Batch], device: torch.device, dtype: torch.dtype) -> list[Batch]:
    """`data` as a list of (inputs, targets) on `device`; floating inputs cast to the model's dtype."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        items: list = [tuple(data)]
    else:
        try:
            items = list(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"data: expected a tuple (inputs, targets) or an iterable of them, got {type(data).__name__}"
            ) from None
    batches = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)):
            raise TypeError(f"data: batch {i} is not a pair of tensors (inputs, targets)")
        x, y = item
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"data: batch {i} has {x.shape[0]} inputs and {y.shape[0]} targets; expected equal, non-zero")
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
        batches.append((x, y))
    if not batches:
        raise ValueError("data: no batches")
    return batches


def rechunk(batches: list[Batch], chunk_size: int | None) -> list[Batch]:
    """Split batches into pieces of at most `chunk_size` examples (only valid where batches are independent)."""
    if chunk_size is None:
        return batches
    out = []
    for x, y in batches:
        out.extend(zip(x.split(chunk_size), y.split(chunk_size)))
    return out


@contextlib.contextmanager
def measurement_mode(model: nn.Module, bn_mode: BNMode) -> Iterator[None]:
    """Dropout off; batch norm with running statistics ("eval") or per-batch statistics that update
    nothing ("train"); TF32 off. Restores every module's flags on exit."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode: expected 'eval' or 'train', got {bn_mode!r}")
    modules = list(model.modules())
    training = [m.training for m in modules]
    tracking = [(m, m.track_running_stats) for m in modules if isinstance(m, _BatchNorm)]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        model.eval()
        if bn_mode == "train":
            for m, _ in tracking:
                # training + no tracking => F.batch_norm with batch statistics and no buffer update
                m.train()
                m.track_running_stats = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        for m, t in zip(modules, training):
            m.training = t
        for m, t in tracking:
            m.track_running_stats = t
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@dataclass
class MeasurementInfo:
    """How a measurement was taken: shared by every instrument's result."""

    seconds: float = 0.0
    matvecs: int = 0  # Hessian- (or K-) vector products, each over all of `data`
    device: str = "cpu"
    dtype: str = "torch.float32"
    bn_mode: str = "eval"
    hvp_method: str = ""
    tf32: bool = False
    autocast: bool = False
    n_examples: int = 0
    n_params: int = 0
    extra: dict = field(default_factory=dict)


class Objective:
    """f(theta), its gradient and Hessian-vector products, over all of `data`.

    Use as a context manager: inside it the model is in measurement mode; on exit it is restored.
    Vectors are flat tensors of length `n_params` in the model's dtype on `device`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Batch | Iterable[Batch],
        *,
        bn_mode: BNMode = "eval",
        device: str | torch.device | None = None,
        hvp_method: HVPMethod = "auto",
        chunk_size: int | None = None,
        params: dict[str, Tensor] | None = None,
    ) -> None:
        if hvp_method not in ("auto", "double_backward", "forward_over_reverse"):
            raise ValueError(
                f"hvp_method: expected 'auto', 'double_backward' or 'forward_over_reverse', got {hvp_method!r}"
            )
        self.model, self.loss_fn, self.bn_mode = model, loss_fn, bn_mode
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no parameters that require grad")
        first = named[0][1]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        src = params if params is not None else dict(named)
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.n_params = sum(self.numels)
        self.theta0 = self.flatten([src[n].detach() for n in self.names]).clone()
        # frozen parameters and buffers travel as constants
        self.consts = {n: b.detach().to(self.device).clone() for n, b in model.named_buffers()}
        self.consts.update(
            {n: p.detach().to(self.device) for n, p in model.named_parameters() if not p.requires_grad}
        )
        batches = as_batches(data, self.device, self.dtype)
        # batch statistics make each batch part of the definition: never re-chunk in train mode
        self.batches = batches if bn_mode == "train" else rechunk(batches, chunk_size)
        self.n_examples = sum(int(x.shape[0]) for x, _ in self.batches)
        self.weights = [x.shape[0] / self.n_examples for x, _ in self.batches]
        self.hvp_method = hvp_method
        self.matvecs = 0
        self._stack = contextlib.ExitStack()

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> Objective:
        self._stack.enter_context(measurement_mode(self.model, self.bn_mode))
        if self.device.type == "cuda":
            self._stack.enter_context(torch.autocast("cuda", enabled=False))
        self._stack.enter_context(torch.enable_grad())
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def info(self, **extra) -> MeasurementInfo:
        return MeasurementInfo(
            seconds=time.perf_counter() - self._t0,
            matvecs=self.matvecs,
            device=str(self.device),
            dtype=str(self.dtype),
            bn_mode=self.bn_mode,
            hvp_method=self.hvp_method if self.matvecs else "",  # "" when no HVP was needed
            n_examples=self.n_examples,
            n_params=self.n_params,
            extra=extra,
        )

    # -- vectors ---------------------------------------------------------------------------
    def flatten(self, tensors: Iterable[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(device=self.device, dtype=self.dtype) for t in tensors])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, vec.split(self.numels), self.shapes)}

    # -- the function ----------------------------------------------------------------------
    def outputs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, {**self.consts, **params}, (x,))

    def batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self.outputs(params, x), y)

    def loss(self, theta: Tensor | None = None) -> float:
        """f(theta) (default: the model's own weights)."""
        p = self.unflatten(self.theta0 if theta is None else theta)
        with torch.no_grad():
            return float(sum(w * self.batch_loss(p, x, y) for w, (x, y) in zip(self.weights, self.batches)))

    def loss_and_grad(self, theta: Tensor | None = None) -> tuple[float, Tensor]:
        """f(theta) and its gradient as a flat vector."""
        theta = (self.theta0 if theta is None else theta).detach().requires_grad_(True)
        p = self.unflatten(theta)
        total, g = 0.0, torch.zeros_like(theta)
        for w, (x, y) in zip(self.weights, self.batches):
            lb = self.batch_loss(p, x, y) * w
            (gb,) = torch.autograd.grad(lb, theta)
            total += float(lb.detach())
            g += gb
        return total, g.detach()

    def hvp(self, v: Tensor, theta: Tensor | None = None) -> Tensor:
        """H v at theta (default: the model's weights), summed exactly over all batches."""
        theta = self.theta0 if theta is None else theta
        if self.hvp_method == "auto":  # chosen on first use, so instruments without HVPs pay nothing
            self.hvp_method = self._pick_hvp_method()
        self.matvecs += 1
        fn = self._hvp_fo_r if self.hvp_method == "forward_over_reverse" else self._hvp_db
        out = torch.zeros_like(theta)
        for w, (x, y) in zip(self.weights, self.batches):
            out += w * fn(theta, v, x, y)
        return out

    def _hvp_db(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor) -> Tensor:
        theta = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.batch_loss(self.unflatten(theta), x, y), theta, create_graph=True)
        (hv,) = torch.autograd.grad(g, theta, grad_outputs=v)
        return hv.detach()

    def _hvp_fo_r(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor) -> Tensor:
        def g(t: Tensor) -> Tensor:
            return grad(lambda t_: self.batch_loss(self.unflatten(t_), x, y))(t)

        return jvp(g, (theta.detach(),), (v,))[1].detach()

    def _pick_hvp_method(self) -> str:
        """Time both HVP implementations on the largest batch and keep the faster (which wins depends
        on the model, e.g. batch norm and conv layouts), so the choice is measured, not assumed."""
        x, y = max(self.batches, key=lambda b: b[0].shape[0])
        v = torch.randn_like(self.theta0)
        best, best_t = "double_backward", float("inf")
        for name, fn in (("double_backward", self._hvp_db), ("forward_over_reverse", self._hvp_fo_r)):
            try:
                fn(self.theta0, v, x, y)  # warm-up
                _sync(self.device)
                t = time.perf_counter()
                fn(self.theta0, v, x, y)
                _sync(self.device)
                t = time.perf_counter() - t
            except RuntimeError:  # an op without forward-mode AD: fall back to double backward
                continue
            if t < best_t:
                best, best_t = name, t
        return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
