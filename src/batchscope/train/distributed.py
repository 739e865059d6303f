"""Data-parallel training of one run (DDP): the process group and the collectives the trainer calls. The
processes themselves (rank 0 leading, the others following, the `--nproc` launcher) are `batchscope.launch`.

The number of processes is not part of a run: the same spec gives the same run (and run id) on 1 or N
processes, within float tolerance; the count is recorded in the run's provenance.

- `train.batch_size` is the global batch. Every process draws the same permutation from `seeds.data` and
  trains on its contiguous slice of each batch; the slices' gradients, weighted by their share of the batch,
  are summed over processes: the gradient of the global batch.
- Batch-norm statistics are the spec's. `model.norm = "ghost"`: chunks of `ghost_size`; slices are cut at
  chunk boundaries (as evenly as whole chunks allow), so the chunks are the single-process run's, and the
  running statistics are merged as if one process had seen every chunk in order. `model.norm = "batch"`:
  statistics of the global batch, combined over processes with gradients through them (SyncBatchNorm's
  math, on CPU/gloo too).
- Every process evaluates the same weights; rank 0 alone writes to the store (metrics, checkpoints, outcome).
- Collectives time out after `--dist-timeout` seconds, so a dead or hung process stops the run with one line
  instead of the 30-minute default; the run resumes from its last resume checkpoint.
- Dropout draws one random stream per process (rank 0's is the single-process stream): with dropout a run
  equals the single-process run in distribution, not in value.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from ..errors import BatchscopeError
from ..factories import check_objective, dataset_for, epoch_plan, model_for, resolve_device
from ..models import GhostBatchNorm
from ..provenance import provenance
from ..spec import RunSpec
from .comm import Communicator

T = TypeVar("T")
# Set by the --nproc launcher: the workers meet at the launcher's store instead of rank 0 hosting one.
LAUNCHER_ENV = "BATCHSCOPE_DIST_LAUNCHER"


class PeerLostError(BatchscopeError):
    """A collective failed: another process died, or did not answer within the timeout."""


def worker_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several started by torchrun or `--nproc`, else None."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world <= 1:
        return None
    if not os.environ.get("RANK"):
        raise BatchscopeError(f"WORLD_SIZE={world} but RANK is not set: start the processes with --nproc or torchrun")
    return int(os.environ["RANK"]), world


def batch_sizes(spec: RunSpec, n_train: int) -> dict[int, bool]:
    """Every batch size the run trains on -> whether it is (only) the short last batch of an epoch."""
    sizes: dict[int, bool] = {}
    for b, k in epoch_plan(spec, n_train):
        sizes[b] = False
        if not spec.train.drop_last and n_train % b and k == math.ceil(n_train / b):
            sizes.setdefault(n_train % b, True)
    return sizes


def check_run(spec: RunSpec, world: int, data_device: torch.device | None = None) -> None:
    """Refuse (one line) a split of the run's batches that would make it differ from the single-process run.
    `data_device`: where to load the data to count it (default: the run's device)."""
    if not tdist.is_available():
        raise BatchscopeError("--nproc: this torch build has no torch.distributed")
    device = resolve_device(spec.train.device)
    if device.type not in ("cpu", "cuda"):
        raise BatchscopeError(f"--nproc {world}: data-parallel runs train on CPUs (gloo) or CUDA GPUs (NCCL), not {device}")
    if device.type == "cuda" and world > torch.cuda.device_count():
        seen = torch.cuda.device_count()
        raise BatchscopeError(f"--nproc {world}: one process per GPU, but torch sees {seen} CUDA devices")
    g = spec.model.ghost_size if spec.model.norm == "ghost" else 1
    for size, last in sorted(batch_sizes(spec, dataset_for(spec, data_device or device).n_train).items()):
        what = f"the last batch of an epoch ({size} examples)" if last else f"a batch of {size} examples"
        fix = "set train.drop_last = true" if last else f"use a batch size of at least {world * g}"
        if math.ceil(size / g) < world:
            held = f"holds {math.ceil(size / g)} ghost batch(es) of {g}, fewer than" if g > 1 else "is smaller than"
            raise BatchscopeError(f"--nproc {world}: {what} {held} the {world} processes; {fix}")


def _cause(err: BaseException) -> str:
    """A backend's error message cut to its first sentence, without the source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is")[0][:160]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is again the sum over processes (every loss depends on every input)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dist: DistContext) -> Tensor:
        ctx.dist = dist
        return dist.all_reduce(x.clone(), "a batch-norm statistics all-reduce")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.dist.all_reduce(grad.clone(), "a batch-norm gradient all-reduce"), None


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.BatchNorm whose training statistics are the global batch's: every process's per-channel count, mean
    and sum of squared deviations, combined (Chan et al.) rather than sums of squares, which cancel."""

    dist: DistContext

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        d = self.dist
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        # A sum of rows that only their own process fills is an all-gather that autograd can follow.
        slots = _AllReduceSum.apply(d.own_row(torch.cat([x.new_full((1,), count), mean, var * count])), d)
        c = self.num_features
        counts, means, m2s = slots[:, :1], slots[:, 1 : 1 + c], slots[:, 1 + c :]
        n = counts.sum()
        g_mean = (counts * means).sum(0) / n
        g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
        out = (x - g_mean.reshape(shape)) * torch.rsqrt(g_m2 / n + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                a = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - a).add_(a * g_mean)
                self.running_var.mul_(1 - a).add_(a * g_m2 / (n - 1))  # unbiased, as nn.BatchNorm
        return out


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """Global-batch statistics over (B, C) or (B, C, L) inputs."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """Global-batch statistics over (B, C, H, W) inputs."""


@dataclass
class DistContext(Communicator):
    """This process's place in a data-parallel run, and the collectives the loop and the plain step call."""

    rank: int
    world: int
    device: torch.device
    backend: str
    timeout_s: float
    align: int = 1

    def close(self) -> None:
        """Leave the process group (a peer blocked on this process then fails at once, not after the timeout)."""
        if tdist.is_initialized():
            tdist.destroy_process_group()

    def provenance(self, spec: RunSpec) -> dict[str, Any]:
        """The run's provenance, with the process count, backend and batch-norm statistics."""
        m = spec.model
        return {
            **provenance(str(self.device), spec.train.dtype),
            "nproc": self.world,
            "dist_backend": self.backend,
            "norm_statistics": {"none": "none", "ghost": f"ghost batches of {m.ghost_size}", "batch": "global batch"}[m.norm],
        }

    # -- collectives ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # gloo and NCCL report a dead or silent peer as a RuntimeError
            raise PeerLostError(
                f"rank {self.rank}: {what} failed: another process died or did not answer within "
                f"{self.timeout_s:g} s ({_cause(e)})"
            ) from None

    def all_reduce(self, t: Tensor, what: str) -> Tensor:
        """Sum t over processes, in place; returns it."""
        with self._guard(what):
            tdist.all_reduce(t)
        return t

    def own_row(self, row: Tensor) -> Tensor:
        """(world, len(row)) zeros with `row` at this process's rank: summed over processes, an all-gather."""
        zeros = row.new_zeros
        return torch.cat([zeros(self.rank, row.numel()), row[None], zeros(self.world - self.rank - 1, row.numel())])

    def from_rank0(self, fn: Callable[[], T] | None) -> T:
        """fn() computed on rank 0 and sent to every process; an error on rank 0 is raised on every process."""
        box: list[Any] = [None]
        error: Exception | None = None
        if self.rank == 0:
            assert fn is not None
            try:
                box[0] = (True, fn())
            except Exception as e:  # the others must not wait for a value that will never come
                error = e
                box[0] = (False, str(e) if isinstance(e, BatchscopeError) else f"{type(e).__name__}: {e}")
        with self._guard("a broadcast from rank 0"):
            tdist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        ok, value = box[0]
        if not ok:
            raise BatchscopeError(f"rank 0: {value}")
        return value

    def prepare(self, model: nn.Module) -> None:
        """Give plain batch norm ('batch') the global batch's statistics; ghost batch norm keeps its chunks."""
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
                    cls = GlobalBatchNorm1d if isinstance(child, nn.BatchNorm1d) else GlobalBatchNorm2d
                    new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                    new.load_state_dict(child.state_dict())
                    ref = next(itertools.chain(child.parameters(), child.buffers()), None)
                    if ref is not None:
                        new.to(device=ref.device, dtype=ref.dtype)
                    new.train(child.training)
                    new.dist = self
                    setattr(parent, name, new)
                elif isinstance(child, GhostBatchNorm) and child.momentum is None:
                    raise BatchscopeError("ghost batch norm with momentum None: cannot merge its statistics over processes")

    def start_from_rank0(self, model: nn.Module, warm_start: Callable[[], None]) -> None:
        """Every process starts from rank 0's weights, after rank 0's warm start (which reads the store)."""

        def weights() -> dict[str, Tensor]:
            warm_start()
            return {k: v.cpu() for k, v in model.state_dict().items()}  # unpickled on CPU on every process

        model.load_state_dict(self.from_rank0(weights))

    def reduce_gradients(self, loss: Tensor, params: list[Tensor], share: float) -> tuple[list[Tensor], Tensor]:
        """Gradient and loss of the global batch: each process's share-weighted part, summed in one all-reduce."""
        grads = torch.autograd.grad(loss * share, params)
        flat = torch.cat([g.reshape(-1) for g in grads] + [(loss.detach() * share).reshape(1).to(grads[0].dtype)])
        self.all_reduce(flat, "the gradient all-reduce")
        return [f.view_as(g) for f, g in zip(flat[:-1].split([g.numel() for g in grads]), grads)], flat[-1]

    @contextlib.contextmanager
    def merged_norm_stats(self, model: nn.Module) -> Iterator[None]:
        """Around an update: ghost batch norm's running statistics as if one process had seen every process's
        chunks in rank order (each process updated them with its own chunks only)."""
        mods = [m for m in model.modules() if isinstance(m, GhostBatchNorm) and m.running_mean is not None]
        mods = [m for m in mods if m.track_running_stats]
        before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in mods]
        yield
        if not mods:
            return
        # The update is linear: after k chunks, stat = (1 - a)^k * stat0 + c, with c independent of stat0.
        rows = []
        for m, (mean0, var0, n0) in zip(mods, before):
            k = (m.num_batches_tracked - n0).double()
            keep = (1 - m.momentum) ** k
            rows += [k.reshape(1), m.running_mean.double() - keep * mean0.double()]
            rows += [m.running_var.double() - keep * var0.double()]
        slots = self.all_reduce(self.own_row(torch.cat(rows)), "the batch-norm running statistics all-reduce")
        i = 0
        with torch.no_grad():
            for m, (mean0, var0, n0) in zip(mods, before):
                c = m.num_features
                k, cm, cv = slots[:, i], slots[:, i + 1 : i + 1 + c], slots[:, i + 1 + c : i + 1 + 2 * c]
                i += 1 + 2 * c
                mean, var = mean0.double(), var0.double()
                for r in range(self.world):
                    keep = (1 - m.momentum) ** k[r]
                    mean, var = keep * mean + cm[r], keep * var + cv[r]
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n0 + k.sum().long())

    def rng_state(self) -> dict[str, Any]:
        """The global generator's state, and every process's dropout generator state (CPU, and CUDA when
        training there) in rank order."""
        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        out: list[Any] = [None] * self.world
        with self._guard("gathering the random states"):
            tdist.all_gather_object(out, mine)
        return {**super().rng_state(), "rng_ranks": out}


