"""Batches of any structure: (inputs, targets) pairs, dicts, HuggingFace `BatchEncoding`s, and tuples,
lists or mappings of tensors nested in any way.

The instruments need four things of a batch: its size (to weight it among the others), a copy on
the measuring device, pieces of it (chunks, single examples) and several batches glued into one. A
tensor whose leading dimension equals the batch size holds one row per example and is cut along it;
any other tensor (a 0-d scalar, a mask shared by the batch) and any other leaf (ints, strings, None)
is shared by every piece as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

BatchSizeFn = Callable[[Any], int]


def map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """`batch` with every tensor t replaced by fn(t), in the same structure and container types."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        items = [map_tensors(v, fn) for v in batch]
        if hasattr(batch, "_fields"):  # a namedtuple takes its fields as arguments
            return type(batch)(*items)
        return type(batch)(items)
    return batch


def _rebuild_mapping(batch: Mapping, items: dict) -> Any:
    # BatchEncoding, UserDict, OrderedDict take a dict; a type that does not (defaultdict) becomes a dict
    try:
        return type(batch)(items)  # type: ignore[call-arg]
    except TypeError:
        return items


def tensors(batch: Any) -> list[Tensor]:
    """The tensors of `batch`, in the order `map_tensors` visits them."""
    out: list[Tensor] = []
    map_tensors(batch, out.append)
    return out


def rebuild(batch: Any, new: Sequence[Tensor]) -> Any:
    """`batch` with its tensors (in `tensors` order) replaced by `new`."""
    it = iter(new)
    return map_tensors(batch, lambda _: next(it))


def leading_size(batch: Any) -> int:
    """The default batch size: the leading dimension of the batch's first tensor."""
    for t in tensors(batch):
        if t.ndim == 0:
            raise ValueError("the batch's first tensor is 0-d; pass batch_size_fn=(batch) -> number of examples")
        return int(t.shape[0])
    raise ValueError(f"a {type(batch).__name__} batch holds no tensor; pass batch_size_fn=(batch) -> number of examples")


def per_example(batch: Any, n: int) -> list[bool]:
    """Per tensor (in `tensors` order): whether it holds one row per example (leading dimension n)."""
    return [t.ndim >= 1 and t.shape[0] == n for t in tensors(batch)]


def select(batch: Any, n: int, index: slice | Tensor) -> Any:
    """Examples `index` (a slice or an index tensor) of a batch of n examples; shared tensors kept whole."""
    rows = per_example(batch, n)
    return rebuild(batch, [t[index] if r else t for t, r in zip(tensors(batch), rows)])


def split(batch: Any, n: int, size: int) -> Iterator[tuple[int, Any]]:
    """(examples, piece) for consecutive pieces of at most `size` examples of a batch of n."""
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield stop - start, select(batch, n, slice(start, stop))


def concat(batches: Sequence[tuple[int, Any]]) -> Any:
    """The batches (examples, batch) glued into one along their per-example tensors, in order.

    Every batch must have the same structure, and their per-example tensors the same trailing shapes
    (e.g. token sequences padded to one length); shared tensors come from the first batch.
    """
    n0, first = batches[0]
    rows = per_example(first, n0)
    parts = [tensors(b) for _, b in batches]
    if any(len(p) != len(rows) for p in parts):
        raise ValueError("data: the batches differ in structure; cannot join them into one")
    out = []
    for i, (t, r) in enumerate(zip(parts[0], rows)):
        if not r:
            out.append(t)
            continue
        column = [p[i] for p in parts]
        if any(c.shape[1:] != t.shape[1:] for c in column):
            raise ValueError(f"data: tensor {i} of the batches has shapes {sorted({tuple(c.shape[1:]) for c in column})} "
                             "after the batch dimension; joining batches needs one shape (pad to one length)")
        out.append(torch.cat(column))
    return rebuild(first, out)
