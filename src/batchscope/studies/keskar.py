"""Keskar et al. 2017, "On large-batch training for deep learning: generalization gap and sharp minima".

Small-batch (SB) and large-batch (LB = 10% of the training set) Adam runs from the same
initialization; test accuracy, epsilon-sharpness (full space and a random 100-dim subspace),
the 1-D loss along the line between the two solutions, and a batch-size sweep.
"""

from __future__ import annotations

import numpy as np

from ..curvature import epsilon_sharpness, interpolate
from ..report.claims import Claim
from ..report.figures import errorbar_points, line_with_band, new_figure
from ..spec import SweepSpec
from ..stats import exclude, paired_difference, summarize, trend
from .base import Analysis, Options, Study, cpu_loss, fmt, nanmean, paired, seed_of

ALPHAS = np.linspace(-1.0, 2.0, 25)  # as in the authors' code


class Keskar(Study):
    name = "keskar"
    title = "Large-batch training converges to sharp minima (Keskar et al. 2017)"
    citation = "N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy, P. T. P. Tang. ICLR 2017."

    def config(self, opts: Options) -> dict:
        if opts.scale == "quick":
            data = opts.data_spec("mnist1d")
            return dict(
                data=data,
                model={"name": "mlp", "width": 0.25, "depth": 3, "norm": "batch"},  # F1 kind, narrower
                sb=32,
                lb_fraction=0.1,
                grid=[32, 64, 128, 256, 400, 1000, 2000],
                epochs=60,
                measure_examples=1000,
                measure_batch=500,
                subspace_dim=100,
                fit_acc=0.99,  # the paper's runs all reached 98.35-99.99% training accuracy
            )
        data = opts.data_spec("cifar10", ("cifar10", "cifar100", "mnist", "fashion_mnist"))
        model = {"name": "mlp", "depth": 5, "norm": "batch"} if "mnist" in data["name"] else {
            "name": "keskar_shallow", "norm": "batch", "dropout": 0.5}  # C1 / C3 (F1 on MNIST)
        return dict(
            data=data, model=model, sb=256, lb_fraction=0.1, grid=[256, 512, 1024, 2048, 5000],
            epochs=100, measure_examples=10000, measure_batch=500, subspace_dim=100, fit_acc=0.99,
        )

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        c = self.config(opts)
        n_train = _train_size(c["data"])
        lb = int(round(c["lb_fraction"] * n_train))
        sizes = sorted(set(c["grid"]) | {c["sb"], lb})
        body = {
            "name": "keskar",
            "data": c["data"],
            "model": c["model"],
            "optim": {"name": "adam", "lr": 1e-3},  # not re-tuned between SB and LB, as in the paper
            "train": {
                "epochs": c["epochs"],
                "device": opts.device,
                # "until the loss stops improving": stop once the training set is fitted
                "stop": {"metric": "train_acc", "threshold": c["fit_acc"]},
            },
            "log": {"log_points": 15},
            "grid": {"train.batch_size": sizes},
            **opts.seeding(self.default_seeds),
        }
        return [SweepSpec.model_validate(body)]

    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        n_train = _train_size(c["data"])
        lb = int(round(c["lb_fraction"] * n_train))
        sb, fit_acc = c["sb"], c["fit_acc"]
        done = [r for r in ctx.runs if ctx.status(r) == "done"]
        fitted = lambda r: ctx.final(r).get("train_acc", 0.0) >= fit_acc  # noqa: E731
        runs_sb = [r for r in done if r.train.batch_size == sb]
        runs_lb = [r for r in done if r.train.batch_size == lb]
        loss = cpu_loss()
        bn = "train"  # the authors' batch norm used batch statistics, also when measuring

        def sharp(r, eps: float, sub: int | None) -> float:
            key = f"sharpness_eps{eps:g}" + (f"_p{sub}" if sub else "")

            def compute() -> dict[str, float]:
                model, ds = ctx.model(r)
                data = _batches(ds, c["measure_examples"], c["measure_batch"])
                res = epsilon_sharpness(model, loss, data, eps=eps, subspace_dim=sub, seed=seed_of(r), bn_mode=bn)
                return {key: res.sharpness}

            return ctx.measure(r, [key], compute)[key]

        acc = lambda r: ctx.final(r).get("test_acc", np.nan)  # noqa: E731
        ok = lambda r: 1.0 if fitted(r) else np.nan  # noqa: E731

        # 1. the generalization gap
        a, b = paired(runs_sb, runs_lb, lambda r: acc(r) * ok(r))
        ctx.add_claim(Claim(
            "gap", f"LB (batch {lb}) reaches lower test accuracy than SB (batch {sb}), both fitted to {fit_acc:.0%} train accuracy.",
            paired_difference(a, b, direction="greater"),
            {"test_acc_SB": summarize(a), "test_acc_LB": summarize(b)}, figure="accuracy_vs_batch",
        ))
        # 2. sharper minima, full space and subspace, two radii
        for eps, sub in ((1e-3, None), (5e-4, None), (1e-3, c["subspace_dim"])):
            s_lb, s_sb = paired(runs_lb, runs_sb, lambda r: sharp(r, eps, sub) * ok(r))
            where = "full space" if sub is None else f"a random {sub}-dim subspace"
            ctx.add_claim(Claim(
                f"sharper_eps{eps:g}" + (f"_p{sub}" if sub else ""),
                f"LB minimizers are sharper than SB ones (epsilon-sharpness, eps={eps:g}, {where}).",
                paired_difference(s_lb, s_sb, direction="greater"),
                {"sharpness_LB": summarize(s_lb), "sharpness_SB": summarize(s_sb)}, figure="sharpness_vs_batch",
            ))
        # 3. SB travels farther from the initialization
        d_sb, d_lb = paired(runs_sb, runs_lb, lambda r: np.log(ctx.final(r).get("weight_distance", np.nan)) * ok(r))
        ratio = np.exp(d_sb - d_lb)
        ctx.add_claim(Claim(
            "distance", "SB solutions lie farther from the initial weights than LB ones (paper: ratio 3 to 10).",
            paired_difference(d_sb, d_lb, direction="greater"),
            {"ratio_SB_over_LB": summarize(ratio)},
        ))
        # 4. batch-size sweep: accuracy falls and sharpness rises with the batch size
        sizes = sorted({r.train.batch_size for r in done})
        seeds = sorted({seed_of(r) for r in done})
        grid_acc = _grid(done, sizes, seeds, lambda r: acc(r) * ok(r))
        grid_sharp = _grid(done, sizes, seeds, lambda r: sharp(r, 1e-3, None) * ok(r))
        logb = np.log(np.asarray(sizes, dtype=float))
        ctx.add_claim(Claim(
            "acc_trend", "Test accuracy falls as the batch size grows.",
            trend(logb, grid_acc, direction="decreasing"),
            {"batch_sizes": sizes, "test_acc_mean": nanmean(grid_acc, 0).tolist()}, figure="accuracy_vs_batch",
        ))
        ctx.add_claim(Claim(
            "sharp_trend", "Sharpness (eps=1e-3, full space) rises as the batch size grows.",
            trend(logb, grid_sharp, direction="increasing"),
            {"batch_sizes": sizes, "sharpness_mean": nanmean(grid_sharp, 0).tolist()}, figure="sharpness_vs_batch",
        ))
        # 5. 1-D slices: the loss rises faster around LB than around SB
        curves = []
        for r_sb in sorted(runs_sb, key=seed_of):
            r_lb = next((r for r in runs_lb if seed_of(r) == seed_of(r_sb)), None)
            if r_lb is None or not (fitted(r_sb) and fitted(r_lb)):
                continue
            curves.append(self._line(ctx, r_sb, r_lb, c, loss, bn))
        if curves:
            train = np.array([cu["train_loss"] for cu in curves])
            i0, i1 = np.argmin(abs(ALPHAS)), np.argmin(abs(ALPHAS - 1))
            step = 2  # 2 grid points = 0.25 in alpha
            rise = lambda row, i: np.mean([row[i - step], row[i + step]]) - row[i]  # noqa: E731
            r_lb_rise = np.array([rise(t, i1) for t in train])
            r_sb_rise = np.array([rise(t, i0) for t in train])
            ctx.add_claim(Claim(
                "line", "Along the line between the solutions, the training loss rises faster around LB than around SB.",
                paired_difference(r_lb_rise, r_sb_rise, direction="greater"),
                {"rise_LB": summarize(r_lb_rise), "rise_SB": summarize(r_sb_rise), "delta_alpha": 0.25},
                figure="line_sb_lb",
            ))
            fig, ax = new_figure()
            line_with_band(ax, ALPHAS, train, "train loss")
            line_with_band(ax, ALPHAS, np.array([cu["test_loss"] for cu in curves]), "test loss")
            ax.set_xlabel("alpha  (0 = SB solution, 1 = LB solution)")
            ax.set_ylabel("cross-entropy")
            if np.nanmin(train, initial=np.inf) > 0:
                ax.set_yscale("log")
            ctx.add_figure("line_sb_lb", fig, f"Loss along (1-alpha) x_SB + alpha x_LB, mean and sd over {len(curves)} seeds.")
        _, n_ex = exclude(np.array([ok(r) for r in done]), np.array([fitted(r) for r in done]))
        ctx.notes.append(
            f"{len(done)} runs done; {n_ex} did not reach {fit_acc:.0%} training accuracy within {c['epochs']} epochs "
            f"and are excluded from every comparison. Batch norm is measured with batch statistics (batches of "
            f"{c['measure_batch']}), as the authors' code did; sharpness on the first {c['measure_examples']} training examples."
        )
        for name, grid, ylabel in (("accuracy_vs_batch", grid_acc, "test accuracy"), ("sharpness_vs_batch", grid_sharp, "sharpness (eps=1e-3)")):
            fig, ax = new_figure()
            errorbar_points(ax, sizes, grid, ylabel)
            ax.set_xscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            if name == "sharpness_vs_batch" and np.nanmax(grid, initial=0) > 0:
                ax.set_yscale("log")
            ctx.add_figure(name, fig, f"{ylabel} against batch size: mean and sd over seeds (fitted runs only).")
        ctx.add_table(
            "Final metrics by batch size (mean over fitted seeds)",
            ["batch", "fitted/runs", "train acc", "test acc", "sharpness 1e-3", "epochs"],
            [
                [str(b), f"{int(np.sum(~np.isnan(grid_acc[:, j])))}/{sum(1 for r in done if r.train.batch_size == b)}",
                 fmt(nanmean([ctx.final(r).get('train_acc', np.nan) for r in done if r.train.batch_size == b])),
                 fmt(nanmean(grid_acc[:, j])), fmt(nanmean(grid_sharp[:, j])),
                 fmt(nanmean([ctx.final(r).get('epochs', np.nan) for r in done if r.train.batch_size == b]), 3)]
                for j, b in enumerate(sizes)
            ],
        )

    def _line(self, ctx: Analysis, r_sb, r_lb, c, loss, bn) -> dict[str, np.ndarray]:
        names = [f"line_{split}_{m}_{i}" for split in ("train", "test") for m in ("loss", "acc") for i in range(len(ALPHAS))]

        def compute() -> dict[str, float]:
            m_sb, ds = ctx.model(r_sb)
            m_lb, _ = ctx.model(r_lb)
            out = {}
            for split, (x, y) in (("train", (ds.x_train, ds.y_train)), ("test", (ds.x_test, ds.y_test))):
                data = _chunks(x[: c["measure_examples"]], y[: c["measure_examples"]], c["measure_batch"])
                res = interpolate(m_sb, loss, data, m_sb.state_dict(), m_lb.state_dict(), ALPHAS, bn_mode=bn)
                for i in range(len(ALPHAS)):
                    out[f"line_{split}_loss_{i}"] = float(res.loss[i])
                    out[f"line_{split}_acc_{i}"] = float(res.accuracy[i])
            return out

        # cached on the SB run (the line belongs to the pair; SB and LB share the seed)
        vals = ctx.measure(r_sb, names, compute)
        return {
            f"{split}_{m}": np.array([vals[f"line_{split}_{m}_{i}"] for i in range(len(ALPHAS))])
            for split in ("train", "test") for m in ("loss", "acc")
        }


def _train_size(data: dict) -> int:
    from ..data import load_dataset

    ds = load_dataset(data["name"], path=data.get("path"), **data.get("options", {}))
    return ds.n_train


def _chunks(x, y, size: int) -> list:
    return list(zip(x.split(size), y.split(size)))


def _batches(ds, n: int, size: int) -> list:
    return _chunks(ds.x_train[:n], ds.y_train[:n], size)


def _grid(runs, sizes, seeds, value) -> np.ndarray:
    """seeds x batch sizes array of a value, NaN where a run is missing."""
    out = np.full((len(seeds), len(sizes)), np.nan)
    for r in runs:
        out[seeds.index(seed_of(r)), sizes.index(r.train.batch_size)] = value(r)
    return out
