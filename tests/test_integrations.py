"""Probes in the real Lightning Trainer and the real HuggingFace Trainer: a tiny model, a few steps on CPU, the
probes read back at their scheduled steps and checked against the instruments called directly."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchscope.curvature.hessian import hessian_eigenvalues
from batchscope.probes import schedule_steps
from batchscope.spec import ProbeSpec

HESSIAN = {"instrument": "hessian_top", "options": {"hvp_method": "double_backward", "tol": 1e-6}}


def direct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, forward=lambda m, x: m(x)) -> dict[str, float]:
    """grad_norm and hessian_lambda_1 of the mean cross-entropy on (x, y), computed here, not by the probes."""
    model.eval()  # the instruments measure with dropout off
    try:
        g = torch.autograd.grad(F.cross_entropy(forward(model, x), y), [p for p in model.parameters() if p.requires_grad])
    finally:
        model.train()
    from batchscope.integrations._common import Forwarded

    top = hessian_eigenvalues(Forwarded(model, forward), F.cross_entropy, list(zip(x.split(batch), y.split(batch))), k=1,
                              tol=1e-6, hvp_method="double_backward")
    return {"grad_norm": float(torch.cat([t.flatten() for t in g]).norm()), "hessian_lambda_1": float(top.eigenvalues[0])}


def test_lightning_trainer_runs_the_probes_on_schedule(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from batchscope.integrations.lightning import ProbeCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 4, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    module = Tiny()
    cb = ProbeCallback(["grad_norm", HESSIAN], loader, schedule="log", points=4, subset=64)  # the loader's first 64
    trainer = L.Trainer(max_steps=12, callbacks=[cb], accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)

    due = sorted(schedule_steps(ProbeSpec(instrument="grad_norm", schedule="log", points=4), 12))
    assert cb.probes.total_steps == 12 and due[-1] == 12  # planned over the trainer's run
    for name in ("grad_norm", "hessian_lambda_1", "hessian_converged"):
        series = cb.probes.series(name)
        assert [s for s, _ in series] == due and all(math.isfinite(v) for _, v in series), name
    # the last point is the trained weights: a direct call on them and on the same subset gives the same numbers
    xs, ys = cb.probes.subset(loader)
    want = direct(module, xs, ys, batch=32)
    last = dict(cb.probes.history[-1][1])
    assert last["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert last["hessian_lambda_1"] == pytest.approx(want["hessian_lambda_1"], rel=1e-4)
    assert cb.probes.series("grad_norm")[0][1] != last["grad_norm"]  # it did train in between
    # and the trainer's logger has them at the same steps
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [(int(r["step"]), float(r["grad_norm"])) for r in csv.DictReader(f) if r.get("grad_norm")]
    assert logged == cb.probes.series("grad_norm")


def test_hf_trainer_runs_the_probes_on_schedule(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from batchscope.integrations._common import logits
    from batchscope.integrations.hf import ProbeCallback

    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     attn_implementation="eager")  # fused attention has no second derivative
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)  # randomly initialized: nothing downloaded
    ids, labels = torch.randint(0, 40, (64, 8)), torch.randint(0, 3, (64,))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=16,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    cb = ProbeCallback(["grad_norm", HESSIAN], (ids, labels), schedule=3, subset=32, batch_size=16)
    # the same probes on the Trainer's own kind of batch (dicts), through the model's own loss
    dicts = [transformers.BatchEncoding({"input_ids": ids[i:i + 16], "labels": labels[i:i + 16]}) for i in range(0, 64, 16)]
    cb_dicts = ProbeCallback(["grad_norm", HESSIAN], dicts, schedule=3, subset=32, batch_size=16,
                             batch_loss=lambda m, batch: m(**batch).loss)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[cb, cb_dicts])
    trainer.train()

    for name in ("grad_norm", "hessian_lambda_1"):
        series = cb.probes.series(name)
        assert [s for s, _ in series] == [0, 3, 6] and all(math.isfinite(v) for _, v in series), name
    want = direct(model, ids[:32], labels[:32], batch=16, forward=logits)
    last = cb.probes.history[-1]
    assert last[0] == 6 and last[1]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert last[1]["hessian_lambda_1"] == pytest.approx(want["hessian_lambda_1"], rel=1e-4)
    assert cb.probes.series("grad_norm")[0][1] != last[1]["grad_norm"]
    for name in ("grad_norm", "hessian_lambda_1"):
        for (s1, v1), (s2, v2) in zip(cb.probes.series(name), cb_dicts.probes.series(name), strict=True):
            assert s1 == s2 and v2 == pytest.approx(v1, rel=1e-4), name
    # kept in the trainer's log history (saved in trainer_state.json with each checkpoint)
    logged = [(h["step"], h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    assert logged[0::2] == cb.probes.series("grad_norm") and logged[1::2] == cb_dicts.probes.series("grad_norm")


@pytest.mark.parametrize("module, blocked, extra", [("lightning", "lightning.pytorch", "lightning"),
                                                    ("hf", "transformers", "hf")])
def test_without_the_framework_the_import_is_one_line_naming_the_extra(monkeypatch, module, blocked, extra):
    import importlib
    import sys

    from batchscope.sinks import MissingExtraError

    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"batchscope.integrations.{module}", raising=False)
    words = rf"^batchscope\.integrations\.{module} needs .*pip install 'batchscope\[{extra}\]'$"
    with pytest.raises(MissingExtraError, match=words):
        importlib.import_module(f"batchscope.integrations.{module}")
