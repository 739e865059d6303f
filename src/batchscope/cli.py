"""`batchscope ...`: train, sweep, reproduce, list and export runs. Errors end in one line and exit code 2; an
option or argument outside its choices, in typer's usage error (exit code 2 as well)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress
from rich.table import Table

from . import __version__
from .console import err, out, progress_bars
from .errors import BatchscopeError
from .executors import EXECUTORS
from .spec import SweepSpec, load_spec
from .store import STATUSES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The science and practice of batch size.",
)

# The choices of the options that take one: typer lists them in --help and refuses anything else (exit code 2).


class Study(str, Enum):
    """The studies of `reproduce` and `report`: the keys of batchscope.studies.STUDIES (tests/test_cli.py checks
    that they agree), written out so that starting the command line does not import every study."""

    keskar = "keskar"
    hoffer = "hoffer"
    breakeven = "breakeven"
    lili = "lili"
    kaur = "kaur"


class Scale(str, Enum):
    quick = "quick"
    paper = "paper"


class LrRule(str, Enum):
    auto = "auto"
    linear = "linear"
    sqrt = "sqrt"
    none = "none"


class ExportFormat(str, Enum):
    csv = "csv"
    parquet = "parquet"
    tensorboard = "tensorboard"
    mlflow = "mlflow"


ExecutorName = Enum("ExecutorName", [(e, e) for e in EXECUTORS], type=str)
Status = Enum("Status", [(s, s) for s in STATUSES], type=str)


def _value(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value


def _version(show: bool) -> None:
    if show:
        out.print(f"batchscope {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print batchscope's version and exit.")
    ] = False,
) -> None:
    pass


DEFAULT_STORE = "runs/batchscope.db"
StoreOpt = Annotated[
    Optional[Path], typer.Option("--store", help=f"SQLite store (default: the spec's `store`, else {DEFAULT_STORE}).")
]


ExecutorOpt = Annotated[
    Optional[ExecutorName],
    typer.Option(help="How the runs are trained (default: chosen for the device and the grid; ray: on a Ray cluster)."),
]
AddressOpt = Annotated[
    Optional[str],
    typer.Option("--address", help="Ray cluster to run on (host:port); implies --executor ray (needs batchscope\\[ray])."),
]
RetriesOpt = Annotated[Optional[int], typer.Option(help="Ray: re-submissions of a run whose worker dies (default 2).")]
CpusOpt = Annotated[Optional[float], typer.Option("--cpus-per-run", help="Ray: CPUs each run asks for (default 1).")]
GpusOpt = Annotated[
    Optional[float],
    typer.Option("--gpus-per-run", help="Ray: GPUs each run asks for, fractions share one (default 1 on GPUs, else 0)."),
]


def _ray_settings(executor: Enum | None, address: str | None, retries: int | None, cpus: float | None, gpus: float | None):
    """The Ray options given, as settings for choose_executor; None when neither they nor `--executor ray` are."""
    from .executors import RaySettings

    given = {"address": address, "retries": retries, "cpus_per_run": cpus, "gpus_per_run": gpus}
    given = {k: v for k, v in given.items() if v is not None}
    return RaySettings(**given) if given or _value(executor) == "ray" else None


def _store_path(store: Path | None, spec: SweepSpec | None = None) -> Path:
    if store is not None:
        return store
    if spec is not None and spec.store:
        return Path(spec.store)
    return Path(DEFAULT_STORE)


def _run_bars(prog: Progress, label: str):
    """An on_run_start callback: one bar over the runs, one over the steps of the run in progress."""
    overall = prog.add_task(label, total=None)
    current: dict = {}

    def on_run_start(i: int, n: int, spec) -> object:
        prog.update(overall, completed=i, total=n)
        if "task" in current:
            prog.remove_task(current["task"])
        current["task"] = prog.add_task(f"  {spec.run_id()}", total=None)
        return lambda s, t: prog.update(current["task"], completed=s, total=t)

    return on_run_start


@app.command()
def train(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="A run spec (.toml or .yaml).")],
    store: StoreOpt = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1,
        help="Data-parallel processes on this machine, one per GPU; train.batch_size is the global batch, split between them.",
    )] = 1,
    dist_timeout: Annotated[float, typer.Option(
        "--dist-timeout", min=1,
        help="Seconds a data-parallel process waits for the others before the run stops (resumable).",
    )] = 60.0,
) -> None:
    """Train one run from SPEC (resumes it if it was interrupted; does nothing if it is done).
    With --nproc N, or under torchrun, N processes train it data-parallel
    (README.md, "One run across processes and GPUs (DDP)")."""
    from . import launch
    from .train.distributed import worker_rank

    sweep = load_spec(spec_file)
    if sweep.is_grid():
        raise BatchscopeError(f"{spec_file}: has grid/zip/ladder/seeds_n axes; use `batchscope sweep {spec_file}`")
    spec = sweep.base()
    path = _store_path(store, sweep)
    if worker_rank() is None and nproc > 1:  # checks the spec itself, on CPU: the GPUs are the workers'
        raise typer.Exit(launch.launch(spec_file, spec, path, nproc, dist_timeout))
    code = launch.train_here(spec, sweep.name, path, nproc, dist_timeout)
    if code:
        raise typer.Exit(code)


@app.command()
def sweep(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="A sweep spec (.toml or .yaml).")],
    store: StoreOpt = None,
    recompute_old: Annotated[bool, typer.Option(help="Retrain runs stored by another batchscope version.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List the runs and exit.")] = False,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    retries: RetriesOpt = None,
    cpus_per_run: CpusOpt = None,
    gpus_per_run: GpusOpt = None,
) -> None:
    """Train every run of SPEC's grid that is not already done in the store."""
    from .executors import choose_executor
    from .store import Store
    from .sweep import plan_runs, prepare, run_sweep

    sweep_spec = load_spec(spec_file)
    runs = plan_runs(sweep_spec)
    if dry_run:
        for r in runs:
            out.print(f"{r.run_id()}  {r.tags}")
        out.print(f"{len(runs)} runs")
        return
    ray = _ray_settings(executor, address, retries, cpus_per_run, gpus_per_run)
    chosen = choose_executor(runs, None, _value(executor), ray)
    out.print(f"executor: {chosen.name} ({chosen.reason})", markup=False, highlight=False)
    prepare(runs, chosen)  # before the store is opened: a bad spec or a wrong address leaves nothing behind
    path = _store_path(store, sweep_spec)
    with Store(path) as st, progress_bars() as prog:
        on_run_start = _run_bars(prog, "sweep")
        summary = run_sweep(
            st, sweep_spec, recompute_old=recompute_old, executor=chosen, on_run_start=on_run_start, prepared=True
        )
    out.print(
        f"{summary.total} runs: {len(summary.trained)} trained, {len(summary.skipped)} already done, "
        f"{len(summary.diverged)} diverged, {len(summary.failed)} failed  (store: {path})"
    )
    if summary.older and not recompute_old:
        out.print(f"{len(summary.older)} stored runs came from another batchscope version; --recompute-old retrains them")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def runs(
    store: StoreOpt = None,
    status: Annotated[Optional[Status], typer.Option(help="Only runs with this status.")] = None,
    group: Annotated[Optional[str], typer.Option(help="Only runs of this sweep name.")] = None,
) -> None:
    """A table of stored runs with their status and final metrics."""
    from .store import Store

    path = _store_path(store)
    if not path.exists():
        raise BatchscopeError(f"{path}: no store here (expected a batchscope SQLite file; see --store)")
    with Store(path) as st:
        records = st.runs(status=_value(status), group=group)
    table = Table(title=f"{len(records)} runs in {path}")
    for col in ("run", "group", "settings", "status", "train_loss", "train_acc", "test_acc", "steps", "seconds"):
        table.add_column(col, justify="right" if col not in ("run", "group", "settings", "status") else "left")
    for r in records:
        f = r.final or {}
        num = lambda k, fmt="{:.4f}", f=f: fmt.format(f[k]) if isinstance(f.get(k), (int, float)) else "-"  # noqa: E731
        settings = " ".join(f"{k.split('.')[-1]}={v}" for k, v in (r.spec.get("tags") or {}).items())
        table.add_row(
            r.run_id,
            r.group or "-",
            settings or "-",
            r.status,
            num("train_loss"),
            num("train_acc"),
            num("test_acc"),
            num("steps", "{:.0f}"),
            f"{r.seconds:.1f}" if r.seconds is not None else "-",
        )
    out.print(table)


