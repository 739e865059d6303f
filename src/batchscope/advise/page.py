"""The advice's report: index.html (the recommendation in words and numbers, five figures, the tables) and
advice.json (every number the page shows, and the curves behind the figures)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..report import new_figure, save, write_page
from ..report.figures import log_ticks
from .core import Advice

_COLORS = ["#0969da", "#1a7f37", "#bc4c00", "#8250df", "#cf222e", "#6e7781", "#116329", "#953800"]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def _loss_curves(ax: Any, curves: dict[str, Any], title: str, emphasize: str | None = None) -> None:
    """Training loss against examples since the branch point, one line per curve, on log axes."""
    for i, (label, curve) in enumerate(curves.items()):
        if not curve:
            continue
        x, y = np.array(curve, dtype=float).T
        bold = label == emphasize
        ax.plot(np.maximum(x, 1), y, lw=1.6 if bold else 1, color="black" if bold else _COLORS[i % 8], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples since the branch point")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)


def _figures(a: Advice, fig_dir: Path) -> list[tuple[str, Path, str]]:
    out = []

    # S(B): each checkpoint's steps to its window's loss, with the fit S_min + E_min / B
    fig, ax = new_figure()
    all_b: list[float] = []
    for i, c in enumerate(a.checkpoints):
        pts = [(b, v["steps"]) for b, v in c.batches.items() if v["steps"] is not None]
        if not pts:
            continue
        b, s = np.array(pts, dtype=float).T
        all_b += b.tolist()
        col = _COLORS[i % len(_COLORS)]
        ax.scatter(b, s, color=col, s=18, zorder=3, label=f"from epoch {c.epoch:.3g}")
        if c.tradeoff is not None:
            grid = np.geomspace(b.min(), b.max(), 50)
            ax.plot(grid, c.tradeoff["s_min"] + c.tradeoff["e_min"] / grid, color=col, lw=1)
            ax.axvline(c.tradeoff["b_crit"], color=col, lw=0.8, ls=":")
    if all_b:
        log_ticks(ax, all_b)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("steps to the window's loss")
    ax.set_title("S(B) from the branches; dotted: B_crit")
    ax.legend(fontsize=7, frameon=False)
    out.append(("steps_by_batch", save(fig, fig_dir, "steps_by_batch"),
                "Steps each batch size took from a checkpoint to the loss B0 reached after one window, at its best "
                "learning rate; lines: the fit S(B) = S_min + E_min / B; dotted: B_crit = E_min / S_min."))

    # batch sizes over training: B_simple with its 95% interval, CBS and B_crit
    fig, ax = new_figure()
    ex = np.array([max(c.examples, 1.0) for c in a.checkpoints])
    bs = np.array([c.noise.get("b_simple", math.nan) for c in a.checkpoints])
    se = np.array([c.noise.get("b_simple_se", math.nan) for c in a.checkpoints])
    ax.errorbar(ex, bs, yerr=1.96 * se, fmt="o-", color=_COLORS[0], ms=4, lw=1, capsize=2, label="B_simple (95% CI)")
    if any("b_noise" in c.noise for c in a.checkpoints):
        bn = np.array([c.noise.get("b_noise", math.nan) for c in a.checkpoints])
        bse = np.array([c.noise.get("b_noise_se", math.nan) for c in a.checkpoints])
        ax.errorbar(ex, bn, yerr=1.96 * bse, fmt="s-", color=_COLORS[3], ms=4, lw=1, capsize=2, label="B_noise (95% CI)")
    cbs = np.array([c.cbs if c.cbs is not None else math.nan for c in a.checkpoints], dtype=float)
    ax.plot(ex, cbs, "^--", color=_COLORS[1], ms=5, lw=1, label="CBS (branches)")
    bc = [(e, c.tradeoff) for e, c in zip(ex, a.checkpoints) if c.tradeoff is not None]
    if bc:
        e2 = np.array([e for e, _ in bc])
        mid = np.array([t["b_crit"] for _, t in bc])
        lo = np.array([t["b_crit_lo"] for _, t in bc])
        hi = np.array([t["b_crit_hi"] for _, t in bc])
        ax.errorbar(e2, mid, yerr=[mid - lo, hi - mid], fmt="D-", color=_COLORS[2], ms=4, lw=1, capsize=2,
                    label="B_crit (fit, 95% CI)")
    ax.axhline(a.b0, color="#6e7781", lw=0.8, ls=":", label=f"B0 = {a.b0}")
    ax.set_xscale("symlog", linthresh=max(float(ex[ex > 1].min()) if np.any(ex > 1) else 1.0, 1.0))
    ax.set_xlim(left=0)  # no negative ticks: examples are never negative
    ax.set_yscale("log")
    ax.set_xlabel("examples seen by B0 (checkpoint)")
    ax.set_ylabel("batch size")
    ax.set_title("noise scale and critical batch over training")
    ax.legend(fontsize=7, frameon=False)
    out.append(("batch_over_training", save(fig, fig_dir, "batch_over_training"),
                "At each checkpoint of the reference run: the gradient noise scale B_simple (McCandlish et al.'s "
                "two-batch estimators, 95% interval), the critical batch size CBS from the branches (Merrill et al.) and "
                "B_crit from the fit of S(B)."))

    # stability: sharpness against the limit
    fig, ax = new_figure()
    sh = [(c.examples, c.sharpness / c.sharpness_limit) for c in a.checkpoints if c.sharpness is not None]
    if sh:
        x, y = np.array(sh, dtype=float).T
        ax.plot(np.maximum(x, 1), y, "o-", color=_COLORS[0], ms=4, lw=1, label=f"B0 = {a.b0}, lr {_fmt(a.lr0)}")
    st = a.recommendation.get("stability") or {}
    if st:
        last = a.checkpoints[-1]
        ax.scatter([max(last.examples, 1)], [st["ratio"]], marker="*", s=90, color=_COLORS[2], zorder=4,
                   label=f"recommended B = {st['batch']}, lr {_fmt(st['lr'])}")
    ax.axhline(1.0, color=_COLORS[4], lw=1, ls="--", label="stability limit")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("examples seen by B0 (checkpoint)")
    pre = a.optimizer in ("adam", "adamw", "lamb")
    ax.set_ylabel("preconditioned sharpness / limit" if pre else "lambda_max / (2(1+beta)/lr)")
    ax.set_title("stability (Cohen et al.)")
    ax.legend(fontsize=7, frameon=False)
    out.append(("stability", save(fig, fig_dir, "stability"),
                "The top Hessian eigenvalue (Adam: of the preconditioned Hessian) over its stability limit, "
                "2(1 + beta)/lr for SGD with momentum beta, (2 + 2 beta_1)/((1 - beta_1) lr) for Adam; below 1 is stable."))

    # recipe arms overlaid on B0
    fig, ax = new_figure()
    _loss_curves(ax, a.curves.get("recipe", {}), f"moving from B0 = {a.recipe.get('b0')} to B1 = {a.recipe.get('b1')}",
                 emphasize="B0")
    out.append(("recipe", save(fig, fig_dir, "recipe"),
                f"Short branches from epoch {a.recipe.get('from_epoch', 0):.3g} of the reference: each recipe for the larger "
                "batch, its training loss against examples, overlaid on B0's."))

    # the branches of the last checkpoint, loss against examples
    last = a.checkpoints[-1]
    fig, ax = new_figure()
    curves = a.curves["branches"].get(last.point, {})
    ax.axhline(last.window_loss, color="black", lw=0.8, ls=":", label="window's loss")
    _loss_curves(ax, {f"B = {b}": c for b, c in sorted(curves.items())}, f"branches from epoch {last.epoch:.3g}")
    out.append(("branches", save(fig, fig_dir, "branches"),
                f"Branches from the reference's checkpoint at epoch {last.epoch:.3g}, each batch size at its best learning rate: "
                "training loss against examples seen."))
    return out


def _words(a: Advice) -> list[str]:
    r = a.recommendation
    paras = []
    if a.run_tradeoff is not None:
        t = a.run_tradeoff
        paras.append(
            f"Recommended batch size: {r['batch']} at learning rate {_fmt(r['lr'])} ({a.optimizer}, {a.lr_rule} scaling "
            f"from B0 = {a.b0} at {_fmt(a.lr0)}). The whole run's critical batch size is B_crit = {_fmt(t['b_crit'])} "
            f"(95% interval {_fmt(t['b_crit_lo'])} to {_fmt(t['b_crit_hi'])}), from S_min = {_fmt(t['s_min'])} steps and "
            f"E_min = {_fmt(t['e_min'])} examples: at B_crit a run needs about twice the fewest steps and twice the "
            "fewest examples (McCandlish et al.). The recommendation is the largest batch tried at or below it.")
        paras.append(
            f"Expected to reach {a.target}: about {_fmt(r.get('steps_at_batch'))} steps and {_fmt(r.get('examples_at_batch'))} "
            f"examples at B = {r['batch']}, against {_fmt(r.get('steps_at_b0'))} steps and {_fmt(r.get('examples_at_b0'))} "
            f"examples at B0 (the reference measured {_fmt(a.reference_steps_to_target)} steps); with the ramp, about "
            f"{_fmt(r.get('steps_with_ramp'))} steps.")
    else:
        paras.append(f"No S(B) fit could be made: stay at B0 = {a.b0}. See the notes.")
    ramp = "; ".join(f"from {_fmt(s['from_examples'])} examples: B = {s['batch']} at lr {_fmt(s['lr'])}" for s in r["ramp"])
    paras.append(f"Batch ramp (each segment at its checkpoint's B_crit, never decreasing): {ramp}.")
    st = r.get("stability") or {}
    if st:
        paras.append(
            f"Stability at the recommendation: sharpness {_fmt(st['sharpness'])} against the limit {_fmt(st['limit'])} "
            f"({_fmt(st['ratio'])} of it) after a branch from checkpoint {st['after_point']}: "
            f"{'stable' if st['stable'] else 'at or past the edge of stability: lower the learning rate'}.")
    rc = a.recipe
    if rc.get("choice"):
        paras.append(f"To move from B0 = {rc['b0']} to B1 = {rc['b1']}: '{rc['choice']}' is the cheapest recipe whose "
                     f"training loss stayed within {a.options['tolerance']:.0%} of B0's after the same window (table below).")
    else:
        paras.append(f"To move from B0 = {rc['b0']} to B1 = {rc['b1']}: no recipe stayed within {a.options['tolerance']:.0%} "
                     "of B0's loss in the short branch; keep B0, or use B1 with as many updates as at B0 and check it.")
    return paras


def write_advice(a: Advice, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    figs = _figures(a, out / "figures")
    method = (
        f"Measured: a reference run at B0 = {a.b0} (lr {_fmt(a.lr0)}) until {a.target}; from {len(a.checkpoints)} of its "
        f"checkpoints, B0 for one window of {a.window_epochs:.3g} epochs, then each batch B0 x 2^k at the {a.lr_rule} rule's "
        f"learning rate times {', '.join(f'{m:g}' for m in a.options['lr_grid'])} until it reached B0's loss (at most "
        f"{a.options['cap']:g} windows of examples). A branch is a warm start: the checkpoint's weights, a fresh optimizer, "
        "a constant learning rate. The noise scale is McCandlish et al.'s two-batch estimate on "
        f"{a.options['noise_examples']} training examples ({a.options['noise_pairs']} pairs). Compute: "
        f"{_fmt(a.compute['examples'])} examples processed in all (reference runs {_fmt(a.compute['reference_examples'])}, "
        f"branches {_fmt(a.compute['branch_examples'])}, measurements {_fmt(a.compute['measurement_examples'])} in "
        f"gradient-equivalents, the recipe's branches {_fmt(a.compute['recipe_examples'])}).")
    tables = [
        ("checkpoints", ["epoch", "examples", "window loss", "B_simple", "B_simple 95% CI", "CBS", "B_crit", "B_crit 95% CI",
                         "sharpness / limit"],
         [[c.epoch, c.examples, c.window_loss, c.noise.get("b_simple"),
           f"{_fmt(c.noise.get('b_simple', math.nan) - 1.96 * c.noise.get('b_simple_se', math.nan))} to "
           f"{_fmt(c.noise.get('b_simple', math.nan) + 1.96 * c.noise.get('b_simple_se', math.nan))}",
           c.cbs, c.tradeoff["b_crit"] if c.tradeoff else None,
           f"{_fmt(c.tradeoff['b_crit_lo'])} to {_fmt(c.tradeoff['b_crit_hi'])}" if c.tradeoff else "n/a",
           c.sharpness / c.sharpness_limit if c.sharpness is not None else None] for c in a.checkpoints]),
        ("branches: best learning rate and steps to the window's loss",
         ["epoch", "batch", "lr", "steps", "loss after the window"],
         [[c.epoch, b, v["lr"], v["steps"], v["loss_at_window"]] for c in a.checkpoints for b, v in c.batches.items()]),
        ("recipe arms", ["arm", "batch", "lr", "examples", "steps", "final loss", "within tolerance of B0"],
         [[r["arm"], r["batch"], r["lr"], r["examples"], r["steps"], r["final_loss"], r["within_tolerance"]]
          for r in a.recipe["arms"]]),
    ]
    sections = [("Recommendation", _words(a)), ("How it was measured", [method])]
    if a.notes:
        sections.append(("Notes", a.notes))
    return write_page(out, title=f"Batch-size advice: {a.target}", subtitle=f"reference run {a.reference_id}",
                      sections=sections, figures=figs, tables=tables, document=("advice.json", a.to_dict()))
