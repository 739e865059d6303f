"""Prototypes for issue 18 items 1 and 2, measured before they go into `Objective`: what (a) keeping each
batch's gradient graph across Hessian-vector products and (b) products in blocks of vectors save per
product, on the issue's CNN workload (9,098 parameters, 2,000 images in 4 batches of 500, one thread).

    python bench/bench_hvp_reuse.py            # checks on a tiny float64 problem, then the measurements
    python bench/bench_hvp_reuse.py --tiny     # both on tiny problems (seconds): the smoke test

Implementations of H V (V: one vector or a block of k), all over every batch with the Objective's weights:

- `Objective.hvp` by double backward and by forward-over-reverse, streaming (graph_budget=None): batchscope's
  products without kept graphs, one vector at a time (with them, `Objective.hvp` is the `reuse` row);
- `reuse`: the gradient of every batch built once with create_graph=True and kept; a product is one
  backward through the kept graphs (all batches' gradients summed first, so one autograd call);
- `reuse, block k`: the same with k vectors in one call (autograd.grad(..., is_grads_batched=True));
- `vmap fwd-over-rev, block k`: torch.func.vmap over the forward-over-reverse product (no reuse);
- `linearize`: torch.func.linearize of each batch's gradient function, built once (the forward and the
  gradient traced into a graph of the tangent map), a product runs that tangent graph; with blocks by vmap.

Every implementation is first checked against the dense Hessian (torch.autograd.functional.hessian in
float64) on a tiny CNN with batch norm and unequal batches. Memory of the kept graphs: the bytes of the
tensors autograd saved while building them (a saved_tensors_hooks count, storage-deduplicated), and the
growth of the process's resident memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, linearize, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batchscope.curvature._core import Objective  # noqa: E402
from hessian_workload import make_cnn, workload  # noqa: E402


def weighted_batches(obj) -> list:
    """(n_b / N, batch) for the batches an Objective holds in memory (the prototypes need them all at once)."""
    assert obj.data.kept is not None, "the prototypes measure data held in memory"
    n = sum(nb for nb, _ in obj.data.kept)
    return [(nb / n, b) for nb, b in obj.data.kept]


def rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Reuse:
    """The gradient graph of every batch, built once and kept; products by backward passes through it."""

    def __init__(self, obj: Objective) -> None:
        self.theta = obj.theta0.detach().clone().requires_grad_(True)
        p = obj.unflatten(self.theta)
        seen: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            except (RuntimeError, NotImplementedError):
                pass
            return t

        rss0 = rss_bytes()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total = None
            for w, (x, y) in weighted_batches(obj):
                (g,) = torch.autograd.grad(w * obj.batch_loss(p, (x, y)), self.theta, create_graph=True)
                total = g if total is None else total + g
        self.g = total
        self.graph_bytes = sum(seen.values())
        self.rss_growth = rss_bytes() - rss0

    def hvp(self, v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(self.g, self.theta, grad_outputs=v, retain_graph=True)
        return hv

    def hvp_block(self, V: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(self.g, self.theta, grad_outputs=V, retain_graph=True, is_grads_batched=True)
        return hv


def vmap_fwd_over_rev(obj: Objective, V: Tensor) -> Tensor:
    """sum_b w_b H_b V by vmap over forward-over-reverse products (forward and gradient recomputed)."""
    theta = obj.theta0.detach()
    out = torch.zeros_like(V)
    for w, (x, y) in weighted_batches(obj):
        gfn = grad(lambda t, x=x, y=y: obj.batch_loss(obj.unflatten(t), (x, y)))
        out += w * vmap(lambda v, gfn=gfn: jvp(gfn, (theta,), (v,))[1])(V)
    return out


class Linearized:
    """torch.func.linearize of each batch's gradient: the tangent map traced once, run per product."""

    def __init__(self, obj: Objective) -> None:
        theta = obj.theta0.detach()
        self.maps = []
        rss0 = rss_bytes()
        def unflatten(t: Tensor) -> dict[str, Tensor]:  # reshape, not view: the traced graph may be strided
            return {n: c.reshape(s) for n, c, s in zip(obj.names, t.split(obj.numels), obj.shapes)}

        for w, (x, y) in weighted_batches(obj):
            gfn = grad(lambda t, x=x, y=y: obj.batch_loss(unflatten(t), (x, y)))
            _, jfn = linearize(gfn, theta)
            self.maps.append((w, jfn))
        self.rss_growth = rss_bytes() - rss0

    def hvp(self, v: Tensor) -> Tensor:
        return sum(w * jfn(v) for w, jfn in self.maps)

    def hvp_block(self, V: Tensor) -> Tensor:
        return sum(w * vmap(jfn)(V) for w, jfn in self.maps)


def dense_hessian(obj: Objective) -> Tensor:
    """The Hessian of the Objective's loss, through a path of its own: functional_call and
    torch.autograd.functional.hessian on a flat float64 vector (the model is float64)."""
    model = obj.model

    def f(theta: Tensor) -> Tensor:
        params = obj.unflatten(theta)
        return sum(w * obj.loss_fn(functional_call(model, {**obj.consts, **params}, (x,)), y)
                   for w, (x, y) in weighted_batches(obj))

    return torch.autograd.functional.hessian(f, obj.theta0)


