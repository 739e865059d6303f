"""The workloads of issue 18's Hessian benchmarks, shared by bench_hessian.py and bench_hvp_reuse.py.

`cnn`: a ResNet-ish conv net of 9,098 parameters (widths 15, 35, 8; batch norm; one residual block) on
2,000 CIFAR-shaped synthetic images in 4 batches of 500, after 100 SGD steps; the CPU table's workload.
`resnet20` (5,000 CIFAR-shaped random images) and `gpt2` (GPT-2-small configuration, random weights,
random tokens) are the GPU arms; `tiny=True` shrinks every one of them to seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

NOISE = 4.0


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def make_cnn(widths: tuple[int, int, int] = (15, 35, 8)) -> nn.Module:
    """Strided convs with batch norm, one residual block, a linear head: 3x32x32 images to 10 logits.
    The default widths give the 9,098 parameters of the issue's table."""
    c1, c2, c3 = widths
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),  # 16x16
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),  # 8x8
        nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
        Block(c3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, 10),
    )


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped synthetic images: a smooth random template per class plus pixel noise, with 10% of
    the labels redrawn at random so the loss cannot reach zero (a Hessian that has not collapsed)."""
    g = torch.Generator().manual_seed(seed)
    templates = nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=32, mode="bilinear")
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + NOISE * torch.randn(n, 3, 32, 32, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return x, y


def train_briefly(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """A few SGD steps so the Hessian has the outliers of a network that has started to fit; eval mode after."""
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx].to(next(model.parameters()).device)),
                                           y[idx].to(next(model.parameters()).device))
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        dev = next(model.parameters()).device
        return float(nn.functional.cross_entropy(model(x.to(dev)), y.to(dev)))


class GPT2Logits(nn.Module):
    """transformers' GPT2LMHeadModel returning the (B, T, V) logits alone; eager attention (the fused SDPA
    kernels on GPU have no double backward) and no dropout."""

    def __init__(self, tiny: bool) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        kw = dict(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=1000) if tiny else {}
        cfg = GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg._attn_implementation = "eager"
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=x).logits


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Token-averaged cross-entropy of (B, T, V) logits against (B, T) targets."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def workload(name: str, *, tiny: bool = False, device: str = "cpu", train_steps: int = 100):
    """(model, batches, loss_fn, description) for `name` in cnn, resnet20, gpt2."""
    dev = torch.device(device)
    torch.manual_seed(0)
    if name == "cnn":
        n, bs = (64, 16) if tiny else (2000, 500)
        model = make_cnn((4, 6, 4) if tiny else (15, 35, 8)).to(dev)
        x, y = make_images(n, seed=1)
        loss = train_briefly(model, (x, y), 5 if tiny else train_steps)
        batches = [(xb.to(dev), yb.to(dev)) for xb, yb in zip(x.split(bs), y.split(bs))]
        desc = f"CNN, {n} CIFAR-shaped images in {len(batches)} batches of {bs}, loss {loss:.3f} after training"
        return model, batches, nn.functional.cross_entropy, desc
    if name == "resnet20":
        from batchscope.models import build_model

        n, bs = (32, 16) if tiny else (5000, 500)
        model = build_model("resnet", input_shape=(3, 32, 32), num_classes=10, width=0.25 if tiny else 1.0,
                            depth=8 if tiny else 20, norm="batch").to(dev)
        x, y = make_images(n, seed=1)
        loss = train_briefly(model, (x, y), 3 if tiny else train_steps)
        batches = [(xb.to(dev), yb.to(dev)) for xb, yb in zip(x.split(bs), y.split(bs))]
        desc = f"ResNet-{8 if tiny else 20}, {n} CIFAR-shaped images in {len(batches)} batches of {bs}, loss {loss:.3f}"
        return model, batches, nn.functional.cross_entropy, desc
    if name == "gpt2":
        model = GPT2Logits(tiny).to(dev).eval()
        vocab = model.lm.config.vocab_size
        nb, B, T = (2, 2, 8) if tiny else (4, 8, 256)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randint(0, vocab, (B, T), generator=g).to(dev), torch.randint(0, vocab, (B, T), generator=g).to(dev))
                   for _ in range(nb)]
        desc = f"GPT-2{' (tiny config)' if tiny else '-small config'}, random weights, {nb} batches of {B}x{T} random tokens"
        return model, batches, lm_loss, desc
    raise ValueError(f"workload: expected cnn, resnet20 or gpt2, got {name!r}")
