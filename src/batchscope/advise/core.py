"""`advise`: the batch size for a model, measured, and the recipe to move to a larger one.

1. A reference run at a small batch B0, with checkpoints at epoch 0, inside the first epoch and at every power of 2
   of epochs until the target.
2. At each checkpoint: the gradient noise scale B_simple (and, asked for, B_noise) by McCandlish et al.'s
   unbiased two-batch estimators, numerator and denominator averaged separately, with a standard error.
3. From each checkpoint, branches (Merrill et al. 2025): B0 for one window of examples sets the window's loss;
   B0 x 2^k at the rule's learning rate (times a small grid) train until they reach it. CBS(t): the largest
   batch within a tolerance of B0's loss after the window. S(B): steps to the window's loss, fitted by
   S = S_min + E_min / B (McCandlish et al.), so B_crit(t) = E_min / S_min.
4. The run's trade-off: S and E add over the segments between checkpoints (each segment is the window's
   trade-off times the examples B0 spent there over the window's), giving the whole run's S(B) and B_crit.
5. Stability at the recommendation (Cohen et al.): the top Hessian eigenvalue against 2(1+beta)/eta for SGD,
   the preconditioned one against (2 + 2 beta_1)/((1 - beta_1) eta) for Adam.
6. The recommendation (a batch now, a ramp, learning rates, steps and examples to the target) and a recipe
   for B0 -> B1 chosen among the seeds' remedies by short branches, overlaid on B0.

Every run is a stored run and every measurement a stored pseudo-run: an interrupted advice resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..curvature import HessianOperator, gradient_noise_scale, hessian_eigenvalues
from ..errors import BatchscopeError
from ..executors import Executor, choose_executor
from ..factories import dataset_for, epoch_plan, loss_for, model_for, resolve_device
from ..runs import OnRunStart, register, simulated
from ..spec import RunSpec
from ..store import Store
from ..sweep import prepare
from .fit import Tradeoff, combine, critical_batch, crossing, fit_tradeoff, lr_for, stability_limit, value_at
from .plan import AdviseOptions, Branch, Target, batch_branches, lr_rule, recipe_arms, reference_spec, window_branches

GROUP = "advise"
Stage = Callable[[str], None]


# -- running what is not stored yet ----------------------------------------------------------------------------
def _train(store: Store, runs: Sequence[RunSpec], executor: str | Executor | None, on_run_start: OnRunStart | None) -> None:
    runs = list(runs)
    if not runs:
        return
    ex = executor if executor is not None and not isinstance(executor, str) else choose_executor(runs, None, executor)
    prepare(runs, ex)
    register(store, runs, GROUP)
    summary = ex.run(store, runs, on_run_start)
    if summary.failed:
        rec = store.get_run(summary.failed[0])
        err = (rec.error or "").splitlines()[0] if rec is not None else ""
        raise BatchscopeError(f"advise: {len(summary.failed)} run(s) failed, e.g. {summary.failed[0]}: {err} "
                              "(run the advice again to retry them)")


def examples_at(spec: RunSpec, n_train: int) -> Callable[[int], float]:
    """Examples a run has processed after `step` updates (its batch may change by epoch)."""
    plan = epoch_plan(spec, n_train)
    bounds = np.cumsum([0] + [k for _, k in plan])
    seen = np.cumsum([0] + [min(b * k, n_train) for b, k in plan])  # an epoch's last batch may be partial

    def f(step: int) -> float:
        e = int(np.searchsorted(bounds, step, side="right")) - 1
        if e >= len(plan):
            return float(seen[-1])
        return float(seen[e] + min((step - bounds[e]) * plan[e][0], n_train))

    return f


def _curve(store: Store, spec: RunSpec, n_train: int, metric: str = "train_loss",
           value: Callable[[float], float] = float) -> list[tuple[float, float]]:
    ex = examples_at(spec, n_train)
    return [(ex(s), value(v)) for s, v in store.metrics(spec.run_id(), [metric])[metric]]


def _pseudo_id(kind: str, body: dict) -> str:
    text = json.dumps({"advise": kind, **body}, sort_keys=True, separators=(",", ":"))
    return "adv-" + hashlib.sha256(text.encode()).hexdigest()[:16]


# -- measurements at a checkpoint ------------------------------------------------------------------------------
def _model_at(store: Store, spec: RunSpec, tag: str, device: torch.device) -> torch.nn.Module:
    ds = dataset_for(spec, device)
    model = model_for(spec, ds, device)
    model.load_state_dict(store.load_checkpoint(spec.run_id(), tag)["model"])
    return model


def _examples(spec: RunSpec, device: torch.device, n: int, chunk: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = dataset_for(spec, device)
    m = min(n, ds.n_train)
    return list(zip(ds.x_train[:m].split(chunk), ds.y_train[:m].split(chunk)))


def _noise(store: Store, ref: RunSpec, point: str, seed: int, opts: AdviseOptions, device: torch.device) -> dict[str, float]:
    model = _model_at(store, ref, point, device)
    data = _examples(ref, device, opts.noise_examples)
    m = sum(len(y) for _, y in data)
    # McCandlish et al.'s estimators are unbiased for any small < big; their variance is lowest with a large big batch
    # and a small one not far below it (measured on the least-squares workload of bench/bench_advise.py: 5% at
    # 32/512 against 7% at 8/128, 200 pairs each)
    small = max(1, min(max(ref.train.batch_size, m // 32), m // 4))
    big = max(small + 1, m // 2)
    r = gradient_noise_scale(model, loss_for(ref).fn, data, method="two_batch", small_batch=small, big_batch=big,
                             n_pairs=opts.noise_pairs, curvature=opts.curvature, seed=seed)
    # compute, in examples' gradients: each pair's big batch, and with curvature 2 products over m examples (a
    # Hessian-vector product costs about 2 gradients)
    cost = opts.noise_pairs * big + (4 * opts.noise_pairs * m if opts.curvature else 0)
    out = {"b_simple": r.b_simple, "b_simple_se": r.b_simple_se, "grad_norm_sq": r.grad_norm_sq,
           "trace_sigma": r.trace_sigma, "small_batch": small, "big_batch": big, "examples": m, "cost_examples": cost}
    if r.b_noise is not None:
        out.update(b_noise=r.b_noise, b_noise_se=r.b_noise_se)
    return {k: float(v) for k, v in out.items() if v is not None}


def preconditioned_sharpness(model: torch.nn.Module, loss_fn: Callable, data: list, batch: int, eps: float = 1e-8,
                             tol: float = 1e-3) -> float:
    """Top eigenvalue of P^{-1/2} H P^{-1/2}, P = diag(sqrt(v) + eps), Adam's preconditioner with v its second-moment
    estimate at stationarity: v = E[g_B^2] = G^2 + (mean_i g_i^2 - G^2) / B over the examples of `data` (the EMA of
    squared minibatch gradients at fixed weights; Cohen et al. 2022 measure it with the optimizer's own v)."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.func import functional_call, grad, vmap

    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach() for k, p in model.named_parameters()}
    was = model.training
    model.eval()
    try:
        def loss_i(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

        per = vmap(grad(loss_i), in_dims=(None, 0, 0))
        n, s1, s2 = 0, None, None
        for x, y in data:
            g = per(params, x, y)
            flat = torch.cat([g[k].reshape(len(y), -1) for k in names], dim=1).double()
            s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
            s2 = flat.square().sum(0) if s2 is None else s2 + flat.square().sum(0)
            n += len(y)
    finally:
        model.train(was)
    assert s1 is not None and s2 is not None
    G2 = (s1 / n).square()
    v = G2 + (s2 / n - G2).clamp_min(0) / batch
    d = (v.sqrt() + eps).rsqrt().cpu().numpy()
    H = HessianOperator(model, loss_fn, data)
    A = LinearOperator(H.shape, matvec=lambda z: d * H.matvec(d * np.ravel(z)), dtype=np.float64)
    return float(eigsh(A, k=1, which="LA", tol=tol, return_eigenvectors=False)[0])


def _sharpness(store: Store, spec: RunSpec, tag: str, batch: int, device: torch.device, n: int = 2048) -> dict[str, float]:
    model = _model_at(store, spec, tag, device)
    data = _examples(spec, device, n)
    loss = loss_for(spec).fn
    m = sum(len(y) for _, y in data)
    if spec.optim.name in ("adam", "adamw", "lamb"):
        value, products = preconditioned_sharpness(model, loss, data, batch), math.nan
    else:
        r = hessian_eigenvalues(model, loss, data, k=1, tol=1e-3)
        value, products = float(r.eigenvalues[0]), r.info.matvecs
    return {"sharpness": value, "cost_examples": 2 * products * m}


def _measure(store: Store, kind: str, jobs: dict[str, tuple[dict, Callable[[], dict[str, float]]]]) -> dict[str, dict]:
    """Stored pseudo-runs: measured once, read back after (an interrupted advice does not measure them again)."""
    items = {rid: (body, fn) for rid, (body, fn) in jobs.items()}
    simulated(store, items, GROUP + "-" + kind, lambda fns: [fn() for fn in fns],
              lambda rid, _, res: res, wait_s=600.0)
    out = {}
    for rid in jobs:
        rec = store.get_run(rid)
        assert rec is not None
        out[rid] = dict(rec.final)
    return out


# -- the advice ------------------------------------------------------------------------------------------------
@dataclass
class CheckpointAdvice:
    """What was measured from one checkpoint of the reference run."""

    point: str  # the reference's checkpoint: epoch_E or step_S
    epoch: float  # where it lies, in epochs of B0
    examples: float  # examples the reference had processed there
    window_loss: float
    noise: dict[str, float]
    sharpness: float | None
    sharpness_limit: float
    cbs: int | None
    tradeoff: dict[str, float] | None  # S_min, E_min, B_crit and its interval, or None (too few batches reached)
    batches: dict[int, dict[str, Any]] = field(default_factory=dict)  # batch -> best lr, steps to the window's loss


@dataclass
class Advice:
    target: str
    b0: int
    lr0: float
    optimizer: str
    lr_rule: str
    reference_id: str
    reference_examples_to_target: float
    reference_steps_to_target: float
    window_epochs: float
    checkpoints: list[CheckpointAdvice]
    run_tradeoff: dict[str, float] | None
    recommendation: dict[str, Any]
    recipe: dict[str, Any]
    options: dict[str, Any]
    compute: dict[str, float]
    curves: dict[str, Any]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tradeoff_dict(t: Tradeoff) -> dict[str, float]:
    lo, hi = t.b_crit_interval()
    return {"s_min": t.s_min, "e_min": t.e_min, "b_crit": t.b_crit, "b_crit_lo": lo, "b_crit_hi": hi,
            "log_b_crit_se": t.log_b_crit_se, "rms_log_s": t.rms, "n": t.n}


def _best_reference(store: Store, candidates: list[RunSpec], opts: AdviseOptions, n: int) -> RunSpec:
    """The reference among runs at B0 with different learning rates: fewest steps to the target, or (no target, or none
    reached it) the lowest final training loss; diverged runs never."""
    done = [s for s in candidates if (r := store.get_run(s.run_id())) is not None and r.status == "done"]
    if not done:
        raise BatchscopeError(f"advise: every reference run at B0 diverged or failed (learning rates "
                              f"{', '.join(f'{s.optim.lr:g}' for s in candidates)}); give a smaller --lr")
    if opts.target is not None:
        t = Target.parse(opts.target)
        reach = {s.run_id(): crossing(_curve(store, s, n, t.stored, t.value), t.level) for s in done}
        hit = [s for s in done if reach[s.run_id()] is not None]
        if hit:
            return min(hit, key=lambda s: reach[s.run_id()])  # type: ignore[arg-type, return-value]

    def final_loss(s: RunSpec) -> float:
        v = store.get_run(s.run_id()).final.get("train_loss", math.inf)  # type: ignore[union-attr]
        return v if v is not None and math.isfinite(v) else math.inf

    return min(done, key=final_loss)


def _pick_checkpoints(saved: dict[str, float], before: float, count: int) -> list[str]:
    """Epoch 0 and up to count - 1 others before the target, spread evenly over the (log-spaced) saved ones."""
    ok = sorted((t for t in saved if saved[t] < before), key=saved.__getitem__)
    if len(ok) <= count:
        return ok
    idx = np.unique(np.round(np.linspace(0, len(ok) - 1, count)).astype(int))
    return [ok[i] for i in idx]


def _best_by_batch(store: Store, window: Branch, branches: list[Branch], window_examples: float, window_loss: float,
                   n: int) -> tuple[dict[int, dict[str, Any]], dict[int, Any]]:
    """Per batch size, the branch at its best learning rate (fewest steps to the window's loss; none reached it: the
    lowest loss after the window) and the loss curves of those branches."""
    b0 = window.batch
    best: dict[int, dict[str, Any]] = {b0: {"lr": window.lr, "multiplier": 1.0, "steps": window_examples / b0,
                                            "loss_at_window": window_loss}}
    curves = {b0: _curve(store, window.spec, n)}
    for br in branches:
        c = _curve(store, br.spec, n)
        reached = crossing(c, window_loss)
        steps = None if reached is None else reached / br.batch
        at_w = value_at(c, window_examples)
        if at_w is None and reached is not None and reached <= window_examples and c:
            at_w = c[-1][1]  # it stopped at the window's loss before the window ended
        cur = best.get(br.batch)
        better = cur is None or (steps is not None and (cur["steps"] is None or steps < cur["steps"])) or (
            steps is None and cur["steps"] is None and (at_w or math.inf) < (cur["loss_at_window"] or math.inf))
        if better:
            best[br.batch] = {"lr": br.lr, "multiplier": br.multiplier, "steps": steps, "loss_at_window": at_w}
            curves[br.batch] = c
    return {b: best[b] for b in sorted(best)}, curves


def _fit_checkpoint(best: dict[int, dict[str, Any]], start_loss: float, window_loss: float) -> tuple[Tradeoff | None, str]:
    """S(B) fitted on the batch sizes that reached the window's loss, or None and why not."""
    if not start_loss > window_loss:
        return None, f"B0's training loss did not fall over the window ({start_loss:.4g} to {window_loss:.4g})"
    reached = {b: v["steps"] for b, v in best.items() if v["steps"] is not None and v["steps"] > 0}
    if len(reached) < 3:
        return None, f"only {len(reached)} batch sizes reached the window's loss"
    return fit_tradeoff(list(reached), list(reached.values())), ""


def run_advice(base: RunSpec, opts: AdviseOptions, store: Store, *, executor: str | Executor | None = None,
               on_stage: Stage | None = None, on_run_start: OnRunStart | None = None) -> Advice:
    """Measure, branch, fit and recommend (see the module doc); every run and measurement goes to `store`."""
    opts.check()
    stage = on_stage or (lambda _: None)
    device = resolve_device(base.train.device)
    n = dataset_for(base, device).n_train
    rule = lr_rule(base, opts)
    notes: list[str] = []
    lrs = [opts.lr] if opts.lr else list(dict.fromkeys(opts.reference_lrs)) or [base.optim.lr]
    b0 = opts.b0 or base.train.batch_size
    stage(f"reference run at B0 = {b0}" + (f", learning rates {', '.join(f'{x:g}' for x in lrs)}" if len(lrs) > 1 else ""))
    candidates = [reference_spec(base, opts, n, lr) for lr in lrs]
    _train(store, candidates, executor, on_run_start)
    ref = _best_reference(store, candidates, opts, n)
    if len(candidates) > 1:
        notes.append(f"B0's learning rate {ref.optim.lr:g}: the best of {', '.join(f'{x:g}' for x in lrs)} at B0 "
                     f"({'fewest steps to the target' if opts.target else 'lowest final training loss'})")
    ref_id, lr0 = ref.run_id(), ref.optim.lr
    rec = store.get_run(ref_id)
    assert rec is not None
    if opts.target is None:  # the loss B0 reaches in half its budget: a target the reference is known to reach
        half = value_at(_curve(store, ref, n), examples_at(ref, n)(int(rec.final.get("steps", 0))) / 2)
        if half is None:
            raise BatchscopeError("advise: the reference run's loss at half its budget is not logged; give --target")
        target = Target("train_loss", float(f"{half:.4g}"))
        notes.append(f"target: {target}, the training loss B0 reached in half the spec's budget (no target was given)")
    else:
        target = Target.parse(opts.target)
    target_curve = _curve(store, ref, n, target.stored, target.value)
    e_target = crossing(target_curve, target.level)
    if e_target is None:
        best = min((v for _, v in target_curve), default=float("nan"))
        raise BatchscopeError(f"advise: the reference run at B0 = {b0} did not reach {target} in its budget of "
                              f"{ref.train.epochs:g} epochs (its best: {best:.4g}, as loss or error); "
                              "give a reachable target or more train.epochs")
    s_target = e_target / b0
    at = examples_at(ref, n)
    saved = {t: (int(t[6:]) * n if t.startswith("epoch_") else at(step)) for t, step in store.checkpoints(ref_id)
             if t.startswith(("epoch_", "step_"))}
    ckpts = _pick_checkpoints(saved, e_target, opts.checkpoints)
    ref_train = _curve(store, ref, n)

    stage(f"gradient noise scale at {len(ckpts)} checkpoints")
    noise_opts = {"pairs": opts.noise_pairs, "examples": opts.noise_examples, "curvature": opts.curvature}
    noise_jobs = {_pseudo_id("noise", {"reference": ref_id, "point": e, **noise_opts}):
                  ({"advise": "noise", "reference": ref_id, "point": e, **noise_opts},
                   (lambda e=e, i=i: _noise(store, ref, e, i, opts, device))) for i, e in enumerate(ckpts)}
    noise = dict(zip(ckpts, _measure(store, "noise", noise_jobs).values()))

    stage("branches: B0 for one window from each checkpoint")
    window = min(opts.window, e_target / (2 * n))  # epochs; the B0 branch's last logged point ends it
    if window < opts.window:
        notes.append(f"B0 reaches the target in {e_target / n:.3g} epochs: windows of {window:.3g} epochs (half of that) "
                     f"instead of {opts.window:g}")
    windows = {e: window_branches(ref, e, opts, n, window)[0] for e in ckpts}
    _train(store, [w.spec for w in windows.values()], executor, on_run_start)
    window_loss, window_seen = {}, {}
    for e, w in windows.items():
        c = _curve(store, w.spec, n)  # its last point ends the window (whole updates: about window x n examples)
        if not c or not math.isfinite(c[-1][1]) or c[-1][0] <= 0:
            raise BatchscopeError(f"advise: the B0 branch from checkpoint {e} did not finish its window (diverged?)")
        window_seen[e], window_loss[e] = c[-1]

    stage("branches: larger batches to each window's loss")
    branches = {e: batch_branches(ref, e, window_loss[e], opts, n, rule, window) for e in ckpts}
    _train(store, [b.spec for bs in branches.values() for b in bs], executor, on_run_start)

    checkpoint_advice: list[CheckpointAdvice] = []
    parts: list[tuple[float, Tradeoff]] = []  # (segment weight, trade-off) of the checkpoints with a fit
    bounds = [saved[e] for e in ckpts] + [e_target]
    curves: dict[str, Any] = {"reference": ref_train, "target": target_curve, "branches": {}}
    limit = stability_limit(ref.optim.name, lr0, ref.optim.momentum, ref.optim.betas[0])
    for i, e in enumerate(ckpts):
        best, curves["branches"][e] = _best_by_batch(store, windows[e], branches[e], window_seen[e], window_loss[e], n)
        cbs = critical_batch({b: v["loss_at_window"] for b, v in best.items()}, window_loss[e], opts.tolerance)
        trade, why = _fit_checkpoint(best, curves["branches"][e][b0][0][1], window_loss[e])
        if trade is None:
            notes.append(f"checkpoint {e}: {why}; no S(B) fit there")
        else:
            parts.append(((bounds[i + 1] - bounds[i]) / window_seen[e], trade))
        checkpoint_advice.append(CheckpointAdvice(
            point=e, epoch=saved[e] / n, examples=saved[e], window_loss=window_loss[e], noise=noise[e], sharpness=None,
            sharpness_limit=limit, cbs=cbs, tradeoff=_tradeoff_dict(trade) if trade else None, batches=best))

    run_t = combine(parts) if parts else None
    tested = sorted({b for c in checkpoint_advice for b in c.batches})

    def round_down(b: float) -> int:
        return max([x for x in tested if x <= b] or [b0])

    # the ramp: each segment at its checkpoint's B_crit (never smaller than before), at the best lr found there
    ramp, now = [], b0
    for c in checkpoint_advice:
        if c.tradeoff is not None:
            now = max(now, round_down(c.tradeoff["b_crit"]))
        lr = c.batches.get(now, {}).get("lr", lr_for(lr0, b0, now, rule))
        ramp.append({"from_epoch_of_b0": c.epoch, "from_examples": c.examples, "batch": now, "lr": lr})
    recommended = round_down(run_t.b_crit) if run_t else b0
    rec_lr = next((c.batches[recommended]["lr"] for c in reversed(checkpoint_advice) if recommended in c.batches),
                  lr_for(lr0, b0, recommended, rule))
    recommendation: dict[str, Any] = {"batch": recommended, "lr": rec_lr, "ramp": ramp}
    if run_t is not None:
        scale = s_target / run_t.steps(b0)  # the fit's S(B0) against the reference's measured steps
        for name, b in (("batch", recommended), ("b0", b0)):
            recommendation[f"steps_at_{name}"] = run_t.steps(b) * scale
            recommendation[f"examples_at_{name}"] = run_t.examples(b) * scale
        fitted_ramp = [r for r, c in zip(ramp, checkpoint_advice) if c.tradeoff is not None]  # in the order of parts
        ramp_steps = sum(w * t.steps(r["batch"]) for (w, t), r in zip(parts, fitted_ramp))
        recommendation["steps_with_ramp"] = ramp_steps * scale
        recommendation["fit_vs_reference"] = scale
    else:
        notes.append("no checkpoint gave an S(B) fit: the recommendation stays at B0")

    stage("stability: sharpness at the checkpoints and at the recommendation")
    sharp_jobs: dict[str, tuple[dict, Callable[[], dict[str, float]]]] = {}
    for c in checkpoint_advice:
        body = {"advise": "sharpness", "run": ref_id, "tag": c.point, "batch": b0}
        sharp_jobs[_pseudo_id("sharpness", body)] = (body, lambda c=c: _sharpness(store, ref, c.point, b0, device))
    last = checkpoint_advice[-1]
    rec_branch: Branch | None = windows[last.point]
    if recommended != b0:
        lr_last = last.batches.get(recommended, {}).get("lr")
        rec_branch = next((br for br in branches[last.point] if br.batch == recommended and lr_last is not None
                           and math.isclose(br.lr, lr_last)), None)
    stab: dict[str, Any] = {}
    if rec_branch is not None and any(t == "final" for t, _ in store.checkpoints(rec_branch.spec.run_id())):
        rb = rec_branch
        body = {"advise": "sharpness", "run": rec_branch.spec.run_id(), "tag": "final", "batch": rec_branch.batch}
        sharp_jobs[_pseudo_id("sharpness", body)] = (
            body, lambda: _sharpness(store, rb.spec, "final", rb.batch, device))
    measured = list(_measure(store, "sharpness", sharp_jobs).values())
    for c, m in zip(checkpoint_advice, measured):
        c.sharpness = m["sharpness"]
    if len(measured) > len(checkpoint_advice) and rec_branch is not None:
        lim = stability_limit(ref.optim.name, rec_branch.lr, ref.optim.momentum, ref.optim.betas[0])
        stab = {"batch": recommended, "lr": rec_branch.lr, "sharpness": measured[-1]["sharpness"], "limit": lim,
                "ratio": measured[-1]["sharpness"] / lim, "after_point": last.point}
        stab["stable"] = stab["ratio"] < 1.0
    recommendation["stability"] = stab

    stage("recipe: the seeds' remedies for a larger batch, branched and overlaid on B0")
    b1 = opts.move_to or max(recommended, 4 * b0)
    b1 = min(b1, n)
    mid = ckpts[len(ckpts) // 2]
    arms = recipe_arms(ref, mid, b1, opts, n, window)
    _train(store, [a.spec for a in arms], executor, on_run_start)
    recipe = _judge_recipe(store, arms, n, opts)
    recipe.update(b0=b0, b1=b1, from_point=mid, from_epoch=saved[mid] / n)
    curves["recipe"] = {a.arm: _curve(store, a.spec, n) for a in arms}

    measured_cost = sum(v.get("cost_examples", 0.0) for v in noise.values()) + sum(
        m.get("cost_examples", 0.0) for m in measured if math.isfinite(m.get("cost_examples", math.nan)))
    compute = _compute(store, candidates, [*[w.spec for w in windows.values()], *[b.spec for bs in branches.values() for b in bs],
                               *[a.spec for a in arms]], n, ref, e_target, measured_cost, len(arms))
    return Advice(
        target=str(target), b0=b0, lr0=lr0, optimizer=ref.optim.name, lr_rule=rule, reference_id=ref_id,
        reference_examples_to_target=e_target, reference_steps_to_target=s_target, window_epochs=window,
        checkpoints=checkpoint_advice,
        run_tradeoff=_tradeoff_dict(run_t) if run_t else None, recommendation=recommendation, recipe=recipe,
        options=asdict(opts), compute=compute, curves=curves, notes=notes)


def _judge_recipe(store: Store, arms: list[Branch], n: int, opts: AdviseOptions) -> dict[str, Any]:
    """Each arm's final training loss against B0's after the same window; the recommended arm is the cheapest (fewest
    examples, then fewest steps) whose loss is within (1 + tolerance) x B0's."""
    rows = []
    ref_loss = None
    for a in arms:
        c = _curve(store, a.spec, n)
        final = c[-1][1] if c and math.isfinite(c[-1][1]) else None
        rec = store.get_run(a.spec.run_id())
        steps = float(rec.final.get("steps", math.nan)) if rec is not None else math.nan
        rows.append({"arm": a.arm, "batch": a.batch, "lr": a.lr, "examples": a.budget_examples, "steps": steps,
                     "final_loss": final, "status": rec.status if rec else "absent"})
        if a.arm == "B0":
            ref_loss = final
    ok = [r for r in rows if r["arm"] != "B0" and r["final_loss"] is not None and ref_loss is not None
          and r["final_loss"] <= (1 + opts.tolerance) * ref_loss]
    for r in rows:
        r["within_tolerance"] = r in ok
    choice = min(ok, key=lambda r: (r["examples"], r["steps"]))["arm"] if ok else None
    return {"arms": rows, "b0_loss": ref_loss, "choice": choice}


def _compute(store: Store, references: Sequence[RunSpec], branches: Sequence[RunSpec], n: int, ref: RunSpec,
             e_target: float, measured: float, n_arms: int) -> dict[str, float]:
    """Examples processed: by the reference runs (every learning rate tried at B0), by the branches (the last `n_arms`
    of them are the recipe's), and by the measurements (noise scale, sharpness) in gradient-equivalents of examples."""

    def used(specs: Sequence[RunSpec]) -> float:
        total = 0.0
        for s in specs:
            rec = store.get_run(s.run_id())
            if rec is not None:
                total += examples_at(s, n)(int(rec.final.get("steps", 0) or 0))
        return total

    refs, recipe = used(references), used(branches[len(branches) - n_arms:])
    fit = used(branches[: len(branches) - n_arms])
    return {"reference_examples": refs, "branch_examples": fit, "recipe_examples": recipe, "measurement_examples": measured,
            "advice_examples": refs + fit + measured, "examples": refs + fit + recipe + measured,
            "examples_to_target_at_b0": e_target}