def check_tiny() -> list[str]:
    """Every implementation against the dense float64 Hessian on a tiny CNN with batch norm (eval mode)
    and unequal batches; raises if any is off."""
    torch.manual_seed(0)
    model = make_cnn((2, 3, 2)).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(s, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (s,), generator=g))
               for s in (3, 5)]
    lines = []
    with Objective(model, nn.functional.cross_entropy, batches, graph_budget=None) as obj:
        H = dense_hessian(obj)
        V = torch.randn(4, obj.n_params, generator=g, dtype=torch.float64)
        ref = V @ H  # H symmetric: rows are H v
        reuse = Reuse(obj)
        try:
            lin = Linearized(obj)
            lin.hvp(V[0])
        except RuntimeError as e:  # torch.func.linearize cannot trace every model (conv backward here)
            lin = None
            lines.append(f"linearize: failed on the tiny CNN, left out of the measurements ({str(e)[:90]})")
        candidates = {
            "Objective.hvp (double backward)": lambda: torch.stack([obj.hvp(v) for v in V]),
            "reuse": lambda: torch.stack([reuse.hvp(v) for v in V]),
            "reuse, block": lambda: reuse.hvp_block(V),
            "vmap fwd-over-rev, block": lambda: vmap_fwd_over_rev(obj, V),
        }
        if lin is not None:
            candidates["linearize"] = lambda: torch.stack([lin.hvp(v) for v in V])
            candidates["linearize, block"] = lambda: lin.hvp_block(V)
        obj.hvp_method = "double_backward"
        for name, fn in candidates.items():
            try:
                err = float((fn() - ref).norm() / ref.norm())
            except RuntimeError as e:
                if not name.startswith("linearize"):
                    raise
                lines.append(f"{name}: failed, left out of the measurements ({str(e)[:90]})")
                continue
            lines.append(f"{name}: relative error {err:.1e} against the dense float64 Hessian ({obj.n_params} parameters)")
            if err > 1e-10:
                raise AssertionError(lines[-1])
    return lines


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--blocks", default="4,8,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    checks = check_tiny()
    for line in checks:
        print("check:", line)
    use_linearize = not any(line.startswith("linearize: failed") for line in checks)
    lin_blocks = not any(line.startswith("linearize, block: failed") for line in checks)
    model, batches, loss_fn, desc = workload("cnn", tiny=args.tiny)
    blocks = [int(k) for k in args.blocks.split(",")]
    print(f"workload: {desc}; {sum(p.numel() for p in model.parameters())} parameters; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    rows = []
    with Objective(model, loss_fn, batches, hvp_method="double_backward", graph_budget=None) as obj:
        gen = torch.Generator().manual_seed(2)
        V = torch.randn(max(blocks), obj.n_params, generator=gen)
        v = V[0]
        # one gradient of the data, the unit the issue counts products in
        t_grad = timed(lambda: obj.loss_and_grad(), args.reps)
        rows.append(("gradient of the data (reference unit)", 1, t_grad))
        ref = obj.hvp(v)
        rows.append(("Objective.hvp, double backward", 1, timed(lambda: obj.hvp(v), args.reps)))
        obj.hvp_method = "forward_over_reverse"
        rows.append(("Objective.hvp, forward over reverse", 1, timed(lambda: obj.hvp(v), args.reps)))
        obj.hvp_method = "double_backward"

        t = time.perf_counter()
        reuse = Reuse(obj)
        t_build = time.perf_counter() - t
        err = float((reuse.hvp(v) - ref).norm() / ref.norm())
        rows.append((f"reuse (graphs built once in {t_build:.2f} s)", 1, timed(lambda: reuse.hvp(v), args.reps)))
        for k in blocks:
            rows.append((f"reuse, block {k} (is_grads_batched)", k, timed(lambda k=k: reuse.hvp_block(V[:k]), args.reps)))
        graph_mb, rss_mb = reuse.graph_bytes / 2**20, reuse.rss_growth / 2**20
        reuse = None  # the kept graphs go
        for k in blocks:
            rows.append((f"vmap fwd-over-rev, block {k}", k, timed(lambda k=k: vmap_fwd_over_rev(obj, V[:k]), args.reps)))
        try:
            if not use_linearize:
                raise RuntimeError("it failed the tiny check")
            t = time.perf_counter()
            lin = Linearized(obj)
            t_lin = time.perf_counter() - t
            lin_err = float((lin.hvp(v) - ref).norm() / ref.norm())
            rows.append((f"linearize (traced once in {t_lin:.2f} s)", 1, timed(lambda: lin.hvp(v), args.reps)))
            for k in blocks if lin_blocks else []:
                rows.append((f"linearize, block {k} (vmap)", k, timed(lambda k=k: lin.hvp_block(V[:k]), args.reps)))
            lin_note = (f"linearize: float32 difference from Objective.hvp {lin_err:.1e}; "
                        f"resident memory +{lin.rss_growth / 2**20:.0f} MB")
            lin = None
        except Exception as e:  # noqa: BLE001 - a prototype: report, do not stop
            lin_note = f"linearize failed: {type(e).__name__}: {str(e)[:200]}"
    base = rows[1][2]
    print()
    print("| product | vectors per call | s per call | s per product | per product vs Objective.hvp (double backward) "
          "| gradients of the data per product |")
    print("|---|---|---|---|---|---|")
    for name, k, s in rows:
        print(f"| {name} | {k} | {s:.3f} | {s / k:.3f} | {base / (s / k):.2f}x | {s / k / t_grad:.2f} |")
    print()
    print(f"reuse: float32 difference from Objective.hvp {err:.1e}; kept graphs: {graph_mb:.0f} MB of saved tensors, "
          f"resident memory +{rss_mb:.0f} MB ({len(batches)} batches)")
    print(lin_note)


if __name__ == "__main__":
    main()
