"""Sweep executors: batchscope's chosen executor vs a plain PyTorch loop over the same runs, side by side.

The grid is MNIST-1D MLPs, batch sizes x learning rates x seeds, every run the same number of updates
(SGD with momentum 0.9), metrics at the same steps in both arms (train and test loss/accuracy on the
whole sets, at batchscope's log steps). The plain loop trains the runs one by one with torch.optim.SGD,
the same initialization and the same data order, so the two arms' results agree (checked and printed).

    python bench/bench_sweep.py            # default grid: 4 batch sizes x 4 lrs x 2 seeds, 1000 updates each
    python bench/bench_sweep.py --full     # the whole grid: 4 x 16 x 4 (groups of 64 runs), 1000 updates
    python bench/bench_sweep.py --write    # also appends/replaces the "Sweep executors" section of RESULTS.md
    python bench/bench_sweep.py --also ray # adds an arm with the Ray executor (a local Ray instance)

Each arm runs in its own process (clean peak-memory numbers) and the arms alternate, `--repeats` times,
so that load from other users of the machine falls on both; times are medians. Peak memory: max RSS
(getrusage) of the arm's process and of its largest worker on a CPU; torch.cuda.max_memory_allocated on
a GPU. The plain loop runs with one thread, its fastest setting for these small models on a CPU (with
torch's default thread count, on a machine other jobs load, OpenMP threads wait on each other and a step
takes several times longer: `--default-threads` adds that arm). On a GPU batchscope chooses the fused
executor; on a CPU with several cores, the process pool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADING = "## Sweep executors"
RESULTS = Path(__file__).with_name("RESULTS.md")
BATCHES = (32, 64, 128, 256)


def grid(full: bool, steps: int | None) -> dict:
    """The sweep spec: 4 batch sizes x 16 (full) or 4 learning rates x 4 (full) or 2 seeds."""
    import numpy as np

    lrs = np.geomspace(0.003, 0.3, 16 if full else 4).round(5).tolist()
    return {
        "name": "bench",
        "data": {"name": "mnist1d"},
        "model": {"name": "mlp", "width": 0.25, "depth": 2},
        "optim": {"momentum": 0.9},
        "train": {"epochs": None, "steps": steps or 1000},
        "log": {"log_points": 5, "every_epoch": False, "resume_every_s": 60.0},
        "grid": {"train.batch_size": list(BATCHES), "optim.lr": lrs},
        "seeds_n": 4 if full else 2,
    }


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def arm_plain(body: dict, threads: int | None) -> dict:
    """The runs one by one: nn model, torch.optim.SGD, the same init, data order and evaluation steps."""
    import torch
    import torch.nn.functional as F

    from batchscope.data import epoch_batches
    from batchscope.factories import dataset_for, epoch_plan, log_steps, model_for, resolve_device
    from batchscope.spec import SweepSpec

    if threads:
        torch.set_num_threads(threads)
    runs = SweepSpec.model_validate(body).expand()
    device = resolve_device(runs[0].train.device)
    ds = dataset_for(runs[0], device)

    @torch.no_grad()
    def evaluate(model, x, y):
        model.eval()
        loss = correct = 0.0
        for xb, yb in zip(x.split(1024), y.split(1024)):
            out = model(xb)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += float((out.argmax(1) == yb).sum())
        model.train()
        return loss / len(y), correct / len(y)

    finals = {}
    t0 = time.perf_counter()
    for spec in runs:
        model = model_for(spec, ds, device)
        opt = torch.optim.SGD(model.parameters(), lr=spec.optim.lr, momentum=spec.optim.momentum)
        plan = epoch_plan(spec, ds.n_train)
        at = log_steps(plan, spec)
        gen = torch.Generator().manual_seed(spec.seeds.data)
        step = 0
        for bsz, k in plan:
            for idx in epoch_batches(ds.n_train, bsz, gen)[:k]:
                idx = idx.to(device)
                loss = F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step in at:
                    metrics = (*evaluate(model, ds.x_train, ds.y_train), *evaluate(model, ds.x_test, ds.y_test))
        finals[spec.run_id()] = metrics[3]
    _cuda_sync()
    return {"seconds": time.perf_counter() - t0, "test_acc": finals, "threads": torch.get_num_threads()}


def arm_batchscope(body: dict, executor: str | None) -> dict:
    """`run_sweep` into a fresh store with the executor batchscope chooses (or the one asked for)."""

    from batchscope.executors import choose_executor
    from batchscope.factories import dataset_for, resolve_device
    from batchscope.spec import SweepSpec
    from batchscope.store import Store
    from batchscope.sweep import plan_runs, run_sweep

    sweep = SweepSpec.model_validate(body)
    runs = plan_runs(sweep)
    dataset_for(runs[0], resolve_device(runs[0].train.device))  # both arms start with the data loaded
    chosen = choose_executor(runs, None, executor)
    start = 0.0
    if chosen.remote:  # a cluster's start (ray: a local instance here) is timed apart from the sweep
        t0 = time.perf_counter()
        chosen.connect()
        start = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.db") as st:
        t0 = time.perf_counter()
        summary = run_sweep(st, sweep, executor=chosen)
        _cuda_sync()
        seconds = time.perf_counter() - t0
        finals = {r.run_id: r.final.get("test_acc") for r in st.runs()}
        run_seconds = sum(r.seconds for r in st.runs())
    assert len(summary.trained) + len(summary.diverged) == len(runs), summary
    return {"seconds": seconds, "test_acc": finals, "executor": f"{chosen.name} ({chosen.reason})",
            "run_seconds": run_seconds, "start_seconds": start}


def run_arm(args: argparse.Namespace) -> None:
    """Child process: one arm, its result and peak memory as one JSON line on stdout."""
    import torch

    body = grid(args.full, args.steps)
    out = arm_plain(body, args.threads) if args.arm == "plain" else arm_batchscope(body, args.executor)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in usage)  # workers count once reaped
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["worker_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest reaped child
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def spawn(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, *extra, *(["--full"] if args.full else []),
           *(["--steps", str(args.steps)] if args.steps else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))  # fmt: skip
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    from batchscope.executors.processes import usable_cores

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return f"{cpu}, {usable_cores()} cores, {gpu}; torch {torch.__version__}; load average at start {load}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the whole grid: 4 x 16 x 4 runs, 1000 updates each")
    p.add_argument("--steps", type=int, default=None, help="updates per run (default 1000)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--executor", default=None, help="batchscope's executor (default: its own choice)")
    p.add_argument("--also", action="append", default=[], metavar="EXECUTOR",
                   help="another batchscope arm with this executor (e.g. ray: a local Ray instance), side by side")
    p.add_argument("--default-threads", action="store_true",
                   help="also time the plain loop with torch's default thread count (very slow on a loaded machine)")
    p.add_argument("--write", action="store_true", help=f"append/replace '{HEADING}' in {RESULTS.name}")
    p.add_argument("--arm", choices=("plain", "batchscope"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        return run_arm(args)

    body = grid(args.full, args.steps)
    n_runs = len(BATCHES) * len(body["grid"]["optim.lr"]) * body["seeds_n"]
    where = machine()
    print(f"{n_runs} runs x {body['train']['steps']} updates; {where}", flush=True)
    arms = {"plain, 1 thread": ("--arm", "plain", "--threads", "1"),
            "batchscope": ("--arm", "batchscope", *(["--executor", args.executor] if args.executor else []))}  # fmt: skip
    arms.update({f"batchscope, {name}": ("--arm", "batchscope", "--executor", name) for name in args.also})
    if args.default_threads:
        arms = {"plain, default threads": ("--arm", "plain"), **arms}
    results: dict[str, list[dict]] = {k: [] for k in arms}
    for rep in range(args.repeats):
        for name, extra in arms.items():
            results[name].append(spawn(args, *extra))
            results[name][-1]["load"] = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
            r = results[name][-1]
            extra_info = f", runs' own training time {r['run_seconds']:.1f} s" if "run_seconds" in r else ""
            extra_info += f", cluster start {r['start_seconds']:.1f} s (not counted)" if r.get("start_seconds") else ""
            print(f"  [{rep + 1}/{args.repeats}] {name}: {r['seconds']:.1f} s, CPU {r['cpu_seconds']:.1f} s{extra_info}"
                  f" (1-min load average after: {r['load']})", flush=True)
    secs = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    bs = results["batchscope"][-1]
    diffs = [abs(bs["test_acc"][k] - results["plain, 1 thread"][-1]["test_acc"][k]) for k in bs["test_acc"]]
    rows = []
    for name, v in results.items():
        r = v[-1]
        mem = f"{r['maxrss_mb']:.0f} MB"
        if r.get("worker_maxrss_mb"):
            mem += f" + workers {r['worker_maxrss_mb']:.0f} MB each"
        if "cuda_max_allocated_mb" in r:
            mem += f"; CUDA {r['cuda_max_allocated_mb']:.0f} MB"
        ratio = "" if name == "batchscope" else f"{secs[name] / secs['batchscope']:.2f}x"
        label = name if not name.startswith("batchscope") else f"batchscope: {r['executor']}"
        cpu = statistics.median(x["cpu_seconds"] for x in v)
        rows.append(f"| {label} | {secs[name]:.1f} | {ratio} | {cpu:.1f} | {mem} |")
    table = "\n".join(["| arm | seconds | batchscope speed-up | CPU seconds | peak memory |", "|---|---|---|---|---|", *rows])
    report = (
        f"{HEADING}\n\n{datetime.date.today().isoformat()}, `python bench/bench_sweep.py"
        f"{' --full' if args.full else ''}{f' --steps {args.steps}' if args.steps else ''}"
        f"{f' --repeats {args.repeats}' if args.repeats > 1 else ''}`: {n_runs} MNIST-1D MLP runs (width 0.25, depth 2)"
        f" x {body['train']['steps']} updates, batch sizes {', '.join(map(str, BATCHES))}; {where}.\n\n{table}\n\n"
        f"Final test accuracy, batchscope vs the plain loop (same init, data order and updates; the update is\n"
        f"rounded differently, which chaotic high-lr runs amplify): mean |difference| {statistics.mean(diffs):.4f},"
        f" largest {max(diffs):.4f}.\n"
    )
    print("\n" + report)
    if args.write:
        write_section(report)


def write_section(report: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), leaving the other sections alone."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: report + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + report
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
