"""One run from one spec: determinism, seeds, schedules, budgets, divergence, stopping, SAM."""

import math

import pytest
import torch

from batchscope.factories import dataset_for, epoch_plan, model_for, train_size
from batchscope.spec import RunSpec
from batchscope.train import train_run
from batchscope.train.schedule import lr_at
from helpers import tiny_spec as tiny  # TINY: float32, 3 epochs


def series(result, name):
    return [(s, m[name]) for s, _, m in result.metrics]


def test_same_spec_gives_identical_metrics():
    a, b = train_run(tiny()), train_run(tiny())
    assert a.metrics == b.metrics and a.status == "done"
    assert a.final["steps"] == 3 * 8


def test_initialization_depends_on_init_seed_only():
    ds = dataset_for(tiny(), torch.device("cpu"))
    w = lambda spec: torch.cat([p.flatten() for p in model_for(spec, ds, torch.device("cpu")).parameters()])  # noqa: E731
    assert torch.equal(w(tiny()), w(tiny(seeds__data=5, seeds__noise=7, train__batch_size=64)))
    assert not torch.equal(w(tiny()), w(tiny(seeds__init=1)))


def test_train_size_counts_as_the_run_does():
    spec = tiny(data__n_train=200)
    n = dataset_for(spec, torch.device("cpu")).n_train
    assert n == 200 and train_size(spec.data) == n == train_size(spec.data.model_dump())


def test_data_order_seed_changes_trajectory_not_start():
    a, b = train_run(tiny()), train_run(tiny(seeds__data=1))
    assert series(a, "train_loss")[0] == series(b, "train_loss")[0]
    assert series(a, "train_loss")[-1] != series(b, "train_loss")[-1]


def test_dropout_stream_comes_from_noise_seed():
    base = dict(model__dropout=0.3)
    a, b, c = train_run(tiny(**base)), train_run(tiny(**base)), train_run(tiny(seeds__noise=3, **base))
    assert a.metrics == b.metrics
    assert a.metrics != c.metrics


def test_weight_distance_starts_at_zero_and_grows():
    d = series(train_run(tiny()), "weight_distance")
    assert d[0] == (0, 0.0) and d[-1][1] > 0


def test_metrics_at_step_zero_log_spaced_steps_and_epoch_ends():
    steps = [s for s, _ in series(train_run(tiny()), "train_loss")]
    assert steps[0] == 0 and {8, 16, 24} <= set(steps) and 1 in steps
    assert steps == sorted(set(steps))


def test_budget_in_steps_and_regime_adaptation():
    assert sum(k for _, k in epoch_plan(tiny(train__epochs=None, train__steps=20), 256)) == 20
    ra = tiny(train__batch_size=128, train__regime_adaptation=True)
    ra = RunSpec.model_validate({**ra.model_dump(), "schedule": {"reference_batch": 32}})
    # 128 / 32 = 4 times the epochs, so as many updates as the batch-32 run
    assert sum(k for _, k in epoch_plan(ra, 256)) == 4 * 3 * 2 == sum(k for _, k in epoch_plan(tiny(), 256))


def test_full_batch_is_one_update_per_epoch_and_batch_schedule_raises_batch():
    assert epoch_plan(tiny(train__full_batch=True), 256) == [(256, 1)] * 3
    plan = epoch_plan(tiny(train__batch_schedule=[(1, 64), (2, 128)]), 256)
    assert plan == [(32, 8), (64, 4), (128, 2)]


