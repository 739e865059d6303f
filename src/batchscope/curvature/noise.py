"""Gradient noise: the per-example gradient covariance and McCandlish et al.'s (2018) gradient noise scale.

Per-example gradients. With the training loss f = (1/N) sum_i l_i over all N examples of `data`
(`loss_fn` must reduce by the mean, so a batch's loss is the mean of its examples' losses),
g_i = grad l_i and G = (1/N) sum_i g_i = grad f.
  * bn_mode="eval": l_i is example i's loss on its own (batch norm uses running statistics), computed
    with `torch.func.vmap(grad(...))` over chunks of examples, each example a batch of one.
  * bn_mode="train": batch norm normalizes with the statistics of the batch an example arrives in, so
    l_i depends on its batch mates and g_i is defined as row i of the Jacobian of the batch's vector
    of per-example losses (`torch.func.jacrev`). The batches of `data` are then part of the
    definition and are never re-chunked; sum_i g_i / N is still exactly grad f.

Batches of any structure (dicts, `BatchEncoding`s, through `batch_loss`) are cut into examples along
their tensors whose leading dimension is the batch size, each example a batch of one; where vmap
cannot batch the model (data-dependent control flow), the examples go one at a time
(info.extra["per_example"] = "loop"). With `distributed=True` every rank's per-example gradients
are gathered on every rank (the exact spectra need them all) or, streamed, their sums added up.

Nothing of size d x d (d = number of parameters) is ever formed: the N x d matrix of per-example
gradients is kept (N * d entries of the model's dtype) and spectra come from N x N Gram matrices,
accumulated in float64. The noise scale without curvature streams them instead (memory O(d)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from ._batch import BatchSizeFn, concat, per_example, rebuild, select, split, tensors
from ._core import BatchLoss, BNMode, Data, LossFn, MeasurementInfo, Objective, Wrt, weighted

_DEFAULT_CHUNK = 64  # examples per vmap'd chunk: bounds memory at ~chunk * (d + activations)


# -- shared machinery -------------------------------------------------------------------------
def _per_example(obj: Objective, fn: Callable[[Tensor, Any], Tensor], theta: Tensor, batch: Any, n: int) -> Tensor:
    """fn(theta, example) for each of the n examples of `batch` (each a batch of one), stacked.

    vmap'd over the batch's per-example tensors; where the model has an op vmap cannot batch or
    data-dependent control flow, one example at a time instead (info.extra["per_example"] says which).
    """
    rows = per_example(batch, n)
    if obj.notes.get("per_example") != "loop":

        def one(t: Tensor, *ts: Tensor) -> Tensor:
            return fn(t, rebuild(batch, [u.unsqueeze(0) if r else u for u, r in zip(ts, rows)]))

        try:
            out = vmap(one, in_dims=(None, *[0 if r else None for r in rows]))(theta, *tensors(batch))
            obj.notes["per_example"] = "vmap"
            return out
        except (RuntimeError, NotImplementedError):
            # vmap's limitation (its forward may have passed where the backward cannot): the loop below
            # gives the same numbers, and raises again if the error was not vmap's
            obj.notes["per_example"] = "loop"
    return torch.stack([fn(theta, select(batch, n, slice(i, i + 1))) for i in range(n)])


def _per_example_gradient_chunks(obj: Objective, chunk_size: int | None) -> Iterator[Tensor]:
    """This rank's per-example gradients g_i at obj.theta0 as (chunk x d) blocks in example order (model
    dtype; see module doc); records the pass's examples in `obj` (N over all ranks).

    Eval mode: blocks of `chunk_size` examples (default 64). Train mode: one block per batch of
    `data`, its Jacobian rows built `chunk_size` vjps at a time.
    """
    chunk = chunk_size or _DEFAULT_CHUNK
    theta = obj.theta0.detach()
    seen = 0

    def loss_one(t: Tensor, b: Any) -> Tensor:
        return obj.batch_loss(obj.unflatten(t), b)

    if obj.bn_mode == "eval":
        for n, batch in obj.data:
            for m, piece in split(batch, n, chunk):
                if seen == 0:  # examples are independent here: check the reduction on the first piece
                    with torch.no_grad():
                        _check_mean_reduction(obj, _per_example(obj, loss_one, theta, piece, m), piece)
                yield _per_example(obj, grad(loss_one), theta, piece, m).detach()
                seen += m
            del batch, piece  # one batch alive while the loader builds the next
    else:
        if not obj.pairs:
            raise ValueError("bn_mode: per-example gradients with batch statistics ('train') need each example's "
                             "loss within its batch, which batch_loss(model, batch) does not give; use "
                             "bn_mode='eval', or loss_fn with (inputs, targets) batches")
        for n, (x, y) in obj.data:

            def losses(t: Tensor, x: Tensor = x, y: Tensor = y) -> Tensor:
                out = obj.outputs(obj.unflatten(t), x)
                return vmap(lambda o, yi: obj.loss_fn(o[None], yi[None]))(out, y)  # type: ignore[misc]

            if seen == 0:
                with torch.no_grad():
                    _check_mean_reduction(obj, losses(theta), (x, y))
            # rows of the Jacobian = vjps with one-hot cotangents, `chunk` of them at a time
            yield jacrev(losses, chunk_size=chunk)(theta).detach()
            seen += n
            del x, y, losses
    obj.passed(seen)


def _per_example_gradients(obj: Objective, chunk_size: int | None) -> Tensor:
    """The N x d matrix of per-example gradients (N * d entries of the model's dtype in memory), of
    every rank's examples in rank order when distributed."""
    G = torch.cat(list(_per_example_gradient_chunks(obj, chunk_size)))
    return G if obj.ranks is None else obj.ranks.gather_rows(G)


def _check_mean_reduction(obj: Objective, per_example: Tensor, batch: Any) -> None:
    """Per-example losses only make sense if the batch loss is their mean: check it on one batch."""
    whole = float(obj.batch_loss(obj.unflatten(obj.theta0), batch))
    mean = float(per_example.mean())
    tol = math.sqrt(torch.finfo(obj.dtype).eps)
    if abs(mean - whole) > tol * max(abs(mean), abs(whole)) + torch.finfo(obj.dtype).tiny:
        what = "loss_fn" if obj.pairs else "batch_loss"
        raise ValueError(
            f"{what}: the batch loss {whole:.6g} is not the mean of the per-example losses {mean:.6g}; "
            "per-example gradients need a loss that is the mean over examples (reduction='mean', no class "
            "weights, and for token losses the same number of counted tokens in every example)"
        )


def _gram(G: Tensor, block: int = 1 << 16) -> Tensor:
    """G G^T (N x N) in float64, upcasting one block of columns at a time to bound memory."""
    if G.dtype == torch.float64:
        return G @ G.T
    out = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64, device=G.device)
    for s in range(0, G.shape[1], block):
        b = G[:, s : s + block].double()
        out += b @ b.T
    return out


