"""Validation of `batchscope advise` against a full steps-to-target sweep (Shallue et al. 2019's protocol).

For each workload: the advice (its B_crit with interval, and what it cost in examples), and the ground truth: every
batch size B0 x 2^k trained from scratch to the target at 4 learning rates (the optimizer's rule times 1/4, 1/2, 1, 2)
and 3 seeds; steps to the target per (B, lr) is the median over seeds (a seed that misses counts as never), the
best learning rate per B is kept, and S(B) = S_min + E_min / B is fitted to those (the same fit as the advice's).
On the linear least-squares workload the noise scales are also known in closed form at every checkpoint
(bench/advise_workloads.py): the advice's estimates are compared with them.

Targets (issue 17): B_noise within 10% of the closed form; the advised B_crit within a factor of 2 of the ground
truth on every workload; the advice's compute (reference, branches, measurements) at most 15% of the sweep's.

    python bench/bench_advise.py                 # all three workloads (about 20-40 minutes on 2 cores)
    python bench/bench_advise.py lsq --write     # one workload; --write puts the table in bench/RESULTS.md
Stores go to --work (default /tmp/bench_advise): runs already there are not trained again.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])  # the executor's workers

from batchscope.advise import advise  # noqa: E402
from batchscope.advise.core import examples_at  # noqa: E402
from batchscope.advise.fit import crossing, fit_tradeoff, lr_for, rule_for  # noqa: E402
from batchscope.factories import dataset_for, model_for  # noqa: E402
from batchscope.spec import SweepSpec, validate_run  # noqa: E402
from batchscope.store import Store  # noqa: E402
from batchscope.sweep import run_sweep  # noqa: E402

RESULTS = HERE / "RESULTS.md"
HEADING = "## Batch-size advice against a full steps-to-target sweep"
LR_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
SEEDS = 3

WORKLOADS = {
    "lsq": {
        "body": {
            "data": {"name": "advise_workloads:lsq_data", "options": {"n_train": 1024, "n_test": 512}},
            "model": {"name": "advise_workloads:lsq_model"}, "loss": {"name": "mse"},
            "optim": {"name": "sgd", "lr": 0.005}, "train": {"batch_size": 4, "epochs": 32},
            "log": {"log_points": 30},
        },
        "target": "train_loss<=0.27", "curvature": True, "closed_form": True,
    },
    "teacher_student": {
        "body": {
            "data": {"name": "teacher_student", "n_train": 4000, "n_test": 1000},
            "model": {"name": "mlp", "width": 0.25, "depth": 2},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "train": {"batch_size": 16, "epochs": 20},
            "log": {"log_points": 30},
        },
        "target": "train_loss<=0.3", "curvature": False, "closed_form": False,
    },
    "mnist1d": {
        "body": {
            "data": {"name": "mnist1d"}, "model": {"name": "mlp", "width": 0.25, "depth": 2},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "train": {"batch_size": 16, "epochs": 20},
            "log": {"log_points": 30},
        },
        "target": "train_loss<=0.6", "curvature": False, "closed_form": False,
    },
}


def ground_truth(name: str, w: dict, batches: list[int], budget_epochs: float, work: Path) -> dict:
    base = validate_run(w["body"])
    rule = rule_for(base.optim.name)
    metric, threshold = re.match(r"(\w+)<=(.+)", w["target"]).groups()  # type: ignore[union-attr]
    specs = []
    for b in batches:
        for m in LR_MULTIPLIERS:
            body = base.model_dump(mode="python")
            body["train"].update(batch_size=b, epochs=budget_epochs, stop={"metric": metric, "threshold": float(threshold)})
            body["optim"]["lr"] = lr_for(base.optim.lr, base.train.batch_size, b, rule) * m
            body["tags"] = {"batch": b, "lr_multiplier": m}
            specs.append(body)
    sweep = SweepSpec.model_validate({**specs[0], "name": f"truth-{name}", "seeds_n": SEEDS,
                                      "zip": [{"train.batch_size": [s["train"]["batch_size"] for s in specs],
                                               "optim.lr": [s["optim"]["lr"] for s in specs]}]})
    t0 = time.perf_counter()
    with Store(work / "truth.db") as st:
        run_sweep(st, sweep)
        runs = sweep.expand()
        n = dataset_for(runs[0], torch.device("cpu")).n_train
        steps: dict[tuple[int, float], list[float]] = {}
        examples = 0.0
        for r in runs:
            rec = st.get_run(r.run_id())
            ex = examples_at(r, n)
            examples += ex(int(rec.final.get("steps", 0) or 0))
            curve = [(s, v) for s, v in st.metrics(r.run_id(), ["train_loss"])["train_loss"]]
            hit = crossing(curve, float(threshold)) if rec.status == "done" else None
            steps.setdefault((r.train.batch_size, r.optim.lr), []).append(math.inf if hit is None else hit)
    best: dict[int, float] = {}
    for (b, _), ss in steps.items():
        med = statistics.median(ss)
        if math.isfinite(med) and med > 0:
            best[b] = min(best.get(b, math.inf), med)
    fit = fit_tradeoff(list(best), list(best.values()))
    return {"fit": fit, "steps": best, "examples": examples, "runs": len(runs), "seconds": time.perf_counter() - t0}


def closed_form_check(advice, w: dict, work: Path) -> list[dict]:
    """The advice's noise scales at each checkpoint against the closed form on the same examples."""
    from advise_workloads import closed_form_noise

    base = validate_run(w["body"])
    out = []
    with Store(work / "advise.db") as st:
        ref = validate_run(st.get_run(advice.reference_id).spec)
        ds = dataset_for(ref, torch.device("cpu"))
        for c in advice.checkpoints:
            model = model_for(ref, ds, torch.device("cpu"))
            model.load_state_dict(st.load_checkpoint(advice.reference_id, c.point)["model"])
            m = int(c.noise["examples"])
            exact = closed_form_noise(model, ds.x_train[:m], ds.y_train[:m])
            out.append({"epoch": c.point, **{f"{k}_exact": v for k, v in exact.items()},
                        "b_simple": c.noise["b_simple"], "b_simple_se": c.noise["b_simple_se"],
                        "b_noise": c.noise.get("b_noise"), "b_noise_se": c.noise.get("b_noise_se")})
    del base
    return out


