"""Validation of the per-data-set `**options` passed to `load_dataset`."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from batchscope.errors import DataError


def resolve_options(name: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` updated with `given`; an option not in `defaults` is a DataError listing the accepted ones."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        accepted = ", ".join(sorted(defaults)) or "none"
        raise DataError(f"{name}: unknown option(s) {', '.join(unknown)} (accepted: {accepted})")
    return {**defaults, **given}


def int_option(name: str, key: str, value: Any, minimum: int) -> int:
    """`value` as an int >= minimum, else a DataError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DataError(f"{name}: option {key}={value!r}, expected an integer >= {minimum}")
    return int(value)


def float_option(name: str, key: str, value: Any, low: float, high: float) -> float:
    """`value` as a float in the open interval (low, high), else a DataError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < value < high:
        raise DataError(f"{name}: option {key}={value!r}, expected a number in ({low}, {high})")
    return float(value)


def choice_option(name: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a DataError."""
    if value not in choices:
        raise DataError(f"{name}: option {key}={value!r}, expected one of {', '.join(choices)}")
    return value
