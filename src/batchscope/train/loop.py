"""One training run from one spec: a pure function of the spec and its seeds.

Metrics are recorded at step 0, at log-spaced steps and at every epoch end; a resume checkpoint
(weights, optimizer state and every random generator's state) is written at epoch ends, so an
interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset, augment, epoch_batches
from ..errors import BatchscopeError
from ..factories import dataset_for, epoch_plan, log_steps, model_for, resolve_device
from ..spec import RunSpec
from .optim import Hyper, clip_grads, init_state, optimizer_step, sam_perturbation
from .schedule import lr_at

if TYPE_CHECKING:
    from ..store import RunStore
    from .distributed import DistContext

EVAL_BATCH = 1024
Progress = Callable[[int, int], None]


class Callback(Protocol):
    """Measurements along the trajectory (probes): called after the update of each step it asks for."""

    def steps(self, total: int, epoch_ends: list[int]) -> set[int]:
        """The steps (0 = the initial weights) at which to be called."""
        ...

    def __call__(self, step: int, epoch: float, model: nn.Module, data: Dataset) -> dict[str, float]:
        """Metrics to store for this step; the model is in train mode and must be left so."""
        ...


@dataclass
class RunResult:
    status: str  # "done" | "diverged"
    final: dict[str, float]
    steps: int
    seconds: float
    stop_reason: str = "budget"
    diverged_step: int | None = None
    metrics: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (batch norm with running statistics)."""
    was = model.training
    model.eval()
    loss, correct = torch.zeros((), device=x.device, dtype=torch.float64), torch.zeros((), device=x.device)
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum()
    model.train(was)
    n = x.shape[0]
    return float(loss) / n, float(correct) / n


def flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


class _Stopper:
    """The spec's stopping rule on the training metric, with its learning-rate reductions on a plateau."""

    def __init__(self, spec: RunSpec, state: dict | None = None) -> None:
        self.s = spec.train.stop
        self.sign = 1.0 if self.s.metric == "train_loss" else -1.0  # minimize sign * metric
        state = state or {}
        self.best = state.get("best", math.inf)
        self.waited = state.get("waited", 0)
        self.reduced = state.get("reduced", 0)

    @property
    def scale(self) -> float:
        """The factor on the schedule's learning rate after the reductions so far."""
        return self.s.reduce_lr**self.reduced if self.reduced else 1.0

    def check(self, metrics: dict[str, float]) -> str | None:
        v = metrics[self.s.metric]
        if self.s.threshold is not None and self.sign * v <= self.sign * self.s.threshold:
            return f"{self.s.metric} reached {self.s.threshold}"
        if self.s.patience is not None:
            if self.sign * v < self.best - self.s.min_delta:
                self.best, self.waited = self.sign * v, 0
            else:
                self.waited += 1
                if self.waited >= self.s.patience:
                    if self.s.reduce_lr is not None and self.reduced < self.s.reductions:
                        self.reduced, self.waited = self.reduced + 1, 0
                        return None
                    return f"{self.s.metric} did not improve for {self.s.patience} evaluations" + (
                        f" after {self.reduced} learning-rate reduction(s)" if self.reduced else "")
        return None

    def state(self) -> dict:
        return {"best": self.best, "waited": self.waited, "reduced": self.reduced}