def _center(gram: Tensor) -> Tensor:
    """P gram P with P = I - 11^T/N: the Gram matrix of the centered rows g_i - mean_j g_j."""
    r = gram.mean(dim=1, keepdim=True)
    return gram - r - r.T + gram.mean()


@dataclass
class _Spectrum:
    values: Tensor  # (N,) float64, descending, negatives (round-off) clamped to 0
    vectors: Tensor  # (N, N) float64, columns matching `values`
    tol: float  # eigenvalues <= tol count as zero
    rank: int


def _spectrum(cov_gram: Tensor, dtype: torch.dtype, rtol: float | None = None) -> _Spectrum:
    """Eigen-decomposition of (1/N) times a Gram matrix; 'non-zero' means > rtol * lambda_1 (default N * eps)."""
    n = cov_gram.shape[0]
    vals, vecs = torch.linalg.eigh(cov_gram)
    vals, vecs = vals.flip(0).clamp_min(0.0), vecs.flip(1)
    # the per-example gradients carry relative errors of order eps of the model's dtype; by default
    # eigenvalues below N * eps * lambda_1 are not told from zero (numpy's matrix_rank convention for
    # the N x N matrix; conservative: float32 spectra often decay smoothly through this level)
    tol = (n * torch.finfo(dtype).eps if rtol is None else rtol) * float(vals[0])
    rank = int((vals > tol).sum())
    return _Spectrum(vals.cpu(), vecs, tol, rank)


def _directions(G: Tensor, vecs: Tensor, centered: bool) -> Tensor:
    """Unnormalized parameter-space directions D^T u (rows, k x d) for Gram eigenvectors u (columns of vecs)."""
    if centered:
        # D = P G, so D^T u = G^T (P u): center u instead of materializing D
        vecs = vecs - vecs.mean(dim=0, keepdim=True)
    return vecs.T.to(G.dtype) @ G


