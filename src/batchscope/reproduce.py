"""`batchscope reproduce NAME`: run a paper's sweeps through the store, then build its report from the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .errors import BatchscopeError
from .executors import RaySettings, choose_executor
from .factories import dataset_for, epoch_plan, log_steps, loss_for, model_for, resolve_device
from .report.claims import write_claims  # noqa: F401  (re-exported for users)
from .report.html import write_report
from .spec import RunSpec, SweepSpec, is_factory
from .stats import OUTCOMES
from .store import Store
from .studies import STUDIES
from .studies.base import Analysis, Options, Study
from .sweep import plan_runs, prepare, run_sweep


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise BatchscopeError(f"unknown study {name!r} (available: {', '.join(sorted(STUDIES))})")
    return STUDIES[name]()


def study_runs(study: Study, opts: Options) -> list[tuple[SweepSpec, list[RunSpec]]]:
    check_network(study, opts)
    check_model(study, opts)
    sweeps = study.sweeps(opts)
    return [(s, plan_runs(s)) for s in sweeps]


def check_network(study: Study, opts: Options) -> None:
    """A --network is for a study that offers a choice of network; which values it takes, the study checks."""
    if opts.network is not None and not study.networks:
        offered = "; ".join(f"{s.name}: {', '.join(s.networks)}" for s in STUDIES.values() if s.networks)
        raise BatchscopeError(f"--network {opts.network}: {study.name} has no choice of network (studies that have: {offered})")


def check_model(study: Study, opts: Options) -> None:
    """A --model is a user's factory, for a study whose claims are about any model."""
    if opts.model is None:
        return
    if not is_factory(opts.model):
        raise BatchscopeError(f"--model {opts.model}: expected a user's model factory, package.module:callable")
    if not study.takes_model:
        takers = ", ".join(s.name for s in STUDIES.values() if s.takes_model)
        raise BatchscopeError(f"--model {opts.model}: {study.name} trains its own models (studies that take yours: {takers})")


def estimate_seconds(runs: list[RunSpec], sample_steps: int = 10) -> float:
    """Projected training time: a few timed steps of each distinct (data, model, optimizer, batch), times
    the run's updates, plus its evaluations (a forward pass costs about a third of a step)."""
    per_step: dict[str, float] = {}
    total = 0.0
    for r in runs:
        device = resolve_device(r.train.device)
        ds = dataset_for(r, device)
        plan = epoch_plan(r, ds.n_train)
        for bsz, k in _group_plan(plan):
            key = r.data.model_dump_json() + r.model.model_dump_json() + r.optim.model_dump_json() + str(bsz)
            if key not in per_step:
                per_step[key] = _time_steps(r, ds, bsz, device, sample_steps)
            total += per_step[key] * k
        # evaluations at every logged step, in batches of the (last) training batch size
        total += per_step[key] / 3 * len(log_steps(plan, r)) * (ds.n_train + ds.n_test) / bsz
    return total


def _group_plan(plan: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: dict[int, int] = {}
    for b, k in plan:
        out[b] = out.get(b, 0) + k
    return list(out.items())


def _time_steps(r: RunSpec, ds, bsz: int, device: torch.device, n: int) -> float:
    model = model_for(r, ds, device)
    model.train()
    x, y = ds.x_train[:bsz], ds.y_train[:bsz]
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    loss = loss_for(r).fn
    t = 0.0
    for i in range(n + 2):
        start = time.perf_counter()
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # warm-up
            t += time.perf_counter() - start
    return t / n * (2.0 if r.optim.sam_rho > 0 else 1.0)


def reproduce(
    name: str,
    opts: Options,
    store_path: Path,
    out_dir: Path,
    *,
    executor: str | None = None,
    ray: RaySettings | None = None,
    on_run_start: Callable | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train what is missing, then write the report. Interrupted? Run it again: it resumes.
    `executor` (a name) and `ray` (a Ray cluster's settings) as for `choose_executor`."""
    study = get_study(name)
    planned = study_runs(study, opts)
    every = [r for _, runs in planned for r in runs]
    prepare(every, choose_executor(every, None, executor, ray))  # every sweep's runs, before the store is opened
    with Store(store_path) as store:
        for sweep, runs in planned:
            log(f"{name}: sweep '{sweep.name}' with {len(runs)} runs")
            chosen = choose_executor(runs, None, executor, ray)
            log(f"  executor: {chosen.name} ({chosen.reason})")
            summary = run_sweep(store, sweep, executor=chosen, on_run_start=on_run_start, prepared=True)
            log(
                f"  {len(summary.trained)} trained, {len(summary.skipped)} already done, "
                f"{len(summary.diverged)} diverged, {len(summary.failed)} failed"
            )
    return build_report(name, opts, store_path, out_dir, log=log)


def build_report(name: str, opts: Options, store_path: Path, out_dir: Path, *, log: Callable[[str], None] = print) -> Path:
    """The report from what is stored: no training. Post-hoc measurements are computed once and cached."""
    study = get_study(name)
    if not Path(store_path).exists():
        raise BatchscopeError(f"{store_path}: no store here; run `batchscope reproduce {name}` first")
    runs = [r for _, rs in study_runs(study, opts) for r in rs]
    out_dir = Path(out_dir)
    fig_dir = out_dir / ".figures-tmp"
    fig_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Store(store_path) as store:
        ctx = Analysis(store, runs, opts, fig_dir)
        missing = [r for r in runs if ctx.status(r) not in ("done", "diverged", "failed")]
        study.analyze(ctx)
        statuses = [ctx.status(r) for r in runs]
    meta = {
        "study": name,
        "scale": opts.scale,
        "title": study.title,
        "citation": study.citation,
        "seeds": opts.seed_list(study.default_seeds),
        "data": opts.data or "default",
        "runs": len(runs),
        "models": sorted({r.model.name for r in runs}),
        **ctx.meta,
        "runs_done": statuses.count("done"),
        "runs_diverged": statuses.count("diverged"),
        "runs_failed": statuses.count("failed"),
        "runs_missing": len(missing),
        "store": str(store_path),
        "batchscope_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "analysis_seconds": round(time.perf_counter() - t0, 1),
    }
    summary = [study.title, study.citation, *ctx.notes]
    if missing:
        summary.append(f"{len(missing)} of {len(runs)} runs are not in the store yet: claims that need them are inconclusive.")
    index = write_report(
        out_dir, title=study.title, summary=summary, claims=ctx.claims, figures=ctx.figures, tables=ctx.tables, meta=meta
    )
    for p in fig_dir.glob("*.png"):
        p.unlink()
    fig_dir.rmdir()
    counts = {v: sum(1 for c in ctx.claims if c.verdict.verdict == v) for v in OUTCOMES}
    checks = {r.id: r.passed for c in ctx.claims for r in c.regime}
    log(f"{name}: regime checks: {sum(checks.values())} of {len(checks)} passed"
        + "".join(f"\n  [  not reached] {k}" for k, ok in checks.items() if not ok))
    log(f"{name}: {len(ctx.claims)} claims: {counts['holds']} hold, {counts['fails']} fail, "
        f"{counts['inconclusive']} inconclusive, {counts['untested']} untested")
    for c in ctx.claims:
        log(f"  [{c.verdict.verdict:>12}] {c.statement}")
    log(f"report: {index}")
    return index