def join(spec: RunSpec, nproc: int, timeout_s: float) -> DistContext:
    """This process's place in a run started by torchrun or `--nproc`: check the spec on this process's device
    (as `preflight`), then join the process group that torchrun's variables describe (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT, LOCAL_RANK)."""
    where = worker_rank()
    if where is None:
        raise BatchscopeError("distributed training needs WORLD_SIZE > 1 (start it with --nproc or torchrun)")
    if nproc not in (1, where[1]):
        raise BatchscopeError(f"--nproc {nproc}: this process is one of WORLD_SIZE={where[1]} already; leave --nproc out")
    rank, world = where
    device = resolve_device(spec.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))  # one process per GPU
        if device.index >= torch.cuda.device_count():
            raise BatchscopeError(f"LOCAL_RANK={device.index}: torch sees {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    ds = dataset_for(spec, device)
    check_objective(spec, model_for(spec, ds, device), ds)
    check_run(spec, world, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if os.environ.get(LAUNCHER_ENV):
            store = tdist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
            )
            tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            tdist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError, KeyError) as e:
        raise BatchscopeError(
            f"rank {rank}: could not meet the other {world - 1} processes within {timeout_s:g} s ({_cause(e)})"
        ) from None
    align = spec.model.ghost_size if spec.model.norm == "ghost" else 1
    return DistContext(rank, world, device, backend, float(timeout_s), align)