class Recorder:
    """Where a run's metrics and checkpoints go: a store, or nowhere (library use)."""

    def __init__(self, store: RunStore | None, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.pending: list[tuple[int, float, dict[str, float]]] = []
        self.all: list[tuple[int, float, dict[str, float]]] = []

    def log(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.pending.append((step, epoch, metrics))
        self.all.append((step, epoch, metrics))

    def flush(self) -> None:
        if self.store is not None and self.pending:
            self.store.log_metrics_many(self.run_id, [(s, e, m) for s, e, m in self.pending])
        self.pending = []

    def save(self, tag: str, state: dict, step: int) -> None:
        if self.store is not None:
            self.store.save_checkpoint(self.run_id, tag, state, step)

    def resume_point(self) -> dict | None:
        if self.store is None:
            return None
        latest = self.store.latest_checkpoint(self.run_id, prefix="resume")
        if latest is None:
            return None
        state = self.store.load_checkpoint(self.run_id, latest[0])
        self.store.truncate_metrics(self.run_id, state["step"])
        return state

    def load(self, run_id: str, tag: str) -> dict:
        assert self.store is not None, "no store, no checkpoints: callers check rec.store first"
        return self.store.load_checkpoint(run_id, tag)


def _resume_point(rec: Recorder, dist: DistContext | None) -> dict | None:
    """The resume checkpoint with the run's initial weights, or None; under DDP rank 0 reads it for everyone."""

    def read() -> dict | None:
        state = rec.resume_point()
        if state is not None:
            state["init"] = rec.load(rec.run_id, "init")["model"]
        return state

    return read() if dist is None else dist.from_rank0(read)


def _warm_start(spec: RunSpec, model: nn.Module, rec: Recorder, device: torch.device) -> None:
    src, ws = spec.source_spec(), spec.train.warm_start
    if src is None or ws is None:  # both None, or neither
        return
    if rec.store is None:
        raise BatchscopeError("train.warm_start: needs a store that holds the source run")
    src_id = src.run_id()
    run = rec.store.get_run(src_id)
    if run is None or run.status != "done":
        raise BatchscopeError(f"train.warm_start: source run {src_id} is not done (status {getattr(run, 'status', 'absent')})")
    tag = f"epoch_{ws.epoch}"
    if tag not in {t for t, _ in rec.store.checkpoints(src_id)}:
        raise BatchscopeError(
            f"train.warm_start: source run {src_id} has no checkpoint at epoch {ws.epoch}; "
            f"add {ws.epoch} to log.checkpoint_epochs"
        )
    model.load_state_dict(rec.load(src_id, tag)["model"])


def train_run(
    spec: RunSpec,
    store: RunStore | None = None,
    run_id: str | None = None,
    progress: Progress | None = None,
    callbacks: Sequence[Callback] = (),
    dist: DistContext | None = None,
) -> RunResult:
    """Train one run; with a store, record metrics and checkpoints under `run_id` and resume if interrupted.
    `callbacks` add measurements (probes) at the steps they ask for; their time is reported apart.
    `dist`: this process's part of a data-parallel run (see .distributed; only rank 0 gets a store)."""
    device = resolve_device(spec.train.device) if dist is None else dist.device
    ds = dataset_for(spec, device)
    model = model_for(spec, ds, device)
    if dist is not None:
        dist.prepare(model)
    rec = Recorder(store, run_id or spec.run_id())
    plan = epoch_plan(spec, ds.n_train)
    total = sum(k for _, k in plan)
    points = log_steps(plan, spec)
    ends = np.cumsum([k for _, k in plan]).tolist()
    probe_at = [cb.steps(total, ends) for cb in callbacks]
    record_at = points.union(*probe_at)
    probe_seconds = 0.0
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    o = spec.optim
    hp = Hyper.from_spec(o, device, params[0].dtype)
    opt_state = init_state(o, params)
    n_eval = spec.log.train_eval_examples or ds.n_train
    x_tr_eval, y_tr_eval = ds.x_train[:n_eval], ds.y_train[:n_eval]
    data_gen = torch.Generator().manual_seed(spec.seeds.data)
    aug_gen = torch.Generator().manual_seed(spec.seeds.noise + 0x5EED)
    lr_t = torch.zeros((), device=device, dtype=params[0].dtype)
    cuda = [device.index or 0] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(spec.seeds.noise if dist is None else dist.noise_seed(spec.seeds.noise))  # dropout's stream
        resume = _resume_point(rec, dist)
        if resume is None:
            if dist is None:
                _warm_start(spec, model, rec, device)
            else:  # rank 0 reads the store; every process starts from its weights
                dist.start_from_rank0(model, lambda: _warm_start(spec, model, rec, device))
            theta0 = flat(params)
            rec.save("init", {"model": model.state_dict()}, 0)
            if 0 in spec.log.checkpoint_epochs:
                rec.save("epoch_0", {"model": model.state_dict()}, 0)
            step, start_epoch, stopper = 0, 0, _Stopper(spec)
        else:
            model.load_state_dict(resume["model"])
            for buf, saved in zip(_state_tensors(opt_state), resume["opt"]):
                buf.copy_(saved)
            theta0 = flat(list(_params_of(resume["init"], model)))
            torch.set_rng_state(resume["rng"])
            if cuda and "cuda_rng" in resume:
                torch.cuda.set_rng_state(resume["cuda_rng"], device)
            if dist is not None:
                dist.restore_rng(resume, spec)
            elif spec.model.dropout > 0 and len(resume.get("rng_ranks", ())) > 1:
                raise BatchscopeError(
                    f"run {rec.run_id}: its resume checkpoint was written by {len(resume['rng_ranks'])} processes and "
                    f"dropout draws one random stream per process; resume it with --nproc {len(resume['rng_ranks'])}"
                )
            data_gen.set_state(resume["data_gen"])
            aug_gen.set_state(resume["aug_gen"])
            step, start_epoch, stopper = resume["step"], resume["epoch"], _Stopper(spec, resume["stop"])

        t_start = time.perf_counter()
        seconds_before = resume["seconds"] if resume else 0.0
        last_ckpt = time.perf_counter()
        status, stop_reason, diverged_step = "done", "budget", None
        finite = torch.ones((), dtype=torch.bool, device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)

        def record(step: int, epoch: float) -> dict[str, float]:
            nonlocal probe_seconds
            tr_loss, tr_acc = evaluate(model, x_tr_eval, y_tr_eval)
            te_loss, te_acc = evaluate(model, ds.x_test, ds.y_test)
            m = {
                "train_loss": tr_loss,
                "train_acc": tr_acc,
                "test_loss": te_loss,
                "test_acc": te_acc,
                "weight_distance": float(torch.linalg.vector_norm(flat(params) - theta0)),
                "lr": float(lr_t),
            }
            t = time.perf_counter()
            with torch.random.fork_rng(devices=cuda):  # probes must not shift the run's dropout stream
                for cb, at in zip(callbacks, probe_at):
                    if step in at:
                        m.update(cb(step, epoch, model, ds))
            probe_seconds += time.perf_counter() - t
            rec.log(step, epoch, m)
            return m

        last = record(0, 0.0) if resume is None else {}
        model.train()
        for e in range(start_epoch, len(plan)):
            bsz, k = plan[e]
            batches = epoch_batches(ds.n_train, bsz, data_gen, drop_last=spec.train.drop_last)[:k]
            for i, idx in enumerate(batches):
                epoch_f = e + i / max(k, 1)
                lr_t.fill_(lr_at(spec, epoch_f, len(plan), bsz) * stopper.scale)
                x, y = (ds.x_train, ds.y_train) if bsz == ds.n_train else (ds.x_train[idx], ds.y_train[idx])
                if spec.data.augment:
                    x = augment(x, aug_gen, crop_pad=ds.crop_pad, hflip=ds.hflip)
                if dist is None:
                    loss = _update(model, params, x, y, o, opt_state, hp, lr_t)
                else:
                    # Augmented whole, then sliced: every process draws the single-process run's augmentation.
                    xs, ys, share = dist.shard(x, y)
                    with dist.merged_norm_stats(model):
                        loss = _update(model, params, xs, ys, o, opt_state, hp, lr_t, dist, share)
                bad = ~torch.isfinite(loss)
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step + 1), first_bad)
                finite &= ~bad
                step += 1
                if progress is not None:
                    progress(step, total)
                if step in record_at:
                    if not bool(finite):
                        break
                    last = record(step, e + (i + 1) / k)
                    # probe-only steps must not change when the stopping rule looks
                    reason = stopper.check(last) if step in points else None
                    if dist is not None:
                        reason = dist.agree(reason)  # never let one process train on alone
                    if reason is not None:
                        stop_reason = reason
                        break
            if not bool(finite):
                status, diverged_step = "diverged", int(first_bad)
                stop_reason = f"non-finite loss at step {diverged_step}"
                break
            if e + 1 in spec.log.checkpoint_epochs:
                rec.save(f"epoch_{e + 1}", {"model": model.state_dict()}, step)
            if stop_reason != "budget":
                break
            now = time.perf_counter()
            due = now - last_ckpt >= spec.log.resume_every_s
            if e + 1 < len(plan) and (due if dist is None else dist.agree(due)):  # rank 0's clock decides for all
                rec.flush()
                rec.save(
                    "resume",
                    {
                        "model": model.state_dict(),
                        "opt": [t.detach().clone() for t in _state_tensors(opt_state)],
                        "rng": torch.get_rng_state(),
                        **({"rng_ranks": dist.rng_states()} if dist is not None else {}),
                        **({"cuda_rng": torch.cuda.get_rng_state(device)} if cuda else {}),
                        "data_gen": data_gen.get_state(),
                        "aug_gen": aug_gen.get_state(),
                        "step": step,
                        "epoch": e + 1,
                        "stop": stopper.state(),
                        "seconds": seconds_before + now - t_start,
                    },
                    step,
                )
                last_ckpt = now

    seconds = seconds_before + time.perf_counter() - t_start
    if status == "done":
        rec.save("final", {"model": model.state_dict()}, step)
    rec.flush()
    final = {k: v for k, v in last.items()}
    final.update({"steps": float(step), "epochs": _epochs_done(plan, step), "probe_seconds": probe_seconds})
    return RunResult(status, final, step, seconds, stop_reason, diverged_step, rec.all)


