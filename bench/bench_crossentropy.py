"""The fused cross-entropy Hessian-vector product (batchscope.curvature.crossentropy) against the plain ones,
on a language model with a large vocabulary: time per product and peak memory, each arm in its own process.

    python bench/bench_crossentropy.py                 # tiny LM, vocab 50,257, CPU
    python bench/bench_crossentropy.py --model gpt2    # GPT-2-small configuration, random weights (GPU)
    python bench/bench_crossentropy.py --tiny          # seconds: a smoke test of every arm

Arms: `Objective.hvp` by double backward and by forward-over-reverse (what batchscope does today), the
fused Hessian and Gauss-Newton products, and hessian-eigenthings' GGNOperator (its output block by a
double backward of the loss alone; skipped with a note if the package is missing). Every arm is checked
against the double-backward product on the same data (the Gauss-Newton arms against the fused
Gauss-Newton product, itself checked against dense in tests/curvature/test_crossentropy.py); the
relative difference is printed. Times: medians of --reps rounds in one process, one product of each arm
per round (side by side on a shared machine). Peak memory: CUDA's
max_memory_allocated on a GPU; on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs
after a warm-up product) less its RSS then, over one product; each arm's memory in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hessian_workload import GPT2Logits, lm_loss  # noqa: E402

ARMS = ["double_backward", "forward_over_reverse", "fused_hessian", "fused_hessian_rr", "fused_ggn", "eigenthings_ggn"]


class TinyLM(nn.Module):
    """Embedding -> 2-layer MLP -> linear over the vocabulary: (B, T) tokens to (B, T, V) logits."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.out = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.out(h + self.mix(h))


def build(args):
    torch.manual_seed(0)
    if args.model == "gpt2":
        model = GPT2Logits(args.tiny)
        vocab = model.lm.config.vocab_size
    else:
        vocab = 1000 if args.tiny else args.vocab
        model = TinyLM(vocab, 16 if args.tiny else args.width)
    dev = torch.device(args.device)
    model = model.to(dev)
    g = torch.Generator().manual_seed(1)
    B, T = (2, 8) if args.tiny else (args.batch, args.seq)
    x = torch.randint(0, vocab, (B, T), generator=g).to(dev)
    y = torch.randint(0, vocab, (B, T), generator=g).to(dev)
    return model, [(x, y)], vocab


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_arms(obj, model, data, v, names):
    """{arm: product function} for the arms in `names` (an arm whose package is missing maps to a note)."""
    from batchscope.curvature.crossentropy import objective_hvp

    def objective(method):
        def fn():
            obj.hvp_method = method
            return obj.hvp(v)
        return fn

    arms = {}
    for name in names:
        if name in ("double_backward", "forward_over_reverse"):
            arms[name] = objective(name)
        elif name.startswith("fused_"):
            curv = name.split("_")[1]
            meth = "reverse_over_reverse" if name.endswith("_rr") else "auto"
            arms[name] = lambda curv=curv, meth=meth: objective_hvp(obj, v, curvature=curv, method=meth, class_dim=-1)
        elif name == "eigenthings_ggn":
            try:
                from hessian_eigenthings import GGNOperator
            except ImportError:
                arms[name] = "hessian-eigenthings is not installed"
                continue
            op = GGNOperator(model, data, lambda m, b: m(b[0]), lambda out, b: lm_loss(out, b[1]))
            arms[name] = lambda op=op: op.matvec(v)
        else:
            raise ValueError(f"arm {name!r}: expected one of {', '.join(ARMS)}")
    return arms