def _hvps(obj: Objective, V: Tensor, chunk: int = 16) -> Tensor:
    """H v for every row v of V (m x d), H the Hessian of the data-averaged loss at obj.theta0.

    One double-backward graph per batch of `data`; the second backward runs for `chunk` vectors at
    once (`is_grads_batched`, a vmap over the backward pass), falling back to a loop where an op
    has no batching rule.
    """
    theta = obj.theta0.detach().requires_grad_(True)

    def part(batch: Any, n: int) -> tuple[Tensor]:
        (g,) = torch.autograd.grad(obj.batch_loss(obj.unflatten(theta), batch), theta, create_graph=True)
        out = torch.empty_like(V)
        for s in range(0, V.shape[0], chunk):
            vs = V[s : s + chunk]
            try:
                (hv,) = torch.autograd.grad(g, theta, grad_outputs=vs, is_grads_batched=True, retain_graph=True)
            except RuntimeError:
                hv = torch.stack([torch.autograd.grad(g, theta, grad_outputs=v, retain_graph=True)[0] for v in vs])
            out[s : s + chunk] = hv.detach()
        return (weighted(out, n),)

    (total,) = obj.accumulate(part)
    obj.matvecs += V.shape[0]
    return (total / obj.n_examples).to(V.dtype)


def _div(a: float, b: float) -> float:
    """a / b, with inf or nan (not an exception) where b = 0, e.g. |G| = 0 at an exact minimum."""
    if b != 0:
        return a / b
    return math.copysign(math.inf, a) if a != 0 else math.nan


def _quad_forms(obj: Objective, V: Tensor) -> Tensor:
    """v^T H v (float64, CPU) for every row v of V."""
    return (V.double() * _hvps(obj, V).double()).sum(dim=1).cpu()


# -- gradient covariance ----------------------------------------------------------------------
@dataclass
class CovarianceResult:
    """Spectrum of K = (1/N) sum_i g_i g_i^T (or the centered covariance) over all N examples of `data`."""

    lambda_1: float  # top eigenvalue of K (loss units^2 per parameter units^2)
    trace: float  # tr K = (1/N) sum_i |g_i|^2 (centered: (1/N) sum_i |g_i - G|^2)
    eigenvalues: Tensor  # top-k eigenvalues of K, descending, float64 on the CPU
    condition_k: float  # lambda_k / lambda_1
    condition_min_nonzero: float  # smallest non-zero eigenvalue / lambda_1 (non-zero: > zero_tol)
    rank: int  # number of non-zero eigenvalues
    zero_tol: float  # the threshold N * eps(model dtype) * lambda_1
    centered: bool
    k: int
    n_examples: int
    vectors: Tensor | None  # (k, d) unit eigenvectors of K in parameter space (model dtype), if asked
    info: MeasurementInfo


def gradient_covariance(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    *,
    k: int = 10,
    centered: bool = False,
    return_vectors: bool = False,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
    chunk_size: int | None = _DEFAULT_CHUNK,
    zero_rtol: float | None = None,
) -> CovarianceResult:
    """Top-k spectrum of the per-example gradient second-moment matrix K = (1/N) sum_i g_i g_i^T (or covariance).

    Uncentered by default, as in Jastrzebski et al.'s break-even analysis; `centered=True` uses
    g_i - G. The eigenvalues of K (d x d) are those of the N x N Gram matrix (1/N) G G^T (plus zeros),
    so k may be at most min(N, d). Eigenvectors, if asked, are D^T u / |D^T u| for Gram eigenvectors u;
    those with a zero eigenvalue are undetermined and returned as zeros. An eigenvalue counts as
    non-zero (for `rank`, `condition_min_nonzero`) above zero_rtol * lambda_1, by default N * eps of
    the model's dtype. Memory: the N x d per-example gradients plus N x N float64.
    """
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    with Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method="double_backward",
                   batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt, distributed=distributed) as obj:
        if k > min(obj.n_examples, obj.n_params):
            raise ValueError(
                f"k: expected <= min(n_examples, n_params) = {min(obj.n_examples, obj.n_params)}, got {k}"
            )
        G = _per_example_gradients(obj, chunk_size)
        n = G.shape[0]
        gram = _gram(G)
        if centered:
            gram = _center(gram)
        spec = _spectrum(gram / n, obj.dtype, zero_rtol)
        vals = spec.values
        lam1 = float(vals[0])
        vectors = None
        if return_vectors:
            W = _directions(G, spec.vectors[:, :k], centered)
            norms = W.norm(dim=1, keepdim=True)
            W = torch.where(
                spec.values[:k, None].to(W.device) > spec.tol, W / norms.clamp_min(torch.finfo(W.dtype).tiny), 0.0
            )
            vectors = W
        smallest = float(vals[spec.rank - 1]) if spec.rank > 0 else 0.0
        return CovarianceResult(
            lambda_1=lam1,
            trace=float(torch.diagonal(gram).sum()) / n,
            eigenvalues=vals[:k].clone(),
            condition_k=float(vals[k - 1]) / lam1 if lam1 > 0 else float("nan"),
            condition_min_nonzero=smallest / lam1 if lam1 > 0 else float("nan"),
            rank=spec.rank,
            zero_tol=spec.tol,
            centered=centered,
            k=k,
            n_examples=n,
            vectors=vectors,
            info=obj.info(k=k, centered=centered, chunk_size=chunk_size),
        )


