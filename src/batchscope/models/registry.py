"""Architecture registry: `build_model` validates options and dispatches to the builders by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from batchscope.errors import ModelError
from batchscope.models.blocks import NormSpec
from batchscope.models.cnn import build_conv1d, build_keskar_shallow, build_simple_cnn
from batchscope.models.mlp import build_mlp
from batchscope.models.norm import NORM_KINDS
from batchscope.models.resnet import build_resnet, resnet_depth_ok
from batchscope.models.rnn import build_lstm
from batchscope.models.vgg import build_keskar_deep, build_vgg11


@dataclass(frozen=True)
class Architecture:
    """A builder and the options it understands; `input_ranks` lists the accepted len(input_shape)."""

    builder: Callable[..., nn.Module]
    input_ranks: tuple[int, ...] | None  # None: any rank (the MLP flattens)
    input_help: str
    default_depth: int | None = None  # None: the architecture has no depth knob
    depth_ok: Callable[[int], bool] | None = None
    depth_help: str = ""
    has_dropout: bool = False
    has_norm: bool = True  # False: no batch norm layers to put anywhere (norm must be "none")


_IMAGE = ((3,), "(C, H, W)")
_ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(
        build_mlp, None, "any shape", default_depth=5,
        depth_ok=lambda d: d >= 0, depth_help="an integer >= 0 (hidden layers)", has_dropout=True,
    ),
    "keskar_shallow": Architecture(build_keskar_shallow, *_IMAGE, has_dropout=True),
    "keskar_deep": Architecture(build_keskar_deep, *_IMAGE, has_dropout=True),
    "simple_cnn": Architecture(build_simple_cnn, *_IMAGE),
    "resnet": Architecture(
        build_resnet, *_IMAGE, default_depth=20,
        depth_ok=resnet_depth_ok, depth_help="6n+2 (20, 32, 44, 56, ...)",
    ),
    "vgg11": Architecture(build_vgg11, *_IMAGE),
    "conv1d": Architecture(build_conv1d, (1, 2), "(L,) or (C, L)"),
    "lstm": Architecture(build_lstm, (1, 2), "(L,) or (L, F)", has_norm=False),
}  # fmt: skip


def available_models() -> list[str]:
    """Names accepted by `build_model`, sorted."""
    return sorted(_ARCHITECTURES)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
    depth: int | None = None,
    norm: str = "none",
    ghost_size: int = 128,
    dropout: float = 0.0,
    bn_momentum: float = 0.1,
) -> nn.Module:
    """A freshly initialised `name` network mapping (B, *input_shape) to (B, num_classes) logits."""
    arch = _ARCHITECTURES.get(name)
    if arch is None:
        raise ModelError(f"model {name!r}: expected one of {', '.join(available_models())}")
    input_shape = _check_input_shape(name, arch, input_shape)
    if not _is_int(num_classes) or num_classes < 1:
        raise ModelError(f"num_classes {num_classes!r}: expected an integer >= 1")
    if not _is_number(width) or not width > 0:
        raise ModelError(f"width {width!r}: expected a number > 0")
    if norm not in NORM_KINDS:
        raise ModelError(f"norm {norm!r}: expected one of {', '.join(NORM_KINDS)}")
    if norm != "none" and not arch.has_norm:
        raise ModelError(f"norm {norm!r}: {name} has no batch norm; expected none")
    if not _is_int(ghost_size) or ghost_size < 1:
        raise ModelError(f"ghost_size {ghost_size!r}: expected an integer >= 1")
    if not _is_number(bn_momentum) or not 0 < bn_momentum <= 1:
        raise ModelError(f"bn_momentum {bn_momentum!r}: expected a number in (0, 1]")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ModelError(f"dropout {dropout!r}: expected a number in [0, 1)")
    if dropout > 0 and not arch.has_dropout:
        raise ModelError(f"dropout {dropout!r}: {name} has no dropout; expected 0")

    kwargs: dict[str, object] = {"input_shape": input_shape, "num_classes": num_classes, "width": float(width)}
    kwargs["norm"] = NormSpec(norm, ghost_size, float(bn_momentum))
    if arch.has_dropout:
        kwargs["dropout"] = float(dropout)
    if arch.default_depth is not None:
        depth = arch.default_depth if depth is None else depth
        if not _is_int(depth) or (arch.depth_ok is not None and not arch.depth_ok(depth)):
            raise ModelError(f"{name} depth {depth!r}: expected {arch.depth_help}")
        kwargs["depth"] = depth
    elif depth is not None:
        raise ModelError(f"depth {depth!r}: {name} has no depth option; expected None")
    return arch.builder(**kwargs)


def _check_input_shape(name: str, arch: Architecture, shape: object) -> tuple[int, ...]:
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) > 0
        and all(_is_int(s) and s >= 1 for s in shape)
        and (arch.input_ranks is None or len(shape) in arch.input_ranks)
    )
    if not ok:
        raise ModelError(f"{name} input_shape {shape!r}: expected {arch.input_help} of positive integers")
    return tuple(int(s) for s in shape)  # type: ignore[union-attr]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
