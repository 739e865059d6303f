"""A user's own model, data and loss, named in a spec as "package.module:callable".

The callable is imported by name wherever a run is built: in this process, in the process executor's workers
(spawned: they start with this process's sys.path and environment) and on Ray workers (the Ray executor ships
the modules that are not installed packages with its tasks: `shippable_modules`, `pack_modules`,
`unpack_modules`). What a factory returns is checked here, so that one that cannot be imported, or returns the
wrong thing, fails in one line naming it and what was expected.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import Dataset
from .errors import BatchscopeError, DataError

__all__ = [
    "as_dataset", "build_user_model", "load_user_data", "pack_modules", "resolve", "shippable_modules", "unpack_modules",
    "user_loss",
]

_SPLITS = ("x_train", "y_train", "x_test", "y_test")


def resolve(ref: str, what: str) -> Callable[..., Any]:
    """The callable "package.module:attr" names; `what` ("model", "data", "loss") starts every error line."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name != err.name and not module_name.startswith(err.name + "."):
            raise BatchscopeError(f"{what} {ref!r}: importing {module_name} failed: {_first_line(err)}") from err
        raise BatchscopeError(
            f"{what} {ref!r}: no module named {module_name!r} here; it must be importable wherever runs train "
            f"(put its folder on PYTHONPATH, or install it){_here_hint(module_name)}"
        ) from None
    except Exception as err:  # the module itself raised on import
        raise BatchscopeError(f"{what} {ref!r}: importing {module_name} raised {type(err).__name__}: {_first_line(err)}") from err
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            raise BatchscopeError(f"{what} {ref!r}: {where} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BatchscopeError(f"{what} {ref!r}: is a {type(obj).__name__}, not a callable")
    return obj


def _here_hint(module_name: str) -> str:
    top = module_name.split(".")[0]
    cwd = Path.cwd()
    if (cwd / f"{top}.py").is_file() or (cwd / top).is_dir():
        return "; it is in the current folder, which a console script does not search: PYTHONPATH=. finds it"
    return ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` accepts the keyword argument `name` (by name, or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass nothing unasked
        return False
    return any(
        (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or p.kind == p.VAR_KEYWORD for p in params
    )


def _call(what: str, ref: str, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    try:
        return fn(**kwargs)
    except BatchscopeError:
        raise
    except Exception as err:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise BatchscopeError(
            f"{what} {ref!r}: calling it with ({args}) raised {type(err).__name__}: {_first_line(err)}"
        ) from err


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    kind = type(value)
    return f"a {kind.__name__}" if kind.__module__ == "builtins" else f"a {kind.__module__}.{kind.__qualname__}"


# -- the model --------------------------------------------------------------------------------------


def build_user_model(ref: str, options: Mapping[str, Any], *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """model = "pkg.mod:fn": fn(**options), with input_shape and num_classes added where fn takes them (options win)."""
    fn = resolve(ref, "model")
    given = {"input_shape": tuple(input_shape), "num_classes": int(num_classes)}
    kwargs = {**{k: v for k, v in given.items() if _takes(fn, k)}, **options}
    model = _call("model", ref, fn, kwargs)
    if not isinstance(model, nn.Module):
        raise BatchscopeError(f"model {ref!r}: returned {_describe(model)}; expected a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise BatchscopeError(f"model {ref!r}: returned a module with no trainable parameters")
    return model


# -- the data ---------------------------------------------------------------------------------------


def load_user_data(ref: str, options: Mapping[str, Any], *, path: str | None, seed: int) -> Dataset:
    """data = "pkg.mod:fn": fn(**options), with `seed` added where fn takes it and `path` where the spec sets one."""
    fn = resolve(ref, "data")
    kwargs = dict(options)
    if path is not None:
        if not _takes(fn, "path"):
            raise BatchscopeError(f"data {ref!r}: data.path is set, but the factory takes no `path` argument")
        kwargs.setdefault("path", path)
    if _takes(fn, "seed"):
        kwargs.setdefault("seed", seed)
    return as_dataset(_call("data", ref, fn, kwargs), ref)


_EXPECTED = ("expected a batchscope Dataset; tensors or arrays (x_train, y_train, x_test, y_test), as a tuple or a dict "
             "with those keys; or (train, test) map-style torch Datasets of (x, y) pairs, as a tuple or a dict with keys "
             "train and test")


def as_dataset(value: Any, name: str) -> Dataset:
    """What a data factory returned, as the in-memory Dataset the training loop indexes (see `DataSpec.name`)."""
    if isinstance(value, Dataset):
        return value
    num_classes = None
    if isinstance(value, Mapping):
        keys = set(value) - {"num_classes"}
        num_classes = value.get("num_classes")
        if keys == set(_SPLITS):
            value = tuple(value[k] for k in _SPLITS)
        elif keys == {"train", "test"}:
            value = (value["train"], value["test"])
        else:
            raise BatchscopeError(f"data {name!r}: returned a dict with keys {sorted(value)}; {_EXPECTED}")
    if isinstance(value, (tuple, list)) and len(value) == 4 and all(_is_array(v) for v in value):
        tensors = [_tensor(v) for v in value]
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_map_style(v) for v in value):
        tensors = [*_stack(value[0], name, "train"), *_stack(value[1], name, "test")]
    else:
        raise BatchscopeError(f"data {name!r}: returned {_describe(value)}; {_EXPECTED}")
    x_train, y_train, x_test, y_test = tensors
    for split, x in (("train", x_train), ("test", x_test)):
        if x.dim() == 0 or x.shape[0] == 0:
            raise BatchscopeError(f"data {name!r}: x_{split} holds no examples (shape {tuple(x.shape)})")
    xs = [x if x.is_floating_point() else x.long() for x in (x_train, x_test)]  # integers: token ids
    ys = [y if y.is_floating_point() else y.long() for y in (y_train, y_test)]
    if ys[0].is_floating_point() != ys[1].is_floating_point():
        raise BatchscopeError(
            f"data {name!r}: y_train is {ys[0].dtype} but y_test {ys[1].dtype}; expected both labels or both targets"
        )
    if num_classes is None:
        if ys[0].is_floating_point():  # regression: the model's outputs per example
            num_classes = math.prod(ys[0].shape[1:])
        else:
            num_classes = max((int(y.max()) for y in ys if y.numel()), default=0) + 1
    try:
        return Dataset(name, xs[0], ys[0], xs[1], ys[1], int(num_classes), tuple(x_train.shape[1:]))
    except DataError as err:
        raise BatchscopeError(f"data {name!r}: {str(err).removeprefix(name + ': ')}") from None


def _is_array(v: Any) -> bool:
    return isinstance(v, (Tensor, np.ndarray))


def _tensor(v: Tensor | np.ndarray) -> Tensor:
    return v.detach().cpu() if isinstance(v, Tensor) else torch.from_numpy(np.ascontiguousarray(v))


def _is_map_style(v: Any) -> bool:
    return hasattr(v, "__getitem__") and hasattr(v, "__len__") and not _is_array(v) and not isinstance(v, (str, bytes, Mapping))


def _stack(ds: Any, name: str, split: str) -> tuple[Tensor, Tensor]:
    """A map-style dataset's (x, y) items as two stacked tensors (the whole split is read into memory)."""
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise BatchscopeError(f"data {name!r}: {split} item {i} is {_describe(item)}; expected an (x, y) pair")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        raise BatchscopeError(f"data {name!r}: the {split} dataset is empty")
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as err:
        raise BatchscopeError(f"data {name!r}: the {split} items do not stack into one tensor: {_first_line(err)}") from None


# -- the loss ---------------------------------------------------------------------------------------


def user_loss(ref: str, options: Mapping[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """loss = "pkg.mod:fn": (outputs, targets) -> fn(outputs, targets, **options), checked to be a scalar tensor
    (checking shapes only, so that it works under vmap and the function transforms)."""
    fn = resolve(ref, "loss")
    opts = dict(options)

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        value = fn(outputs, targets, **opts)
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise BatchscopeError(f"loss {ref!r}: returned {_describe(value)}; expected a scalar tensor, the mean loss "
                                  "over the batch")
        return value

    return loss


# -- Ray: the user's code, shipped to workers -------------------------------------------------------

SHIP_LIMIT = 50 * 2**20  # bytes: more than a user's own code; an installed package need not travel


def shippable_modules(refs: Iterable[str]) -> list[str]:
    """Where the top-level modules of these factories are (a package's folder, a single module's file), leaving out
    installed packages (in site-packages or the standard library), which every node has or must install: what remains
    is the user's own code, which a worker on another machine has not got."""
    installed = {os.path.realpath(p) for key, p in sysconfig.get_paths().items() if key in ("purelib", "platlib", "stdlib")}
    out: dict[str, str] = {}
    for ref in refs:
        top = ref.partition(":")[0].split(".")[0]
        module = sys.modules.get(top) or importlib.import_module(top)
        paths = list(getattr(module, "__path__", []))
        where = paths[0] if len(paths) == 1 else getattr(module, "__file__", None)
        if where is None or (paths and len(paths) != 1):
            continue  # a built-in module, or a namespace package spread over folders: nothing to ship as one
        real = os.path.realpath(where)
        if any(real.startswith(p + os.sep) for p in installed) or "site-packages" in real or "dist-packages" in real:
            continue
        out[top] = real
    return list(out.values())


def pack_modules(paths: Iterable[str]) -> dict[str, bytes]:
    """The files of these modules (`shippable_modules`) by their path relative to the folder that holds them: what a
    worker writes into a folder of its own and puts on sys.path (`unpack_modules`)."""
    files: dict[str, bytes] = {}
    for path in paths:
        root = Path(path)
        members = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for member in members:
            files[member.relative_to(root.parent).as_posix()] = member.read_bytes()
    size = sum(len(b) for b in files.values())
    if size > SHIP_LIMIT:
        raise BatchscopeError(f"executor ray: the factories' own modules ({', '.join(paths)}) hold {size / 2**20:.0f} MiB, "
                              f"more than the {SHIP_LIMIT / 2**20:.0f} MiB shipped with each task; install them on every node")
    return files


def unpack_modules(files: Mapping[str, bytes]) -> None:
    """On a worker: the shipped modules into a folder named by their content, first on sys.path, so that the factories
    import them; a module imported before from other content is forgotten (a later sweep's edited code)."""
    if not files:
        return
    digest = hashlib.sha256(b"".join(k.encode() + b"\0" + v for k, v in sorted(files.items()))).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"batchscope-code-{digest}"
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix="batchscope-code-"))
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        try:
            staging.rename(folder)  # atomic: two workers unpacking at once leave one complete folder
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    if str(folder) not in sys.path:
        tops = {rel.split("/")[0].removesuffix(".py") for rel in files}
        for name in [m for m in sys.modules if m.split(".")[0] in tops]:
            del sys.modules[name]
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
