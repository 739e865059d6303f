"""Hessian top eigenvalues and trace: batchscope against curvlinops, hessian-eigenthings and PyHessian, each
used as its documentation shows and at its defaults, side by side in one run (issue 18's table).

    pip install -e '.[bench]'                # curvlinops-for-pytorch, hessian-eigenthings, pyhessian
    python bench/bench_hessian.py            # the CPU table: 9,098-parameter CNN, 2,000 images, 4 batches of 500
    python bench/bench_hessian.py --write    # ... and replace its section of bench/RESULTS.md
    python bench/bench_hessian.py --gpu      # ResNet-20 on 5,000 images and GPT-2-small (random weights), on CUDA
    python bench/bench_hessian.py --gpu --tiny --device cpu   # the same arms on tiny sizes (the test)

A library that is not installed is skipped with a note; one that fails on a workload is reported as failed.
Tasks: top-1 and top-5 eigenvalues, and the trace with about 100 Hessian-vector products (HVPs). Per task
and library: wall-clock seconds of the whole call (operator setup included), the number of HVPs over all
of the data (a block of k vectors counts k), and the relative error against references computed here:
float64 Lanczos (tol 1e-9) on a float64 copy of the model for the eigenvalues (worst relative error of the
k), and Hutch++ with a large budget for the trace (its own standard error is printed with it).

How each library is called (its defaults, the way its README or docstrings show):
- batchscope: hessian_eigenvalues(model, F.cross_entropy, batches, k=k); hessian_trace(..., 99, method="hutch++").
- curvlinops 3: HessianLinearOperator(model, CrossEntropyLoss(), params, batches) (its determinism check
  included: it is on by default); scipy's eigsh(H.to_scipy(), k=k, which="LA") at its default tol (machine
  precision); hutchpp_trace(H, num_matvecs=99).
- hessian-eigenthings 1.0: HessianOperator(model, batches, supervised_loss(F.cross_entropy)); lanczos(op, k=k,
  seed=0) at its default tol 1e-4, with max_iter doubled from its default 2k until every Ritz pair reports
  converged (the time and HVPs of the converged call only, as if the user had picked that max_iter);
  trace(op, num_matvecs=99, seed=0) (Hutch++ by default).
- PyHessian 0.1: hessian(model, criterion, dataloader=batches) (its full-data mode: several batches);
  eigenvalues(top_n=k) (power iteration, maxIter 100, tol 1e-3); trace(maxIter=99, tol=-inf) (Hutchinson,
  early stop off so that it spends the budget: with tol >= 0 its relative-change rule stops at random).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batchscope.curvature.hessian import hessian_eigenvalues, hessian_trace  # noqa: E402
from hessian_workload import workload  # noqa: E402

HEADING = "## Hessian eigenvalues and trace vs curvature libraries"
OLD_HEADINGS = ("## Hessian eigenvalues and trace vs PyHessian",)
RESULTS = Path(__file__).with_name("RESULTS.md")
LIBRARIES = ("batchscope", "curvlinops", "hessian-eigenthings", "PyHessian")
TRACE_HVPS = 99  # divisible by 3, as curvlinops' Hutch++ requires


@dataclass
class Outcome:
    values: list[float]
    hvps: int
    seconds: float
    note: str = ""


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


class FlatLogits(nn.Module):
    """(B, T, V) logits as (B*T, V), for libraries whose loss takes (N, C) outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return z.reshape(-1, z.shape[-1])


def plain_view(model: nn.Module, batches, lm: bool):
    """(model, batches) as an (N, C)-output classifier for the other libraries: sequence models flattened."""
    if not lm:
        return model, batches
    return FlatLogits(model), [(x, y.reshape(-1)) for x, y in batches]


# -- the arms ------------------------------------------------------------------------------------

def ours_top(model, batches, loss_fn, k: int, lm: bool) -> Outcome:
    t = time.perf_counter()
    r = hessian_eigenvalues(model, loss_fn, batches, k=k)
    return Outcome(r.eigenvalues, r.iterations, time.perf_counter() - t)


def ours_trace(model, batches, loss_fn, budget: int, seed: int, lm: bool) -> Outcome:
    t = time.perf_counter()
    r = hessian_trace(model, loss_fn, batches, budget, method="hutch++", seed=seed)
    return Outcome([r.trace], r.samples, time.perf_counter() - t, "Hutch++")


