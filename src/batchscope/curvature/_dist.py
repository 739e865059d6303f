"""Measuring across data-parallel processes: each rank holds a shard of the data, and sums over it are
added up over the ranks, so every rank gets the quantity of all the data.

Every rank must make the same calls in the same order (the solvers do: their inputs after each
all-reduce are identical on every rank), so anything a rank decides on its own (a random start, a
timing-based choice) is taken from rank 0.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


class Ranks:
    """Sums and agreement over the processes of torch.distributed's default group."""

    def __init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed: True needs torch.distributed initialized (init_process_group) on every rank")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def sum_(self, t: Tensor) -> Tensor:
        """t summed over the ranks, in place (and returned)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def from_rank0(self, value: T) -> T:
        """Rank 0's `value` on every rank (any picklable object; tensors come back on their own device)."""
        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
        if isinstance(value, Tensor) and isinstance(out, Tensor):
            out = out.to(value.device)
        return out

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's rows (m_r x d), stacked in rank order, on every rank."""
        counts = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        sizes = [torch.zeros_like(counts) for _ in range(self.size)]
        dist.all_gather(sizes, counts)
        most = int(max(int(s) for s in sizes))
        padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)  # all_gather needs one shape on every rank: pad, then cut
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])
