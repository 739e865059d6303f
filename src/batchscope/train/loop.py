"""The training loop, written once: a group of one or many runs of one plan, stepped by a `Step` on the
device, one run's own module (`plain.PlainStep`, also one process of a data-parallel run) or a vmapped
stack of runs (`fused.VmappedStep`). The loop holds each run's data order and augmentation (from its own
generators), learning rate at every step (schedule times the stopping rule's reductions), metrics,
checkpoints, stopping rule and divergence. A run that diverges or stops is frozen at that step (outcome
and checkpoints taken then) and leaves the group; the others go on.

Metrics are taken at step 0, at log-spaced steps and at every epoch end. A step that gives resume state
gets a resume checkpoint at epoch ends, so an interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..data import Dataset, augment, epoch_batches
from ..factories import epoch_plan, log_steps
from ..spec import RunSpec
from .comm import Communicator
from .recorder import Recorder
from .schedule import lr_at

EVAL_BATCH = 1024
Progress = Callable[[int, int], None]
Outcome = tuple[str, str, "int | None"]  # status, stop reason, diverged step


class Callback(Protocol):
    """Measurements along the trajectory (probes): called after the update of each step it asks for."""

    def steps(self, total: int, epoch_ends: list[int]) -> set[int]: ...  # when to be called (0: the initial weights)
    # Metrics to store for this step; the model is in train mode and must be left so.
    def __call__(self, step: int, epoch: float, model: nn.Module, data: Dataset) -> dict[str, float]: ...


class Step(Protocol):
    """The group's models and optimizers on the device, one row per run still training."""

    @property
    def module(self) -> nn.Module | None: ...  # the run's own module, for callbacks (a group of one), else None

    def step(self, x: Tensor, y: Tensor, lr: Tensor, step: int) -> Tensor: ...  # every run's update on its batch: the losses
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]: ...  # losses, accuracies in eval mode
    def distances(self) -> list[float]: ...  # from the initial weights
    def state_dict(self, pos: int) -> dict[str, Tensor]: ...  # row pos's weights, as its model's state_dict
    def keep(self, rows: Tensor) -> None: ...  # drop every run but these rows
    def resume_state(self) -> dict | None: ...  # weights, optimizer and random state for a resume checkpoint, or None


class Stopper:
    """The spec's stopping rule on the training metric (a threshold or a plateau); `scale` is the factor
    its learning-rate reductions on a plateau put on the schedule."""

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
        """Why the run stops after these metrics, or None (a reduction on a plateau does not stop it)."""
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


@dataclass
class RunResult:
    status: str  # "done" | "diverged"
    final: dict[str, float]
    steps: int
    seconds: float
    stop_reason: str = "budget"
    diverged_step: int | None = None
    metrics: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)


@dataclass
class _Run:
    """One run's host-side state in the loop."""

    spec: RunSpec
    rec: Recorder
    stopper: Stopper
    data_gen: torch.Generator
    aug_gen: torch.Generator
    last: dict[str, float] = field(default_factory=dict)
    probe_seconds: float = 0.0
    result: RunResult | None = None