@contextlib.contextmanager
def _count_curvlinops():
    from curvlinops._torch_base import CurvatureLinearOperator

    count = [0]
    original = CurvatureLinearOperator._matmat

    def counted(self, M):
        count[0] += int(M[0].shape[-1])
        return original(self, M)

    CurvatureLinearOperator._matmat = counted
    try:
        yield count
    finally:
        CurvatureLinearOperator._matmat = original


def _curvlinops_op(m, data):
    from curvlinops import HessianLinearOperator

    params = [p for p in m.parameters() if p.requires_grad]
    return HessianLinearOperator(m, nn.CrossEntropyLoss(), params, data)


def curvlinops_top(model, batches, loss_fn, k: int, lm: bool) -> Outcome:
    from scipy.sparse.linalg import eigsh

    m, data = plain_view(copy.deepcopy(model).eval(), batches, lm)
    with _count_curvlinops() as count:
        t = time.perf_counter()
        H = _curvlinops_op(m, data)
        vals = eigsh(H.to_scipy(), k=k, which="LA", return_eigenvectors=False)
        s = time.perf_counter() - t
    return Outcome(sorted(map(float, vals), reverse=True), count[0], s)


def curvlinops_trace(model, batches, loss_fn, budget: int, seed: int, lm: bool) -> Outcome:
    from curvlinops import hutchpp_trace

    m, data = plain_view(copy.deepcopy(model).eval(), batches, lm)
    torch.manual_seed(seed)  # curvlinops draws its probes from the global generator
    with _count_curvlinops() as count:
        t = time.perf_counter()
        H = _curvlinops_op(m, data)
        tr = float(hutchpp_trace(H, num_matvecs=budget))
        s = time.perf_counter() - t
    return Outcome([tr], count[0], s, "Hutch++")


def _eigenthings_op(m, data):
    from hessian_eigenthings import HessianOperator, supervised_loss

    op = HessianOperator(m, data, supervised_loss(nn.functional.cross_entropy))
    count = [0]
    original = op.matvec

    def counted(v):
        count[0] += 1
        return original(v)

    op.matvec = counted  # the algorithms call op.matvec (or op(v), which calls it)
    return op, count


def eigenthings_top(model, batches, loss_fn, k: int, lm: bool) -> Outcome:
    from hessian_eigenthings import lanczos

    m, data = plain_view(copy.deepcopy(model).eval(), batches, lm)
    n = sum(p.numel() for p in m.parameters())
    max_iter, tries = 2 * k, []
    while True:
        op, count = _eigenthings_op(m, data)
        t = time.perf_counter()
        r = lanczos(op, k=k, max_iter=max_iter, seed=0)
        s = time.perf_counter() - t
        tries.append(max_iter)
        if bool(r.converged.all()) or max_iter >= min(n - 1, 400):
            break
        max_iter *= 2
    note = f"max_iter {max_iter}" + (f" (tried {', '.join(map(str, tries[:-1]))}: not converged)" if len(tries) > 1 else "")
    return Outcome(sorted(map(float, r.eigenvalues), reverse=True), count[0], s, note)


def eigenthings_trace(model, batches, loss_fn, budget: int, seed: int, lm: bool) -> Outcome:
    from hessian_eigenthings import trace

    m, data = plain_view(copy.deepcopy(model).eval(), batches, lm)
    op, count = _eigenthings_op(m, data)
    t = time.perf_counter()
    r = trace(op, num_matvecs=budget, seed=seed)
    return Outcome([float(r.estimate if hasattr(r, "estimate") else r.trace)], count[0], time.perf_counter() - t, "Hutch++")


def _pyhessian(m, data):
    from pyhessian import hessian as PyHessian

    comp = PyHessian(m, nn.functional.cross_entropy, dataloader=data, cuda=next(m.parameters()).is_cuda)
    count = [0]
    original = comp.dataloader_hv_product

    def counted(v):
        count[0] += 1
        return original(v)

    comp.dataloader_hv_product = counted
    return comp, count


def _pyhessian_cleanup(m: nn.Module) -> None:
    for p in m.parameters():
        p.grad = None  # break the graph <-> .grad cycle its backward(create_graph=True) leaves


def pyhessian_top(model, batches, loss_fn, k: int, lm: bool) -> Outcome:
    m, data = plain_view(copy.deepcopy(model), batches, lm)
    torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
    t = time.perf_counter()
    comp, count = _pyhessian(m, data)
    vals, _ = comp.eigenvalues(top_n=k)
    s = time.perf_counter() - t
    _pyhessian_cleanup(m)
    return Outcome(sorted(map(float, vals), reverse=True), count[0], s, "power iteration")


