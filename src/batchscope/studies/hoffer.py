"""Hoffer, Hubara and Soudry 2017, "Train longer, generalize better".

A ladder of cumulative interventions on a large-batch run: LB, + sqrt learning-rate scaling,
+ Ghost Batch Normalization, + regime adaptation (as many updates as SB); and the
"ultra-slow diffusion" of the weights: ||w_t - w_0|| grows like log t.
"""

from __future__ import annotations

import numpy as np

from ..report.claims import Claim
from ..report.figures import errorbar_points, line_with_band, new_figure
from ..spec import SweepSpec
from ..stats import equivalence, paired_difference, summarize
from .base import Analysis, Options, Study, nanmean, nanstd, paired, seed_of

LADDER = ["SB", "LB", "+LR", "+GBN", "+RA"]


class Hoffer(Study):
    name = "hoffer"
    title = "Train longer, generalize better (Hoffer et al. 2017)"
    citation = "E. Hoffer, I. Hubara, D. Soudry. NeurIPS 2017."

    def config(self, opts: Options) -> dict:
        if opts.scale == "quick":
            return dict(
                data=opts.data_spec("mnist1d"),
                model={"name": "mlp", "width": 0.25, "depth": 3, "norm": "batch"},
                sb=32, lb=1024, epochs=30, milestones=[15.0, 25.0], lr=0.1,
                margin=0.01,  # "closes the gap": within 1 point of test accuracy
            )
        data = opts.data_spec("cifar10", ("cifar10", "cifar100", "mnist", "fashion_mnist"))
        if "mnist" in data["name"]:  # their replica of Keskar's F1
            return dict(data=data, model={"name": "mlp", "depth": 5, "norm": "batch"}, sb=128, lb=4096,
                        epochs=40, milestones=[10.0, 20.0, 30.0], lr=0.1, margin=0.003)
        return dict(data=data, model={"name": "resnet", "depth": 44, "norm": "batch"}, sb=128, lb=4096,
                    epochs=200, milestones=[81.0, 122.0, 164.0], lr=0.1, margin=0.005, augment=True)

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        c = self.config(opts)
        body = {
            "name": "hoffer",
            "data": {**c["data"], "augment": c.get("augment", False)},
            "model": {**c["model"], "ghost_size": c["sb"]},
            "optim": {"name": "sgd", "lr": c["lr"], "momentum": 0.9, "weight_decay": 1e-4, "grad_clip": 5.0},
            "schedule": {"name": "step", "milestones": c["milestones"], "gamma": 0.1, "reference_batch": c["sb"]},
            "train": {"batch_size": c["sb"], "epochs": c["epochs"], "device": opts.device},
            "log": {"log_points": 40},
            "ladder": [
                {"label": "SB", "set": {}},
                {"label": "LB", "set": {"train.batch_size": c["lb"]}},
                {"label": "+LR", "set": {"schedule.scaling": "sqrt"}},  # sqrt(B / ghost) with ghost = SB batch
                {"label": "+GBN", "set": {"model.norm": "ghost"}},
                {"label": "+RA", "set": {"train.regime_adaptation": True}},
            ],
            **opts.seeding(self.default_seeds),
        }
        return [SweepSpec.model_validate(body)]

    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        done = [r for r in ctx.runs if ctx.status(r) == "done"]
        step_runs = {label: [r for r in done if r.tags.get("ladder") == label] for label in LADDER}
        acc = lambda r: ctx.final(r).get("test_acc", np.nan)  # noqa: E731
        for prev, cur in zip(LADDER[:-1], LADDER[1:]):
            a, b = paired(step_runs[cur], step_runs[prev], acc)
            statement = (
                f"LB (batch {c['lb']}, same epochs) generalizes worse than SB (batch {c['sb']})."
                if cur == "LB"
                else f"{cur} improves test accuracy over {prev}."
            )
            if cur == "LB":
                a, b = b, a  # SB > LB
            ctx.add_claim(Claim(f"ladder_{cur.lstrip('+')}", statement, paired_difference(a, b, direction="greater"),
                                {f"test_acc_{cur}": summarize(a if cur != "LB" else b),
                                 f"test_acc_{prev}": summarize(b if cur != "LB" else a)}, figure="ladder"))
        sb, ra = paired(step_runs["SB"], step_runs["+RA"], acc)
        ctx.add_claim(Claim(
            "gap_closed", f"With all three (+RA), LB matches SB test accuracy (within +-{c['margin']:.3g}).",
            equivalence(ra, sb, margin=c["margin"]),
            {"test_acc_SB": summarize(sb), "test_acc_+RA": summarize(ra)}, figure="ladder",
        ))
        # ultra-slow diffusion: in the first, high learning-rate phase, ||w_t - w_0|| ~ a + b log t
        r2_log, r2_sqrt, curves = [], [], []
        for r in sorted(step_runs["SB"], key=seed_of):
            steps, dist = ctx.series(r, "weight_distance")
            per_epoch = int(np.ceil(_n_train(ctx, r) / r.train.batch_size))
            high = (steps >= 1) & (steps <= c["milestones"][0] * per_epoch)
            t, d = steps[high], dist[high]
            if len(t) < 5:
                continue
            r2_log.append(_r2(np.log(t), d))
            r2_sqrt.append(_r2(np.sqrt(t), d))
            curves.append((t, d))
        r2_log, r2_sqrt = np.array(r2_log), np.array(r2_sqrt)
        ctx.add_claim(Claim(
            "log_diffusion",
            "In the high learning-rate phase, ||w_t - w_0|| grows like log t (ultra-slow diffusion): "
            "a line in log t fits better than a random walk's sqrt t.",
            paired_difference(r2_log, r2_sqrt, direction="greater"),
            {"R2_log_t": summarize(r2_log), "R2_sqrt_t": summarize(r2_sqrt)}, figure="weight_distance",
        ))
        # figures
        grid = np.full((len({seed_of(r) for r in done}) or 1, len(LADDER)), np.nan)
        seeds = sorted({seed_of(r) for r in done})
        for j, label in enumerate(LADDER):
            for r in step_runs[label]:
                grid[seeds.index(seed_of(r)), j] = acc(r)
        fig, ax = new_figure()
        errorbar_points(ax, list(range(len(LADDER))), grid, "test accuracy")
        ax.set_xticks(range(len(LADDER)), LADDER)
        ax.set_ylabel("test accuracy")
        ctx.add_figure("ladder", fig, f"Test accuracy along the ladder (SB batch {c['sb']}, LB batch {c['lb']}); mean and sd over seeds.")
        if curves:
            fig, ax = new_figure()
            n = min(len(t) for t, _ in curves)
            line_with_band(ax, curves[0][0][:n], np.array([d[:n] for _, d in curves]), "SB")
            ax.set_xscale("log")
            ax.set_xlabel("step (log scale)")
            ax.set_ylabel("||w_t - w_0||")
            ctx.add_figure("weight_distance", fig, "Distance from the initial weights in the high learning-rate phase; a straight line on this axis is log t growth.")
        ctx.add_table(
            "Test accuracy along the ladder",
            ["step", "runs", "test acc (mean)", "sd", "updates"],
            [[label, str(len(step_runs[label])), f"{nanmean(grid[:, j]):.4f}", f"{nanstd(grid[:, j]):.4f}",
              str(int(nanmean([ctx.final(r).get('steps', np.nan) for r in step_runs[label]] or [np.nan])))
              if step_runs[label] else "-"]
             for j, label in enumerate(LADDER)],
        )


def _r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 of the least-squares line y ~ a + b x."""
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    return float(1 - resid.var() / y.var()) if y.var() > 0 else float("nan")


def _n_train(ctx: Analysis, r) -> int:
    from ..train.loop import dataset_for, resolve_device

    return dataset_for(r, resolve_device("cpu")).n_train
