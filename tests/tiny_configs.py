"""Tiny configurations of the five studies: each runs end to end in seconds (tests of the studies and the
browser test of their reports use them through the `tiny_<study>` fixtures in conftest.py)."""

from batchscope.studies.breakeven import Breakeven
from batchscope.studies.hoffer import Hoffer
from batchscope.studies.kaur import Kaur
from batchscope.studies.keskar import Keskar
from batchscope.studies.lili import LiLi

TINY_DATA = {"name": "gaussian_mixture", "n_train": 200, "n_test": 100,
             "options": {"dim": 8, "num_classes": 3, "separation": 2.0}}
KAUR_DATA = {"name": "gaussian_mixture", "n_train": 200, "n_test": 100,
             "options": {"dim": 8, "num_classes": 3, "separation": 3.0}}


def keskar(self, opts):
    return dict(
        data=TINY_DATA, model={"name": "mlp", "width": 0.05, "depth": 2}, sb=10, lb_fraction=0.1,
        grid=[10, 50], epochs=150, measure_examples=100, measure_batch=50, subspace_dim=5, fit_acc=0.6,
        # loose regime thresholds: the tiny runs only need to reach the analysis, not the paper's regime
        patience=3, min_delta=0.01, reduce_lr=0.1, reductions=1, max_grad_ratio=10.0, min_usable=0.5,
    )


def hoffer(self, opts):
    return dict(
        data=TINY_DATA, model={"name": "mlp", "width": 0.05, "depth": 2, "norm": "batch"}, sb=10, lb=100,
        epochs=4, milestones=[3.0], lr=0.1, margin=0.05, log_points=20, every_epoch=False,
    )


def kaur(self, opts):
    mlp = {"name": "mlp", "width": 0.1, "depth": 2}
    return dict(
        data=KAUR_DATA, dropout_data=None, model=mlp, dropout_model=mlp, epochs=300, dropout_epochs=None, fit_acc=0.9,
        lrs=[0.05, 0.2], batches=[25, 100], scaled=[[25, 0.05], [100, 0.2]],
        sam_rhos=[0.05], sam_lr=0.2, sam_batches=[25, 100],
        dropouts=[0.0, 0.5], dropout_ref=0.0, dropout_lr=0.2, dropout_batch=25,
        bn_lrs=[0.05, 0.2], bn_batches=[25],
        gd_lrs=[0.0005, 0.2],  # 300 full-batch steps at 0.0005 never fit: excluded and counted
        measure_examples=100, lanczos_k=1, lanczos_tol=1e-2, interp_points=8, interp_lr_max=0.05,
        lambda_ratio=1.25, acc_effect=0.05, fit_min=3, fit_share=0.8, eos_margin=0.3,
    )


def breakeven(self, opts):
    return dict(
        data=TINY_DATA,
        models={"plain": {"name": "mlp", "width": 0.05, "depth": 2},
                "bn": {"name": "mlp", "width": 0.05, "depth": 2, "norm": "batch"}},
        lrs=[0.05, 0.5], batch=20, batches=[10, 20], bn_lr_factor=1.0, epochs=2, points=5,
        subset=60, measure_batch=20, k=3,
    )


_real_config = LiLi.config


def lili(self, opts):
    c = _real_config(self, opts)
    c["sim"].update(n_traj=48)
    c["minimum"].update(inv_eta=[6, 8, 10, 12], max_steps=8000)
    c["sharp"].update(batches=[3, 4, 5], vs_flat_batch=4, max_steps=8000)
    c["saddle"].update(etas=[0.01, 0.02, 0.04], batches=[1, 4, 16], max_steps=3000)
    c["regime"].update(min_escaped=0.8, power_resolution=1.0)  # 48 trajectories a group: noisier, fewer escapes
    c["train"] = dict(data=TINY_DATA, model={"name": "mlp", "width": 0.05, "depth": 2}, lr=0.5, sb=10, lb=100,
                      epochs=4, raise_at=3)
    return c


CONFIGS = {Keskar: keskar, Hoffer: hoffer, Breakeven: breakeven, Kaur: kaur, LiLi: lili}
