"""What several test files share: the command line run as a user runs it, a tiny run spec, a process's
liveness, the claims a reproduction wrote, and the dense Hessian the curvature instruments are checked
against. A plain module, imported as `helpers`: tests/ is on sys.path (pytest puts conftest.py's folder
there; the folders have no __init__.py)."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from batchscope.spec import RunSpec

# -- the command line --------------------------------------------------------------------------------

# A 2 x 2 sweep of tiny runs as a spec file; `epochs` is filled in with .format(epochs=...).
SWEEP_SPEC = """
name = "t"
[data]
name = "gaussian_mixture"
n_train = 512
n_test = 128
options = {{dim = 8, num_classes = 4}}
[model]
name = "mlp"
width = 0.05
depth = 2
[train]
epochs = {epochs}
[log]
log_points = 5
resume_every_s = 0
[grid]
"train.batch_size" = [16, 64]
"optim.lr" = [0.05, 0.1]
"""


def cli(*args, cwd, check=True, threads: int | None = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m batchscope.cli *args` in `cwd`, its output captured, with COLUMNS=200 (tables unwrapped).

    threads: the child's OMP_NUM_THREADS (None: inherited from this process's environment); env: more
    variables for the child; check: a non-zero exit raises AssertionError with the output."""
    child_env = {**os.environ, "COLUMNS": "200"}
    if threads is not None:
        child_env["OMP_NUM_THREADS"] = str(threads)
    child_env.update(env or {})
    r = subprocess.run([sys.executable, "-m", "batchscope.cli", *args], cwd=cwd, capture_output=True, text=True, env=child_env)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stdout}\n{r.stderr}")
    return r


def alive(pid: int) -> bool:
    """Whether process `pid` is running (not a zombie); reads /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def read_claims(out) -> tuple[dict, dict]:
    """A report folder's claims.json, and its claims by id."""
    doc = json.loads((out / "claims.json").read_text())
    return doc, {c["id"]: c for c in doc["claims"]}


# -- tiny data files ---------------------------------------------------------------------------------


def write_cifar_bin(root, name: str = "cifar10", *, n_train: int = 100, n_test: int = 40, classes: int = 4,
                    seed: int = 0):
    """Tiny CIFAR-10 (cifar-10-batches-bin: 5 training files and a test file) or CIFAR-100 (cifar-100-binary:
    train.bin, test.bin, coarse and fine label bytes) in the binary format, and its directory. Learnable: each
    image is its class's random template plus noise, labels in 0 .. classes - 1, so tiny nets fit them in a few
    epochs."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (classes, 3072)).astype(np.float64)
    label_bytes = 1 if name == "cifar10" else 2

    def records(n: int) -> bytes:
        labels = rng.integers(0, classes, n)
        pixels = np.clip(0.7 * templates[labels] + 0.3 * rng.integers(0, 256, (n, 3072)), 0, 255).astype(np.uint8)
        return np.concatenate([np.repeat(labels[:, None], label_bytes, 1).astype(np.uint8), pixels], axis=1).tobytes()

    if name == "cifar10":
        d = root / "cifar-10-batches-bin"
        d.mkdir(parents=True)
        assert n_train % 5 == 0, "CIFAR-10 has 5 training files"
        for i in range(1, 6):
            (d / f"data_batch_{i}.bin").write_bytes(records(n_train // 5))
        (d / "test_batch.bin").write_bytes(records(n_test))
    elif name == "cifar100":
        d = root / "cifar-100-binary"
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(records(n_train))
        (d / "test.bin").write_bytes(records(n_test))
    else:
        raise ValueError(f"{name}: expected cifar10 or cifar100")
    return d


# -- a tiny run --------------------------------------------------------------------------------------

# A 4-class Gaussian mixture and a small MLP: a run trains in well under a second.
TINY = {
    "data": {"name": "gaussian_mixture", "n_train": 256, "n_test": 128, "options": {"dim": 8, "num_classes": 4}},
    "model": {"name": "mlp", "width": 0.05, "depth": 2},
    "optim": {"lr": 0.1, "momentum": 0.9},
    "train": {"batch_size": 32, "epochs": 3},
    "log": {"log_points": 5},
}


def tiny_body(*, base: dict = TINY, **over) -> dict:
    """A copy of `base` with `section__key=value` overrides: tiny_body(optim__lr=0.05)."""
    body = copy.deepcopy(base)
    for path, value in over.items():
        section, key = path.split("__")
        body.setdefault(section, {})[key] = value
    return body


# The executors' tiny run: float64, so fused and serial runs agree to 1e-9, and 2 epochs.
TINY_F64 = tiny_body(train__epochs=2, train__dtype="float64")


def tiny_spec(*, base: dict = TINY, **over) -> RunSpec:
    """The RunSpec of tiny_body(base=base, **over)."""
    return RunSpec.model_validate(tiny_body(base=base, **over))


# -- a user's own factories -------------------------------------------------------------------------

# A module of a user's model, data and loss factories (and wrong ones), as a file: write_user_module puts it in a
# folder, which the tests put on sys.path and PYTHONPATH. The same text under the same name in every test, so that
# a copy already imported (sys.modules) is this one.
USER_MODULE = '''
import numpy as np
import torch
from torch import nn


def mlp(input_shape, num_classes, hidden=16, dropout=0.0):
    layers = [nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden), nn.Tanh()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(hidden, num_classes))


def teacher(n_train=256, n_test=64, dim=8, seed=0):
    """Regression on a tiny random teacher: y = tanh(x w1) w2 + noise, float targets of shape (N,)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(dim, 4, generator=g), torch.randn(4, generator=g)
    x = torch.randn(n_train + n_test, dim, generator=g)
    y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n_train + n_test, generator=g)
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


