"""Batches other than (inputs, targets) pairs: dicts and BatchEncodings through `batch_loss`, sized by their
first tensor or `batch_size_fn`; DataLoaders streamed one batch at a time. On the same examples every
instrument must give what it gives on (inputs, targets) pairs, which test_hessian.py and test_noise.py check
against dense references."""

import weakref
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from batchscope.curvature import (
    HessianOperator,
    epsilon_sharpness,
    gradient_covariance,
    gradient_noise_scale,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    interpolate,
    landscape_slice,
)
from batchscope.curvature._core import Objective

F64 = torch.float64
SIZES = [5, 4, 3]  # unequal batches: weighting by size matters


def model_and_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    return model, list(zip(x.split(SIZES), y.split(SIZES)))


Triple = namedtuple("Triple", "x y scale")


def as_kind(pairs, kind: str):
    """The same examples in another container; `scale` is a 0-d tensor shared by the batch (never cut)."""
    one = torch.tensor(1.0, dtype=F64)
    if kind == "dict":
        return [{"x": x, "y": y, "scale": one} for x, y in pairs]
    if kind == "batch_encoding":
        transformers = pytest.importorskip("transformers")
        return [transformers.BatchEncoding({"x": x, "y": y, "scale": one}) for x, y in pairs]
    return [Triple(x, y, one) for x, y in pairs]


def batch_loss(model, batch):
    b = batch._asdict() if isinstance(batch, Triple) else batch
    return F.cross_entropy(model(b["x"]), b["y"]) * b["scale"]


def every_instrument(model, loss_fn, data, **kw) -> dict:
    """One number (or vector) per instrument, on the same seeds."""
    out = {}
    out["eig"] = torch.tensor(hessian_eigenvalues(model, loss_fn, data, k=2, seed=3, **kw).eigenvalues)
    out["eig_chunked"] = torch.tensor(hessian_eigenvalues(model, loss_fn, data, k=1, chunk_size=2, **kw).eigenvalues)
    out["trace"] = torch.tensor(hessian_trace(model, loss_fn, data, samples=6, method="hutchinson", seed=4, **kw).trace)
    out["density"] = hessian_density(model, loss_fn, data, num_probes=1, lanczos_steps=4, grid=5, **kw).nodes[0]
    out["K"] = gradient_covariance(model, loss_fn, data, k=3, chunk_size=4, **kw).eigenvalues
    noise = gradient_noise_scale(model, loss_fn, data, curvature=True, chunk_size=4, **kw)
    out["noise"] = torch.tensor([noise.b_simple, noise.b_noise])
    two = gradient_noise_scale(model, loss_fn, data, method="two_batch", small_batch=2, big_batch=5, n_pairs=3, **kw)
    out["two_batch"] = torch.tensor([two.b_simple, two.b_noise])
    out["sharpness"] = torch.tensor(epsilon_sharpness(model, loss_fn, data, eps=1e-2, max_iter=2, **kw).sharpness)
    out["slice"] = landscape_slice(model, loss_fn, data, steps=3, **kw).loss
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out["line"] = interpolate(model, loss_fn, data, theta, 0.5 * theta, alphas=[0.0, 1.0], **kw).loss
    v = torch.linspace(-1, 1, theta.numel(), dtype=F64).numpy()
    out["operator"] = torch.as_tensor(HessianOperator(model, loss_fn, data, **kw).matvec(v))
    return out


@pytest.mark.parametrize("kind", ["dict", "batch_encoding", "namedtuple"])
def test_every_instrument_takes_other_batches_through_batch_loss(kind):
    model, pairs = model_and_pairs()
    want = every_instrument(model, F.cross_entropy, pairs)
    got = every_instrument(model, None, as_kind(pairs, kind), batch_loss=batch_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-13, msg=name)
    # accuracy needs outputs and targets, which batch_loss does not show
    assert landscape_slice(model, None, as_kind(pairs, kind), steps=2, batch_loss=batch_loss).accuracy is None


def test_batch_size_fn_sets_the_weights():
    model, pairs = model_and_pairs()
    dicts = as_kind(pairs, "dict")
    with Objective(model, None, dicts, batch_loss=batch_loss, batch_size_fn=lambda b: 1) as obj:
        unweighted = obj.loss()  # every batch counts as one example: the plain mean of the batch losses
        assert obj.n_examples == len(SIZES)
    with torch.no_grad():
        model.eval()
        ref = sum(float(F.cross_entropy(model(x), y)) for x, y in pairs) / len(pairs)
    assert unweighted == pytest.approx(ref, rel=1e-12)


