"""distributed=True: two processes (gloo, CPU), each passing its own shard of the data, measure what one process
measures on all of it (float64, within 1e-9), with random vectors and choices taken from rank 0 even where the
ranks are given different seeds and start vectors."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from batchscope.curvature import (
    epsilon_sharpness,
    gradient_covariance,
    gradient_noise_scale,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    interpolate,
    landscape_slice,
)

F64 = torch.float64
SIZES = [5, 4, 3, 6]  # rank 0 holds the first two batches (9 examples), rank 1 the others (9): unequal batches


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    return model, list(zip(x.split(SIZES), y.split(SIZES)))


def measure(model, data, rank: int = 0, **kw) -> dict:
    """Every instrument once; rank r > 0 is handed other seeds and start vectors, which must not matter."""
    n = sum(p.numel() for p in model.parameters())
    v0 = torch.linspace(-1, 1, n, dtype=F64) if rank == 0 else torch.ones(n, dtype=F64)
    seed = 3 + 10 * rank
    out = {
        "top": hessian_eigenvalues(model, F.cross_entropy, data, k=3, tol=1e-10, seed=seed, v0=v0, **kw).eigenvalues,
        "power": hessian_eigenvalues(model, F.cross_entropy, data, k=1, method="power", seed=seed,
                                     max_iter=5, **kw).eigenvalues,
        "trace": hessian_trace(model, F.cross_entropy, data, samples=7, method="hutchinson", seed=seed, **kw).trace,
        "hutchpp": hessian_trace(model, F.cross_entropy, data, samples=9, seed=seed, **kw).trace,
        "K": gradient_covariance(model, F.cross_entropy, data, k=3, **kw).eigenvalues.tolist(),
        "sharpness": epsilon_sharpness(model, F.cross_entropy, data, eps=1e-2, max_iter=3, subspace_dim=4,
                                       y0="random", seed=seed, **kw).sharpness,
        "slice": landscape_slice(model, F.cross_entropy, data, steps=3, seed=seed, **kw).loss.tolist(),
        "density": hessian_density(model, F.cross_entropy, data, num_probes=2, lanczos_steps=4, seed=seed,
                                   **kw).nodes[1].tolist(),
        "line": interpolate(model, F.cross_entropy, data, model.state_dict(), {k: 0.5 * v for k, v in
                            model.state_dict().items()}, alphas=[0.5, 1.5], **kw).accuracy.tolist(),
    }
    noise = gradient_noise_scale(model, F.cross_entropy, data, curvature=True, **kw)
    streamed = gradient_noise_scale(model, F.cross_entropy, data, curvature=False, chunk_size=2, **kw)
    out.update(b_simple=noise.b_simple, b_noise=noise.b_noise, streamed_b_simple=streamed.b_simple,
               n_examples=noise.n_examples)
    return out


def worker(rank: int, world: int, store: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, batches = problem()
        mine = batches[:2] if rank == 0 else batches[2:]
        if rank == 1:  # one rank streams its shard from a loader
            x, y = torch.cat([b[0] for b in mine]), torch.cat([b[1] for b in mine])
            mine = DataLoader(TensorDataset(x, y), batch_size=3)  # three batches of 3: cut unlike the 3 and 6
        torch.save(measure(model, mine, rank, distributed=True), f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_measure_what_one_measures_on_all_the_data(tmp_path):
    model, batches = problem()
    want = measure(model, batches)
    # forked after the single-process measurement: the ranks start with torch.func's modules loaded (CPU only)
    mp.start_processes(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    assert want["n_examples"] == sum(SIZES)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (rank, name)


def test_distributed_without_a_process_group_says_so():
    model, batches = problem()
    with pytest.raises(ValueError, match="distributed: True needs torch.distributed initialized"):
        hessian_trace(model, F.cross_entropy, batches, samples=3, distributed=True)
    with pytest.raises(ValueError, match="two_batch.*per_example"):
        gradient_noise_scale(model, F.cross_entropy, batches, method="two_batch", distributed=True)
