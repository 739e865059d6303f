"""Li and Li 2017, "Batch size matters: a diffusion approximation framework on nonconvex SGD".

SGD seen as the diffusion dX = -grad f(X) dt + sqrt(eta / m) Sigma^(1/2) dW (time t = k eta): from a
local minimum it escapes after a number of iterations exponential in 1/eta, from a saddle after about
1/eta (up to a log); small batches escape sharp minima and saddles sooner; raising the batch late in
training lets SGD settle.

Claims A-C are simulations (`batchscope.diffusion`): SGD on small finite-sum potentials, minibatches
drawn from N examples, many trajectories per setting, in groups by seed. Each (setting, seed) is a
pseudo-run of the store (spec kind "simulation", group "lili") that holds every trajectory's escape
step, so the report rebuilds without simulating again, and every number is computed from stored
values. Claim D trains real networks through the sweep machinery: small batch throughout, small then
raised late (`train.batch_schedule`), large throughout, same epochs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import numpy as np

from .. import diffusion as dif
from ..errors import BatchscopeError
from ..provenance import provenance
from ..report.claims import Claim
from ..report.figures import errorbar_points, line_with_band, log_ticks, new_figure
from ..spec import SweepSpec
from ..stats import equivalence, paired_difference, summarize, trend
from .base import Analysis, Options, Study, fmt, nanmean, paired, seed_of

SIM_VERSION = 1  # bump when the simulator changes what a stored setting means
SIM_GROUP = "lili"
CONDITIONS = ("small", "raised", "large")


class LiLi(Study):
    name = "lili"
    title = "Batch size and SGD as a diffusion: escape from minima and saddles (Li and Li 2017)"
    citation = (
        "C. J. Li, L. Li. Batch size matters: a diffusion approximation framework on nonconvex "
        "stochastic gradient descent. arXiv, 2017."
    )

    def config(self, opts: Options) -> dict:
        quick = opts.scale == "quick"
        c = dict(
            # every simulated setting: N examples whose gradient offsets have mean 0 and variance sigma^2;
            # minibatches drawn with replacement (noise variance sigma^2 / m exactly, as the SDE has it)
            sim=dict(n_traj=512 if quick else 2048, n_examples=1000, replace=True, chunk=256,
                     min_escaped=0.5),  # a group's mean escape needs half its trajectories out
            # A: a flat well (curvature 4 dV / w^2 = 1) of depth dV; escape = past the barrier top
            minimum=dict(dV=1.0, w=2.0, sigma=5.0, batch=4,
                         inv_eta=[6, 8, 10, 12, 14, 16] if quick else list(range(6, 19)),
                         max_steps=60_000 if quick else 400_000),
            # C: a sharp well of the same depth (curvature 4), at one step size, over batch sizes
            sharp=dict(w=1.0, eta=0.1, batches=[2, 3, 4, 5, 6] if quick else [2, 3, 4, 5, 6, 7, 8],
                       max_steps=20_000 if quick else 100_000),
            # B: -gamma x^2 / 2 + h y^2 / 2, leave the ball of radius r around the saddle
            saddle=dict(gamma=1.0, h=1.0, r=1.0, sigma=0.5, batch=4,
                        etas=[0.005, 0.01, 0.02, 0.04, 0.08] if quick else np.geomspace(0.0025, 0.08, 11).round(6).tolist(),
                        batch_eta=0.02, batches=[1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128],
                        max_steps=20_000 if quick else 50_000),
            slope_margin=0.25,  # B: "about 1/eta": |log-log slope - 1| < 0.25 (the log adds ~1 / log(m / eta))
            steeper_margin=1.0,  # B: the minimum's log-log slope exceeds the saddle's by more than 1
        )
        if quick:
            c["train"] = dict(
                data=opts.data_spec("mnist1d"), model={"name": "mlp", "width": 0.25, "depth": 3},
                # lr 0.5 at batch 32 keeps the small-batch loss noise-limited, so settling can show
                lr=0.5, sb=32, lb=512, epochs=20, raise_at=14, margin=0.02,
            )
        else:
            data = opts.data_spec("mnist1d", ("mnist1d", "mnist", "fashion_mnist", "mnist5k"))
            if data["name"] == "mnist1d":
                c["train"] = dict(data=data, model={"name": "mlp", "width": 0.25, "depth": 3},
                                  lr=0.5, sb=32, lb=512, epochs=40, raise_at=28, margin=0.01)
            else:  # 28x28 digits: not run in development (no copy of the data there)
                c["train"] = dict(data=data, model={"name": "mlp", "width": 0.5, "depth": 3},
                                  lr=0.2, sb=32, lb=1024, epochs=30, raise_at=20, margin=0.005)
        return c

    # -- training runs (claim D) ------------------------------------------------------------------

    def sweeps(self, opts: Options) -> list[SweepSpec]:
        t = self.config(opts)["train"]
        body = {
            "name": "lili",
            "data": t["data"],
            "model": t["model"],
            "optim": {"name": "sgd", "lr": t["lr"]},  # plain SGD, constant step: the batch alone sets the noise
            "train": {"batch_size": t["sb"], "epochs": t["epochs"], "device": opts.device},
            "log": {"log_points": 0},  # every epoch end
            "zip": [{
                "tags.condition": list(CONDITIONS),
                "train.batch_size": [t["sb"], t["sb"], t["lb"]],
                "train.batch_schedule": [[], [[t["raise_at"], t["lb"]]], []],
            }],
            **opts.seeding(self.default_seeds),
        }
        return [SweepSpec.model_validate(body)]

    # -- analysis -------------------------------------------------------------------------------

    def analyze(self, ctx: Analysis) -> None:
        c = self.config(ctx.opts)
        seeds = ctx.opts.seed_list(self.default_seeds)
        cells = _cells(c, seeds)
        chunk = c["sim"]["chunk"]
        times = _escape_times(ctx, [s for group in cells.values() for row in group for s in row], chunk)
        mean_t = {k: _mean_grid(rows, times, chunk, c["sim"]["min_escaped"]) for k, rows in cells.items()}
        self._minimum_and_saddle(ctx, c, cells, times, mean_t, seeds)
        self._batch(ctx, c, cells, mean_t, seeds)
        self._training(ctx, c)
        self._simulation_table(ctx, c, cells, times, mean_t)
        sim = c["sim"]
        ctx.notes.append(
            f"Simulations: {len(times)} distinct (setting, seed) groups of {sim['n_traj']} independent SGD trajectories, on finite sums "
            f"of N={sim['n_examples']} examples whose gradient offsets have mean 0 and variance sigma^2; minibatches drawn "
            f"{'with' if sim['replace'] else 'without'} replacement, independently at every step. A group's mean escape "
            f"step is the sample mean, or with censoring the exponential maximum-likelihood mean (steps at risk / escapes); "
            f"groups with fewer than {sim['min_escaped']:.0%} escaped are left out. A seed drives one group of every setting "
            f"(common random numbers across settings, as a training seed is shared across conditions); the statistics "
            f"are over seeds, that is over independent groups of trajectories."
        )

    def _minimum_and_saddle(self, ctx, c, cells, times, mean_t, seeds) -> None:
        mn, sd = c["minimum"], c["saddle"]
        inv_eta = np.asarray(mn["inv_eta"], dtype=float)
        t_min = mean_t["minimum"]  # seeds x etas
        kappa = dif.arrhenius_slope(mn["dV"], mn["sigma"], mn["batch"])
        slope_steps = _row_slopes(inv_eta, np.log(t_min))
        slope_time = _row_slopes(inv_eta, np.log(t_min / inv_eta))  # log(eta T): the SDE's time t = k eta
        r2 = np.array([_r2(inv_eta, row) for row in np.log(t_min)])
        kramers = np.array([dif.kramers_escape_steps(mn["dV"], mn["w"], 1 / ie, mn["sigma"], mn["batch"]) for ie in inv_eta])
        ctx.add_claim(Claim(
            "minimum_exponential",
            f"From a local minimum (barrier dV={mn['dV']:g}, batch {mn['batch']}), SGD escapes after a number of iterations "
            f"exponential in 1/eta: log(mean escape iterations) rises with 1/eta, along a line (its R^2 and its slope "
            f"against the SDE's 2 dV m / sigma^2 are among the measured values).",
            trend(inv_eta, np.log(t_min), direction="increasing", method="slope"),
            {"inv_eta": inv_eta, "mean_escape_steps": nanmean(t_min, 0), "sde_kramers_steps": kramers,
             "slope_log_steps_per_inv_eta": summarize(slope_steps),
             "slope_log_time_per_inv_eta": summarize(slope_time),
             "sde_slope_2dVm_over_sigma2": kappa,
             "ratio_time_slope_over_sde": summarize(slope_time / kappa),
             "r2_log_steps_linear_in_inv_eta": summarize(r2),
             "escaped_fraction_min": _min_escaped(cells["minimum"], times, c["sim"]["chunk"])},
            figure="minimum_escape",
        ))
        etas = np.asarray(sd["etas"], dtype=float)
        t_sad = mean_t["saddle"]
        x = np.log(1 / etas)
        s_sad = _row_slopes(x, np.log(t_sad))
        pred = np.array([dif.saddle_escape_steps(sd["gamma"], sd["r"], e, sd["sigma"], sd["batch"]) for e in etas])
        ctx.add_claim(Claim(
            "saddle_linear",
            f"From a saddle (negative curvature -{sd['gamma']:g}), SGD escapes after about 1/eta iterations, up to a log: "
            f"the slope of log(mean escape iterations) against log(1/eta) is within 1 +- {c['slope_margin']:g}.",
            equivalence(s_sad, np.ones_like(s_sad), margin=c["slope_margin"], names=("loglog_slope", "1")),
            {"eta": etas, "mean_escape_steps": nanmean(t_sad, 0), "sde_steps": pred,
             "ratio_measured_over_sde": nanmean(t_sad, 0) / pred,
             "loglog_slope": summarize(s_sad), "sde_loglog_slope": _slope(x, np.log(pred)),
             "escaped_fraction_min": _min_escaped(cells["saddle"], times, c["sim"]["chunk"])},
            figure="saddle_escape",
        ))
        s_min = _row_slopes(np.log(inv_eta), np.log(t_min))
        ctx.add_claim(Claim(
            "minimum_vs_saddle",
            f"Escape from a minimum depends far more steeply on 1/eta than escape from a saddle (exponential against "
            f"about linear): over the grids, its log-log slope exceeds the saddle's by more than {c['steeper_margin']:g}.",
            paired_difference(dict(zip(seeds, s_min)), dict(zip(seeds, s_sad)), direction="greater",
                              margin=c["steeper_margin"], names=("loglog_slope_minimum", "loglog_slope_saddle")),
            {"loglog_slope_minimum": summarize(s_min), "loglog_slope_saddle": summarize(s_sad)},
            figure="minimum_escape",
        ))
        # figures
        fig, ax = new_figure()
        errorbar_points(ax, inv_eta, t_min, "SGD: mean escape iterations")
        fine = np.linspace(inv_eta.min(), inv_eta.max(), 100)
        ax.plot(fine, [dif.kramers_escape_steps(mn["dV"], mn["w"], 1 / ie, mn["sigma"], mn["batch"]) for ie in fine],
                "k--", linewidth=1, label="SDE (Kramers)")
        ax.set_yscale("log")
        ax.set_xlabel("1 / eta")
        ax.set_ylabel("iterations to escape")
        ax.legend(fontsize=8, frameon=False)
        ctx.add_figure("minimum_escape", fig,
                       f"Escape from a minimum (barrier {mn['dV']:g}, curvature {4 * mn['dV'] / mn['w'] ** 2:g}, batch {mn['batch']}, "
                       f"sigma {mn['sigma']:g}): mean escape iterations per group, mean and sd over {len(seeds)} groups, and the "
                       f"SDE's pi / (h eta) exp(2 dV m / (eta sigma^2)). A straight line on these axes is exponential in 1/eta.")
        fig, ax = new_figure()
        errorbar_points(ax, 1 / etas, t_sad, "SGD: mean escape iterations")
        fine = np.geomspace(1 / etas.max(), 1 / etas.min(), 100)
        ax.plot(fine, [dif.saddle_escape_steps(sd["gamma"], sd["r"], 1 / f, sd["sigma"], sd["batch"]) for f in fine],
                "k--", linewidth=1, label="SDE")
        mid = np.sqrt(etas.min() * etas.max())
        ref = nanmean(t_sad, 0)[np.argmin(abs(etas - mid))] if np.isfinite(t_sad).any() else 1.0
        ax.plot(fine, ref * fine * etas[np.argmin(abs(etas - mid))], ":", color="gray", linewidth=1, label="slope 1")
        log_ticks(ax, 1 / etas, "x")
        ax.set_yscale("log")
        ax.set_xlabel("1 / eta")
        ax.set_ylabel("iterations to escape")
        ax.legend(fontsize=8, frameon=False)
        ctx.add_figure("saddle_escape", fig,
                       f"Escape from a saddle (curvature -{sd['gamma']:g}, ball of radius {sd['r']:g}, batch {sd['batch']}, sigma "
                       f"{sd['sigma']:g}) on log-log axes: mean and sd over {len(seeds)} groups; the SDE's "
                       f"(log(2 gamma r^2 m / (eta sigma^2)) + 0.577 + log 2) / (2 gamma eta); slope 1 is linear in 1/eta.")

    def _batch(self, ctx, c, cells, mean_t, seeds) -> None:
        mn, sh, sd = c["minimum"], c["sharp"], c["saddle"]
        ms = np.asarray(sh["batches"], dtype=float)
        t_sharp = mean_t["sharp"]
        slope_m = _row_slopes(ms, np.log(t_sharp))
        sde_m = 2 * mn["dV"] / (sh["eta"] * mn["sigma"] ** 2)
        ctx.add_claim(Claim(
            "batch_sharp",
            f"At a fixed step size (eta={sh['eta']:g}), SGD escapes a sharp minimum sooner with a smaller batch: "
            f"log(mean escape iterations) rises with the batch size m.",
            trend(ms, np.log(t_sharp), direction="increasing", method="slope"),
            {"batch_sizes": ms, "mean_escape_steps": nanmean(t_sharp, 0),
             "sde_kramers_steps": [dif.kramers_escape_steps(mn["dV"], sh["w"], sh["eta"], mn["sigma"], int(m)) for m in ms],
             "slope_log_steps_per_unit_batch": summarize(slope_m), "sde_slope_2dV_over_eta_sigma2": sde_m,
             "ratio_slope_over_sde": summarize(slope_m / sde_m)},
            figure="escape_vs_batch",
        ))
        t_flat, t_sh = mean_t["flat_vs_sharp"][:, 0], mean_t["flat_vs_sharp"][:, 1]
        h_flat, h_sharp = 4 * mn["dV"] / mn["w"] ** 2, 4 * mn["dV"] / sh["w"] ** 2
        ctx.add_claim(Claim(
            "sharp_vs_flat",
            f"SGD escapes a sharp minimum (curvature {h_sharp:g}) sooner than a flat one (curvature {h_flat:g}) of the same "
            f"depth (dV={mn['dV']:g}), at eta={sh['eta']:g} and batch {mn['batch']}.",
            paired_difference(dict(zip(seeds, np.log(t_flat))), dict(zip(seeds, np.log(t_sh))), direction="greater",
                              names=("log_steps_flat", "log_steps_sharp")),
            {"mean_escape_steps_flat": summarize(t_flat), "mean_escape_steps_sharp": summarize(t_sh),
             "ratio_flat_over_sharp": summarize(t_flat / t_sh),
             "sde_ratio_flat_over_sharp": h_sharp / h_flat},  # same exponent; prefactor pi / h
            figure="escape_vs_batch",
        ))
        bs = np.asarray(sd["batches"], dtype=float)
        t_sb = mean_t["saddle_batch"]
        pred = [dif.saddle_escape_steps(sd["gamma"], sd["r"], sd["batch_eta"], sd["sigma"], int(m)) for m in bs]
        slope_sb = _row_slopes(np.log(bs), np.log(t_sb))
        ctx.add_claim(Claim(
            "batch_saddle",
            f"At a fixed step size (eta={sd['batch_eta']:g}), SGD leaves a saddle sooner with a smaller batch: "
            f"log(mean escape iterations) rises with log m.",
            trend(np.log(bs), np.log(t_sb), direction="increasing", method="slope"),
            {"batch_sizes": bs, "mean_escape_steps": nanmean(t_sb, 0), "sde_steps": pred,
             "slope_log_steps_per_log_batch": summarize(slope_sb),
             "sde_slope": _slope(np.log(bs), np.log(pred))},
            figure="escape_vs_batch",
        ))
        fig, axes = new_figure(1, 2)
        ax = axes[0, 0]
        errorbar_points(ax, ms, t_sharp, f"sharp well (h={h_sharp:g})")
        ax.plot(ms, [dif.kramers_escape_steps(mn["dV"], sh["w"], sh["eta"], mn["sigma"], int(m)) for m in ms],
                "k--", linewidth=1, label="SDE (Kramers)")
        errorbar_points(ax, [float(mn["batch"])], t_flat[:, None], f"flat well (h={h_flat:g})")
        ax.set_yscale("log")
        ax.set_xlabel("batch size m")
        ax.set_ylabel("iterations to escape")
        ax.set_title(f"minimum, eta={sh['eta']:g}")
        ax.legend(fontsize=7, frameon=False)
        ax = axes[0, 1]
        errorbar_points(ax, bs, t_sb, "saddle")
        ax.plot(bs, pred, "k--", linewidth=1, label="SDE")
        log_ticks(ax, bs, "x")
        ax.set_xlabel("batch size m")
        ax.set_ylabel("iterations to escape")
        ax.set_title(f"saddle, eta={sd['batch_eta']:g}")
        ax.legend(fontsize=7, frameon=False)
        ctx.add_figure("escape_vs_batch", fig, "Escape iterations against the batch size at a fixed step size: mean and sd "
                       "over groups of trajectories, with the SDE's prediction.")

    def _training(self, ctx, c) -> None:
        t = c["train"]
        done = [r for r in ctx.runs if ctx.status(r) == "done"]
        by = {k: [r for r in done if r.tags.get("condition") == k] for k in CONDITIONS}
        loss = lambda r: ctx.final(r).get("train_loss", np.nan)  # noqa: E731
        acc = lambda r: ctx.final(r).get("test_acc", np.nan)  # noqa: E731
        curves = {k: _epoch_curves(ctx, runs, ("train_loss", "test_acc")) for k, runs in by.items()}
        figure = "batch_raise" if any(v is not None for v in curves.values()) else None
        sb, ra = paired(by["small"], by["raised"], loss)
        ctx.add_claim(Claim(
            "raise_settles",
            f"Raising the batch late ({t['sb']} -> {t['lb']} at epoch {t['raise_at']:g} of {t['epochs']:g}) ends at a lower "
            f"training loss than staying at batch {t['sb']}: SGD settles.",
            paired_difference(sb, ra, direction="greater", names=("train_loss_small", "train_loss_raised")),
            {"train_loss_small": summarize(sb), "train_loss_raised": summarize(ra)}, figure=figure,
        ))
        ra_acc, sb_acc = paired(by["raised"], by["small"], acc)
        d = t["margin"]
        ctx.add_claim(Claim(
            "raise_generalizes",
            f"Raising the batch late generalizes at least as well as staying small: test accuracy is not lower by "
            f"{d:g} or more (non-inferiority: the CI of raised + {d:g} - small lies above 0).",
            paired_difference(ra_acc + d, sb_acc, direction="greater", names=(f"test_acc_raised + {d:g}", "test_acc_small")),
            {"test_acc_raised": summarize(ra_acc), "test_acc_small": summarize(sb_acc),
             "difference_raised_minus_small": summarize(ra_acc - sb_acc), "margin": d},
            figure=figure,
        ))
        ra_acc2, lb_acc = paired(by["raised"], by["large"], acc)
        ctx.add_claim(Claim(
            "raise_beats_large",
            f"Raising the batch late generalizes better than the large batch ({t['lb']}) throughout, same epochs.",
            paired_difference(ra_acc2, lb_acc, direction="greater", names=("test_acc_raised", "test_acc_large")),
            {"test_acc_raised": summarize(ra_acc2), "test_acc_large": summarize(lb_acc)}, figure=figure,
        ))
        if figure is not None:
            fig, axes = new_figure(1, 2)
            labels = {"small": f"batch {t['sb']}", "raised": f"{t['sb']} -> {t['lb']} at epoch {t['raise_at']:g}",
                      "large": f"batch {t['lb']}"}
            for j, metric in enumerate(("train_loss", "test_acc")):
                ax = axes[0, j]
                for k in CONDITIONS:
                    if curves[k] is not None:
                        epochs, grid = curves[k]
                        line_with_band(ax, epochs, grid[metric], labels[k])
                ax.axvline(t["raise_at"], color="gray", linestyle=":", linewidth=1)
                ax.set_xlabel("epoch")
                ax.set_ylabel(metric.replace("_", " "))
                if metric == "train_loss":
                    ax.set_yscale("log")
            ctx.add_figure("batch_raise", fig, f"Training curves, mean and sd over seeds ({t['data']['name']}, plain SGD at "
                           f"lr {t['lr']:g}); the dotted line marks the batch raise.")
        ctx.add_table(
            "Batch raised late: final metrics (mean over seeds)",
            ["condition", "runs done", "train loss", "train acc", "test acc", "updates"],
            [[k, str(len(by[k])), fmt(nanmean([loss(r) for r in by[k]] or [np.nan])),
              fmt(nanmean([ctx.final(r).get("train_acc", np.nan) for r in by[k]] or [np.nan])),
              fmt(nanmean([acc(r) for r in by[k]] or [np.nan])),
              fmt(nanmean([ctx.final(r).get("steps", np.nan) for r in by[k]] or [np.nan]), 5)] for k in CONDITIONS],
        )

    def _simulation_table(self, ctx, c, cells, times, mean_t) -> None:
        rows = []
        for key, grid in cells.items():
            for j in range(len(grid[0])):
                col = [row[j] for row in grid]
                s = col[0]
                esc = np.concatenate([times[_sim_id(x, c["sim"]["chunk"])[0]] for x in col])
                pred = _prediction(s)
                m = float(nanmean(mean_t[key][:, j]))
                rows.append([key, s.potential, _shape(s), f"{s.eta:g}", str(s.batch), f"{len(col)} x {s.n_traj}",
                             str(s.max_steps), f"{np.isfinite(esc).mean():.1%}", fmt(m), fmt(pred), fmt(m / pred, 3)])
        ctx.add_table(
            "Simulated settings: mean escape iterations (mean over groups) and the SDE's prediction",
            ["use", "potential", "shape", "eta", "batch", "groups x trajectories", "max steps", "escaped",
             "mean escape", "SDE", "ratio"],
            rows,
        )


# -- simulation cells, cached in the store ----------------------------------------------------------


def _cells(c: dict, seeds: list[int]) -> dict[str, list[list[dif.Setting]]]:
    """Every simulated setting, as seeds x grid lists per use."""
    sim, mn, sh, sd = c["sim"], c["minimum"], c["sharp"], c["saddle"]
    common = dict(n_examples=sim["n_examples"], n_traj=sim["n_traj"], replace=sim["replace"])

    def well(w, eta, m, max_steps, seed):
        return dif.Setting("cliff_well", {"dV": float(mn["dV"]), "w": float(w)}, eta=float(eta), batch=int(m),
                           sigma=float(mn["sigma"]), max_steps=int(max_steps), seed=seed, **common)

    def saddle(eta, m, seed):
        return dif.Setting("saddle", {"gamma": float(sd["gamma"]), "h": float(sd["h"]), "r": float(sd["r"])},
                           eta=float(eta), batch=int(m), sigma=float(sd["sigma"]), max_steps=int(sd["max_steps"]),
                           seed=seed, **common)

    return {
        "minimum": [[well(mn["w"], 1 / ie, mn["batch"], mn["max_steps"], s) for ie in mn["inv_eta"]] for s in seeds],
        "sharp": [[well(sh["w"], sh["eta"], m, sh["max_steps"], s) for m in sh["batches"]] for s in seeds],
        "flat_vs_sharp": [[well(mn["w"], sh["eta"], mn["batch"], mn["max_steps"], s),
                           well(sh["w"], sh["eta"], mn["batch"], sh["max_steps"], s)] for s in seeds],
        "saddle": [[saddle(e, sd["batch"], s) for e in sd["etas"]] for s in seeds],
        "saddle_batch": [[saddle(sd["batch_eta"], m, s) for m in sd["batches"]] for s in seeds],
    }


def _sim_id(s: dif.Setting, chunk: int) -> tuple[str, dict]:
    """The pseudo-run's id and stored spec: a hash of everything that determines the result."""
    spec = {"kind": "simulation", "simulator": "batchscope.diffusion", "sim_version": SIM_VERSION, "chunk": chunk,
            **s.to_dict()}
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return "sim-" + hashlib.sha256(text.encode()).hexdigest()[:16], spec


