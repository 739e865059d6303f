"""A small recurrent classifier: input projection (an embedding, on one-hot tokens), one LSTM layer, linear head.

The recurrence is written with plain tensor ops rather than `nn.LSTM`: the instruments take per-example
gradients with `torch.func.vmap(grad(...))` and Hessian-vector products by double backward or
forward-over-reverse, and the fused executor vmaps the training step over runs; `nn.LSTM`'s fused kernel is
not guaranteed to support all of these, while matmuls and pointwise gates are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from batchscope.models.blocks import NormSpec, scaled


class LSTMClassifier(nn.Module):
    """(B, L) or (B, L, F) -> (B, classes): per step x_t -> Linear(F, E) -> LSTM(E, H); the head reads h_L.

    Gates in PyTorch's order (input, forget, cell, output): i, f, o = sigmoid, g = tanh,
    c_t = f * c_{t-1} + i * g, h_t = o * tanh(c_t), from h_0 = c_0 = 0.
    """

    def __init__(self, features: int, embed: int, hidden: int, num_classes: int, length: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Linear(features, embed)  # on one-hot inputs, an embedding table plus a shared offset
        self.input_gates = nn.Linear(embed, 4 * hidden)
        self.hidden_gates = nn.Linear(hidden, 4 * hidden, bias=False)  # one bias per gate is enough
        self.head = nn.Linear(hidden, num_classes)
        # nn.LSTM's init, U(-1/sqrt(H), 1/sqrt(H)), for the recurrent weights; zero biases except the forget
        # gate's, log(L): a cell then forgets at the rate 1 - sigmoid(log L) = 1 / (L + 1) per step, so at
        # initialization it remembers across the whole input (the forget bias sets the time scale of memory,
        # Tallec & Ollivier 2018). With the common bias 1 a cell keeps 0.73^16 < 1% of a token 16 steps on,
        # and on first_marker SGD sat for hundreds of steps at chance before any loss came off.
        bound = 1.0 / math.sqrt(hidden)
        for w in (self.input_gates.weight, self.hidden_gates.weight):
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.input_gates.bias)
        with torch.no_grad():
            self.input_gates.bias[hidden : 2 * hidden].fill_(math.log(length))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(-1)  # (B, L) -> (B, L, 1): one feature per step
        gx = self.input_gates(self.embed(x))  # every step's input contribution at once: (B, L, 4H)
        n, w = self.hidden, self.hidden_gates.weight.t()
        h = x.new_zeros((x.shape[0], n))
        c = h
        # few ops a step (the loop's cost is per op, not per flop, at this size): one sigmoid over all four gates
        # (the cell's slice of it unused), unbind rather than indexing step t (whose backward writes a whole
        # (B, L, 4H) tensor every step)
        for gt in gx.unbind(1):
            z = torch.addmm(gt, h, w)
            s = torch.sigmoid(z)
            c = torch.addcmul(s[:, n : 2 * n] * c, s[:, :n], torch.tanh(z[:, 2 * n : 3 * n]))
            h = s[:, 3 * n :] * torch.tanh(c)
        return self.head(h)


def build_lstm(*, input_shape: tuple[int, ...], num_classes: int, width: float, norm: NormSpec) -> nn.Module:
    """LSTM classifier for (L,) or (L, F) inputs: embedding 32w, hidden 128w (`norm` must be none)."""
    features = input_shape[1] if len(input_shape) == 2 else 1
    return LSTMClassifier(features, scaled(32, width), scaled(128, width), num_classes, input_shape[0])