def mse(outputs, targets):
    return ((outputs.squeeze(-1) - targets) ** 2).mean()


class Blobs:
    """A map-style dataset of (numpy input, int label) pairs: 3 Gaussian blobs in 5 dimensions."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, 3, n)
        self.x = (rng.normal(size=(n, 5)) + 2 * np.eye(5)[self.y]).astype(np.float32)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def blobs(seed=0):
    return Blobs(200, seed), Blobs(60, seed + 1)


def tokens(n=160, length=6, vocab=5, seed=0):
    """Token-level: integer inputs (N, L), each target the previous input token (the first: the last)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = torch.roll(x, 1, dims=1)
    return x[:128], y[:128], x[128:], y[128:]


class Tokens(nn.Module):
    def __init__(self, input_shape, num_classes, width=8):
        super().__init__()
        self.length, self.vocab = input_shape[0], num_classes
        self.embed = nn.Embedding(num_classes, width)
        self.mix = nn.Linear(width * self.length, self.length * num_classes)

    def forward(self, x):
        return self.mix(self.embed(x).flatten(1)).view(x.shape[0], self.length, self.vocab)


NOT_CALLABLE = 3


def not_a_model(input_shape, num_classes):
    return {"weights": 1}


def not_data():
    return "data.csv"


def per_example_loss(outputs, targets):
    return (outputs.squeeze(-1) - targets) ** 2
'''
USER_MODULE_NAME = "bs_user_factories"


def write_user_module(folder) -> str:
    """USER_MODULE as `folder`/bs_user_factories.py; returns the module's name."""
    (folder / f"{USER_MODULE_NAME}.py").write_text(USER_MODULE)
    return USER_MODULE_NAME


# -- the dense Hessian -------------------------------------------------------------------------------


def dense_hessian(model: nn.Module, loss_fn, batches, bn_mode: str = "eval") -> torch.Tensor:
    """The exact Hessian of sum_b (n_b/N) loss_b in the measurement configuration, built by hand.

    A deep copy of the model in eval mode, its batch norms in train mode (batch statistics, no update of
    the running ones) if bn_mode == "train", called through `functional_call` on the flat parameters
    (in `parameters()` order) and differentiated twice by `torch.autograd.functional.hessian`."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and bn_mode == "train":
            m.train()
            m.track_running_stats = False
    names = [n for n, p in ref.named_parameters()]
    shapes = [p.shape for p in ref.parameters()]
    numels = [p.numel() for p in ref.parameters()]
    buffers = {n: b.clone() for n, b in ref.named_buffers()}
    theta0 = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    N = sum(x.shape[0] for x, _ in batches)

    def f(theta):
        params = {n: t.view(s) for n, t, s in zip(names, theta.split(numels), shapes)}
        return sum(x.shape[0] / N * loss_fn(functional_call(ref, {**buffers, **params}, (x,)), y) for x, y in batches)

    return torch.autograd.functional.hessian(f, theta0)