def memory_of_arm(args) -> dict:
    """Peak memory of one product of one arm, in this (fresh) process, after a warm-up product."""
    from batchscope.curvature._core import Objective

    torch.set_num_threads(args.threads)
    model, data, _ = build(args)
    dev = torch.device(args.device)
    with Objective(model, lm_loss, data, hvp_method="double_backward") as obj:
        v = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(2)).to(dev)
        fn = make_arms(obj, model, data, v, [args.arm])[args.arm]
        if isinstance(fn, str):
            return {"arm": args.arm, "skipped": fn}
        fn()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            fn()
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base
        else:
            base = rss_bytes()
            peak = -1
            if reset_peak_rss():  # otherwise the warm-up's peak is mixed in: no measurement
                fn()
                peak = peak_rss_bytes() - base
    return {"arm": args.arm, "peak_bytes": peak}


def time_arms(args) -> tuple[list[dict], str]:
    """Every arm in this process: checked against the double-backward product (the GGN arms against the
    fused GGN product), then timed in rounds, one product of each arm per round (medians)."""
    from batchscope.curvature._core import Objective
    from batchscope.curvature.crossentropy import objective_hvp

    torch.set_num_threads(args.threads)
    model, data, vocab = build(args)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    names = args.arms.split(",")
    rows = {n: {"arm": n, "vocab": vocab} for n in names}
    with Objective(model, lm_loss, data, hvp_method="double_backward") as obj:
        v = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(2)).to(dev)
        ref_h = obj.hvp(v)
        ref_g = objective_hvp(obj, v, curvature="ggn", class_dim=-1)
        arms = make_arms(obj, model, data, v, names)
        live = {}
        for n, fn in arms.items():
            if isinstance(fn, str):
                rows[n]["skipped"] = fn
                continue
            try:
                out = fn()  # warm-up and check
            except Exception as e:  # noqa: BLE001 - report an arm that fails, run the others
                rows[n]["skipped"] = f"failed: {type(e).__name__}: {str(e)[:150]}"
                continue
            ref = ref_g if "ggn" in n else ref_h
            rows[n]["check"] = float((out.detach() - ref).norm() / ref.norm())
            live[n] = fn
        del out
        times = {n: [] for n in live}
        for _ in range(args.reps):
            for n, fn in live.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[n].append(time.perf_counter() - t)
        for n in live:
            rows[n]["seconds"] = statistics.median(times[n])
        rows_method = getattr(obj, "_ce_hvp_methods", {})
        n_params = obj.n_params
    for n in names:
        if n.startswith("fused_") and not n.endswith("_rr"):
            rows[n]["method"] = rows_method.get(n.split("_")[1], "")
        elif n.endswith("_rr"):
            rows[n]["method"] = "reverse_over_reverse"
    return list(rows.values()), f"{n_params} parameters, vocabulary {vocab}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tinylm", "gpt2"], default="tinylm")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(memory_of_arm(args)))
        return
    rows, what = time_arms(args)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for r in rows:
        if "seconds" not in r:
            continue
        cmd = [sys.executable, __file__, "--arm", r["arm"], "--model", args.model, "--vocab", str(args.vocab),
               "--width", str(args.width), "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device,
               "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        r["peak_bytes"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"] if proc.returncode == 0 else -1
    base = next((r for r in rows if r["arm"] == "double_backward" and "seconds" in r), None)
    print(f"{args.model}{' (tiny)' if args.tiny else ''} on {args.device}, {args.threads} thread(s), {what}; "
          f"times: medians of {args.reps} rounds in one process, one product of each arm per round")
    print("| arm | s per product | peak MB | time vs double backward | memory vs double backward | rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "seconds" not in r:
            print(f"| {r['arm']} | {r['skipped']} | | | | |")
            continue
        tr = f"{base['seconds'] / r['seconds']:.2f}x" if base else ""
        ok = base and base["peak_bytes"] > 0 and r["peak_bytes"] > 0
        mr = f"{base['peak_bytes'] / r['peak_bytes']:.2f}x" if ok else ""
        name = r["arm"] + (f" ({r['method']})" if r.get("method") else "")
        print(f"| {name} | {r['seconds']:.3f} | {r['peak_bytes'] / 2**20:.0f} | {tr} | {mr} | {r['check']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