def _update(
    model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor, o, opt_state: dict, hp: Hyper, lr: Tensor,
    dist: DistContext | None = None, share: float = 1.0,
) -> Tensor:
    """One optimizer step (with SAM and clipping as the spec asks); returns the batch loss.
    Under DDP, x is this process's slice, `share` its fraction of the global batch."""
    loss = F.cross_entropy(model(x), y)
    grads, loss = _gradients(loss, params, dist, share)
    if o.sam_rho > 0:
        # the gradient at the worst-case neighbour w + e drives the step taken from w
        e = sam_perturbation(grads, o.sam_rho)
        with _frozen_bn_stats(model):
            with torch.no_grad():
                torch._foreach_add_(params, e)
            grads, _ = _gradients(F.cross_entropy(model(x), y), params, dist, share)
            with torch.no_grad():
                torch._foreach_sub_(params, e)
    if o.grad_clip is not None:
        grads = clip_grads(grads, o.grad_clip)
    optimizer_step(o, params, grads, opt_state, hp, lr)
    return loss


def _gradients(loss: Tensor, params: list[Tensor], dist: DistContext | None, share: float) -> tuple[list[Tensor], Tensor]:
    """Gradient and (detached) loss of the batch; under DDP, of the global batch, summed over processes."""
    if dist is None:
        return list(torch.autograd.grad(loss, params)), loss.detach()
    return dist.reduce_gradients(loss, params, share)


@contextlib.contextmanager
def _frozen_bn_stats(model: nn.Module):
    """SAM's second pass must not update batch-norm running statistics a second time."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])


def _state_tensors(opt_state: dict) -> list[Tensor]:
    out: list[Tensor] = []
    for key in sorted(opt_state):
        v = opt_state[key]
        out.extend(v if isinstance(v, list) else [v])
    return out


def _params_of(state_dict: dict, model: nn.Module) -> list[Tensor]:
    return [state_dict[n] for n, p in model.named_parameters() if p.requires_grad]


def _epochs_done(plan: list[tuple[int, int]], step: int) -> float:
    done = 0.0
    for _, k in plan:
        if step >= k:
            done, step = done + 1, step - k
        else:
            return done + step / k
    return done

