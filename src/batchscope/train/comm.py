"""What a run's processes say to each other, as the loop and the plain step ask it. `Communicator` itself is
a run in one process, where every collective is the identity; `distributed.DistContext` is one process of a
data-parallel run, and every process calls each method at the same point of the run."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import BatchscopeError
from ..spec import RunSpec

T = TypeVar("T")


class Communicator:
    """This process's part of a run: here, all of it."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world, self.device = 0, 1, device
        self.align = 1  # slices are cut at multiples of this: the ghost size, so that each process gets whole ghost batches

    def prepare(self, model: nn.Module) -> None:
        """Adapt the model to the split of each batch over processes (batch norm over the global batch)."""

    def noise_seed(self, seed: int) -> int:
        """This process's dropout seed: rank 0 keeps the single-process stream, the others get their own."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed % 2**64, self.rank]).generate_state(1, np.uint64)[0] >> 1)

    def from_rank0(self, fn: Callable[[], T] | None) -> T:
        """fn() as computed by the process that reads the store (rank 0), on every process."""
        assert fn is not None
        return fn()

    def agree(self, value: T) -> T:
        """Rank 0's value on every process, so that no process takes a branch the others do not."""
        return self.from_rank0(lambda: value)

    def start_from_rank0(self, model: nn.Module, warm_start: Callable[[], None]) -> None:
        """Run the warm start where the store is, and start every process from its weights."""
        warm_start()

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """This process's contiguous slice of a batch, cut at multiples of `align` as evenly as they
        allow, and the slice's share of the batch."""
        n = x.shape[0]
        base, extra = divmod(math.ceil(n / self.align), self.world)
        first = self.rank * base + min(self.rank, extra)
        lo, hi = min(first * self.align, n), min((first + base + (self.rank < extra)) * self.align, n)
        return x[lo:hi], y[lo:hi], (hi - lo) / n

    def reduce_gradients(self, loss: Tensor, params: list[Tensor], share: float) -> tuple[list[Tensor], Tensor]:
        """Gradient and detached loss of the whole batch, from this process's slice."""
        return list(torch.autograd.grad(loss, params)), loss.detach()

    @contextlib.contextmanager
    def merged_norm_stats(self, model: nn.Module) -> Iterator[None]:
        """Around an update: batch-norm running statistics as if one process had seen the whole batch."""
        yield

    def rng_state(self) -> dict[str, Any]:
        """The dropout streams' state for a resume checkpoint: the global generator's (and every process's)."""
        state = {"rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore_rng(self, resume: dict, spec: RunSpec) -> None:
        """Continue this process's dropout stream from a resume checkpoint."""
        torch.set_rng_state(resume["rng"])
        if self.device.type == "cuda" and "cuda_rng" in resume:
            torch.cuda.set_rng_state(resume["cuda_rng"], self.device)
        ranks = resume.get("rng_ranks")
        n = len(ranks) if ranks else 1
        if ranks is not None and n == self.world:
            torch.set_rng_state(ranks[self.rank]["cpu"])
            if "cuda" in ranks[self.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(ranks[self.rank]["cuda"], self.device)
        elif n != self.world and spec.model.dropout > 0:  # only dropout draws from these streams
            how = f"--nproc {n}" if n > 1 else "one process"
            raise BatchscopeError(
                f"run {spec.run_id()}: its resume checkpoint was written by {n} process(es) and dropout draws one "
                f"random stream per process; resume it with {how}"
            )