def run(name: str, work_root: Path) -> dict:
    w = WORKLOADS[name]
    work = work_root / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pairs = 1000 if w["closed_form"] else 50
    base = validate_run(w["body"])
    # the advice tunes B0's learning rate on the same grid the ground truth uses at B0, as a user would
    advice = advise(base, w["target"], store=work / "advise.db", out=work / "report", curvature=w["curvature"],
                    noise_pairs=pairs, noise_examples=1024, lr_grid=(2.0, 1.0, 0.5),
                    reference_lrs=tuple(base.optim.lr * m for m in LR_MULTIPLIERS))
    seconds = time.perf_counter() - t0
    n = dataset_for(validate_run(w["body"]), torch.device("cpu")).n_train
    batches = sorted({b for c in advice.checkpoints for b in c.batches})
    budget = 8 * max(1.0, math.ceil(advice.reference_examples_to_target / n))
    truth = ground_truth(name, w, batches, budget, work)
    row = {"workload": name, "target": w["target"], "advice": advice, "advice_seconds": seconds, "truth": truth,
           "noise": closed_form_check(advice, w, work) if w["closed_form"] else []}
    return row


def fmt(x: float) -> str:
    return f"{x:,.3g}" if abs(x) < 1e4 else f"{x:,.0f}"


def table(rows: list[dict]) -> str:
    lines = ["| workload | target | advised B_crit [95% CI] | ground truth B_crit [95% CI] | ratio | within 2x | "
             "advice: runs (examples) | sweep (examples) | share | with measurements | with the recipe too |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, t = r["advice"], r["truth"]
        rt = a.run_tradeoff
        lo, hi = t["fit"].b_crit_interval()
        ratio = rt["b_crit"] / t["fit"].b_crit
        runs = a.compute["reference_examples"] + a.compute["branch_examples"]
        share = runs / t["examples"]
        lines.append(
            f"| {r['workload']} | {r['target']} | {fmt(rt['b_crit'])} [{fmt(rt['b_crit_lo'])}, {fmt(rt['b_crit_hi'])}] | "
            f"{fmt(t['fit'].b_crit)} [{fmt(lo)}, {fmt(hi)}] | {ratio:.2f} | {'yes' if 0.5 <= ratio <= 2 else 'no'} | "
            f"{fmt(runs)} | {fmt(t['examples'])} ({t['runs']} runs) | {share:.1%} | "
            f"{a.compute['advice_examples'] / t['examples']:.1%} | {a.compute['examples'] / t['examples']:.1%} |")
    noise = [(r["workload"], x) for r in rows for x in r["noise"]]
    if noise:
        lines += ["", "| workload | checkpoint | B_simple estimate ± SE | closed form | error | B_noise estimate ± SE | "
                  "closed form | error |", "|---|---|---|---|---|---|---|---|"]
        for wl, x in noise:
            e1 = x["b_simple"] / x["b_simple_exact"] - 1
            e2 = (x["b_noise"] / x["b_noise_exact"] - 1) if x["b_noise"] is not None else math.nan
            lines.append(f"| {wl} | {x['epoch']} | {fmt(x['b_simple'])} ± {fmt(x['b_simple_se'])} | {fmt(x['b_simple_exact'])} | "
                         f"{e1:+.1%} | {fmt(x['b_noise'])} ± {fmt(x['b_noise_se'])} | {fmt(x['b_noise_exact'])} | {e2:+.1%} |")
    return "\n".join(lines)


def write(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    section = f"{HEADING}\n\n{text}\n"
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        old = old[:start] + section + (old[nxt + 1:] if nxt >= 0 else "")
        RESULTS.write_text(old)
    else:
        RESULTS.write_text(old.rstrip() + "\n\n" + section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"some of {', '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_advise"))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; expected some of {', '.join(WORKLOADS)}")
    args.workloads = args.workloads or list(WORKLOADS)
    torch.set_num_threads(1)
    rows = []
    for name in args.workloads:
        r = run(name, args.work)
        rows.append(r)
        print(f"{name}: advice {r['advice_seconds']:.0f} s, sweep {r['truth']['seconds']:.0f} s; "
              f"steps by batch (truth): {r['truth']['steps']}", flush=True)
    text = table(rows)
    print(text)
    if args.write:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        write(f"`python bench/bench_advise.py --write`, {when}, {platform.machine()} CPU, "
              f"{os.cpu_count()} cores, torch {torch.__version__}. Ground truth: every batch size of the advice's "
              f"branches, {len(LR_MULTIPLIERS)} learning rates (the rule's x {', '.join(f'{m:g}' for m in LR_MULTIPLIERS)}), "
              f"{SEEDS} seeds, from scratch to the target. Advice compute: reference runs, branches and measurements (the "
              "recipe's branches, which the B_crit does not use, in the last column).\n\n" + text)


if __name__ == "__main__":
    main()