@app.command()
def export(
    output: Annotated[str, typer.Argument(help=(
        "Output: a .csv or .parquet file; for tensorboard a folder (one run per stored run); for mlflow a .db file "
        "(a SQLite store), a folder (a file store) or a tracking URI."))],
    store: StoreOpt = None,
    fmt: Annotated[Optional[ExportFormat], typer.Option("--format", help=(
        "Default: csv or parquet from the suffix (parquet needs batchscope\\[parquet], tensorboard "
        "batchscope\\[tensorboard], mlflow batchscope\\[mlflow]).")
    )] = None,
    experiment: Annotated[Optional[str], typer.Option(help="mlflow: the experiment (default: the store's file name).")] = None,
) -> None:
    """Write every stored run's metrics with its settings: one row per run and step (CSV, Parquet), or one
    TensorBoard run or MLflow run per stored run (needs batchscope\\[tensorboard] or batchscope\\[mlflow])."""
    from .store import Store

    path = _store_path(store)
    if not path.exists():
        raise BatchscopeError(f"{path}: no store here (expected a batchscope SQLite file; see --store)")
    kind = _value(fmt)
    if experiment is not None and kind != "mlflow":
        raise BatchscopeError("--experiment: only for --format mlflow")
    with Store(path) as st:
        if kind in ("tensorboard", "mlflow"):
            written = st.export_runs(output, kind, experiment=experiment)
        else:
            written = str(st.export(Path(output), kind))
    out.print(f"wrote {written}", markup=False, highlight=False)