# -- gradient noise scale ---------------------------------------------------------------------
@dataclass
class NoiseScaleResult:
    """McCandlish et al.'s noise scales (in examples) of the data-averaged loss; *_se are standard errors.

    Sigma is the per-example gradient covariance normalized by 1/N (the population covariance of the
    N examples), G the mean gradient. Standard errors are None where the value is exact.
    """

    method: str  # "per_example" (exact) or "two_batch" (unbiased estimator, averaged over pairs)
    b_simple: float  # tr(Sigma) / |G|^2
    b_simple_se: float | None
    grad_norm_sq: float  # |G|^2
    grad_norm_sq_se: float | None
    trace_sigma: float  # tr(Sigma)
    trace_sigma_se: float | None
    b_noise: float | None  # tr(H Sigma) / (G^T H G); None without curvature
    b_noise_se: float | None
    gHg: float | None  # G^T H G
    gHg_se: float | None
    trace_h_sigma: float | None  # tr(H Sigma)
    trace_h_sigma_se: float | None
    curvature_rank: int | None  # per_example: eigen-directions of Sigma used for tr(H Sigma)
    sigma_captured: float | None  # per_example: fraction of tr(Sigma) in those directions (1.0 = exact)
    n_examples: int
    small_batch: int | None
    big_batch: int | None
    n_pairs: int | None
    info: MeasurementInfo


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Data,
    *,
    method: Literal["per_example", "two_batch"] = "per_example",
    small_batch: int = 32,
    big_batch: int = 256,
    n_pairs: int = 100,
    curvature: bool = True,
    curvature_rank: int | None = None,
    bn_mode: BNMode = "eval",
    device: str | torch.device | None = None,
    batch_loss: BatchLoss | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    wrt: Wrt = None,
    distributed: bool = False,
    seed: int = 0,
    chunk_size: int | None = None,
) -> NoiseScaleResult:
    """B_simple = tr(Sigma)/|G|^2 and B_noise = tr(H Sigma)/(G^T H G) (McCandlish et al. 2018), in examples.

    method="per_example": exact, from the per-example gradients (see the module doc for bn_mode).
      Without curvature they are streamed (memory O(d)); with it the N x d matrix is kept.
      tr(H Sigma) = sum_j lambda_j u_j^T H u_j over the eigenpairs of Sigma with lambda_j > 0, from
      the N x N centered Gram matrix: exact (up to eigenvalues below N eps lambda_1) with rank(Sigma)
      <= N - 1 Hessian-vector products, batched. `curvature_rank=r` keeps only the top r directions,
      an approximation (it drops the curvature of the remaining part of Sigma, whose share of tr(Sigma)
      is 1 - sigma_captured).
    method="two_batch": McCandlish's unbiased estimators from batch gradients only. Each pair draws
      `big_batch` examples i.i.d. uniformly with replacement (so E|G_B|^2 = |G|^2 + tr(Sigma)/B holds
      exactly for the 1/N covariance); the small batch is the first `small_batch` of them (nested, as
      in data parallelism: the estimators stay unbiased). Per pair
        |G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small),
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big),
      and the same with the H-norm v^T H v (2 exact Hessian-vector products over all of `data` per
      pair) for G^T H G and tr(H Sigma). Each is averaged over `n_pairs` pairs with its standard error;
      ratios are ratios of the averages, with delta-method standard errors. bn_mode="eval" only:
      with batch statistics the gradient of a batch depends on its size and E[G_B] != G.
    `chunk_size`: examples per vmap'd chunk of per-example gradients (default 64), or per forward
    pass of a batch gradient (default: the whole batch). "two_batch" holds all of `data` in memory
    (it draws examples from all of it) and is not available with distributed=True.
    """
    if method not in ("per_example", "two_batch"):
        raise ValueError(f"method: expected 'per_example' or 'two_batch', got {method!r}")
    if method == "two_batch":
        if bn_mode != "eval":
            raise ValueError("method='two_batch' needs bn_mode='eval': with batch statistics E[G_B] depends on B")
        if not 1 <= small_batch < big_batch:
            raise ValueError(f"small_batch, big_batch: expected 1 <= small < big, got {small_batch}, {big_batch}")
        if n_pairs < 2:
            raise ValueError(f"n_pairs: expected >= 2 (for standard errors), got {n_pairs}")
        if distributed:
            raise ValueError("method='two_batch' draws its batches from all of the data, which no one process holds; "
                             "use method='per_example' with distributed=True")
    if curvature_rank is not None and curvature_rank < 1:
        raise ValueError(f"curvature_rank: expected None or >= 1, got {curvature_rank}")
    with Objective(model, loss_fn, data, bn_mode=bn_mode, device=device, hvp_method="double_backward",
                   batch_loss=batch_loss, batch_size_fn=batch_size_fn, wrt=wrt, distributed=distributed) as obj:
        if method == "per_example":
            return _noise_per_example(obj, curvature, curvature_rank, chunk_size)
        return _noise_two_batch(obj, small_batch, big_batch, n_pairs, curvature, seed, chunk_size)