def _escape_times(ctx: Analysis, settings: list[dif.Setting], chunk: int, wait_s: float = 900.0) -> dict[str, np.ndarray]:
    """run id -> every trajectory's escape step (NaN: censored), read from the store; settings not stored
    yet are simulated (together) and stored first. A setting another process is simulating is waited for."""
    store = ctx.store
    ids = {}
    for s in settings:
        rid, spec = _sim_id(s, chunk)
        if rid not in ids:
            ids[rid] = s
            if store.get_run(rid) is None:
                store.add_run(rid, spec, group=SIM_GROUP)
    todo = [rid for rid in ids if store.get_run(rid).status != "done"]
    mine = [rid for rid in todo if store.claim(rid, provenance("cpu", "float64"))]
    if mine:
        try:
            results = dif.simulate([ids[rid] for rid in mine], chunk=chunk)
        except KeyboardInterrupt:
            for rid in mine:
                store.release(rid)
            raise
        except Exception as err:
            for rid in mine:
                store.finish(rid, "failed", error=f"{type(err).__name__}: {err}")
            raise
        for rid, steps in zip(mine, results):
            s = ids[rid]
            store.log_metrics_many(rid, [(i, None, {"escape_step": float(v)}) for i, v in enumerate(steps)])
            ok = np.isfinite(steps)
            final = {"escaped_fraction": float(ok.mean()), "steps": float(np.nanmax(steps)) if ok.any() else float(s.max_steps)}
            if ok.any():  # a summary for `batchscope runs`; the analysis recomputes it from the stored steps
                final["mean_escape"] = dif.mean_escape(steps, s.max_steps, 0.0)
            store.finish(rid, "done", final=final)
    deadline = time.monotonic() + wait_s
    for rid in todo:
        while store.get_run(rid).status != "done":
            rec = store.get_run(rid)
            if rec.status in ("failed", "pending") or time.monotonic() > deadline:
                raise BatchscopeError(f"simulation {rid} is {rec.status} (another process held it); run the report again")
            time.sleep(1.0)
    out = {}
    for rid, s in ids.items():
        pts = store.metrics(rid, ["escape_step"])["escape_step"]
        if len(pts) != s.n_traj:
            raise BatchscopeError(f"simulation {rid}: {len(pts)} of {s.n_traj} trajectories stored; reset it to recompute")
        out[rid] = np.array([v for _, v in pts], dtype=float)
    return out


