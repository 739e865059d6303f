"""A tiny randomly initialized GPT-2 from `transformers` (no weights downloaded), fed dict batches and
BatchEncodings of token ids with labels, through `batch_loss=lambda m, b: m(**b).loss`: the top Hessian
eigenvalues and the gradient noise scale against a dense reference (the full 1,100 x 1,100 Hessian and a loop
of per-example gradients), float64."""

import copy

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader

from batchscope.curvature import gradient_noise_scale, hessian_eigenvalues

transformers = pytest.importorskip("transformers")

F64 = torch.float64
N, LENGTH, VOCAB = 12, 8, 24


def tiny_gpt2():
    torch.manual_seed(0)
    # eager attention: PyTorch's fused CPU attention has no second derivative
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).to(F64)


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, LENGTH), generator=torch.Generator().manual_seed(1))


def lm_loss(model, batch):
    """Next-token cross-entropy, the mean over every predicted token (equal lengths: also the mean over examples).

    Written out rather than `model(**batch).loss`, which HuggingFace computes in float32 even for a float64
    model (about 1e-8 relative): too coarse for a 1e-8 comparison; that idiom is checked more loosely below.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def flat_loss(model):
    """(loss of one batch as a function of all parameters flat, their values): built by hand on an eval copy."""
    ref = copy.deepcopy(model).eval()
    named = list(ref.named_parameters())  # the tied lm_head weight is listed once, as transformer.wte.weight
    shapes, numels = [p.shape for _, p in named], [p.numel() for _, p in named]

    def loss(theta, ids):
        params = {n: t.view(s) for (n, _), t, s in zip(named, theta.split(numels), shapes)}
        logits = functional_call(ref, params, (ids,)).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    return loss, torch.cat([p.detach().reshape(-1) for _, p in named])


def example_gradient(loss, theta, ids):
    t = theta.clone().requires_grad_(True)
    return torch.autograd.grad(loss(t, ids), t)[0]


def test_hessian_and_noise_scale_of_a_tiny_gpt2_match_dense_references():
    model = tiny_gpt2()
    ids = token_ids()
    loss, theta = flat_loss(model)
    assert theta.numel() < 1500  # small enough for the dense Hessian
    batches = [ids[:5], ids[5:9], ids[9:]]  # unequal: weighted by size
    H = torch.autograd.functional.hessian(
        lambda t: sum(b.shape[0] / N * loss(t, b) for b in batches), theta, vectorize=True)
    G = torch.stack([example_gradient(loss, theta, ids[i:i + 1]) for i in range(N)])  # a plain autograd loop

    # HuggingFace batches: BatchEncodings in a list, and a DataLoader of dict examples collated into dicts
    encodings = [transformers.BatchEncoding({"input_ids": b, "labels": b}) for b in batches]
    loader = DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    ref = torch.linalg.eigvalsh(H).flip(0)
    for data in (encodings, loader):
        top = hessian_eigenvalues(model, None, data, k=3, tol=1e-9, batch_loss=lm_loss)
        assert top.converged and top.info.n_params == theta.numel() and top.info.n_examples == N
        assert top.eigenvalues == pytest.approx(ref[:3].tolist(), rel=1e-8)

    # the HuggingFace idiom, with its float32 loss
    hf = hessian_eigenvalues(model, None, encodings, k=1, batch_loss=lambda m, b: m(**b).loss)
    assert hf.eigenvalues[0] == pytest.approx(float(ref[0]), rel=1e-5)

    g = G.mean(0)
    S = (G - g).T @ (G - g) / N
    res = gradient_noise_scale(model, None, encodings, curvature=True, batch_loss=lm_loss)
    assert res.info.extra["per_example"] == "vmap"
    assert res.grad_norm_sq == pytest.approx(float(g @ g), rel=1e-9)
    assert res.trace_sigma == pytest.approx(float(S.trace()), rel=1e-9)
    assert res.b_simple == pytest.approx(float(S.trace() / (g @ g)), rel=1e-9)
    assert res.b_noise == pytest.approx(float((H @ S).trace() / (g @ H @ g)), rel=1e-8)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training  # as given (from_config builds it in train mode, dropout on)


def test_padded_token_losses_are_not_a_mean_over_examples():
    model = tiny_gpt2()
    ids = token_ids()
    labels = ids.clone()
    labels[0, 3:] = -100  # example 0 counts fewer tokens: the batch loss weighs its tokens, not the example
    batch = {"input_ids": ids, "labels": labels}
    with pytest.raises(ValueError, match="batch_loss: the batch loss .* is not the mean of the per-example losses"):
        gradient_noise_scale(model, None, [batch], curvature=False, batch_loss=lambda m, b: m(**b).loss)


def test_fused_attention_without_a_second_derivative_is_named():
    model = tiny_gpt2()
    model.config._attn_implementation = "sdpa"  # the default of from_config
    ids = token_ids()
    with pytest.raises(RuntimeError, match="without a second derivative.*attn_implementation='eager'"):
        hessian_eigenvalues(model, None, [{"input_ids": ids, "labels": ids}], batch_loss=lm_loss)