def _noise_per_example(
    obj: Objective, curvature: bool, curvature_rank: int | None, chunk_size: int | None
) -> NoiseScaleResult:
    gHg = tr_hs = b_noise = captured = None
    rank = None
    if not curvature:
        # only sums are needed: stream the per-example gradients, memory O(d) instead of O(N d)
        sq = torch.zeros((), dtype=torch.float64, device=obj.device)
        total = torch.zeros(obj.n_params, dtype=torch.float64, device=obj.device)
        for block in _per_example_gradient_chunks(obj, chunk_size):
            sq += block.double().square().sum()
            total += block.double().sum(dim=0)
        if obj.ranks is not None:
            obj.ranks.sum_(sq)
            obj.ranks.sum_(total)
        n = obj.n_examples  # recorded by the pass, over all ranks
        g2 = float(total.square().sum()) / n**2
        tr_sigma = float(sq) / n - g2  # (1/N) sum |g_i|^2 - |G|^2 = (1/N) sum |g_i - G|^2
    else:
        G = _per_example_gradients(obj, chunk_size)
        n = G.shape[0]
        gram = _gram(G)
        g2 = float(gram.sum()) / n**2  # |mean g_i|^2 = 1^T G G^T 1 / N^2
        gram_c = _center(gram)
        tr_sigma = float(torch.diagonal(gram_c).sum()) / n
        spec = _spectrum(gram_c / n, obj.dtype)
        rank = spec.rank if curvature_rank is None else min(curvature_rank, spec.rank)
        # W_j = D^T u_j / sqrt(N), |W_j|^2 = lambda_j, Sigma = sum_j W_j W_j^T over non-zero lambda_j
        W = _directions(G, spec.vectors[:, :rank], centered=True) / math.sqrt(n)
        tr_hs = float(_quad_forms(obj, W).sum()) if rank > 0 else 0.0
        captured = float(spec.values[:rank].sum()) / tr_sigma if tr_sigma > 0 else 1.0
        mean_g = G.mean(dim=0)
        gHg = float(_quad_forms(obj, mean_g[None])[0])
        b_noise = _div(tr_hs, gHg)
    return NoiseScaleResult(
        method="per_example",
        b_simple=_div(tr_sigma, g2),
        b_simple_se=None,
        grad_norm_sq=g2,
        grad_norm_sq_se=None,
        trace_sigma=tr_sigma,
        trace_sigma_se=None,
        b_noise=b_noise,
        b_noise_se=None,
        gHg=gHg,
        gHg_se=None,
        trace_h_sigma=tr_hs,
        trace_h_sigma_se=None,
        curvature_rank=rank,
        sigma_captured=captured,
        n_examples=n,
        small_batch=None,
        big_batch=None,
        n_pairs=None,
        info=obj.info(method="per_example", sigma_normalization="1/N", curvature_rank=rank),
    )