def test_lr_schedules_and_scaling_rules():
    step = RunSpec.model_validate({"optim": {"lr": 0.1}, "schedule": {"name": "step", "milestones": [2, 4], "gamma": 0.5}})
    assert [lr_at(step, e, 6, 256) for e in (0, 1.9, 2, 4.5)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    sq = RunSpec.model_validate({"optim": {"lr": 0.1}, "schedule": {"scaling": "sqrt", "reference_batch": 256}})
    assert lr_at(sq, 0, 1, 1024) == pytest.approx(0.2)
    lin = RunSpec.model_validate({"optim": {"lr": 0.1}, "schedule": {"scaling": "linear", "warmup_epochs": 2}})
    assert lr_at(lin, 1.0, 10, 512) == pytest.approx(0.1 * 2 * 0.5)
    cos = RunSpec.model_validate({"optim": {"lr": 0.1}, "schedule": {"name": "cosine"}})
    assert lr_at(cos, 5, 10, 128) == pytest.approx(0.05) and lr_at(cos, 10, 10, 128) == pytest.approx(0.0)
    ra = RunSpec.model_validate(
        {"optim": {"lr": 0.1}, "train": {"batch_size": 1024, "regime_adaptation": True},
         "schedule": {"name": "step", "milestones": [2], "reference_batch": 256}}
    )
    # milestones stretch by ceil(1024 / 256) = 4
    assert lr_at(ra, 7.9, 40, 1024) == pytest.approx(0.1) and lr_at(ra, 8, 40, 1024) == pytest.approx(0.01)


def test_divergence_is_detected_with_its_step():
    r = train_run(tiny(optim__lr=1e6, optim__momentum=0.0))
    assert r.status == "diverged"
    assert r.diverged_step is not None and 1 <= r.diverged_step <= 24
    assert "non-finite" in r.stop_reason


def test_stopping_rule_on_training_accuracy():
    r = train_run(tiny(train__epochs=20, train__stop={"metric": "train_acc", "threshold": 0.6}))
    assert r.final["train_acc"] >= 0.6
    assert r.final["steps"] < 20 * 8 and "reached" in r.stop_reason


def test_sam_and_clipping_and_adam_train():
    for over in (dict(optim__sam_rho=0.05), dict(optim__grad_clip=0.5),
                 dict(optim__name="adam", optim__lr=1e-2, optim__momentum=0.0)):
        r = train_run(tiny(**over))
        losses = [v for _, v in series(r, "train_loss")]
        assert r.status == "done" and losses[-1] < losses[0]


def test_sam_with_zero_radius_equals_plain_sgd():
    # rho -> 0 makes the perturbed gradient the plain one
    assert train_run(tiny(optim__sam_rho=1e-12)).metrics[-1][2]["train_loss"] == pytest.approx(
        train_run(tiny()).metrics[-1][2]["train_loss"], rel=1e-5
    )


def test_ghost_batch_norm_run_and_augmented_images():
    r = train_run(tiny(model__norm="ghost", model__ghost_size=8))
    assert r.status == "done" and math.isfinite(r.final["train_loss"])
    img = RunSpec.model_validate(
        {"data": {"name": "digits", "n_train": 128, "n_test": 64, "augment": True},
         "model": {"name": "simple_cnn", "width": 0.25}, "train": {"batch_size": 32, "epochs": 1}}
    )
    assert train_run(img).status == "done"


class _RandomProbe:
    """Draws from the global generator, as a careless probe would."""

    def __init__(self):
        self.calls = []

    def steps(self, total, epoch_ends):
        return {0, 3, 5, total}

    def __call__(self, step, epoch, model, data):
        self.calls.append(step)
        assert model.training
        return {"probe_value": float(torch.randn(()))}


def test_callbacks_add_metrics_at_their_steps_without_changing_training():
    probe = _RandomProbe()
    plain = train_run(tiny(model__dropout=0.2))
    probed = train_run(tiny(model__dropout=0.2), callbacks=[probe])
    assert probe.calls == [0, 3, 5, 24]
    with_probe = {s: m for s, _, m in probed.metrics if "probe_value" in m}
    assert sorted(with_probe) == [0, 3, 5, 24]
    same_steps = {s: m["train_loss"] for s, _, m in plain.metrics}
    assert all(same_steps[s] == m["train_loss"] for s, _, m in probed.metrics if s in same_steps)
    assert probed.final["probe_seconds"] > 0


def test_reduce_on_plateau_lowers_the_lr_then_stops():
    stop = {"metric": "train_loss", "patience": 2, "min_delta": 10.0, "reduce_lr": 0.1, "reductions": 2}
    r = train_run(tiny(train__epochs=30, optim__momentum=0.0, train__stop=stop, log__log_points=0))
    lrs = [m["lr"] for s, _, m in r.metrics if s > 0]
    # the first evaluation sets the best; min_delta 10 counts nothing after it as improvement, so every 2
    # evaluations (epoch ends) the lr falls 10x, and the plateau after the second reduction stops the run
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert "after 2 learning-rate reduction(s)" in r.stop_reason and r.final["epochs"] == 7


def test_reduce_on_plateau_needs_patience_and_keeps_old_run_ids():
    with pytest.raises(ValueError, match="set patience"):
        tiny(train__stop={"reduce_lr": 0.5})
    plain = tiny(train__stop={"patience": 3})
    # fields added later are left out of the id at their default, so stores written before keep their ids
    body = plain.model_dump(mode="json", exclude={"name", "tags"})
    del body["train"]["stop"]["reduce_lr"], body["train"]["stop"]["reductions"]
    del body["optim"]["trust_coefficient"]  # added later still (LARS)
    del body["train"]["adversarial"]  # added later still (adversarial training)
    del body["model"]["options"], body["loss"]  # and later (a user's model and loss)
    del body["log"]["checkpoint_steps"]  # and later (checkpoints inside an epoch)
    import hashlib
    import json
    old = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert plain.run_id() == old
    assert tiny(train__stop={"patience": 3, "reduce_lr": 0.5}).run_id() != old