def _mean_grid(rows: list[list[dif.Setting]], times: dict[str, np.ndarray], chunk: int, min_escaped: float) -> np.ndarray:
    """seeds x grid mean escape steps (NaN where too few escaped)."""
    return np.array([[dif.mean_escape(times[_sim_id(s, chunk)[0]], s.max_steps, min_escaped) for s in row] for row in rows])


def _min_escaped(rows: list[list[dif.Setting]], times: dict[str, np.ndarray], chunk: int) -> float:
    """The smallest escaped fraction of any group."""
    return float(min(np.isfinite(times[_sim_id(s, chunk)[0]]).mean() for row in rows for s in row))


def _prediction(s: dif.Setting) -> float:
    if s.potential == "cliff_well":
        return dif.kramers_escape_steps(s.params["dV"], s.params["w"], s.eta, s.sigma, s.batch)
    return dif.saddle_escape_steps(s.params["gamma"], s.params["r"], s.eta, s.sigma, s.batch)


def _shape(s: dif.Setting) -> str:
    if s.potential == "cliff_well":
        return f"dV={s.params['dV']:g}, h={4 * s.params['dV'] / s.params['w'] ** 2:g}"
    return f"curvature -{s.params['gamma']:g}, r={s.params['r']:g}"


# -- small numerics ----------------------------------------------------------------------------------


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x over the finite points (NaN with fewer than 2)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return math.nan
    return float(np.polyfit(x[ok], y[ok], 1)[0])