@app.command()
def advise(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help=(
        "A run or sweep spec (.toml or .yaml), built-in or naming your factories; a sweep's smallest train.batch_size "
        "is B0 and its optim.lr values are tried at B0."))],
    target: Annotated[Optional[str], typer.Option(help=(
        "What to reach: METRIC<=VALUE or METRIC>=VALUE, METRIC one of train_loss, test_loss, train_acc, test_acc, "
        "train_error, test_error. Default: the training loss B0 reaches in half the spec's budget."))] = None,
    b0: Annotated[Optional[int], typer.Option("--b0", min=1, help="The small reference batch (default: from the spec).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="B0's learning rate (default: from the spec).")] = None,
    doublings: Annotated[int, typer.Option(min=2, help="Branches at B0 x 2^k for k = 0..DOUBLINGS.")] = 6,
    lr_rule: Annotated[LrRule, typer.Option(help="Learning rate at a larger batch (auto: by the optimizer).")] = LrRule.auto,
    lr_grid: Annotated[str, typer.Option(help="Multipliers of the rule's lr tried per batch, comma-separated.")] = "1,0.5",
    checkpoints: Annotated[int, typer.Option(min=1, help="Checkpoints of the reference run to branch from, at most.")] = 4,
    tolerance: Annotated[float, typer.Option(help="CBS and recipes: loss within (1 + TOLERANCE) x B0's.")] = 0.05,
    curvature: Annotated[bool, typer.Option(help="Also the curvature-weighted B_noise (Hessian-vector products).")] = False,
    move_to: Annotated[Optional[int], typer.Option(help="B1 of the recipe check (default: the advice, >= 4 x B0).")] = None,
    store: StoreOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Report directory (default: reports/advise-SPEC).")] = None,
    executor: ExecutorOpt = None,
) -> None:
    """Which batch size and learning rate for SPEC's model, and how to move to a larger batch: a reference run, the
    gradient noise scale, branches at larger batches from its checkpoints, the fitted steps/examples trade-off, a
    stability check and the recipes, in an HTML report (and advice.json). Resumable: runs go to the store."""
    from .advise import AdviseOptions, defaults_from
    from .advise.core import run_advice
    from .advise.page import write_advice
    from .store import Store

    sweep_spec = load_spec(spec_file)
    try:
        grid = tuple(float(x) for x in lr_grid.split(","))
    except ValueError:
        raise BatchscopeError(f"--lr-grid {lr_grid!r}: expected comma-separated numbers, e.g. 1,0.5") from None
    given = {k: v for k, v in {"b0": b0, "lr": lr, "move_to": move_to}.items() if v is not None}
    opts = AdviseOptions(target=target, doublings=doublings, lr_rule=lr_rule.value, lr_grid=grid, checkpoints=checkpoints,
                         tolerance=tolerance, curvature=curvature, **{**defaults_from(sweep_spec), **given})
    opts.check()
    path = _store_path(store, sweep_spec)
    report = out_dir or Path("reports") / f"advise-{spec_file.stem}"
    with Store(path) as st, progress_bars() as prog:
        on_run_start = _run_bars(prog, "advise")
        advice = run_advice(sweep_spec.base(), opts, st, executor=_value(executor),
                            on_stage=lambda text: out.print(f"advise: {text}", markup=False, highlight=False),
                            on_run_start=on_run_start)
    index = write_advice(advice, report)
    r = advice.recommendation
    out.print(f"recommended: batch {r['batch']} at lr {r['lr']:.4g}"
              + (f" (B_crit {advice.run_tradeoff['b_crit']:.4g})" if advice.run_tradeoff else "")
              + (f"; to move to {advice.recipe['b1']}: {advice.recipe['choice']}" if advice.recipe.get("choice") else ""),
              markup=False, highlight=False)
    out.print(f"report: {index}  (store: {path})", markup=False, highlight=False)


StudyArg = Annotated[Study, typer.Argument(metavar="STUDY", help="The paper to reproduce.", show_default=False)]
ScaleOpt = Annotated[
    Scale, typer.Option("--scale", help="quick: built-in data on a CPU; paper: the paper's setup on your data (GPU).")
]
DataOpt = Annotated[
    Optional[list[str]], typer.Option("--data", help="NAME or NAME=PATH, e.g. cifar10=/data/cifar-10-batches-bin.")
]
SeedsOpt = Annotated[Optional[int], typer.Option("--seeds", help="Seeds per condition (default: the study's, 5).")]
SeedOffsetOpt = Annotated[
    int,
    typer.Option(
        "--seed-offset", min=0, help="First seed (seeds used: OFFSET .. OFFSET + seeds - 1), for a disjoint second set."
    ),
]
OutOpt = Annotated[
    Optional[Path], typer.Option("--out", help="Report directory (default: reports/NAME-SCALE, or NAME-SCALE-NETWORK).")
]
NetworkOpt = Annotated[
    Optional[str],
    typer.Option(
        "--network",
        help="keskar --scale paper: the paper's network, F1 (mnist, fashion_mnist), C1 or C2 (cifar10), C3 or C4 (cifar100); "
        "C2 and C4 are the deep (VGG-16-like) nets. Default: F1, C1 or C3, by the data.",
    ),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="keskar: your model factory, package.module:callable (importable where runs train), in place of the "
        "study's; trained on the study's data with cross-entropy. The report goes to reports/NAME-SCALE-MODEL.",
    ),
]


