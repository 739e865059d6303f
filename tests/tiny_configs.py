"""Tiny configurations of the five studies: each runs end to end in seconds (tests of the studies and the
browser test of their reports use them through the `tiny_<study>` fixtures in conftest.py)."""

from dataclasses import replace

from batchscope.randomwalk import Walk
from batchscope.studies import Options
from batchscope.studies.breakeven import Breakeven, BreakevenConfig
from batchscope.studies.hoffer import Hoffer, HofferConfig
from batchscope.studies.kaur import Kaur, KaurConfig
from batchscope.studies.keskar import Keskar, KeskarConfig
from batchscope.studies.lili import BatchRaise, LiLi, LiLiConfig

TINY_DATA = {"name": "gaussian_mixture", "n_train": 200, "n_test": 100,
             "options": {"dim": 8, "num_classes": 3, "separation": 2.0}}
KAUR_DATA = {"name": "gaussian_mixture", "n_train": 200, "n_test": 100,
             "options": {"dim": 8, "num_classes": 3, "separation": 3.0}}
MLP = {"name": "mlp", "width": 0.05, "depth": 2}

KESKAR = KeskarConfig(
    data=TINY_DATA, model=MLP, sb=10, lb_fraction=0.1, grid=(10, 50), epochs=150, measure_examples=100,
    measure_batch=50, fit_acc=0.6,
    # loose regime thresholds: the tiny runs only need to reach the analysis, not the paper's regime
    patience=3, min_delta=0.01, reduce_lr=0.1, reductions=1, max_grad_ratio=10.0, min_usable=0.5,
    warm_epochs=(1, 2),
)

HOFFER = HofferConfig(
    data=TINY_DATA, model={**MLP, "norm": "batch"}, sb=10, lb=100, epochs=4, milestones=(3.0,), lr=0.1,
    margin=0.05, log_points=20, every_epoch=False,
    walk=Walk(n_walkers=64, steps=1 << 14, points=40),  # the fit window still spans 2 decades
)

_KAUR_MLP = {"name": "mlp", "width": 0.1, "depth": 2}
KAUR = KaurConfig(
    data=KAUR_DATA, dropout_data=None, model=_KAUR_MLP, dropout_model=_KAUR_MLP, epochs=300, dropout_epochs=None,
    fit_acc=0.9, lrs=(0.05, 0.2), batches=(25, 100), scaled=((25, 0.05), (100, 0.2)),
    sam_rhos=(0.05,), sam_lr=0.2, sam_batches=(25, 100),
    dropouts=(0.0, 0.5), dropout_ref=0.0, dropout_lr=0.2, dropout_batch=25,
    bn_lrs=(0.05, 0.2), bn_batches=(25,),
    gd_lrs=(0.0005, 0.2),  # 300 full-batch steps at 0.0005 never fit: excluded and counted
    measure_examples=100, lanczos_k=1, lanczos_tol=1e-2, interp_points=8, interp_lr_max=0.05,
    lambda_ratio=1.25, acc_effect=0.05, fit_min=3, fit_share=0.8, eos_margin=0.3,
)

BREAKEVEN = BreakevenConfig(
    data=TINY_DATA, models={"plain": MLP, "bn": {**MLP, "norm": "batch"}, "rnn": {"name": "lstm", "width": 0.05}},
    lrs=(0.05, 0.5), batch=20, batches=(10, 20), bn_lr_factor=1.0, epochs=2, points=5,
    subset=60, measure_batch=20, k=3,
    kinds={"rnn": {"data": {"name": "first_marker", "n_train": 200, "n_test": 100,
                            "options": {"markers": 3, "distractors": 3, "length": 5}},
                   "bn_mode": "eval"}},
)

_lili = LiLiConfig.quick(Options())
LILI = replace(
    _lili,
    sim=replace(_lili.sim, n_traj=48),
    minimum=replace(_lili.minimum, inv_eta=(6, 8, 10, 12), max_steps=8000),
    sharp=replace(_lili.sharp, batches=(3, 4, 5), vs_flat_batch=4, max_steps=8000),
    saddle=replace(_lili.saddle, etas=(0.01, 0.02, 0.04), batches=(1, 4, 16), max_steps=3000),
    weak=replace(_lili.weak, saddle_eta=0.02, eta=0.05, well_max_steps=2000),  # short escapes (the well's ~100 steps)
    regime=replace(_lili.regime, min_escaped=0.8, power_resolution=1.0),  # 48 trajectories a group: noisier, fewer escapes
    train=BatchRaise(data=TINY_DATA, model=MLP, lr=0.5, sb=10, lb=100, epochs=4, raise_at=3),
)

CONFIGS = {Keskar: KESKAR, Hoffer: HOFFER, Breakeven: BREAKEVEN, Kaur: KAUR, LiLi: LILI}


def use(monkeypatch, study_cls) -> None:
    """Make `study_cls` plan and analyze its tiny configuration, whatever the scale asked."""
    config = CONFIGS[study_cls]
    monkeypatch.setattr(study_cls, "config", lambda self, opts: config)
