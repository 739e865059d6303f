"""Many runs of one architecture trained together: one vmapped step over stacked parameters.

Runs that share a `group_key` (architecture, data, batch size, schedule, budget, logging, dtype) and differ
only in learning rate, momentum, weight decay, Adam's betas/eps, SAM radius, dropout rate or seeds train as
one stack: each run's model is built by the serial path (`model_for`, so the same initialization), the
parameters are stacked (`torch.func.stack_module_state`) and one `vmap`ped `functional_call` of the model
computes every run's gradient at once. Everything else follows the serial loop run by run: each run draws
its data order from its own generator with the same `epoch_batches` calls, follows its own `lr_at`
schedule, takes the functional optimizer step of `optim.py` with its own hyperparameter tensors, is
measured at the same steps and stops under its own stopping rule. Without dropout the results equal the
serial loop's to float rounding (batched matmuls add in another order).

Differences from the serial loop, by design:
- Batch norm runs the module's own forward on copies of the running statistics, which come back as
  outputs (the stored stacks are updated after the step; SAM's second pass leaves them alone).
- Dropout masks come from a counter-based hash of (the run's noise seed, step, layer, pass, element)
  instead of the global generator, which cannot be split per run under vmap: a fused dropout run is still
  a pure function of its spec, but it is not the serial run's stream (they agree in distribution).
- A run that diverges, or meets its stopping rule, is frozen: its outcome and checkpoints are taken at
  that step, exactly as the serial loop would, and it leaves the stack; the others go on.
- No resume checkpoints: an interrupted group restarts from scratch (its runs' metrics are replaced).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.utils._pytree import tree_map

from ..data import augment, epoch_batches
from ..errors import BatchscopeError
from ..factories import dataset_for, epoch_plan, log_steps, model_for, resolve_device
from ..spec import RunSpec
from .loop import EVAL_BATCH, Progress, Recorder, RunResult, _epochs_done, _Stopper, _warm_start
from .optim import Hyper, clip_grads, init_state, optimizer_step, sam_perturbation
from .schedule import lr_at

# Settings that may differ between the runs of one group: everything the step takes as a per-run tensor.
VARYING = {
    "optim": ("lr", "momentum", "weight_decay", "betas", "eps", "sam_rho"),
    "model": ("dropout",),
    "seeds": ("init", "data", "noise"),
}
_M32 = 0xFFFFFFFF


def group_key(spec: RunSpec) -> str:
    """Runs with equal keys can train in one fused stack (dropout-free models hold no Dropout modules)."""
    body = spec.model_dump(mode="json", exclude={"name", "tags"})
    for section, names in VARYING.items():
        for n in names:
            body[section].pop(n)
    body["model"]["has_dropout"] = spec.model.dropout > 0
    return json.dumps(body, sort_keys=True)


def unfusable_reason(spec: RunSpec) -> str | None:
    """Why this run cannot join a fused stack, or None if it can."""
    if spec.probes:
        return "probes need the serial loop"
    device = resolve_device(spec.train.device)
    model = model_for(spec, dataset_for(spec, device), device)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and type(m) is not nn.Dropout:
            return f"{name}: {type(m).__name__} draws from the global generator"
    return None


def _mix(h: Tensor) -> Tensor:
    """A 32-bit integer bijection with good avalanche (held in int64, so no product overflows)."""
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & _M32
    return h ^ (h >> 16)


class _RunDropout(nn.Module):
    """Dropout with a per-run rate and seed held as buffers (so vmap gives each run its own), masks from a
    hash of (seed, step, layer, pass, element): no generator state, the same on every device."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer, self.step, self.salt = layer, 0, 0
        self.register_buffer("p", torch.zeros(()))
        self.register_buffer("seed", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        key = _mix((_mix(self.seed & _M32) + self.step) & _M32)
        key2 = _mix((key + 0x10001 * self.layer + 0x3F1 * self.salt + 1) & _M32)
        idx = torch.arange(math.prod(x.shape), device=x.device).reshape(x.shape)
        u = (_mix(_mix((idx + key2) & _M32) ^ key) >> 8).to(x.dtype) * 2.0**-24  # 24 bits: exact in float32
        return x * (u >= self.p) / (1 - self.p)


class _Stack:
    """The group's models as one functional model over stacked (R, ...) parameters and buffers."""

    def __init__(self, models: list[nn.Module], specs: list[RunSpec], device: torch.device) -> None:
        first = models[0]
        self.state_keys = list(first.state_dict().keys())
        self.param_names = [n for n, p in first.named_parameters() if p.requires_grad]
        self.stat_names = [n for n, _ in first.named_buffers()]
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = dict(buffers)
        self.template = copy.deepcopy(first).to("meta")  # structure only: functional_call supplies every tensor
        self.drops: list[_RunDropout] = []
        dtype = self.params[self.param_names[0]].dtype
        for name, m in list(self.template.named_modules()):
            if type(m) is nn.Dropout:
                parent, _, child = name.rpartition(".")
                d = _RunDropout(len(self.drops))
                setattr(self.template.get_submodule(parent), child, d)
                self.drops.append(d)
                self.buffers[f"{name}.p"] = torch.tensor([s.model.dropout for s in specs], device=device, dtype=dtype)
                self.buffers[f"{name}.seed"] = torch.tensor([s.seeds.noise for s in specs], device=device)

    def loss(self, params: dict, buffers: dict, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, dict]]:
        """One run's batch loss; batch norm updates copies of its statistics, returned beside the loss."""
        stats = {k: buffers[k].clone() for k in self.stat_names}
        out = functional_call(self.template, {**params, **buffers, **stats}, (x,))
        loss = F.cross_entropy(out, y)
        return loss, (loss.detach(), stats)

    def evaluate(self, params: dict, buffers: dict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One run's summed loss and number correct on (x, y), in eval mode."""
        out = functional_call(self.template, {**params, **buffers}, (x,))
        return F.cross_entropy(out, y, reduction="sum"), (out.argmax(1) == y).sum()

    def state_dict(self, j: int) -> dict[str, Tensor]:
        """Run j's weights as its model's state_dict (cloned: a view would save the whole stack)."""
        both = {**self.params, **self.buffers}
        return {k: both[k][j].clone() for k in self.state_keys}


def _step_fn(stack: _Stack, spec: RunSpec, sam: bool):
    """One run's update (the serial `_update`, with SAM as a per-run choice), to be vmapped over runs."""
    o = spec.optim

    def step(params, buffers, state, hp, rho, lr, x, y):
        for d in stack.drops:
            d.salt = 0
        g, (loss, stats) = grad(stack.loss, has_aux=True)(params, buffers, x, y)
        plist = [params[n] for n in stack.param_names]
        grads = [g[n] for n in stack.param_names]
        if sam:
            # the gradient at the worst-case neighbour w + e drives the step from w; a run with rho 0 keeps its own
            e = sam_perturbation(grads, rho)
            with torch.no_grad():
                for p, ei in zip(plist, e):
                    p.add_(ei)
            for d in stack.drops:
                d.salt = 1
            g2, _ = grad(stack.loss, has_aux=True)(params, buffers, x, y)  # its statistics are dropped
            with torch.no_grad():
                for p, ei in zip(plist, e):
                    p.sub_(ei)
            grads = [torch.where(rho > 0, g2[n], gi) for n, gi in zip(stack.param_names, grads)]
        if o.grad_clip is not None:
            grads = clip_grads(grads, o.grad_clip)
        optimizer_step(o, plist, grads, state, Hyper(*hp), lr)
        with torch.no_grad():
            for k, v in stats.items():
                buffers[k].copy_(v)
        return loss

    return step


def train_group(
    specs: Sequence[RunSpec],
    store=None,
    run_ids: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[RunResult]:
    """Train runs that share a `group_key` as one vmapped stack; with a store, record each run's metrics
    and checkpoints under its id as the serial loop does. Results come back in the order of `specs`."""
    specs = list(specs)
    keys = {group_key(s) for s in specs}
    if len(keys) != 1:
        raise BatchscopeError(
            "train_group: the runs differ in more than learning rate, momentum, weight decay, Adam's betas/eps, "
            "SAM radius, dropout and seeds"
        )
    spec0 = specs[0]
    run_ids = list(run_ids) if run_ids is not None else [s.run_id() for s in specs]
    device = resolve_device(spec0.train.device)
    ds = dataset_for(spec0, device)
    recs = [Recorder(store, rid) for rid in run_ids]
    models = []
    for s, rec in zip(specs, recs):
        m = model_for(s, ds, device)
        _warm_start(s, m, rec, device)
        models.append(m)
    stack = _Stack(models, specs, device)
    del models
    plan = epoch_plan(spec0, ds.n_train)
    total = sum(k for _, k in plan)
    points = log_steps(plan, spec0)  # also the record steps: fused groups have no probes
    n_eval = spec0.log.train_eval_examples or ds.n_train
    x_tr_eval, y_tr_eval = ds.x_train[:n_eval], ds.y_train[:n_eval]
    dtype = stack.params[stack.param_names[0]].dtype
    o = spec0.optim
    R = len(specs)

    hps = [Hyper.from_spec(s.optim, device, dtype) for s in specs]
    live = {  # every per-run tensor, stacked along dim 0: frozen runs are dropped from all of them at once
        "params": stack.params,
        "buffers": stack.buffers,
        "state": init_state(o, [stack.params[n] for n in stack.param_names]),
        "hp": tuple(torch.stack([getattr(h, f.name) for h in hps]) for f in dataclasses.fields(Hyper)),
        "rho": torch.tensor([s.optim.sam_rho for s in specs], device=device, dtype=dtype),
        "theta0": torch.cat([stack.params[n].reshape(R, -1) for n in stack.param_names], 1).clone(),
        "finite": torch.ones(R, dtype=torch.bool, device=device),
        "first_bad": torch.full((R,), -1, dtype=torch.long, device=device),
    }
    if "t" in live["state"]:
        live["state"]["t"] = torch.zeros(R, device=device, dtype=dtype)
    alive = list(range(R))  # positions in `specs` of the runs still in the stack, in stack order
    data_gens = [torch.Generator().manual_seed(s.seeds.data) for s in specs]
    aug_gens = [torch.Generator().manual_seed(s.seeds.noise + 0x5EED) for s in specs]
    stoppers = [_Stopper(s) for s in specs]
    last: list[dict[str, float]] = [{} for _ in specs]
    results: list[RunResult | None] = [None] * R
    sam = any(s.optim.sam_rho > 0 for s in specs)
    step_v = vmap(_step_fn(stack, spec0, sam))
    eval_v = vmap(stack.evaluate, in_dims=(0, 0, None, None))
    t_start = last_flush = time.perf_counter()

    for j, rec in enumerate(recs):
        rec.save("init", {"model": stack.state_dict(j)}, 0)
        if 0 in spec0.log.checkpoint_epochs:
            rec.save("epoch_0", {"model": stack.state_dict(j)}, 0)

    def evaluate(x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
        stack.template.eval()
        n = len(alive)
        loss = torch.zeros(n, device=device, dtype=torch.float64)
        correct = torch.zeros(n, device=device)
        chunk = min(EVAL_BATCH, max(128, 8 * EVAL_BATCH // n))  # at most 8x the serial loop's activations
        with torch.no_grad():
            for xb, yb in zip(x.split(chunk), y.split(chunk)):
                lb, cb = eval_v(live["params"], live["buffers"], xb, yb)
                loss += lb.double()
                correct += cb
        stack.template.train()
        return (loss / x.shape[0]).tolist(), (correct / x.shape[0]).tolist()

    def record(step: int, epoch: float, lr_row: list[float]) -> None:
        tr_loss, tr_acc = evaluate(x_tr_eval, y_tr_eval)
        te_loss, te_acc = evaluate(ds.x_test, ds.y_test)
        flat = torch.cat([live["params"][n].reshape(len(alive), -1) for n in stack.param_names], 1)
        dist = torch.linalg.vector_norm(flat - live["theta0"], dim=1).tolist()
        for pos, j in enumerate(alive):
            m = {
                "train_loss": tr_loss[pos],
                "train_acc": tr_acc[pos],
                "test_loss": te_loss[pos],
                "test_acc": te_acc[pos],
                "weight_distance": dist[pos],
                "lr": lr_row[pos],
            }
            last[j] = m
            recs[j].log(step, epoch, m)

    def freeze(done: dict[int, tuple[str, str, int | None]], step: int) -> None:
        """Take runs out of the stack with their outcome (status, stop reason, diverged step) at `step`."""
        nonlocal alive
        for j, (status, reason, bad) in done.items():
            if status == "done":
                recs[j].save("final", {"model": stack.state_dict(alive.index(j))}, step)
            recs[j].flush()
            final = {**last[j], "steps": float(step), "epochs": _epochs_done(plan, step), "probe_seconds": 0.0}
            seconds = time.perf_counter() - t_start
            results[j] = RunResult(status, final, step, seconds, reason, bad, recs[j].all)
        keep = [pos for pos, j in enumerate(alive) if j not in done]
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=device, dtype=torch.long)
            for name in live:
                live[name] = tree_map(lambda t: t.index_select(0, idx), live[name])  # noqa: B023
            stack.params, stack.buffers = live["params"], live["buffers"]
            alive = [alive[pos] for pos in keep]

    def diverged_now() -> dict[int, tuple[str, str, int | None]]:
        finite, bad = live["finite"].tolist(), live["first_bad"].tolist()
        return {j: ("diverged", f"non-finite loss at step {bad[pos]}", bad[pos])
                for pos, j in enumerate(alive) if not finite[pos]}  # fmt: skip

    stack.template.train()
    record(0, 0.0, [0.0] * R)
    step = 0
    for e, (bsz, k) in enumerate(plan):
        if not alive:
            break
        # every run's own data order, from the same generator calls as the serial loop
        per_gen = [epoch_batches(ds.n_train, bsz, data_gens[j], spec0.train.drop_last)[:k] for j in alive]
        sizes = [len(b) for b in per_gen[0]]
        live["order"] = torch.stack([torch.cat(b) for b in per_gen]).to(device)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        live["lrs"] = torch.tensor(  # (runs, k): the epoch's learning rates, one host-to-device copy
            [[lr_at(specs[j], e + i / k, len(plan), bsz) * stoppers[j].scale for i in range(k)] for j in alive], device=device, dtype=dtype
        )
        for i in range(k):
            if bsz == ds.n_train:  # full batch: the data in its stored order, as the serial loop does
                x = ds.x_train.expand(len(alive), *ds.x_train.shape)
                y = ds.y_train.expand(len(alive), *ds.y_train.shape)
            else:
                idx = live["order"][:, offsets[i] : offsets[i + 1]]
                x, y = ds.x_train[idx], ds.y_train[idx]
            if spec0.data.augment:
                x = torch.stack(
                    [augment(x[pos], aug_gens[j], crop_pad=ds.crop_pad, hflip=ds.hflip) for pos, j in enumerate(alive)]
                )
            for d in stack.drops:
                d.step = step
            lr = live["lrs"][:, i]
            loss = step_v(live["params"], live["buffers"], live["state"], live["hp"], live["rho"], lr, x, y)
            bad = ~torch.isfinite(loss)
            live["first_bad"] = torch.where(bad & (live["first_bad"] < 0), step + 1, live["first_bad"])
            live["finite"] &= ~bad
            step += 1
            if progress is not None:
                progress(step, total)
            if step in points:
                freeze(diverged_now(), step)
                if not alive:
                    break
                record(step, e + (i + 1) / k, live["lrs"][:, i].tolist())
                scales = [stoppers[j].scale for j in alive]
                stops = {j: stoppers[j].check(last[j]) for j in alive}
                for pos, j in enumerate(alive):  # a reduction on a plateau acts from the next step, as in the serial loop
                    if stoppers[j].scale != scales[pos] and i + 1 < k:
                        live["lrs"][pos, i + 1 :] = torch.tensor(
                            [lr_at(specs[j], e + q / k, len(plan), bsz) * stoppers[j].scale for q in range(i + 1, k)],
                            device=device, dtype=dtype)
                stopped = {j: ("done", r, None) for j, r in stops.items() if r is not None}
                for j in stopped:  # the serial loop saves the epoch's checkpoint on the way out
                    if e + 1 in spec0.log.checkpoint_epochs:
                        recs[j].save(f"epoch_{e + 1}", {"model": stack.state_dict(alive.index(j))}, step)
                freeze(stopped, step)
                if not alive:
                    break
        freeze(diverged_now(), step)
        if e + 1 in spec0.log.checkpoint_epochs:
            for pos, j in enumerate(alive):
                recs[j].save(f"epoch_{e + 1}", {"model": stack.state_dict(pos)}, step)
        now = time.perf_counter()
        if now - last_flush >= spec0.log.resume_every_s:  # shows progress and keeps the claims' heartbeat
            for j in alive:
                recs[j].flush()
            last_flush = now
    freeze({j: ("done", "budget", None) for j in alive}, step)
    return [r for r in results if r is not None]