def _row_slopes(x: np.ndarray, y_by_seed: np.ndarray) -> np.ndarray:
    return np.array([_slope(x, row) for row in np.asarray(y_by_seed, dtype=float)])


def _r2(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.var(y[ok]) == 0:
        return math.nan
    b, a = np.polyfit(x[ok], y[ok], 1)
    return float(1 - np.var(y[ok] - (a + b * x[ok])) / np.var(y[ok]))


def _epoch_curves(ctx: Analysis, runs, names) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """(epochs 0..E, {metric: seeds x epochs}) at the epoch ends, or None without runs."""
    from ..train.loop import dataset_for, epoch_plan, resolve_device

    if not runs:
        return None
    runs = sorted(runs, key=seed_of)
    n_train = dataset_for(runs[0], resolve_device("cpu")).n_train
    ends = np.concatenate([[0], np.cumsum([k for _, k in epoch_plan(runs[0], n_train)])])
    grids = {n: np.full((len(runs), len(ends)), np.nan) for n in names}
    for i, r in enumerate(runs):
        for n in names:
            steps, vals = ctx.series(r, n)
            at = dict(zip(steps.astype(int).tolist(), vals.tolist()))
            grids[n][i] = [at.get(int(e), np.nan) for e in ends]
    return np.arange(len(ends), dtype=float), grids