def pyhessian_trace(model, batches, loss_fn, budget: int, seed: int, lm: bool) -> Outcome:
    m, data = plain_view(copy.deepcopy(model), batches, lm)
    torch.manual_seed(seed)
    t = time.perf_counter()
    comp, count = _pyhessian(m, data)
    samples = comp.trace(maxIter=budget, tol=-math.inf)
    s = time.perf_counter() - t
    _pyhessian_cleanup(m)
    return Outcome([statistics.mean(samples)], count[0], s, "Hutchinson")


ARMS: dict[str, tuple[str | None, Callable, Callable]] = {
    # library: (distribution to look for, top-k, trace)
    "batchscope": (None, ours_top, ours_trace),
    "curvlinops": ("curvlinops-for-pytorch", curvlinops_top, curvlinops_trace),
    "hessian-eigenthings": ("hessian-eigenthings", eigenthings_top, eigenthings_trace),
    "PyHessian": ("pyhessian", pyhessian_top, pyhessian_trace),
}


def rel_err(values: list[float], ref: list[float]) -> float:
    """Worst relative error over the k eigenvalues, both sorted largest first."""
    v = sorted(values, reverse=True)
    return max(abs(a - b) / abs(b) for a, b in zip(v, ref))


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return "unknown CPU"


def write_section(text: str) -> None:
    """Replace this bench's section of RESULTS.md (and the section of its PyHessian-only predecessor)."""
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nMeasured by the scripts in `bench/`.\n"
    section = f"{HEADING}\n\n{text.strip()}\n\n"
    done = False
    for heading in (HEADING, *OLD_HEADINGS):
        pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
        if pattern.search(body):
            body = pattern.sub((lambda _: section) if not done else (lambda _: ""), body)
            done = True
    if not done:
        body = body.rstrip() + "\n\n" + section
    RESULTS.write_text(body.rstrip() + "\n")


def run_workload(name: str, args, libs: list[str]) -> tuple[str, list[str]]:
    """The table of one workload (markdown) and its notes."""
    dev = args.device
    model, batches, loss_fn, desc = workload(name, tiny=args.tiny, device=dev, train_steps=args.train_steps)
    model.eval()
    lm = name == "gpt2"
    n_params = sum(p.numel() for p in model.parameters())
    notes = [f"{name}: {desc}; {n_params:,} parameters"]
    print(notes[0], flush=True)
    available = {}
    for lib in libs:
        dist = ARMS[lib][0]
        ver = "(this tree)" if dist is None else _version(dist)
        if ver is None:
            notes.append(f"{lib}: skipped, `{dist}` is not installed (pip install -e '.[bench]')")
            print(notes[-1], flush=True)
        else:
            available[lib] = ver

    # warm-up: lazy initialisation and batchscope's hvp_method pick (once per process and setup)
    warm = hessian_eigenvalues(model, loss_fn, batches, k=1, max_iter=2)
    notes.append(f"batchscope's hvp_method picked by 'auto': {warm.info.hvp_method}")

    t = time.perf_counter()
    model64 = copy.deepcopy(model).double()
    b64 = [(x.double() if x.is_floating_point() else x, y) for x, y in batches]
    ref = hessian_eigenvalues(model64, loss_fn, b64, k=5, tol=1e-9, max_iter=400)
    del model64
    ref_trace = hessian_trace(model, loss_fn, batches, args.ref_trace_hvps, method="hutch++", seed=12345)
    notes.append(f"references: float64 Lanczos top-5 {[float(f'{v:.6g}') for v in ref.eigenvalues]} "
                 f"({ref.iterations} HVPs, converged {ref.converged}); trace {ref_trace.trace:.6g} by Hutch++ with "
                 f"{args.ref_trace_hvps} HVPs, relative stderr {ref_trace.stderr / abs(ref_trace.trace):.1e} (trace errors "
                 f"below it are not resolved) "
                 f"[{time.perf_counter() - t:.0f} s]")
    print(notes[-1], flush=True)

    cells: dict[tuple[str, str], str] = {}
    secs: dict[tuple[str, str], float] = {}
    errs: dict[tuple[str, str], float] = {}
    tasks = [("top-1", 1), ("top-5", 5), (f"trace, {TRACE_HVPS} HVPs", None)]
    for task, k in tasks:
        for lib in available:
            _, top, tr = ARMS[lib]
            try:
                if k is not None:
                    outs = [top(model, batches, loss_fn, k, lm) for _ in range(args.timing_repeats)]
                    o = min(outs, key=lambda o: o.seconds)
                    err = rel_err(o.values, ref.eigenvalues[:k])
                    hvps = o.hvps
                else:
                    outs = [tr(model, batches, loss_fn, TRACE_HVPS, seed, lm) for seed in range(args.repeats)]
                    o = outs[0]
                    err = math.sqrt(statistics.mean(((x.values[0] - ref_trace.trace) / ref_trace.trace) ** 2 for x in outs))
                    o = Outcome(o.values, round(statistics.mean(x.hvps for x in outs)),
                                statistics.mean(x.seconds for x in outs), o.note)
                    hvps = o.hvps
            except Exception as e:  # noqa: BLE001 - one library failing on a workload must not stop the table
                cells[(task, lib)] = f"failed: {type(e).__name__}"
                notes.append(f"{lib}, {task}: failed: {type(e).__name__}: {str(e)[:200]}")
                print(notes[-1], flush=True)
                continue
            cells[(task, lib)] = f"{o.seconds:.2f} s, {hvps} HVPs, {err:.0e}" + (f" ({o.note})" if o.note else "")
            secs[(task, lib)], errs[(task, lib)] = o.seconds, err
            print(f"{task} | {lib}: {cells[(task, lib)]}", flush=True)
    head = "| task | " + " | ".join(f"{lib} {available[lib]}" for lib in available) + " |"
    lines = [head, "|---" * (len(available) + 1) + "|"]
    for task, _ in tasks:
        lines.append(f"| {task} | " + " | ".join(cells.get((task, lib), "") for lib in available) + " |")
    # ratios: each library's time over batchscope's, per task
    ratio = []
    for task, _ in tasks:
        if (task, "batchscope") not in secs:
            continue
        parts = [f"{lib} {secs[(task, lib)] / secs[(task, 'batchscope')]:.2f}x (error {errs[(task, lib)]:.0e})"
                 for lib in available if lib != "batchscope" and (task, lib) in secs]
        ratio.append(f"{task}: time of each library / batchscope's ({secs[(task, 'batchscope')]:.2f} s, error "
                     f"{errs[(task, 'batchscope')]:.0e}): " + ", ".join(parts))
    return "\n".join(lines), notes + ratio


