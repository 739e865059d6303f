"""TrajectoryProbes on batches that are not (inputs, targets) pairs: dicts and BatchEncodings, through batch_loss."""

import pytest
import torch
import torch.nn.functional as F

import batchscope
from batchscope import TrajectoryProbes


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    return model, x, y


def batch_loss(model, batch):
    return F.cross_entropy(model(batch["inputs"]), batch["labels"])


@pytest.mark.parametrize("kind", ["dict", "batch_encoding"])
def test_dict_batches_measure_what_pairs_measure(kind):
    model, x, y = _setup()
    if kind == "dict":
        loader = [{"inputs": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 64, 16)]
    else:
        transformers = pytest.importorskip("transformers")
        loader = [transformers.BatchEncoding({"inputs": x[i:i + 16], "labels": y[i:i + 16]}) for i in range(0, 64, 16)]
    probes = TrajectoryProbes(["hessian_top", "grad_norm"], schedule=1, subset=40, batch_loss=batch_loss)
    source = iter(loader)  # a one-shot iterator: read once, kept
    got = probes.step(0, model, None, source)
    again = probes.step(1, model, None, source)
    pairs = TrajectoryProbes(["hessian_top", "grad_norm"], schedule=1, subset=40)
    want = pairs.step(0, model, F.cross_entropy, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)])
    for k, v in want.items():
        if k.startswith("probe_seconds"):
            continue
        assert got[k] == pytest.approx(v, rel=1e-8), k
        if not k.endswith("matvecs"):  # the second step starts Lanczos from the first's eigenvector: fewer products
            assert again[k] == pytest.approx(v, rel=1e-6), k
    first40 = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:40], y[32:40])]
    direct = batchscope.hessian_eigenvalues(model, F.cross_entropy, first40, k=1, tol=1e-8)
    assert got["hessian_lambda_1"] == pytest.approx(float(direct.eigenvalues[0]), rel=1e-5)


def test_pairs_from_a_one_shot_iterator_with_batch_loss():
    model, x, y = _setup()
    gen = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16))
    probes = TrajectoryProbes(["grad_norm"], schedule=1, subset=32,
                              batch_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    got = probes.step(0, model, None, gen)
    want = TrajectoryProbes(["grad_norm"], schedule=1, subset=32).step(0, model, F.cross_entropy, (x, y))
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-10)