def _mean_gradient(obj: Objective, batch: Any, n: int, chunk: int | None) -> Tensor:
    """Gradient of the mean loss over the n examples of `batch`, in pieces of at most `chunk` examples."""
    theta = obj.theta0.detach().requires_grad_(True)
    p = obj.unflatten(theta)
    out = torch.zeros_like(theta)
    for m, piece in split(batch, n, chunk or n):
        (g,) = torch.autograd.grad(obj.batch_loss(p, piece) * (m / n), theta)
        out += g
    return out.detach()


def _mean_se(v: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of i.i.d. samples."""
    return float(v.mean()), float(v.std(correction=1)) / math.sqrt(v.numel())


def _ratio_se(num: Tensor, den: Tensor) -> tuple[float, float]:
    """mean(num)/mean(den) and its delta-method standard error from paired samples."""
    r = _div(float(num.mean()), float(den.mean()))
    return r, _div(float((num - r * den).std(correction=1)), math.sqrt(num.numel()) * abs(float(den.mean())))


def _noise_two_batch(
    obj: Objective, bs: int, bb: int, n_pairs: int, curvature: bool, seed: int, chunk: int | None
) -> NoiseScaleResult:
    # i.i.d. draws from all the examples need them at hand: the data is held in memory here, as one batch
    pieces = list(obj.data)
    n = obj.passed(sum(m for m, _ in pieces))
    whole = concat(pieces)
    del pieces
    gen = torch.Generator().manual_seed(seed)
    sq_small, sq_big = torch.empty(n_pairs, dtype=torch.float64), torch.empty(n_pairs, dtype=torch.float64)
    h_small, h_big = torch.empty_like(sq_small), torch.empty_like(sq_big)
    group = 8  # pairs per batched Hessian-vector product call (2 vectors each)
    for start in range(0, n_pairs, group):
        vecs = []
        for k in range(start, min(start + group, n_pairs)):
            idx = torch.randint(n, (bb,), generator=gen).to(obj.device)
            g_small = _mean_gradient(obj, select(whole, n, idx[:bs]), bs, chunk)
            g_rest = _mean_gradient(obj, select(whole, n, idx[bs:]), bb - bs, chunk)
            g_big = (bs * g_small + (bb - bs) * g_rest) / bb
            sq_small[k], sq_big[k] = float(g_small.double().square().sum()), float(g_big.double().square().sum())
            if curvature:
                vecs += [g_small, g_big]
        if curvature:
            q = _quad_forms(obj, torch.stack(vecs))
            h_small[start : start + len(vecs) // 2], h_big[start : start + len(vecs) // 2] = q[0::2], q[1::2]

    def estimators(small: Tensor, big: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pair unbiased estimates of |G|^2 (or G^T H G) and tr(Sigma) (or tr(H Sigma))."""
        return (bb * big - bs * small) / (bb - bs), (small - big) / (1.0 / bs - 1.0 / bb)

    a, b = estimators(sq_small, sq_big)
    g2, g2_se = _mean_se(a)
    trs, trs_se = _mean_se(b)
    b_simple, b_simple_se = _ratio_se(b, a)
    gHg = gHg_se = trhs = trhs_se = b_noise = b_noise_se = None
    if curvature:
        ah, bh = estimators(h_small, h_big)
        gHg, gHg_se = _mean_se(ah)
        trhs, trhs_se = _mean_se(bh)
        b_noise, b_noise_se = _ratio_se(bh, ah)
    return NoiseScaleResult(
        method="two_batch",
        b_simple=b_simple,
        b_simple_se=b_simple_se,
        grad_norm_sq=g2,
        grad_norm_sq_se=g2_se,
        trace_sigma=trs,
        trace_sigma_se=trs_se,
        b_noise=b_noise,
        b_noise_se=b_noise_se,
        gHg=gHg,
        gHg_se=gHg_se,
        trace_h_sigma=trhs,
        trace_h_sigma_se=trhs_se,
        curvature_rank=None,
        sigma_captured=None,
        n_examples=n,
        small_batch=bs,
        big_batch=bb,
        n_pairs=n_pairs,
        info=obj.info(method="two_batch", sigma_normalization="1/N", sampling="iid with replacement", seed=seed),
    )
