"""The training loss as a pure function of one flat parameter vector.

Every instrument in `batchscope.curvature` measures f(theta) = sum_b (n_b / N) loss_b(theta), the loss
averaged over all of `data` (each batch weighted by its size n_b), with the model in a measurement
configuration (dropout off; batch norm in eval mode or with per-batch statistics). A batch's loss is
`loss_fn(model(inputs), targets)` for (inputs, targets) pairs, or `batch_loss(model, batch)` for any
other batch (a dict, a HuggingFace `BatchEncoding`). theta is the model's trainable parameters, or
the ones `wrt` selects (the others held fixed). The user's module is never mutated: parameters and
buffers are copied, calls go through `torch.func.functional_call`, and the train/eval flags are
restored on exit. With `distributed=True` each process passes its own shard of the data and every
sum over the data is added up over the processes.

Data is read one pass at a time, by `Batches`, the one place that iterates it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from ._batch import BatchSizeFn, leading_size, map_tensors, split, tensors
from ._dist import Ranks

BNMode = Literal["eval", "train"]
HVPMethod = Literal["auto", "double_backward", "forward_over_reverse"]
GraphBudget = Union[int, Literal["auto"], None]  # bytes of gradient graphs kept across HVPs
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
BatchLoss = Callable[[nn.Module, Any], Tensor]
"""batch_loss(model, batch) -> the batch's loss, a scalar averaged over its examples; `model` is the
user's module with the measured parameters swapped in, so `model(**batch).loss` works."""
Data = Any
"""One batch ((inputs, targets), a dict or BatchEncoding), or an iterable of batches (a list, a DataLoader)."""
Selector = Union[str, re.Pattern, nn.Module]
Wrt = Union[Selector, Sequence[Selector], None]


def _is_pair(item: object) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item)


# -- the data -----------------------------------------------------------------------------------
class Batches:
    """The batches of `data` as (examples, batch on the device) pairs, one pass at a time.

    * One batch (a pair (inputs, targets), a dict or BatchEncoding) or a list/tuple of batches: in
      memory already, so moved to the device (floating tensors cast to the model's dtype) once and kept.
    * Any other iterable (a DataLoader): streamed. Each pass calls iter(data) afresh and moves one
      batch at a time to the device, so memory holds one batch (plus what the loader holds). Every
      pass must give the same examples; in eval mode their order and batching may differ (a shuffling
      loader), with bn_mode="train" the batches are part of f and must not.
    * A one-shot iterator or generator (iter(it) is it) cannot be read twice: it is read once and
      kept like a list (pass the loader itself, not iter(loader), to stream).

    Batches are cut into pieces of at most `chunk_size` examples (eval mode only: with batch
    statistics each batch is part of the definition of f).
    """

    def __init__(self, data: Data, *, device: torch.device, dtype: torch.dtype, pairs: bool,
                 size_fn: BatchSizeFn | None, chunk_size: int | None, bn_mode: BNMode) -> None:
        self.device, self.dtype, self.pairs, self.size_fn = device, dtype, pairs, size_fn
        self.chunk = chunk_size if bn_mode == "eval" else None
        self.data = data
        self.kept: list[tuple[int, Any]] | None = None
        if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
            raise TypeError(f"data: a {type(data).__name__} gives single examples, not batches; wrap it in "
                            "DataLoader(dataset, batch_size=...)")
        if _is_pair(data) or isinstance(data, Mapping):
            items: list | None = [data]
        elif isinstance(data, (tuple, list)):
            items = list(data)
        else:
            try:
                it = iter(data)
            except TypeError:
                raise TypeError(f"data: expected a batch (inputs, targets), a dict, or an iterable of batches, "
                                f"got {type(data).__name__}") from None
            items = list(it) if it is data else None
        if bn_mode == "train" and isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
            raise ValueError("data: a shuffling DataLoader gives other batches on every pass, and with "
                             "bn_mode='train' batch statistics make them part of the loss; use shuffle=False")
        if items is not None:
            self.kept = [self._prepare(i, item) for i, item in enumerate(items)]
            if not self.kept:
                raise ValueError("data: no batches")
        self.streamed = self.kept is None

    def _size(self, i: int, item: Any) -> int:
        if self.pairs:
            if not _is_pair(item):
                raise TypeError(f"data: batch {i} is a {type(item).__name__}, not a pair of tensors (inputs, targets); "
                                "for other batches pass batch_loss=(model, batch) -> mean loss and loss_fn=None")
            x, y = item
            if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ValueError(f"data: batch {i} has {x.shape[:1]} inputs and {y.shape[:1]} targets; "
                                 "expected equal, non-zero leading dimensions")
            return int(x.shape[0])
        try:
            n = self.size_fn(item) if self.size_fn is not None else leading_size(item)
        except ValueError as err:
            raise ValueError(f"data: batch {i}: {err}") from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"data: batch {i} has batch size {n!r}; expected an integer >= 1")
        return n

    def _prepare(self, i: int, item: Any) -> tuple[int, Any]:
        n = self._size(i, item)
        dev, dt = self.device, self.dtype
        return n, map_tensors(item, lambda t: t.to(device=dev, dtype=dt if t.is_floating_point() else t.dtype))

    def _raw(self) -> Iterator[tuple[int, Any]]:
        """(examples, batch on the device) of one pass, before chunking."""
        if self.kept is not None:
            yield from self.kept
            return
        count = 0
        for item in self.data:  # not enumerate: its cached result tuple would keep the previous batch alive
            prepared = self._prepare(count, item)
            del item
            count += 1
            yield prepared
            del prepared  # hold no reference to this batch while the loader builds the next
        if count == 0:
            raise ValueError("data: no batches")

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for n, batch in self._raw():
            if self.chunk is None or n <= self.chunk:
                yield n, batch
            else:
                yield from split(batch, n, self.chunk)
            del batch

    def count(self) -> int:
        """Examples in one pass (a streamed loader is read for it, batches not moved to the device)."""
        if self.kept is not None:
            return sum(n for n, _ in self.kept)
        total = 0
        for i, item in enumerate(self.data):
            total += self._size(i, item)
        return total

    def representative(self) -> tuple[int, Any]:
        """The largest kept batch, or a stream's first: where the HVP methods are timed."""
        if self.kept is not None:
            return max(self.kept, key=lambda b: b[0])
        return next(iter(self._raw()))