def main() -> None:
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU workloads: resnet20 and gpt2")
    ap.add_argument("--workloads", help="comma-separated, among cnn, resnet20, gpt2 (default: cnn, or both GPU ones)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes of every workload (seconds; the test)")
    ap.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1, help="seeds of each trace estimate (RMS error, mean time)")
    ap.add_argument("--timing-repeats", type=int, default=1, help="runs of each eigenvalue call (fastest counts)")
    ap.add_argument("--ref-trace-hvps", type=int, default=600)
    ap.add_argument("--write", action="store_true", help=f"write the table to {RESULTS.name}")
    args = ap.parse_args()
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.tiny:
        args.ref_trace_hvps = min(args.ref_trace_hvps, 60)
    torch.set_num_threads(args.threads)
    names = args.workloads.split(",") if args.workloads else (["resnet20", "gpt2"] if args.gpu else ["cnn"])
    libs = [lib for lib in args.libraries.split(",") if lib]
    unknown = set(libs) - set(ARMS)
    if unknown:
        raise SystemExit(f"--libraries: unknown {sorted(unknown)}; expected among {', '.join(ARMS)}")
    t0 = time.perf_counter()
    sections = []
    for name in names:
        table, notes = run_workload(name, args, libs)
        print()
        print(table)
        for n in notes:
            print(n)
        sections.append((name, table, notes))
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s")
    if args.write:
        date = (subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
                or str(datetime.datetime.now()))
        flags = " ".join(a for a in sys.argv[1:] if a != "--write")
        body = [f"`python bench/bench_hessian.py {flags}`: {date}; {machine()}, {args.threads} thread(s) of 2 cores "
                f"shared with other jobs; torch {torch.__version__}; device {args.device}. Cells: seconds of the whole "
                f"call, HVPs over all of the data, relative error. How each library is called: the docstring of "
                f"bench/bench_hessian.py. Whole bench: {total:.0f} s."]
        for name, table, notes in sections:
            body += ["", f"Workload {name}.", "", table, ""] + [f"- {n}" for n in notes]
        write_section("\n".join(body))
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
