"""Kaur, Cohen and Lipton 2023, "On the maximum Hessian eigenvalue and generalization".

lambda_max (the top eigenvalue of the training-loss Hessian at the end of training) against test
accuracy over six grids: learning rate x batch size; batch size and learning rate scaled together;
SAM (several rho) x batch size; dropout rates; with and without batch norm; full-batch GD against
SGD. As in the paper: plain SGD (no momentum, no weight decay) at a constant learning rate until 99%
training accuracy; lambda_max by Lanczos on a fixed 1,000-example training subset, network in train
mode for batch norm (batch statistics over batches of the training batch size), dropout off; for
batch-norm nets at small learning rates, the maximum over 8 points between the final weights and
one more SGD step. Runs that never reach 99% training accuracy are excluded from every comparison
and counted.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..curvature.hessian import hessian_eigenvalues
from ..data import epoch_batches
from ..report.claims import Claim
from ..report.figures import log_ticks, new_figure
from ..spec import ModelSpec, RunSpec, SweepSpec
from ..stats import Verdict, all_of, equivalence, paired_difference, summarize, trend
from .base import Analysis, Options, Study, cpu_loss, fmt, nanmean, nanstd, seed_of

PAPER_DATA = ("cifar10", "fashion_mnist", "mnist")


@dataclass(frozen=True)
class Cell:
    """One condition of a grid (its runs are the seeds of it) and its label."""

    grid: str
    label: str
    model: dict
    lr: float
    batch: int | None = None  # None: full batch
    rho: float = 0.0

    @property
    def full(self) -> bool:
        return self.batch is None


class Kaur(Study):
    name = "kaur"
    title = "lambda_max and generalization (Kaur, Cohen and Lipton 2023)"
    citation = (
        "S. Kaur, J. Cohen, Z. C. Lipton. On the maximum Hessian eigenvalue and generalization. "
        "Proceedings on 'I Can't Believe It's Not Better!' at NeurIPS 2022 Workshops, PMLR 187:51-65, 2023."
    )

    def config(self, opts: Options) -> dict:
        """Every choice of the reproduction, by scale (tests shrink it)."""
        if opts.scale == "quick":
            # The paper's 1,000-example regime on built-in data, with a small MLP (40 -> 128 -> 128 -> 10).
            mlp = {"name": "mlp", "width": 0.25, "depth": 2}
            return dict(
                data={**opts.data_spec("mnist1d"), "n_train": 1000},
                model=mlp,
                dropout_model=mlp,
                epochs=3000,  # generous: the slowest cell (lr 0.025, batch 512) fits in about 1,100 epochs
                dropout_epochs=None,  # None: the same budget as the other grids (shares the p = 0 runs)
                fit_acc=0.99,
                lrs=[0.025, 0.1, 0.4],
                batches=[32, 128, 512],
                scaled=[[32, 0.025], [128, 0.1], [512, 0.4]],  # eta / B fixed: the diagonal of the grid above
                sam_rhos=[0.05, 0.1],
                sam_lr=0.1,
                sam_batches=[32, 128, 512],
                dropouts=[0.0, 0.25, 0.5],  # p >= 0.7 does not reach 99% training accuracy in 1,500 epochs here
                dropout_ref=0.0,  # "too much" (the largest p) is compared with this one
                dropout_lr=0.4,
                dropout_batch=128,
                bn_lrs=[0.025, 0.1, 0.4],
                bn_batches=[128],
                gd_lrs=[0.1, 0.4],
                measure_examples=1000,
                lanczos_k=1,
                lanczos_tol=1e-3,
                interp_points=8,
                interp_lr_max=0.025,  # batch-norm nets at learning rates up to this get the 8-point maximum
                acc_margin=0.02,  # "without changing" / "vanishes": within +-2 points of test accuracy
                eos_margin=0.2,  # "near 2/eta": within +-20% of 2/eta
            )
        data = opts.data_spec("cifar10", PAPER_DATA)
        vgg = {"name": "vgg11", "width": 1.0}
        return dict(
            data={**data, "n_train": 1000},  # the paper's first-1,000-examples setting
            model=vgg,
            dropout_model={"name": "mlp", "width": 1.0, "depth": 2},  # VGG-11 has no dropout: the paper used MLPs
            epochs=5000,
            dropout_epochs=None,
            fit_acc=0.99,
            lrs=[0.005, 0.02, 0.08],
            batches=[32, 128, 512],
            scaled=[[32, 0.005], [128, 0.02], [512, 0.08]],
            sam_rhos=[0.05, 0.1],
            sam_lr=0.02,
            sam_batches=[32, 128, 512],
            dropouts=[0.0, 0.1, 0.2, 0.5, 0.6, 0.7],
            dropout_ref=0.0,
            dropout_lr=0.02,
            dropout_batch=128,
            bn_lrs=[0.005, 0.02, 0.08],
            bn_batches=[128],
            gd_lrs=[0.02, 0.08],
            measure_examples=1000,
            lanczos_k=6,  # as the paper (eigsh, k = 6, the first taken)
            lanczos_tol=1e-3,
            interp_points=8,
            interp_lr_max=0.005,
            acc_margin=0.01,
            eos_margin=0.2,
        )

    # -- the grids ---------------------------------------------------------------------------------
    def cells(self, c: dict) -> dict[str, list[Cell]]:
        """Every condition, by grid. Cells shared between grids are the same runs (same spec)."""
        m, lrs, bs = c["model"], c["lrs"], c["batches"]
        bn = {**m, "norm": "batch"}
        out = {
            "lr_batch": [Cell("lr_batch", f"B={b}, eta={lr:g}", m, lr, b) for b in bs for lr in lrs],
            "scaled": [Cell("scaled", f"B={b}, eta={lr:g}", m, lr, b) for b, lr in c["scaled"]],
            "sam": [
                Cell("sam", f"B={b}, rho={rho:g}", m, c["sam_lr"], b, rho)
                for b in c["sam_batches"] for rho in [0.0, *c["sam_rhos"]]
            ],
            "dropout": [
                Cell("dropout", f"p={p:g}", {**c["dropout_model"], "dropout": p}, c["dropout_lr"], c["dropout_batch"])
                for p in c["dropouts"]
            ],
            "bn": [
                Cell("bn", f"{'BN' if mm is bn else 'no BN'}, B={b}, eta={lr:g}", mm, lr, b)
                for b in c["bn_batches"] for lr in c["bn_lrs"] for mm in (m, bn)
            ],
            "gd": [Cell("gd", f"GD, eta={lr:g}", m, lr, None) for lr in c["gd_lrs"]],
        }
        return out

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        c = self.config(opts)
        n_train = _train_size(c["data"])
        sweeps = []
        for grid, cells in self.cells(c).items():
            epochs = c["dropout_epochs"] if grid == "dropout" and c.get("dropout_epochs") else c["epochs"]
            body = {
                # one name and the same zip paths (hence tags) for every grid: a run shared by two grids is
                # then the same stored spec, trained once
                "name": "kaur",
                "data": c["data"],
                "model": ModelSpec.model_validate(cells[0].model).model_dump(mode="json"),
                # plain SGD, no momentum, no weight decay, constant learning rate (the paper's setting)
                "optim": {"name": "sgd", "lr": cells[0].lr, "momentum": 0.0, "weight_decay": 0.0},
                "train": {
                    "batch_size": cells[0].batch or n_train,
                    "epochs": epochs,
                    "device": opts.device,
                    "stop": {"metric": "train_acc", "threshold": c["fit_acc"]},  # until 99% training accuracy
                },
                "log": {"log_points": 0},  # the stopping rule looks at every epoch end
                "zip": [{
                    **{f"model.{k}": [ModelSpec.model_validate(cell.model).model_dump()[k] for cell in cells]
                       for k in ("name", "width", "depth", "norm", "dropout")},
                    "optim.lr": [cell.lr for cell in cells],
                    "optim.sam_rho": [cell.rho for cell in cells],
                    "train.batch_size": [cell.batch or n_train for cell in cells],
                    "train.full_batch": [cell.full for cell in cells],
                }],
                **opts.seeding(self.default_seeds),
            }
            sweeps.append(SweepSpec.model_validate(body))
        return sweeps

    # -- analysis ----------------------------------------------------------------------------------
    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        grids = self.cells(c)
        runs = list({r.run_id(): r for r in ctx.runs}.values())  # a run shared by two grids counts once
        fit_acc = c["fit_acc"]
        margin = c["acc_margin"]

        def fitted(r: RunSpec) -> bool:
            return ctx.status(r) == "done" and ctx.final(r).get("train_acc", 0.0) >= fit_acc

        def members(cell: Cell) -> list[RunSpec]:
            want = ModelSpec.model_validate(cell.model)
            return sorted(
                (r for r in runs if r.model == want and math.isclose(r.optim.lr, cell.lr)
                 and math.isclose(r.optim.sam_rho, cell.rho) and r.train.full_batch == cell.full
                 and (cell.full or r.train.batch_size == cell.batch)),
                key=seed_of,
            )

        def acc(r: RunSpec) -> float:
            return ctx.final(r).get("test_acc", np.nan) if fitted(r) else np.nan

        def lam(r: RunSpec) -> float:
            return self._lambda(ctx, r, c) if fitted(r) else np.nan

        def by_seed(cell: Cell, value: Callable[[RunSpec], float]) -> dict[int, float]:
            return {seed_of(r): value(r) for r in members(cell)}

        def log_lam(cell: Cell) -> dict[int, float]:
            return {s: np.log(v) if v > 0 else np.nan for s, v in by_seed(cell, lam).items()}

        def accs(cell: Cell) -> dict[int, float]:
            return by_seed(cell, acc)

        def find(grid: str, **where) -> Cell:
            for cell in grids[grid]:
                if all(_same(getattr(cell, k), v) for k, v in where.items()):
                    return cell
            raise KeyError(f"{grid}: no cell {where}")

        def summary(cell: Cell) -> dict:
            return {"lambda_max": summarize(list(by_seed(cell, lam).values())),
                    "test_acc": summarize(list(accs(cell).values()))}

        lrs, bs = sorted(c["lrs"]), sorted(c["batches"])
        seeds = sorted({seed_of(r) for r in runs})

        # 1. learning rate x batch size -----------------------------------------------------------
        parts: dict[str, Verdict] = {}
        for b in bs:
            grid = _seed_grid(seeds, [by_seed(find("lr_batch", lr=lr, batch=b), lam) for lr in lrs])
            parts[f"lambda_falls_with_lr_B{b}"] = trend(np.log(lrs), grid, direction="decreasing",
                                                        min_points=min(3, len(lrs)))
        lo, hi = lrs[0], lrs[-1]
        parts[f"acc_benefit_B{bs[0]}"] = paired_difference(
            accs(find("lr_batch", lr=hi, batch=bs[0])), accs(find("lr_batch", lr=lo, batch=bs[0])),
            direction="greater", names=(f"acc(eta={hi:g})", f"acc(eta={lo:g})"))
        parts[f"benefit_vanishes_B{bs[-1]}"] = equivalence(
            accs(find("lr_batch", lr=hi, batch=bs[-1])), accs(find("lr_batch", lr=lo, batch=bs[-1])),
            margin=margin, names=(f"acc(eta={hi:g})", f"acc(eta={lo:g})"))
        ctx.add_claim(Claim(
            "lr_batch",
            f"A larger learning rate lowers lambda_max at every batch size ({', '.join(map(str, bs))}), but its "
            f"generalization benefit (eta {hi:g} over {lo:g}: higher test accuracy at batch {bs[0]}) vanishes at "
            f"batch {bs[-1]} (test accuracies equal within +-{margin:g}).",
            all_of(parts, what="every part"),
            {f"B={b}": {f"eta={lr:g}": summary(find("lr_batch", lr=lr, batch=b)) for lr in lrs} for b in bs},
            figure="lambda_vs_acc_lr_batch",
        ))

        # 2. batch size and learning rate scaled together -----------------------------------------
        sc = sorted(grids["scaled"], key=lambda cell: cell.batch)
        grid = _seed_grid(seeds, [by_seed(cell, lam) for cell in sc])
        parts = {"lambda_falls_along_diagonal": trend(np.log([cell.batch for cell in sc]), grid, direction="decreasing",
                                                      min_points=min(3, len(sc)))}
        for cell in sc[1:]:
            parts[f"acc_unchanged_B{cell.batch}_vs_B{sc[0].batch}"] = equivalence(
                accs(cell), accs(sc[0]), margin=margin, names=(f"acc({cell.label})", f"acc({sc[0].label})"))
        ratio = sc[0].lr / sc[0].batch
        ctx.add_claim(Claim(
            "scaled",
            f"Scaling batch size and learning rate together (eta / B = {ratio:.3g}: "
            f"{'; '.join(cell.label for cell in sc)}) changes lambda_max (it falls as both grow) without changing "
            f"generalization (test accuracy within +-{margin:g} of the smallest pair's).",
            all_of(parts, what="every part"),
            {cell.label: summary(cell) for cell in sc},
            figure="lambda_vs_acc_scaled",
        ))

        # 3. SAM x batch size ------------------------------------------------------------------------
        sbs, rhos = sorted(c["sam_batches"]), sorted(c["sam_rhos"])
        parts = {}
        for b in sbs:
            base = find("sam", batch=b, rho=0.0)
            for rho in rhos:
                parts[f"lambda_lower_rho{rho:g}_B{b}"] = paired_difference(
                    log_lam(find("sam", batch=b, rho=rho)), log_lam(base), direction="less",
                    names=("log lambda_max(SAM)", "log lambda_max(SGD)"))
        for rho in rhos:
            parts[f"acc_benefit_rho{rho:g}_B{sbs[0]}"] = paired_difference(
                accs(find("sam", batch=sbs[0], rho=rho)), accs(find("sam", batch=sbs[0], rho=0.0)),
                direction="greater", names=("acc(SAM)", "acc(SGD)"))
            parts[f"benefit_vanishes_rho{rho:g}_B{sbs[-1]}"] = equivalence(
                accs(find("sam", batch=sbs[-1], rho=rho)), accs(find("sam", batch=sbs[-1], rho=0.0)),
                margin=margin, names=("acc(SAM)", "acc(SGD)"))
        ctx.add_claim(Claim(
            "sam",
            f"SAM (rho {', '.join(f'{r:g}' for r in rhos)}; eta {c['sam_lr']:g}) lowers lambda_max at every batch size "
            f"({', '.join(map(str, sbs))}), but its benefit (higher test accuracy than SGD at batch {sbs[0]}) vanishes "
            f"at batch {sbs[-1]} (equal within +-{margin:g}).",
            all_of(parts, what="every part"),
            {cell.label: summary(cell) for cell in grids["sam"]},
            figure="lambda_vs_acc_sam",
        ))

        # 4. dropout --------------------------------------------------------------------------------
        ps = sorted(c["dropouts"])
        pmax, pref = ps[-1], c["dropout_ref"]
        cell_of = {p: next(cell for cell in grids["dropout"] if _same(cell.model.get("dropout", 0.0), p)) for p in ps}
        parts = {
            f"lambda_lower_p{pmax:g}": paired_difference(
                log_lam(cell_of[pmax]), log_lam(cell_of[pref]), direction="less",
                names=(f"log lambda_max(p={pmax:g})", f"log lambda_max(p={pref:g})")),
            f"acc_lower_p{pmax:g}": paired_difference(
                accs(cell_of[pmax]), accs(cell_of[pref]), direction="less",
                names=(f"acc(p={pmax:g})", f"acc(p={pref:g})")),
        }
        ctx.add_claim(Claim(
            "dropout",
            f"Too much dropout (p = {pmax:g} against p = {pref:g}; eta {c['dropout_lr']:g}, batch {c['dropout_batch']}) "
            f"lowers lambda_max and hurts generalization (lower test accuracy).",
            all_of(parts, what="every part"),
            {cell.label: summary(cell) for cell in grids["dropout"]},
            figure="lambda_vs_acc_dropout",
        ))

        # 5. batch norm --------------------------------------------------------------------------------
        parts = {}
        bn_lrs, bn_bs = sorted(c["bn_lrs"]), sorted(c["bn_batches"])
        bn_model = {**c["model"], "norm": "batch"}
        for b in bn_bs:
            for lr in bn_lrs:
                with_bn, without = find("bn", lr=lr, batch=b, model=bn_model), find("bn", lr=lr, batch=b, model=c["model"])
                parts[f"acc_benefit_eta{lr:g}_B{b}"] = paired_difference(
                    accs(with_bn), accs(without), direction="greater", names=("acc(BN)", "acc(no BN)"))
        for b in bn_bs:
            lr = bn_lrs[0]
            with_bn, without = find("bn", lr=lr, batch=b, model=bn_model), find("bn", lr=lr, batch=b, model=c["model"])
            parts[f"lambda_higher_with_bn_eta{lr:g}_B{b}"] = paired_difference(
                log_lam(with_bn), log_lam(without), direction="greater",
                names=("log lambda_max(BN)", "log lambda_max(no BN)"))
        ctx.add_claim(Claim(
            "batch_norm",
            f"Batch norm does not consistently lower lambda_max (at the smallest learning rate, eta {bn_lrs[0]:g}, "
            f"lambda_max is higher with BN than without) but helps generalization (higher test accuracy at every "
            f"eta in {', '.join(f'{x:g}' for x in bn_lrs)}, batch {', '.join(map(str, bn_bs))}).",
            all_of(parts, what="every part"),
            {cell.label: summary(cell) for cell in grids["bn"]},
            figure="lambda_vs_acc_bn",
        ))

        # 6. full-batch GD against SGD -----------------------------------------------------------------
        gd = sorted(grids["gd"], key=lambda cell: cell.lr)
        top = gd[-1]
        parts = {
            f"gd_at_edge_of_stability_eta{top.lr:g}": equivalence(
                by_seed(top, lam), {s: 2.0 / top.lr for s in by_seed(top, lam)}, margin=c["eos_margin"],
                relative=True, names=("lambda_max(GD)", "2/eta")),
        }
        sgd_cells = grids["lr_batch"]
        pred, actual, residuals = {}, {}, {}
        for s in seeds:
            pts = [(lam(r), acc(r)) for cell in sgd_cells for r in members(cell) if seed_of(r) == s]
            pts = [(np.log(x), y) for x, y in pts if np.isfinite(x) and x > 0 and np.isfinite(y)]
            gd_pts = [(lam(r), acc(r)) for cell in gd for r in members(cell) if seed_of(r) == s]
            gd_pts = [(np.log(x), y) for x, y in gd_pts if np.isfinite(x) and x > 0 and np.isfinite(y)]
            if len(pts) < 3 or len({x for x, _ in pts}) < 2:
                pred[s], actual[s] = np.nan, np.nan
                continue
            slope, icpt = np.polyfit([x for x, _ in pts], [y for _, y in pts], 1)
            if gd_pts:
                pred[s] = float(np.mean([icpt + slope * x for x, _ in gd_pts]))
                actual[s] = float(np.mean([y for _, y in gd_pts]))
                residuals[s] = actual[s] - pred[s]
            else:
                pred[s], actual[s] = np.nan, np.nan
        # GD runs left out of a seed's average that still counts (a seed with none left is counted by the test)
        partly = sum(1 for cell in gd for r in members(cell) if not fitted(r) and np.isfinite(actual.get(seed_of(r), np.nan)))
        parts["gd_below_sgd_relation"] = paired_difference(
            actual, pred, direction="less", excluded=partly,
            names=("acc(GD)", "acc predicted by SGD's lambda_max relation"))
        ctx.add_claim(Claim(
            "gd_vs_sgd",
            f"Full-batch GD against SGD: lambda_max alone cannot explain generalization. GD ends at the edge of "
            f"stability (lambda_max within +-{c['eos_margin']:.0%} of 2/eta at eta {top.lr:g}), and its test accuracy "
            f"is below what SGD's relation between lambda_max and test accuracy predicts at GD's lambda_max "
            f"(per seed: least-squares line of test accuracy on log lambda_max over the learning rate x batch size "
            f"grid, at the GD runs' lambda_max, averaged over eta {', '.join(f'{cell.lr:g}' for cell in gd)}).",
            all_of(parts, what="every part"),
            {**{cell.label: {**summary(cell), "two_over_eta": 2.0 / cell.lr} for cell in gd},
             "residual_acc_GD_minus_SGD_relation": summarize(list(residuals.values()))},
            figure="lambda_vs_acc_gd",
        ))

        self._figures(ctx, c, grids, members, lam, acc)
        self._table(ctx, c, grids, members, lam, acc, fitted)
        unfitted = {g: sum(1 for cell in cs for r in members(cell) if not fitted(r)) for g, cs in grids.items()}
        total = len(runs)
        excluded = sum(1 for r in runs if not fitted(r))
        ctx.notes.append(
            f"{total} distinct runs ({sum(len(members(cell)) for cs in grids.values() for cell in cs) - total} more "
            f"grid cells reuse a run of another grid: same spec, trained once); {excluded} did not reach {fit_acc:.0%} training accuracy within the budget "
            f"({c['epochs']} epochs) or diverged and are excluded from every comparison "
            f"(by grid: {', '.join(f'{g} {n}' for g, n in unfitted.items())})."
        )
        ctx.notes.append(
            f"Training: plain SGD (no momentum, no weight decay) at a constant learning rate until {fit_acc:.0%} training "
            f"accuracy, checked at every epoch end. lambda_max: Lanczos (k={c['lanczos_k']}, the largest taken; "
            f"tolerance {c['lanczos_tol']:g}) on the first {c['measure_examples']} training examples, batch norm with "
            f"batch statistics over batches of the training batch size, dropout off. Batch-norm nets at eta <= "
            f"{c['interp_lr_max']:g}: the maximum over {c['interp_points']} points between the final weights and one "
            f"more SGD step (on a batch of the training batch size drawn with the run's data seed). Comparisons of "
            f"lambda_max are on log lambda_max (ratios)."
        )

    # -- lambda_max, cached in the store -------------------------------------------------------------
    def _lambda(self, ctx: Analysis, r: RunSpec, c: dict) -> float:
        """The study's lambda_max of a run, measured once and cached in the store. Batch-norm nets at small
        learning rates: the maximum over the points between the final weights and one more SGD step."""
        interp = r.model.norm != "none" and r.optim.lr <= c["interp_lr_max"] + 1e-12
        names = ["lambda_max"] + (["lambda_max_interp"] if interp else [])
        vals = ctx.measure(r, names, lambda: measure_lambda(ctx, r, c, interp))
        return vals["lambda_max_interp"] if interp else vals["lambda_max"]

    # -- figures and tables ----------------------------------------------------------------------------
    def _figures(self, ctx, c, grids, members, lam, acc) -> None:
        def points(cells, text=lambda cell: f"{cell.lr:g}"):
            return [(text(cell), np.array([lam(r) for r in members(cell)]), np.array([acc(r) for r in members(cell)]))
                    for cell in cells]

        def panel(ax, series, title):
            for label, pts in series:
                _lines(ax, pts, label)
            ax.set_xscale("log")
            ax.set_xlabel("lambda_max (log scale)")
            ax.set_ylabel("test accuracy")
            ax.set_title(title)
            if any(label for label, _ in series):
                ax.legend(fontsize=7, frameon=False)

        lrs, bs = sorted(c["lrs"]), sorted(c["batches"])
        caption = ("mean +- sd over the fitted seeds; a line joins the cells of one series (a larger dot marks its first "
                   "cell), each labelled by the setting that varies.")
        fig, ax = new_figure()
        panel(ax, [(f"B={b} (eta {', '.join(f'{x:g}' for x in lrs)})",
                    points([cell for cell in grids["lr_batch"] if cell.batch == b])) for b in bs],
              "learning rate x batch size")
        ctx.add_figure("lambda_vs_acc_lr_batch", fig, f"Test accuracy against lambda_max, learning rate x batch size: {caption}")
        fig, ax = new_figure()
        sc = sorted(grids["scaled"], key=lambda cell: cell.batch)
        panel(ax, [("; ".join(cell.label for cell in sc), points(sc, lambda cell: f"B={cell.batch}"))],
              "B and eta scaled together")
        ctx.add_figure("lambda_vs_acc_scaled", fig, f"Test accuracy against lambda_max, batch size and learning rate scaled together: {caption}")
        fig, ax = new_figure()
        panel(ax, [(f"B={b} (rho 0, {', '.join(f'{x:g}' for x in sorted(c['sam_rhos']))})",
                    points(sorted([cell for cell in grids["sam"] if cell.batch == b], key=lambda cell: cell.rho),
                           lambda cell: f"rho {cell.rho:g}"))
                   for b in sorted(c["sam_batches"])], "SAM x batch size")
        ctx.add_figure("lambda_vs_acc_sam", fig, f"Test accuracy against lambda_max, SAM x batch size: {caption}")
        fig, ax = new_figure()
        panel(ax, [(f"p = {', '.join(f'{p:g}' for p in sorted(c['dropouts']))}",
                    points(sorted(grids["dropout"], key=lambda cell: cell.model.get("dropout", 0.0)),
                           lambda cell: f"p {cell.model.get('dropout', 0.0):g}"))], "dropout")
        ctx.add_figure("lambda_vs_acc_dropout", fig, f"Test accuracy against lambda_max over dropout rates: {caption}")
        fig, ax = new_figure()
        panel(ax, [(f"{kind}, B={b} (eta {', '.join(f'{x:g}' for x in sorted(c['bn_lrs']))})",
                    points(sorted([cell for cell in grids["bn"] if cell.batch == b
                                   and (cell.model.get("norm", "none") == "batch") == (kind == "BN")],
                                  key=lambda cell: cell.lr)))
                   for kind in ("no BN", "BN") for b in sorted(c["bn_batches"])], "batch norm")
        ctx.add_figure("lambda_vs_acc_bn", fig, f"Test accuracy against lambda_max with and without batch norm: {caption}")
        fig, ax = new_figure()
        panel(ax, [(f"SGD, B={b}", points([cell for cell in grids["lr_batch"] if cell.batch == b])) for b in bs]
              + [(f"GD (eta {', '.join(f'{cell.lr:g}' for cell in sorted(grids['gd'], key=lambda x: x.lr))})",
                  points(sorted(grids["gd"], key=lambda cell: cell.lr)))], "full-batch GD against SGD")
        ctx.add_figure("lambda_vs_acc_gd", fig, f"Test accuracy against lambda_max, full-batch GD against SGD: {caption}")

        # edge of stability: lambda_max against 2/eta for the large SGD batches and for GD
        fig, ax = new_figure()
        large = bs[len(bs) // 2:]  # the upper half of the batch sizes
        series = [(f"SGD, B={b}", [cell for cell in grids["lr_batch"] if cell.batch == b]) for b in large]
        series.append(("full-batch GD", list(grids["gd"])))
        xs_all = []
        for label, cells in series:
            cells = sorted(cells, key=lambda cell: -cell.lr)
            x = np.array([2.0 / cell.lr for cell in cells])
            ys = [np.array([lam(r) for r in members(cell)]) for cell in cells]
            mean = np.array([nanmean(y) for y in ys])
            sd = np.nan_to_num(np.array([nanstd(y) for y in ys]))
            ax.errorbar(x, mean, yerr=[np.minimum(sd, 0.9 * np.nan_to_num(mean)), sd], marker="o", markersize=4,
                        capsize=3, linewidth=1.2, label=label)
            xs_all.extend(x.tolist())
        if xs_all:
            g = np.array([min(xs_all) / 1.5, max(xs_all) * 1.5])
            ax.plot(g, g, "k--", linewidth=0.8, label="lambda_max = 2/eta")
            log_ticks(ax, xs_all, "x")
        ax.set_yscale("log")
        ax.set_xlabel("2 / eta")
        ax.set_ylabel("lambda_max")
        ax.legend(fontsize=7, frameon=False)
        ax.set_title("edge of stability")
        ctx.add_figure("lambda_vs_2_over_eta", fig,
                       f"lambda_max against 2/eta for the large batches ({', '.join(map(str, large))}) and full-batch GD: mean +- sd over "
                       f"the fitted seeds; the dashed line is the edge of stability lambda_max = 2/eta.")

    def _table(self, ctx, c, grids, members, lam, acc, fitted) -> None:
        rows = []
        for g, cells in grids.items():
            for cell in cells:
                rs = members(cell)
                ls = [lam(r) for r in rs]
                a = [acc(r) for r in rs]
                rows.append([
                    g, cell.label + (f", p={cell.model['dropout']:g}" if g != "dropout" and cell.model.get("dropout") else ""),
                    f"{sum(fitted(r) for r in rs)}/{len(rs)}",
                    f"{fmt(nanmean(ls))} +- {fmt(nanstd(ls), 2)}", fmt(2.0 / cell.lr),
                    f"{fmt(nanmean(a))} +- {fmt(nanstd(a), 2)}",
                    fmt(nanmean([ctx.final(r).get("epochs", np.nan) for r in rs]), 4),
                ])
        ctx.add_table("Every cell (mean +- sd over fitted seeds)",
                      ["grid", "cell", "fitted/runs", "lambda_max", "2/eta", "test acc", "epochs"], rows)


def measure_lambda(ctx: Analysis, r: RunSpec, c: dict, interp: bool) -> dict[str, float]:
    """lambda_max at the final weights and, with `interp`, the maximum over `interp_points` points on the
    segment from the final weights to the weights after one more SGD step (both ends included)."""
    model, ds = ctx.model(r)
    n = min(c["measure_examples"], ds.n_train)
    x, y = ds.x_train[:n], ds.y_train[:n]
    bn = r.model.norm != "none"
    # batch statistics make the batch part of the measurement: batches of the training batch size
    size = n if (r.train.full_batch or not bn) else min(r.train.batch_size, n)
    data = list(zip(x.split(size), y.split(size)))
    loss = cpu_loss()

    def top(m) -> float:
        res = hessian_eigenvalues(m, loss, data, k=c["lanczos_k"], which="top", tol=c["lanczos_tol"],
                                  bn_mode="train", seed=seed_of(r))
        return float(res.eigenvalues[0])

    out = {"lambda_max": top(model)}
    if interp:
        ends = one_sgd_step(model, ds, r)
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        probe = copy.deepcopy(model)
        params = [p for p in probe.parameters() if p.requires_grad]
        values = [out["lambda_max"]]  # t = 0 is the final weights, measured above
        for t in np.linspace(0.0, 1.0, c["interp_points"])[1:]:
            with torch.no_grad():
                for p, w0, w1 in zip(params, start, ends):
                    p.copy_(w0 + float(t) * (w1 - w0))
            values.append(top(probe))
        out["lambda_max_interp"] = max(values)
    return out


def one_sgd_step(model: torch.nn.Module, ds, r: RunSpec) -> list[torch.Tensor]:
    """The weights after one more plain SGD step (the run's learning rate) from `model`'s weights, on a
    batch of the training batch size drawn with the run's data seed, in train mode (batch statistics;
    dropout drawn from the run's noise seed). `model` is left unchanged. Plain SGD is how every net of
    this study that gets the 8-point maximum (batch norm, small learning rate) was trained."""
    m = copy.deepcopy(model)
    m.train()
    size = ds.n_train if r.train.full_batch else min(r.train.batch_size, ds.n_train)
    idx = epoch_batches(ds.n_train, size, torch.Generator().manual_seed(r.seeds.data))[0]
    params = [p for p in m.parameters() if p.requires_grad]
    device = params[0].device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(r.seeds.noise)
        loss = F.cross_entropy(m(ds.x_train[idx]), ds.y_train[idx])
    grads = torch.autograd.grad(loss, params)
    return [(p - r.optim.lr * g).detach() for p, g in zip(params, grads)]


def _lines(ax, pts, label: str | None) -> None:
    """One series of cells: mean +- sd of lambda_max (x, log) and test accuracy (y), joined in order."""
    xm, ym, xl, xh, ye = [], [], [], [], []
    texts = []
    for text, lam_v, acc_v in pts:
        ok = np.isfinite(lam_v) & np.isfinite(acc_v) & (lam_v > 0)
        if not ok.any():
            continue
        texts.append(text)
        lx, ay = lam_v[ok], acc_v[ok]
        m = float(np.mean(lx))
        s = float(np.std(lx, ddof=1)) if ok.sum() > 1 else 0.0
        xm.append(m)
        ym.append(float(np.mean(ay)))
        xl.append(min(s, 0.9 * m))
        xh.append(s)
        ye.append(float(np.std(ay, ddof=1)) if ok.sum() > 1 else 0.0)
    if not xm:
        return
    bars = ax.errorbar(xm, ym, xerr=[xl, xh], yerr=ye, marker="o", markersize=4, capsize=2, linewidth=1.0, label=label)
    ax.plot(xm[:1], ym[:1], marker="o", markersize=7, color=bars[0].get_color(), linestyle="none")
    for text, x, y in zip(texts, xm, ym):
        ax.annotate(text, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, color=bars[0].get_color())


def _seed_grid(seeds: list[int], columns: list[dict[int, float]]) -> np.ndarray:
    """seeds x columns array, NaN where a seed has no value."""
    out = np.full((max(len(seeds), 1), len(columns)), np.nan)
    for j, col in enumerate(columns):
        for s, v in col.items():
            if s in seeds:
                out[seeds.index(s), j] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b))
    return a == b


def _train_size(data: dict) -> int:
    from ..spec import validate_run
    from ..train.loop import dataset_for

    return dataset_for(validate_run({"data": data}), torch.device("cpu")).n_train