def test_bad_batches_get_one_line_errors():
    model, pairs = model_and_pairs()
    dicts = as_kind(pairs, "dict")
    with pytest.raises(TypeError, match=r"batch 0 is a dict, not a pair .* batch_loss"):
        hessian_trace(model, F.cross_entropy, dicts, samples=3)
    with pytest.raises(ValueError, match="exactly one"):
        hessian_trace(model, F.cross_entropy, dicts, samples=3, batch_loss=batch_loss)
    with pytest.raises(ValueError, match="exactly one"):
        hessian_trace(model, None, pairs, samples=3)
    with pytest.raises(ValueError, match=r"batch 1 has batch size 0"):
        hessian_trace(model, None, dicts, samples=3, batch_loss=batch_loss, batch_size_fn=lambda b: 0 * len(b["y"])
                      if len(b["y"]) == 4 else 5)
    with pytest.raises(ValueError, match="0-d.*batch_size_fn"):
        hessian_trace(model, None, [{"s": torch.tensor(1.0), "x": x} for x, _ in pairs], samples=3,
                      batch_loss=batch_loss)
    with pytest.raises(ValueError, match="bn_mode.*batch_loss"):
        gradient_covariance(model, None, dicts, k=2, bn_mode="train", batch_loss=batch_loss)
    with pytest.raises(TypeError, match="data: expected"):
        hessian_trace(model, F.cross_entropy, 3, samples=3)
    with pytest.raises(ValueError, match="no batches"):
        hessian_trace(model, F.cross_entropy, DataLoader(TensorDataset(torch.zeros(0, 3)), batch_size=2), samples=3)


def test_dataloaders_and_generators_equal_the_list():
    model, pairs = model_and_pairs()
    x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    want = hessian_eigenvalues(model, F.cross_entropy, [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])], k=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    got = hessian_eigenvalues(model, F.cross_entropy, loader, k=2)
    assert got.eigenvalues == pytest.approx(want.eigenvalues, rel=1e-12)
    assert got.info.n_examples == 12
    # a one-shot generator cannot be read twice: it is read once and kept
    gen = ((a, b) for a, b in [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])])
    assert hessian_eigenvalues(model, F.cross_entropy, gen, k=2).eigenvalues == pytest.approx(want.eigenvalues,
                                                                                             rel=1e-12)
    # in eval mode a shuffling loader gives the same loss in another order (equal to rounding) ...
    shuffled = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    assert hessian_eigenvalues(model, F.cross_entropy, shuffled, k=2).eigenvalues == pytest.approx(
        want.eigenvalues, rel=1e-9)
    # ... but with batch statistics the batches are part of the loss
    with pytest.raises(ValueError, match="shuffl"):
        hessian_eigenvalues(model, F.cross_entropy, shuffled, bn_mode="train")


class Generated(Dataset):
    """Examples made on demand, as a dataset far larger than memory would be; `live` counts the
    collated batches still alive (a finalizer per batch)."""

    def __init__(self, n: int, dim: int) -> None:
        self.n, self.dim = n, dim
        self.live = self.most = self.made = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(self.dim, generator=g, dtype=F64), torch.randint(0, 3, (), generator=g)

    def collate(self, items):
        x = torch.stack([a for a, _ in items])
        y = torch.stack([b for _, b in items])
        self.live += 1
        self.made += 1
        self.most = max(self.most, self.live)
        weakref.finalize(x, self._freed)
        return x, y

    def _freed(self) -> None:
        self.live -= 1


def test_a_streamed_loader_holds_one_batch_at_a_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    ds = Generated(3000, 6)
    loader = DataLoader(ds, batch_size=30, collate_fn=ds.collate)  # 100 batches
    top = hessian_eigenvalues(model, F.cross_entropy, loader, k=1, tol=1e-3, max_iter=8)
    trace = hessian_trace(model, F.cross_entropy, loader, samples=3, method="hutchinson")
    noise = gradient_noise_scale(model, F.cross_entropy, loader, curvature=False)
    assert ds.made >= 100 * 10  # every product read the loader again
    assert ds.most == 1, f"{ds.most} batches were alive at once"
    # and the numbers are those of the same examples held in memory
    kept = [ds.collate([ds[i] for i in range(s, s + 30)]) for s in range(0, 3000, 30)]
    assert hessian_eigenvalues(model, F.cross_entropy, kept, k=1, tol=1e-3, max_iter=8).eigenvalues == pytest.approx(
        top.eigenvalues, rel=1e-12)
    assert hessian_trace(model, F.cross_entropy, kept, samples=3, method="hutchinson").trace == pytest.approx(
        trace.trace, rel=1e-12)
    assert gradient_noise_scale(model, F.cross_entropy, kept, curvature=False).b_simple == pytest.approx(
        noise.b_simple, rel=1e-12)


class Branchy(nn.Module):
    """A model with data-dependent control flow, which vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        out = self.lin(x)
        return out if float(x.abs().sum()) >= 0 else -out


def test_per_example_gradients_go_one_at_a_time_where_vmap_cannot():
    _, pairs = model_and_pairs()
    torch.manual_seed(0)
    model = Branchy().double()
    res = gradient_noise_scale(model, None, as_kind(pairs, "dict"), batch_loss=batch_loss, chunk_size=4)
    assert res.info.extra["per_example"] == "loop"
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                                                   list(model.parameters()))])
            for x, y in pairs for i in range(x.shape[0])]
    G = torch.stack(rows)
    g = G.mean(0)
    assert res.b_simple == pytest.approx(float(((G - g) ** 2).sum(1).mean() / (g @ g)), rel=1e-10)


def test_a_dataset_is_not_taken_for_batches():
    model, pairs = model_and_pairs()
    with pytest.raises(TypeError, match="TensorDataset gives single examples.*DataLoader"):
        hessian_trace(model, F.cross_entropy, TensorDataset(*pairs[0]), samples=3)