def _options(scale: Scale, data: list[str] | None, seeds: int | None, device: str, seed_offset: int = 0,
             network: str | None = None):
    from .studies import Options

    if seeds is not None and seeds < 1:
        raise BatchscopeError(f"--seeds {seeds}: expected a positive number")
    return Options(scale=scale.value, data=list(data or []), seeds=seeds, device=device, seed_offset=seed_offset,
                   network=network)


def _report_dir(name: Study, scale: Scale, network: str | None) -> Path:
    """reports/NAME-SCALE, with the network when one is named, so that two networks' reports do not overwrite."""
    return Path("reports") / "-".join([name.value, scale.value, *([network] if network else [])])


def _model_dir(report_dir: Path, model: str | None) -> Path:
    """The report directory of a study on a user's model: its name added, so that it does not overwrite the study's."""
    return report_dir if model is None else report_dir.with_name(f"{report_dir.name}-{model.replace(':', '.')}")


@app.command()
def reproduce(
    name: StudyArg,
    scale: ScaleOpt = Scale.quick,
    data: DataOpt = None,
    seeds: SeedsOpt = None,
    seed_offset: SeedOffsetOpt = 0,
    network: NetworkOpt = None,
    model: ModelOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out_dir: OutOpt = None,
    store: StoreOpt = None,
    executor: ExecutorOpt = None,
    address: AddressOpt = None,
    retries: RetriesOpt = None,
    cpus_per_run: CpusOpt = None,
    gpus_per_run: GpusOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Print the runs and an estimate of the time, then exit.")] = False,
) -> None:
    """Run a paper's experiments and write a report whose verdicts are computed from what was measured."""
    from .reproduce import estimate_seconds, get_study, study_runs
    from .reproduce import reproduce as run

    opts = _options(scale, data, seeds, device, seed_offset, network)
    opts.model = model
    out_dir = out_dir or _model_dir(_report_dir(name, scale, network), model)
    if dry_run:
        planned = study_runs(get_study(name.value), opts)
        runs = [r for _, rs in planned for r in rs]
        for r in runs:
            out.print(f"{r.run_id()}  " + " ".join(f"{k}={v}" for k, v in r.tags.items()), markup=False)
        secs = estimate_seconds(runs)
        stopping = sum(1 for r in runs if r.train.stop.patience is not None or r.train.stop.threshold is not None)
        bound = (f"; an upper bound: {stopping} runs stop early by their stopping rule, which the estimate cannot "
                 f"foresee (it assumes every epoch of the budget)") if stopping else ""
        out.print(f"{len(runs)} runs; estimated training time on this machine: {'at most ' if stopping else ''}"
                  f"{secs / 60:.1f} min (one process){bound}")
        return
    with progress_bars() as prog:
        on_run_start = _run_bars(prog, name.value)
        ray = _ray_settings(executor, address, retries, cpus_per_run, gpus_per_run)
        run(name.value, opts, _store_path(store), out_dir, executor=_value(executor), ray=ray, on_run_start=on_run_start,
            log=out.print)


@app.command()
def report(
    name: StudyArg,
    scale: ScaleOpt = Scale.quick,
    data: DataOpt = None,
    seeds: SeedsOpt = None,
    seed_offset: SeedOffsetOpt = 0,
    network: NetworkOpt = None,
    model: ModelOpt = None,
    device: Annotated[str, typer.Option(help="Device for post-hoc measurements.")] = "auto",
    out_dir: OutOpt = None,
    store: StoreOpt = None,
) -> None:
    """Rebuild a study's report from the store, without training."""
    from .reproduce import build_report

    opts = _options(scale, data, seeds, device, seed_offset, network)
    opts.model = model
    out_dir = out_dir or _model_dir(_report_dir(name, scale, network), model)
    build_report(name.value, opts, _store_path(store), out_dir, log=out.print)


@app.command()
def datasets() -> None:
    """The data sets batchscope knows (built-in ones need no download)."""
    from .data import available_datasets

    for name in available_datasets():
        out.print(name)


@app.command()
def models() -> None:
    """The architectures batchscope can build."""
    from .models import available_models

    for name in available_models():
        out.print(name)


def main() -> None:
    try:
        app()  # click's own usage errors already exit with code 2
    except BatchscopeError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