def select_parameters(model: nn.Module, wrt: Wrt) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters `wrt` names, in the model's order: all (None), those whose name matches
    a glob (str, fnmatch: `*` crosses dots) or a regex (re.Pattern, searched), or those of a module."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: has no parameters that require grad")
    if wrt is None:
        return named
    items = [wrt] if isinstance(wrt, (str, re.Pattern, nn.Module)) else list(wrt)
    if not items:
        raise ValueError("wrt: expected a name pattern, a module or a non-empty list of them, got an empty list")
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            hits = {n for n, _ in named if fnmatchcase(n, item)}
        elif isinstance(item, re.Pattern):
            hits = {n for n, _ in named if item.search(n)}
        elif isinstance(item, nn.Module):
            ids = {id(p) for p in item.parameters()}
            hits = {n for n, p in named if id(p) in ids}
        else:
            raise TypeError(f"wrt: expected a name pattern (str glob or re.Pattern), an nn.Module or a list of them, "
                            f"got {type(item).__name__}")
        if not hits:
            what = f"{type(item).__name__} module" if isinstance(item, nn.Module) else repr(item)
            raise ValueError(f"wrt: {what} selects no trainable parameter of the model; its names look like "
                             f"{named[0][0]!r}")
        chosen |= hits
    return [(n, p) for n, p in named if n in chosen]


class _Bound(nn.Module):
    """The user's model under a module whose forward is batch_loss(model, batch): `functional_call` on it
    swaps the parameters of the very module the user's function receives."""

    def __init__(self, model: nn.Module, fn: BatchLoss) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


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
    n_params: int = 0  # trainable parameters measured (those `wrt` selects)
    world_size: int = 1  # processes whose shards of the data were measured together
    extra: dict = field(default_factory=dict)


