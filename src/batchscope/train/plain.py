"""The plain step: one run's own module and optimizer, stepped by autograd, alone or as one process of a
data-parallel run (its communicator splits each batch and sums the gradients); and `train_run`, one run
as a pure function of its spec and seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..factories import correct, dataset_for, loss_for, model_for, resolve_device
from ..spec import RunSpec
from .comm import Communicator
from .loop import EVAL_BATCH, Callback, Progress, RunResult, run_group
from .objective import batch_objective
from .optim import Hyper, descend, init_state
from .recorder import Recorder, warm_start

if TYPE_CHECKING:
    from ..sinks import Sink
    from ..store import RunStore


def flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


class PlainStep:
    """One run's model and optimizer state, as the loop's `Step` for a group of one. The global generator
    is the run's dropout stream: the caller seeds it (and forks it, so the caller's stream is left alone)."""

    def __init__(self, spec: RunSpec, model: nn.Module, comm: Communicator, resume: dict | None = None) -> None:
        self.spec, self.module, self.comm = spec, model, comm
        self.loss = loss_for(spec)
        self.params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        self.hp = Hyper.from_spec(spec.optim, comm.device, self.params[0].dtype)
        self.opt_state = init_state(spec.optim, self.params)
        if resume is None:
            self.theta0 = flat(self.params)
        else:
            model.load_state_dict(resume["model"])
            for buf, saved in zip(_state_tensors(self.opt_state), resume["opt"]):
                buf.copy_(saved)
            self.theta0 = flat([resume["init"][n] for n, p in model.named_parameters() if p.requires_grad])
            comm.restore_rng(resume, spec)
        model.train()

    def step(self, x: Tensor, y: Tensor, lr: Tensor, step: int) -> Tensor:
        model, params, o, comm = self.module, self.params, self.spec.optim, self.comm
        # Augmented whole, then sliced: every process of a data-parallel run draws the one-process run's augmentation.
        xs, ys, share = comm.shard(x[0], y[0])

        def second(_: list[Tensor]) -> list[Tensor]:
            saved = [v.clone() for v in model.buffers()]  # SAM's second pass must not update batch-norm statistics again
            grads = comm.reduce_gradients(self.objective(xs, ys), params, share)[0]
            with torch.no_grad():
                for v, s in zip(model.buffers(), saved):
                    v.copy_(s)
            return grads

        with comm.merged_norm_stats(model):
            grads, loss = comm.reduce_gradients(self.objective(xs, ys), params, share)
            descend(o, params, grads, second if o.sam_rho > 0 else None, self.opt_state, self.hp, lr[0], o.sam_rho)
        return loss.reshape(1)

    def objective(self, x: Tensor, y: Tensor) -> Tensor:
        model, adv = self.module, self.spec.train.adversarial
        params = dict(model.named_parameters())

        def quiet(xx: Tensor) -> Tensor:  # adversarial training's extra passes work on copies of the BN statistics
            return functional_call(model, {**params, **{k: v.clone() for k, v in model.named_buffers()}}, (xx,))

        return batch_objective(model, x, y, adv, quiet if adv is not None else None, self.loss.fn)

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
        """Mean loss and accuracy (NaN where the targets are not class labels) in eval mode (batch norm with
        running statistics)."""
        self.module.eval()
        loss, right = torch.zeros((), device=x.device, dtype=torch.float64), torch.zeros((), device=x.device)
        for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
            out = self.module(xb)
            loss += self.loss.total(out, yb).double()
            hits = correct(out, yb)
            right += hits if hits is not None else math.nan
        self.module.train()
        return [float(loss) / x.shape[0]], [float(right) / x.shape[0]]

    def distances(self) -> list[float]:
        return [float(torch.linalg.vector_norm(flat(self.params) - self.theta0))]

    def state_dict(self, pos: int) -> dict[str, Tensor]:
        return self.module.state_dict()

    def keep(self, rows: Tensor) -> None:
        pass  # a group of one ends when its run leaves

    def resume_state(self) -> dict:
        opt = [t.detach().clone() for t in _state_tensors(self.opt_state)]
        return {"model": self.module.state_dict(), "opt": opt, **self.comm.rng_state()}


def train_run(
    spec: RunSpec,
    store: RunStore | None = None,
    run_id: str | None = None,
    progress: Progress | None = None,
    callbacks: Sequence[Callback] = (),
    dist: Communicator | None = None,
    sinks: Sequence[Sink] = (),
) -> RunResult:
    """Train one run; with a store, record metrics and checkpoints under `run_id` and resume if interrupted.
    `callbacks` add measurements (probes) at the steps they ask for; their time is reported apart.
    `dist`: this process's part of a data-parallel run (see .distributed; only rank 0 gets a store).
    `sinks` (batchscope.sinks: TensorBoard, MLflow) get every metrics row as it is logged, on rank 0 only;
    they stay open (the caller closes them)."""
    comm = dist if dist is not None else Communicator(resolve_device(spec.train.device))
    ds = dataset_for(spec, comm.device)
    model = model_for(spec, ds, comm.device)
    comm.prepare(model)
    rec = Recorder(store, run_id or spec.run_id(), sinks if comm.rank == 0 else ())
    cuda = [comm.device.index or 0] if comm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(comm.noise_seed(spec.seeds.noise))  # dropout's stream
        resume = comm.from_rank0(rec.resume_point)  # under DDP rank 0 reads it for everyone
        if resume is None:  # rank 0 reads the store; every process starts from its weights
            comm.start_from_rank0(model, lambda: warm_start(spec, model, rec))
        step = PlainStep(spec, model, comm, resume)
        return run_group([spec], [rec], step, ds, comm, progress, callbacks, resume)[0]


def _state_tensors(opt_state: dict) -> list[Tensor]:
    values = [opt_state[key] for key in sorted(opt_state)]
    return [t for v in values for t in (v if isinstance(v, list) else [v])]
