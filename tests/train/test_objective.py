"""The batch objective: cross-entropy, and adversarial training (FGSM) checked against a closed form."""

import pytest
import torch
import torch.nn.functional as F

from batchscope.spec import AdversarialSpec, RunSpec
from batchscope.train import train_run
from batchscope.train.objective import batch_objective, fgsm
from helpers import tiny_spec


def _softmax_regression(seed=0, n=12, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(k, d, generator=g, dtype=torch.float64), torch.randn(k, generator=g, dtype=torch.float64)
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)
    return W, b, x, y


def test_fgsm_against_the_softmax_regression_closed_form():
    W, b, x, y = _softmax_regression()
    # for logits W x + b and the mean cross-entropy, grad_x = W^T (softmax - onehot) / n, row by row
    p = torch.softmax(x @ W.T + b, 1)
    gx = (p - F.one_hot(y, 3).double()) @ W / len(y)
    eps = 0.07
    out = fgsm(lambda xx: xx @ W.T + b, x, y, eps)
    assert torch.allclose(out, x + eps * gx.sign(), atol=0, rtol=0)
    # and the objective: (1 - mix) CE(x) + mix CE(x_adv)
    adv = AdversarialSpec(eps=eps, mix=0.3)
    want = 0.7 * F.cross_entropy(x @ W.T + b, y) + 0.3 * F.cross_entropy((x + eps * gx.sign()) @ W.T + b, y)
    assert batch_objective(lambda xx: xx @ W.T + b, x, y, adv).item() == pytest.approx(want.item(), rel=1e-12)
    assert batch_objective(lambda xx: xx @ W.T + b, x, y, None).item() == pytest.approx(F.cross_entropy(x @ W.T + b, y).item())


def test_the_adversarial_loss_is_larger_and_its_gradient_reaches_the_weights():
    W, b, x, y = _softmax_regression(1)
    W.requires_grad_(True)
    fwd = lambda xx: xx @ W.T + b  # noqa: E731
    clean = F.cross_entropy(fwd(x), y)
    full = batch_objective(fwd, x, y, AdversarialSpec(eps=0.1, mix=1.0))
    assert full.item() > clean.item()  # FGSM raises the loss (to first order by eps |grad_x|_1)
    (gw,) = torch.autograd.grad(full, W)
    x_adv = fgsm(fwd, x, y, 0.1)
    (want,) = torch.autograd.grad(F.cross_entropy(x_adv @ W.T + b, y), W)  # the example is a constant: no second order
    assert torch.allclose(gw, want, rtol=1e-12, atol=0)


def test_adversarial_training_changes_the_run_and_keeps_old_ids():
    plain = tiny_spec(optim__momentum=0.0)
    adv = tiny_spec(optim__momentum=0.0, train__adversarial={"eps": 0.1})
    assert adv.run_id() != plain.run_id()
    body = plain.model_dump(mode="json", exclude={"name", "tags"})
    del body["train"]["adversarial"]  # as a version without the field stored it: the same run
    assert RunSpec.model_validate(body).run_id() == plain.run_id()
    a, b = train_run(plain), train_run(adv)
    assert a.status == b.status == "done" and a.final["train_loss"] != b.final["train_loss"]
    with pytest.raises(ValueError, match="eps"):
        tiny_spec(train__adversarial={"eps": 0.0})


def test_adversarial_passes_leave_batch_norm_statistics_to_the_clean_pass():
    # one step from the same start: the running statistics depend only on the clean batch, with or without FGSM
    kw = {"model__norm": "batch", "train__epochs": 1, "train__batch_size": 256, "data__n_train": 256}
    from batchscope.factories import dataset_for, model_for
    from batchscope.train.comm import Communicator
    from batchscope.train.plain import PlainStep

    stats = []
    for adv in (None, {"eps": 0.2}):
        spec = tiny_spec(train__adversarial=adv, **kw)
        ds = dataset_for(spec, torch.device("cpu"))
        model = model_for(spec, ds, torch.device("cpu"))
        step = PlainStep(spec, model, Communicator(torch.device("cpu")))
        step.step(ds.x_train[None], ds.y_train[None], torch.tensor([0.0], dtype=ds.x_train.dtype), 0)  # lr 0: weights stay
        stats.append([v.clone() for k, v in model.named_buffers() if "running" in k])
    assert stats[0] and all(torch.equal(a, b) for a, b in zip(*stats))
