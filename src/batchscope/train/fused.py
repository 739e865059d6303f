"""Many runs of one architecture trained together: one vmapped step over stacked parameters.

Runs that share a `group_key` (architecture, data, batch size, schedule, budget, logging, dtype) and differ
only in the settings of `VARYING` (the optimizer's hyperparameters, SAM radius, dropout rate, seeds) train as
one stack: each run's model is built as for a serial run (`model_for`, so the same initialization), the
parameters are stacked (`torch.func.stack_module_state`) and one `vmap`ped `functional_call` of the model
computes every run's gradient at once. The rest is the serial run's loop (`loop.py`) and update
(`optim.descend`), with per-run hyperparameter tensors. Without dropout the results equal the serial run's
to float rounding (batched matmuls add in another order).

Differences from the plain step, by design:
- Batch norm runs the module's own forward on copies of the running statistics, which come back as
  outputs (the stored stacks are updated after the step; SAM's second pass leaves them alone).
- Dropout masks come from a counter-based hash of (the run's noise seed, step, layer, pass, element)
  instead of the global generator, which cannot be split per run under vmap: a fused dropout run is still
  a pure function of its spec, but it is not the serial run's stream (they agree in distribution).
- No resume checkpoints: an interrupted group restarts from scratch (its runs' metrics are replaced).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.utils._pytree import tree_map

from ..errors import BatchscopeError
from ..factories import correct, dataset_for, loss_for, model_for, resolve_device
from ..spec import RunSpec
from .comm import Communicator
from .loop import EVAL_BATCH, Progress, RunResult, run_group
from .objective import batch_objective
from .optim import Hyper, descend, init_state
from .recorder import Recorder, warm_start

if TYPE_CHECKING:
    from ..store import RunStore

# Settings that may differ between the runs of one group: everything the step takes as a per-run tensor.
VARYING = {
    "optim": ("lr", "momentum", "weight_decay", "betas", "eps", "trust_coefficient", "sam_rho"),
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


class VmappedStep:
    """The group's models as one functional model over stacked (R, ...) parameters, buffers and optimizer
    state, stepped by one vmapped update: the loop's `Step` for a group of many."""

    module: None = None

    def __init__(self, models: list[nn.Module], specs: list[RunSpec], device: torch.device) -> None:
        first = models[0]
        self.state_keys = list(first.state_dict().keys())
        self.param_names = [n for n, p in first.named_parameters() if p.requires_grad]
        self.stat_names = [n for n, _ in first.named_buffers()]
        params, buffers = stack_module_state(models)
        params, buffers = {k: v.detach() for k, v in params.items()}, dict(buffers)
        dtype = params[self.param_names[0]].dtype
        self.template = copy.deepcopy(first).to("meta")  # structure only: functional_call supplies every tensor
        self.drops: list[_RunDropout] = []
        for name, m in list(self.template.named_modules()):
            if type(m) is nn.Dropout:
                parent, _, child = name.rpartition(".")
                d = _RunDropout(len(self.drops))
                setattr(self.template.get_submodule(parent), child, d)
                self.drops.append(d)
                # each run's own module's rate: model.dropout for most built-ins, what a user's model set for its own
                buffers[f"{name}.p"] = torch.tensor([float(r.get_submodule(name).p) for r in models], device=device, dtype=dtype)
                buffers[f"{name}.seed"] = torch.tensor([s.seeds.noise for s in specs], device=device)
        state = init_state(specs[0].optim, [params[n] for n in self.param_names])
        if "t" in state:
            state["t"] = torch.zeros(len(models), device=device, dtype=dtype)
        hps = [Hyper.from_spec(s.optim, device, dtype) for s in specs]
        self.live: dict[str, Any] = {  # every per-run tensor, stacked along dim 0: runs that leave are dropped from all at once
            "params": params,
            "buffers": buffers,
            "state": state,
            "hp": tuple(torch.stack([getattr(h, f.name) for h in hps]) for f in dataclasses.fields(Hyper)),
            "rho": torch.tensor([s.optim.sam_rho for s in specs], device=device, dtype=dtype),
        }
        self.live["theta0"] = self._flat().clone()
        self.optim, self.sam = specs[0].optim, any(s.optim.sam_rho > 0 for s in specs)
        self.adversarial = specs[0].train.adversarial  # part of the group key: the same for every run
        self.loss = loss_for(specs[0])  # part of the group key too
        self.step_v = vmap(self._update)
        self.eval_v = vmap(self._evaluate, in_dims=(0, 0, None, None))
        self.template.train()

    def _loss(self, params: dict, buffers: dict, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, dict]]:
        """One run's batch objective; batch norm updates copies of its statistics, returned beside the loss."""
        stats = {k: buffers[k].clone() for k in self.stat_names}

        def forward(xx: Tensor) -> Tensor:
            return functional_call(self.template, {**params, **buffers, **stats}, (xx,))

        def quiet(xx: Tensor) -> Tensor:  # the adversarial passes leave the statistics alone
            for d in self.drops:
                d.salt += 2  # and draw their own dropout masks
            return functional_call(self.template, {**params, **buffers, **{k: v.clone() for k, v in stats.items()}}, (xx,))

        loss = batch_objective(forward, x, y, self.adversarial, quiet, self.loss.fn)
        return loss, (loss.detach(), stats)

    def _evaluate(self, params: dict, buffers: dict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One run's summed loss and number correct on (x, y) (NaN where there is no accuracy), in eval mode."""
        out = functional_call(self.template, {**params, **buffers}, (x,))
        total = self.loss.total(out, y)
        hits = correct(out, y)
        return total, (hits if hits is not None else torch.full_like(total, math.nan))

    def _update(self, params, buffers, state, hp, rho, lr, x, y) -> Tensor:
        """One run's update (the plain step's, with SAM as a per-run choice), to be vmapped over runs."""
        for d in self.drops:
            d.salt = 0
        g, (loss, stats) = grad(self._loss, has_aux=True)(params, buffers, x, y)

        def second(grads: list[Tensor]) -> list[Tensor]:
            for d in self.drops:
                d.salt = 1
            g2, _ = grad(self._loss, has_aux=True)(params, buffers, x, y)  # its statistics are dropped
            return [torch.where(rho > 0, g2[n], gi) for n, gi in zip(self.param_names, grads)]  # rho 0: its own

        plist, grads = [params[n] for n in self.param_names], [g[n] for n in self.param_names]
        descend(self.optim, plist, grads, second if self.sam else None, state, Hyper(*hp), lr, rho)
        with torch.no_grad():
            for k, v in stats.items():
                buffers[k].copy_(v)
        return loss

    def _flat(self) -> Tensor:
        p = self.live["params"]
        return torch.cat([p[n].reshape(p[n].shape[0], -1) for n in self.param_names], 1)

    def step(self, x: Tensor, y: Tensor, lr: Tensor, step: int) -> Tensor:
        for d in self.drops:
            d.step = step
        v = self.live
        return self.step_v(v["params"], v["buffers"], v["state"], v["hp"], v["rho"], lr, x, y)

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
        self.template.eval()
        n = self.live["theta0"].shape[0]
        loss = torch.zeros(n, device=x.device, dtype=torch.float64)
        correct = torch.zeros(n, device=x.device)
        chunk = min(EVAL_BATCH, max(128, 8 * EVAL_BATCH // n))  # at most 8x the plain step's activations
        with torch.no_grad():
            for xb, yb in zip(x.split(chunk), y.split(chunk)):
                lb, cb = self.eval_v(self.live["params"], self.live["buffers"], xb, yb)
                loss += lb.double()
                correct += cb
        self.template.train()
        return (loss / x.shape[0]).tolist(), (correct / x.shape[0]).tolist()

    def distances(self) -> list[float]:
        return torch.linalg.vector_norm(self._flat() - self.live["theta0"], dim=1).tolist()

    def state_dict(self, pos: int) -> dict[str, Tensor]:
        """Run `pos`'s weights as its model's state_dict (cloned: a view would save the whole stack)."""
        both = {**self.live["params"], **self.live["buffers"]}
        return {k: both[k][pos].clone() for k in self.state_keys}

    def keep(self, rows: Tensor) -> None:
        self.live = tree_map(lambda t: t.index_select(0, rows), self.live)

    def resume_state(self) -> None:
        return None  # an interrupted group restarts from scratch


def train_group(
    specs: Sequence[RunSpec],
    store: RunStore | None = None,
    run_ids: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[RunResult]:
    """Train runs that share a `group_key` as one vmapped stack; with a store, record each run's metrics
    and checkpoints under its id as a serial run does. Results come back in the order of `specs`."""
    specs = list(specs)
    if len({group_key(s) for s in specs}) != 1:
        raise BatchscopeError(
            "train_group: the runs differ in more than learning rate, momentum, weight decay, Adam's betas/eps, "
            "LARS's trust coefficient, SAM radius, dropout and seeds"
        )
    run_ids = list(run_ids) if run_ids is not None else [s.run_id() for s in specs]
    device = resolve_device(specs[0].train.device)
    ds = dataset_for(specs[0], device)
    recs = [Recorder(store, rid) for rid in run_ids]
    models = [model_for(s, ds, device) for s in specs]
    for s, m, rec in zip(specs, models, recs):
        warm_start(s, m, rec)
    engine = VmappedStep(models, specs, device)
    del models
    return run_group(specs, recs, engine, ds, Communicator(device), progress)
