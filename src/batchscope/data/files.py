"""Helpers shared by the loaders of user-supplied files: locating them and reading raw bytes."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

from batchscope.errors import DataError


def require_dir(path: str | os.PathLike | None, name: str, expected: str) -> Path:
    """`path` as a Path if it is an existing directory, else a DataError saying what it should hold."""
    if path is None:
        raise DataError(f"{name}: a path is required (the directory holding {expected})")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such directory (expected the directory holding {expected})")
    if not p.is_dir():
        raise DataError(f"{p}: not a directory (expected the directory holding {expected})")
    return p


def find_file(directory: Path, names: Iterable[str], expected: str) -> Path:
    """The first of `names` that exists in `directory`, else a DataError listing what was looked for."""
    names = list(names)
    for n in names:
        if (directory / n).is_file():
            return directory / n
    raise DataError(f"{directory}: no {' or '.join(names)} found (expected {expected})")


def read_bytes(path: Path, expected: str) -> bytes:
    """The contents of `path`, gunzipped if its name ends in .gz; unreadable or corrupt → DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file (expected {expected})") from e
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data (expected {expected})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}; expected {expected})") from e
