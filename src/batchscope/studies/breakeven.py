"""Jastrzebski et al. 2020, "The break-even point on optimization trajectories of deep neural networks".

Plain SGD at several learning rates (fixed batch) and several batch sizes (fixed learning rate),
with and without batch norm; along each trajectory, densely early: lambda_1^H (top Hessian
eigenvalue), lambda_1^K and tr K (gradient second-moment matrix) and K's conditioning
lambda_k / lambda_1, measured by probes on a fixed subset of the training set.
"""

from __future__ import annotations

import numpy as np

from ..report.claims import Claim
from ..report.figures import line_with_band, new_figure
from ..spec import SweepSpec
from ..stats import all_of, paired_difference, summarize
from .base import Analysis, Options, Study, paired, seed_of

METRICS = ("hessian_lambda_1", "K_lambda_1", "K_trace", "K_condition_k")


class Breakeven(Study):
    name = "breakeven"
    title = "The break-even point on SGD trajectories (Jastrzebski et al. 2020)"
    citation = "S. Jastrzebski, M. Szymczak, S. Fort, D. Arpit, J. Tabor, K. Cho, K. Geras. ICLR 2020."

    def config(self, opts: Options) -> dict:
        if opts.scale == "quick":
            return dict(
                data=opts.data_spec("mnist1d"),
                models={"plain": {"name": "conv1d", "width": 0.5}, "bn": {"name": "conv1d", "width": 0.5, "norm": "batch"}},
                lrs=[0.01, 0.1], batch=128, lr_for_batches=0.01, batches=[32, 128],
                bn_lr_factor=1.0, epochs=4, points=12, subset=500, measure_batch=125, k=10,
                separation_margin=np.log(1.5),
            )
        data = opts.data_spec("cifar10", ("cifar10", "cifar100"))
        return dict(
            data=data,
            models={"plain": {"name": "simple_cnn"}, "bn": {"name": "resnet", "depth": 32, "norm": "batch"}},
            lrs=[0.01, 0.1], batch=128, lr_for_batches=0.01, batches=[32, 128], bn_lr_factor=1.0,
            epochs=20, points=40, subset=2500, measure_batch=125, k=20, separation_margin=np.log(1.5),
        )

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        c = self.config(opts)
        out = []
        for kind, model in c["models"].items():
            probes = [
                {"instrument": "hessian_top", "points": c["points"], "subset": c["subset"],
                 "batch_size": c["measure_batch"], "bn_mode": "train", "options": {"tol": 1e-3}},
                {"instrument": "gradient_covariance", "points": c["points"], "subset": c["subset"],
                 "batch_size": c["measure_batch"], "bn_mode": "train", "options": {"k": c["k"]}},
            ]
            factor = c["bn_lr_factor"] if kind == "bn" else 1.0
            base = {
                "data": c["data"], "model": model,
                "optim": {"name": "sgd", "lr": c["lr_for_batches"] * factor},
                "train": {"batch_size": c["batch"], "epochs": c["epochs"], "device": opts.device},
                "log": {"log_points": c["points"]},
                "probes": probes,
                **opts.seeding(self.default_seeds),
            }
            out.append(SweepSpec.model_validate({**base, "name": f"breakeven-{kind}-lr",
                                                 "grid": {"optim.lr": [lr * factor for lr in c["lrs"]]}}))
            out.append(SweepSpec.model_validate({**base, "name": f"breakeven-{kind}-batch",
                                                 "grid": {"train.batch_size": c["batches"]}}))
        return out

    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        done = [r for r in ctx.runs if ctx.status(r) == "done"]
        for kind in c["models"]:
            norm = c["models"][kind].get("norm", "none")
            mine = [r for r in done if r.model.norm == norm]
            lrs = sorted({r.optim.lr for r in mine if r.train.batch_size == c["batch"]})
            batches = sorted({r.train.batch_size for r in mine if r.optim.lr == min(lrs or [0])})
            if len(lrs) < 2 or len(batches) < 2:
                ctx.notes.append(f"{kind}: too few finished runs to compare ({len(mine)} done).")
                continue
            small_lr = [r for r in mine if r.optim.lr == lrs[0] and r.train.batch_size == c["batch"]]
            large_lr = [r for r in mine if r.optim.lr == lrs[-1] and r.train.batch_size == c["batch"]]
            small_b = [r for r in mine if r.train.batch_size == batches[0] and r.optim.lr == lrs[0]]
            large_b = [r for r in mine if r.train.batch_size == batches[-1] and r.optim.lr == lrs[0]]
            label = "" if kind == "plain" else " (with batch norm)"
            peak = lambda m: lambda r: np.nanmax(ctx.series(r, m)[1], initial=np.nan)  # noqa: E731
            last = lambda m: lambda r: ctx.series(r, m)[1][-1] if len(ctx.series(r, m)[1]) else np.nan  # noqa: E731
            # 1. larger lr / smaller batch -> lower peak and later values of lambda_1^H and lambda_1^K
            for metric, sym in (("hessian_lambda_1", "lambda_1^H"), ("K_lambda_1", "lambda_1^K")):
                parts, measured = [], {}
                for what, lo_runs, hi_runs in (("larger learning rate", large_lr, small_lr), ("smaller batch", small_b, large_b)):
                    for stat, fn in (("peak", peak(metric)), ("final", last(metric))):
                        hi, lo = paired(hi_runs, lo_runs, fn)
                        parts.append(paired_difference(hi, lo, direction="greater"))
                        measured[f"{stat}_{what.replace(' ', '_')}"] = {"other": summarize(hi), "this": summarize(lo)}
                ctx.add_claim(Claim(
                    f"{kind}_lower_{metric}",
                    f"A larger learning rate or a smaller batch gives a lower peak and lower later values of {sym}{label}.",
                    all_of(parts, what="peak and final value, for the learning rate and for the batch size"),
                    measured, figure=f"{kind}_trajectories",
                ))
            # 2. better conditioning of K (lambda_k / lambda_1 larger) at the end of the early phase
            parts, measured = [], {}
            for what, better, worse in (("lr", large_lr, small_lr), ("batch", small_b, large_b)):
                a, b = paired(better, worse, last("K_condition_k"))
                parts.append(paired_difference(a, b, direction="greater"))
                measured[what] = {"better": summarize(a), "worse": summarize(b)}
            ctx.add_claim(Claim(
                f"{kind}_conditioning",
                f"A larger learning rate or a smaller batch gives better conditioning of K (larger lambda_{c['k']}^K / lambda_1^K){label}.",
                all_of(parts, what="learning rate and batch size"), measured, figure=f"{kind}_conditioning",
            ))
            # 3. break-even: lambda_1^H of the large-lr run reaches 2/eta; the trajectories separate after it
            limit = 2.0 / lrs[-1]
            reach, before, after = [], [], []
            for r_hi in sorted(large_lr, key=seed_of):
                r_lo = next((r for r in small_lr if seed_of(r) == seed_of(r_hi)), None)
                s_hi, h_hi = ctx.series(r_hi, "hessian_lambda_1")
                if r_lo is None or not len(h_hi):
                    continue
                s_lo, h_lo = ctx.series(r_lo, "hessian_lambda_1")
                reach.append(np.nanmax(h_hi) / limit)
                crossed = np.nonzero(h_hi >= 0.5 * limit)[0]
                if len(crossed) == 0 or len(s_lo) != len(s_hi):
                    before.append(np.nan)
                    after.append(np.nan)
                    continue
                t = crossed[0]  # first measured step at the break-even scale
                ratio = np.log(h_lo / h_hi)
                before.append(np.mean(ratio[: t + 1]))
                after.append(np.mean(ratio[t + 1 :]) if t + 1 < len(ratio) else np.nan)
            reach, before, after = map(np.asarray, (reach, before, after))
            ctx.add_claim(Claim(
                f"{kind}_breakeven_reached",
                f"With the larger learning rate ({lrs[-1]:g}), lambda_1^H climbs to the stability limit 2/eta = {limit:.3g} "
                f"(at least half of it){label}.",
                paired_difference(reach, np.full_like(reach, 0.5), direction="greater"),
                {"max_lambda_over_limit": summarize(reach)}, figure=f"{kind}_trajectories",
            ))
            ctx.add_claim(Claim(
                f"{kind}_breakeven_separation",
                f"The trajectories of lambda_1^H for learning rates {lrs[0]:g} and {lrs[-1]:g} separate after the break-even "
                f"point: log(lambda_small / lambda_large) is larger after it than up to it{label}.",
                paired_difference(after, before, direction="greater"),
                {"log_ratio_before": summarize(before), "log_ratio_after": summarize(after)},
                figure=f"{kind}_trajectories",
            ))
            self._figures(ctx, kind, label, lrs, batches, small_lr, large_lr, small_b, large_b, limit)

    def _figures(self, ctx, kind, label, lrs, batches, small_lr, large_lr, small_b, large_b, limit) -> None:
        fig, axes = new_figure(1, 2)
        for ax, metric, ylabel in zip(axes[0], ("hessian_lambda_1", "K_lambda_1"), ("lambda_1^H", "lambda_1^K")):
            for runs, name in ((small_lr, f"lr {lrs[0]:g}"), (large_lr, f"lr {lrs[-1]:g}"), (small_b, f"batch {batches[0]}")):
                _band(ctx, ax, runs, metric, name)
            if metric == "hessian_lambda_1":
                ax.axhline(limit, ls="--", color="gray", lw=1, label=f"2/eta for lr {lrs[-1]:g}")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        ctx.add_figure(f"{kind}_trajectories", fig, f"lambda_1^H and lambda_1^K along training{label}; mean and sd over seeds.")
        fig, ax = new_figure()
        for runs, name in ((small_lr, f"lr {lrs[0]:g}, batch {small_lr[0].train.batch_size}"),
                           (large_lr, f"lr {lrs[-1]:g}"), (small_b, f"batch {batches[0]}")):
            _band(ctx, ax, runs, "K_condition_k", name)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("step")
        ax.set_ylabel("lambda_k^K / lambda_1^K")
        ax.legend(fontsize=7)
        ctx.add_figure(f"{kind}_conditioning", fig, f"Conditioning of K along training{label} (higher is better conditioned).")


def _band(ctx: Analysis, ax, runs, metric: str, label: str) -> None:
    series = [ctx.series(r, metric) for r in sorted(runs, key=seed_of)]
    series = [(s, v) for s, v in series if len(s)]
    if not series:
        return
    n = min(len(s) for s, _ in series)
    line_with_band(ax, series[0][0][:n], np.array([v[:n] for _, v in series]), label)