def run_group(
    specs: Sequence[RunSpec],
    recs: Sequence[Recorder],
    engine: Step,
    ds: Dataset,
    comm: Communicator,
    progress: Progress | None = None,
    callbacks: Sequence[Callback] = (),
    resume: dict | None = None,
) -> list[RunResult]:
    """Train the runs of one plan (specs differing only in what `engine` holds per run) from `engine`'s
    weights, or from `resume` (a group of one); results in the order of `specs`."""
    spec0 = specs[0]
    runs = [
        _Run(s, r, Stopper(s), torch.Generator().manual_seed(s.seeds.data), torch.Generator().manual_seed(s.seeds.noise + 0x5EED))
        for s, r in zip(specs, recs)
    ]
    module = engine.module
    if callbacks and module is None:
        raise ValueError("run_group: callbacks need a step with its own module")
    plan = epoch_plan(spec0, ds.n_train)
    total = sum(k for _, k in plan)
    points = log_steps(plan, spec0)
    probe_at = [cb.steps(total, np.cumsum([k for _, k in plan]).tolist()) for cb in callbacks]
    ckpt_steps = set(spec0.log.checkpoint_steps)
    record_at = points.union(*probe_at, ckpt_steps)
    n_eval = spec0.log.train_eval_examples or ds.n_train
    x_tr_eval, y_tr_eval = ds.x_train[:n_eval], ds.y_train[:n_eval]
    device, dtype = ds.x_train.device, getattr(torch, spec0.train.dtype)
    cuda = [device.index or 0] if device.type == "cuda" else []
    ckpt_epochs = spec0.log.checkpoint_epochs
    alive = list(runs)  # in row order of the engine and of `live`
    live = {  # the loop's per-run tensors, one row per run in `alive`
        "finite": torch.ones(len(runs), dtype=torch.bool, device=device),
        "first_bad": torch.full((len(runs),), -1, dtype=torch.long, device=device),
    }

    if resume is None:
        for pos, run in enumerate(alive):
            run.rec.save("init", {"model": engine.state_dict(pos)}, 0)
            if 0 in ckpt_epochs:
                run.rec.save("epoch_0", {"model": engine.state_dict(pos)}, 0)
        step, start_epoch, seconds_before = 0, 0, 0.0
    else:
        (run,) = runs
        run.data_gen.set_state(resume["data_gen"])
        run.aug_gen.set_state(resume["aug_gen"])
        run.stopper = Stopper(run.spec, resume["stop"])
        step, start_epoch, seconds_before = resume["step"], resume["epoch"], resume["seconds"]
    t_start = last_ckpt = time.perf_counter()

    def record(step: int, epoch: float, lrs: list[float]) -> None:
        tr_loss, tr_acc = engine.evaluate(x_tr_eval, y_tr_eval)
        te_loss, te_acc = engine.evaluate(ds.x_test, ds.y_test)
        dist = engine.distances()
        for pos, run in enumerate(alive):
            m = {"train_loss": tr_loss[pos], "train_acc": tr_acc[pos], "test_loss": te_loss[pos],
                 "test_acc": te_acc[pos], "weight_distance": dist[pos], "lr": lrs[pos]}  # fmt: skip
            if callbacks:
                t = time.perf_counter()
                with torch.random.fork_rng(devices=cuda):  # probes must not shift the run's dropout stream
                    for cb, at in zip(callbacks, probe_at):
                        if step in at and module is not None:
                            m.update(cb(step, epoch, module, ds))
                run.probe_seconds += time.perf_counter() - t
            run.last = m
            run.rec.log(step, epoch, m)

    def freeze(done: dict[int, Outcome], step: int) -> None:
        """Take the runs in rows `done` out of the group with their outcome (status, stop reason, diverged step)."""
        nonlocal alive, live
        seconds = time.perf_counter() - t_start
        for pos, (status, reason, bad) in done.items():
            run = alive[pos]
            if status == "done":
                run.rec.save("final", {"model": engine.state_dict(pos)}, step)
            run.rec.flush()
            final = {**run.last, "steps": float(step), "epochs": _epochs_done(plan, step), "probe_seconds": run.probe_seconds}
            run.result = RunResult(status, final, step, seconds_before + seconds, reason, bad, run.rec.all)
        keep = [pos for pos in range(len(alive)) if pos not in done]
        if len(keep) < len(alive):
            rows = torch.tensor(keep, device=device, dtype=torch.long)
            engine.keep(rows)
            live = tree_map(lambda t: t.index_select(0, rows), live)
            alive = [alive[pos] for pos in keep]

    def diverged() -> dict[int, Outcome]:
        finite, bad = live["finite"].tolist(), live["first_bad"].tolist()
        return {pos: ("diverged", f"non-finite loss at step {b}", b) for pos, (ok, b) in enumerate(zip(finite, bad)) if not ok}

    def lr_row(run: _Run, e: int, steps: range, k: int, bsz: int) -> list[float]:
        return [lr_at(run.spec, e + i / k, len(plan), bsz) * run.stopper.scale for i in steps]

    if resume is None:
        record(0, 0.0, [0.0] * len(alive))
    for e in range(start_epoch, len(plan)):
        if not alive:
            break
        bsz, k = plan[e]
        # every run's own data order, from the same generator calls in every kind of group
        batches = [epoch_batches(ds.n_train, bsz, run.data_gen, drop_last=spec0.train.drop_last)[:k] for run in alive]
        offsets = np.cumsum([0] + [len(b) for b in batches[0]]).tolist()
        live["order"] = torch.stack([torch.cat(b) for b in batches]).to(device)
        # (runs, k): the epoch's learning rates, one host-to-device copy
        live["lrs"] = torch.tensor([lr_row(run, e, range(k), k, bsz) for run in alive], device=device, dtype=dtype)
        for i in range(k):
            if bsz == ds.n_train:  # full batch: the data in its stored order
                x = ds.x_train.expand(len(alive), *ds.x_train.shape)
                y = ds.y_train.expand(len(alive), *ds.y_train.shape)
            else:
                idx = live["order"][:, offsets[i] : offsets[i + 1]]
                x, y = ds.x_train[idx], ds.y_train[idx]
            if spec0.data.augment:
                x = torch.stack([augment(xr, run.aug_gen, crop_pad=ds.crop_pad, hflip=ds.hflip) for xr, run in zip(x, alive)])
            loss = engine.step(x, y, live["lrs"][:, i], step)
            bad = ~torch.isfinite(loss)
            live["first_bad"] = torch.where(bad & (live["first_bad"] < 0), step + 1, live["first_bad"])
            live["finite"] &= ~bad
            step += 1
            if progress is not None:
                progress(step, total)
            if step not in record_at:
                continue
            if step in ckpt_steps:  # before the divergence check drops a run: a stored point is the weights then
                for pos, run in enumerate(alive):
                    run.rec.save(f"step_{step}", {"model": engine.state_dict(pos)}, step)
            freeze(diverged(), step)
            if not alive:
                break
            record(step, e + (i + 1) / k, live["lrs"][:, i].tolist())
            if step not in points:  # probe-only steps must not change when the stopping rule looks
                continue
            scales = [run.stopper.scale for run in alive]
            # rank 0's decisions: never let one process of a data-parallel run train on alone
            reasons = comm.agree([run.stopper.check(run.last) for run in alive])
            for pos, run in enumerate(alive):  # a reduction on a plateau acts from the next step
                if run.stopper.scale != scales[pos] and i + 1 < k:
                    live["lrs"][pos, i + 1 :] = torch.tensor(lr_row(run, e, range(i + 1, k), k, bsz), device=device, dtype=dtype)
            stopped: dict[int, Outcome] = {pos: ("done", r, None) for pos, r in enumerate(reasons) if r is not None}
            for pos in stopped:  # a run that stops saves its epoch's checkpoint on the way out
                if e + 1 in ckpt_epochs:
                    alive[pos].rec.save(f"epoch_{e + 1}", {"model": engine.state_dict(pos)}, step)
            freeze(stopped, step)
            if not alive:
                break
        freeze(diverged(), step)
        if e + 1 in ckpt_epochs:
            for pos, run in enumerate(alive):
                run.rec.save(f"epoch_{e + 1}", {"model": engine.state_dict(pos)}, step)
        now = time.perf_counter()
        # rank 0's clock decides for all; the flush also shows progress and keeps the claims' heartbeat
        if alive and e + 1 < len(plan) and comm.agree(now - last_ckpt >= spec0.log.resume_every_s):
            for run in alive:
                run.rec.flush()
                state = engine.resume_state()  # on every process (it gathers their random states); rank 0 saves it
                if state is not None:
                    state.update(data_gen=run.data_gen.get_state(), aug_gen=run.aug_gen.get_state(), step=step,
                                 epoch=e + 1, stop=run.stopper.state(), seconds=seconds_before + now - t_start)
                    run.rec.save("resume", state, step)
            last_ckpt = now
    freeze({pos: ("done", "budget", None) for pos in range(len(alive))}, step)
    return [run.result for run in runs if run.result is not None]


def _epochs_done(plan: list[tuple[int, int]], step: int) -> float:
    done = 0.0
    for _, k in plan:
        if step < k:
            return done + step / k
        done, step = done + 1, step - k
    return done