class Objective:
    """f(theta), its gradient and Hessian-vector products, over all of `data`.

    Use as a context manager: inside it the model is in measurement mode; on exit it is restored.
    Vectors are flat tensors of length `n_params` (the `wrt` parameters, in model order) in the
    model's dtype on `device`. Give `loss_fn(outputs, targets)` for (inputs, targets) batches, or
    `batch_loss(model, batch)` (and loss_fn=None) for any batch; `batch_size_fn(batch)` counts a
    batch's examples (default: the leading dimension of its first tensor).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: Data,
        *,
        bn_mode: BNMode = "eval",
        device: str | torch.device | None = None,
        hvp_method: HVPMethod = "auto",
        chunk_size: int | None = None,
        params: dict[str, Tensor] | None = None,
        batch_loss: BatchLoss | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        wrt: Wrt = None,
        distributed: bool = False,
        graph_budget: GraphBudget = "auto",
    ) -> None:
        if hvp_method not in ("auto", "double_backward", "forward_over_reverse"):
            raise ValueError(
                f"hvp_method: expected 'auto', 'double_backward' or 'forward_over_reverse', got {hvp_method!r}"
            )
        if (loss_fn is None) == (batch_loss is None):
            raise ValueError("loss_fn, batch_loss: give exactly one: loss_fn(outputs, targets) for (inputs, targets) "
                             "batches, or batch_loss(model, batch) with loss_fn=None")
        if batch_size_fn is not None and batch_loss is None:
            raise ValueError("batch_size_fn: only with batch_loss ((inputs, targets) batches count their rows)")
        self.model, self.loss_fn, self.bn_mode = model, loss_fn, bn_mode
        self.pairs = batch_loss is None  # (inputs, targets) batches through loss_fn
        self._bound = None if batch_loss is None else _Bound(model, batch_loss)
        named = select_parameters(model, wrt)
        first = named[0][1]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        src = params if params is not None else dict(named)
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.n_params = sum(self.numels)
        self.theta0 = self.flatten([src[n].detach() for n in self.names]).clone()
        # buffers, frozen parameters and parameters outside `wrt` travel as constants
        self.consts = {n: b.detach().to(self.device).clone() for n, b in model.named_buffers()}
        chosen = set(self.names)
        self.fixed = [n for n, p in model.named_parameters() if p.requires_grad and n not in chosen]
        self.consts.update({n: (params or {}).get(n, p).detach().to(self.device)
                            for n, p in model.named_parameters() if n not in chosen})
        self.ranks = Ranks() if distributed else None
        self.data = Batches(data, device=self.device, dtype=self.dtype, pairs=self.pairs, size_fn=batch_size_fn,
                            chunk_size=chunk_size, bn_mode=bn_mode)
        self._n: int | None = None  # examples over all ranks, known after the first pass
        self.hvp_method = hvp_method
        self.hvp_asked = hvp_method  # hvp_method may become an earlier pick; graph reuse follows what was asked
        self.matvecs = 0
        self.notes: dict[str, Any] = {}  # how things were computed, for `info`
        if not (graph_budget in ("auto", None) or isinstance(graph_budget, int) and graph_budget >= 0):
            raise ValueError(f"graph_budget: expected 'auto', None or bytes >= 0, got {graph_budget!r}")
        self.graph_budget = graph_budget
        self._graphs: list[tuple[int, Tensor]] | None = None  # each batch's create_graph gradient at theta0
        self._graph_leaf: Tensor | None = None
        self._graphs_refused = False
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
            world_size=1 if self.ranks is None else self.ranks.size,
            extra={**self.notes, **extra},
        )

    # -- the data --------------------------------------------------------------------------
    @property
    def n_examples(self) -> int:
        """N, the examples of `data` (of every rank's shard, when distributed)."""
        if self._n is None:
            self.passed(self.data.count())
        assert self._n is not None
        return self._n

    def passed(self, local: int) -> int:
        """Record a full pass over this rank's data that gave `local` examples; N, over all ranks."""
        n = local if self.ranks is None else int(self.ranks.sum_(torch.tensor(local, device=self.device)))
        if self._n is not None and n != self._n:
            raise ValueError(f"data: a pass gave {n} examples, an earlier one {self._n}; the data must give the "
                             "same examples on every pass")
        self._n = n
        return n

    def accumulate(self, fn: Callable[[Any, int], Sequence[Any]]) -> list[Any]:
        """Sums over one pass of the data (and over the ranks) of fn(batch, n_b), n_b the batch's examples.

        The only loop over the data for whole-data quantities: a caller weights by n_b (`weighted`) and
        divides by `n_examples`. Parts are tensors (summed in float32 at least: half precision would
        overflow) or Python numbers (summed as floats).
        """
        sums: list[Any] | None = None
        n = 0
        for nb, batch in self.data:
            parts = fn(batch, nb)
            del batch  # one batch alive: free this one's activations before the loader gives the next
            if sums is None:
                sums = [p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone() if isinstance(p, Tensor)
                        else float(p) for p in parts]
            else:
                for i, p in enumerate(parts):
                    if isinstance(p, Tensor):
                        sums[i] += p.detach()
                    else:
                        sums[i] += float(p)
            del parts
            n += nb
        assert sums is not None  # Batches raises on no batches
        if self.ranks is not None:
            for i, s in enumerate(sums):
                if isinstance(s, Tensor):
                    self.ranks.sum_(s)
                else:
                    sums[i] = float(self.ranks.sum_(torch.tensor(s, dtype=torch.float64, device=self.device)))
        self.passed(n)
        return sums

    # -- vectors ---------------------------------------------------------------------------
    def flatten(self, tensors: Iterable[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(device=self.device, dtype=self.dtype) for t in tensors])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, vec.split(self.numels), self.shapes)}

    # -- the function ----------------------------------------------------------------------
    def outputs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model's outputs on inputs x ((inputs, targets) batches only)."""
        return functional_call(self.model, {**self.consts, **params}, (x,))

    def batch_loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """The loss of one batch at `params` (the trainable ones, optionally buffers overriding `consts`)."""
        if self._bound is None:
            x, y = batch
            return self.loss_fn(self.outputs(params, x), y)  # type: ignore[misc]
        merged = {**self.consts, **params}
        return functional_call(self._bound, {"model." + k: v for k, v in merged.items()}, (batch,))

    def loss(self, theta: Tensor | None = None) -> float:
        """f(theta) (default: the model's own weights)."""
        p = self.unflatten(self.theta0 if theta is None else theta)
        with torch.no_grad():
            (total,) = self.accumulate(lambda b, n: (weighted(self.batch_loss(p, b).double(), n),))
        return float(total) / self.n_examples

    def loss_and_grad(self, theta: Tensor | None = None) -> tuple[float, Tensor]:
        """f(theta) and its gradient as a flat vector."""
        theta = (self.theta0 if theta is None else theta).detach().requires_grad_(True)
        p = self.unflatten(theta)

        def part(b: Any, n: int) -> tuple[Tensor, Tensor]:
            lb = self.batch_loss(p, b)
            (gb,) = torch.autograd.grad(lb, theta)
            return weighted(lb.detach().double(), n), weighted(gb, n)

        total, g = self.accumulate(part)
        return float(total) / self.n_examples, (g / self.n_examples).to(self.dtype)

    def hvp(self, v: Tensor, theta: Tensor | None = None) -> Tensor:
        """H v at theta (default: the model's weights), summed exactly over all batches.

        At the model's weights, each batch's gradient graph is built once and kept when all of them fit
        `graph_budget` (bytes of the tensors autograd saves; "auto": a quarter of the device's free memory,
        for data held in memory, not for a streamed loader): a product is then one more backward pass per
        batch instead of a forward, a backward and a second backward. Over the budget (or at other weights,
        or with forward-over-reverse asked for) the data is streamed and each product rebuilds the graphs."""
        at_theta0 = theta is None or theta is self.theta0
        theta = self.theta0 if theta is None else theta
        try:
            if at_theta0 and self.hvp_asked in ("auto", "double_backward") and self._keep_graphs():
                self.hvp_method = "double_backward"
                self.matvecs += 1
                return self._hvp_kept(v)
            if self.hvp_method == "auto":  # chosen on first use, so instruments without HVPs pay nothing
                self.hvp_method = self._pick_hvp_method()
            self.matvecs += 1
            fn = self._hvp_fo_r if self.hvp_method == "forward_over_reverse" else self._hvp_db
            (out,) = self.accumulate(lambda b, n: (weighted(fn(theta, v, b), n),))
        except RuntimeError as err:
            if "not implemented" not in str(err):
                raise
            first = str(err).splitlines()[0]
            raise RuntimeError(f"hvp: {first}: the model has an op without a second derivative (a HuggingFace "
                               "model: load it with attn_implementation='eager')") from err
        return (out / self.n_examples).to(self.dtype)

    def _keep_graphs(self) -> bool:
        """Build every batch's gradient graph at theta0 once, if they fit the budget; whether they are kept."""
        if self._graphs is not None:
            return True
        if self._graphs_refused:
            return False
        why = ("off: no budget" if self.graph_budget in (None, 0) else
               "off: streamed data (give graph_budget in bytes to keep the graphs)"
               if self.graph_budget == "auto" and self.data.streamed else "")  # streamed on purpose: one batch held
        if self.ranks is not None:  # a collective decision: every rank keeps its graphs, or none does
            if self.ranks.sum_(torch.tensor(float(bool(why)), device=self.device)) > 0:
                why = why or "off: another rank does not keep its graphs"
        if why:
            self.notes["graph_reuse"] = why
            self._graphs_refused = True
            return False
        budget = auto_graph_budget(self.device) if self.graph_budget == "auto" else int(self.graph_budget)
        leaf = self.theta0.detach().requires_grad_(True)
        params = self.unflatten(leaf)
        kept: list[tuple[int, Tensor]] = []
        seen: dict[tuple[int, int], int] = {}  # storages autograd saved, counted once

        def pack(t: Tensor) -> Tensor:
            try:
                key = (t.untyped_storage().data_ptr(), t.device.index or 0)
                seen.setdefault(key, t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. sparse): count its elements
                seen.setdefault((id(t), -1), t.numel() * t.element_size())
            return t

        n, over = 0, False
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for nb, batch in self.data:
                (g,) = torch.autograd.grad(self.batch_loss(params, batch), leaf, create_graph=True)
                kept.append((nb, g))
                n += nb
                del batch
                if sum(seen.values()) > budget:
                    over = True
                    break
        if self.ranks is not None:  # every rank keeps its graphs, or none does
            over = bool(self.ranks.sum_(torch.tensor(float(over), device=self.device)) > 0)
        if over:
            self.notes["graph_reuse"] = f"off: the graphs exceed the budget of {budget / 2**20:.0f} MiB"
            self._graphs_refused = True
            return False
        self.passed(n)
        self._graphs, self._graph_leaf = kept, leaf
        self.notes["graph_reuse"] = f"on: {sum(seen.values()) / 2**20:.1f} MiB kept (budget {budget / 2**20:.0f} MiB)"
        self.notes["graph_bytes"] = sum(seen.values())
        return True

    def _hvp_kept(self, v: Tensor) -> Tensor:
        assert self._graphs is not None and self._graph_leaf is not None
        out = None
        for nb, g in self._graphs:
            (hv,) = torch.autograd.grad(g, self._graph_leaf, grad_outputs=v, retain_graph=True)
            part = weighted(hv.detach(), nb)
            out = part if out is None else out + part
        assert out is not None
        if self.ranks is not None:
            self.ranks.sum_(out)
        return (out / self.n_examples).to(self.dtype)

    def release_graphs(self) -> None:
        """Free the kept gradient graphs (they are rebuilt at the next product at theta0)."""
        self._graphs, self._graph_leaf = None, None

    def _hvp_db(self, theta: Tensor, v: Tensor, batch: Any) -> Tensor:
        theta = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.batch_loss(self.unflatten(theta), batch), theta, create_graph=True)
        (hv,) = torch.autograd.grad(g, theta, grad_outputs=v)
        return hv.detach()

    def _hvp_fo_r(self, theta: Tensor, v: Tensor, batch: Any) -> Tensor:
        def g(t: Tensor) -> Tensor:
            return grad(lambda t_: self.batch_loss(self.unflatten(t_), batch))(t)

        return jvp(g, (theta.detach(),), (v,))[1].detach()

    def batch_signature(self) -> tuple:
        """Shapes and dtypes of the tensors of the batch the HVP methods are timed on."""
        _, batch = self.data.representative()
        return tuple((tuple(t.shape), t.dtype) for t in tensors(batch))

    def _pick_hvp_method(self) -> str:
        """Time both HVP implementations on the largest batch and keep the faster (which wins depends
        on the model, e.g. batch norm and conv layouts), so the choice is measured, not assumed.
        Across processes rank 0's choice is everyone's."""
        _, batch = self.data.representative()
        v = torch.randn_like(self.theta0)
        best, best_t = "double_backward", float("inf")
        for name, fn in (("double_backward", self._hvp_db), ("forward_over_reverse", self._hvp_fo_r)):
            try:
                fn(self.theta0, v, batch)  # warm-up
                _sync(self.device)
                t = time.perf_counter()
                fn(self.theta0, v, batch)
                _sync(self.device)
                t = time.perf_counter() - t
            except RuntimeError:  # an op without forward-mode AD: fall back to double backward
                continue
            if t < best_t:
                best, best_t = name, t
        return best if self.ranks is None else self.ranks.from_rank0(best)

    def same_on_all_ranks(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a seed, a start vector), or `value` when not distributed."""
        return value if self.ranks is None else self.ranks.from_rank0(value)


def auto_graph_budget(device: torch.device) -> int:
    """A quarter of the device's free memory (CUDA), or of the host's available memory (else 1 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 1 << 30


def weighted(t: Tensor, n: int) -> Tensor:
    """n * t, in float32 at least (a batch's mean times its examples can overflow half precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) * n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
