"""Figures with error bars over seeds: matplotlib's object API on the Agg canvas, never pyplot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, FuncFormatter, LogLocator, NullFormatter

from ..stats import Summary, summarize

PANEL = (4.2, 3.0)  # inches per panel
DPI = 150
BAND_ALPHA = 0.25
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def style_axes(ax: Axes) -> None:
    """The house style: light grid, no top/right spines, small ticks."""
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(which="both", labelsize=8)
    ax.xaxis.label.set_size(9)
    ax.yaxis.label.set_size(9)
    ax.title.set_size(10)


def new_figure(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = PANEL) -> tuple[Figure, Any]:
    """(figure, axes) on an Agg canvas: one Axes for 1 x 1, else a 2-D array of them."""
    # No pyplot: no global figure registry to leak, no GUI backend, safe from threads.
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        style_axes(ax)
    return fig, (axes[0, 0] if nrows == ncols == 1 else axes)


def log_ticks(ax: Axes, values: Any, axis: Literal["x", "y"] = "x") -> None:
    """Log scale with one plainly labelled tick per value (batch sizes, learning rates), no minor labels."""
    # Matplotlib's default labels a sub-decade log axis with overlapping minor ticks like "3x10^1".
    v = sorted({float(t) for t in np.asarray(values, dtype=float).ravel() if t > 0})
    which = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    which.set_major_locator(FixedLocator(v))
    which.set_major_formatter(FixedFormatter([f"{t:g}" for t in v]))
    which.set_minor_formatter(NullFormatter())


def plain_log(ax: Axes, axis: Literal["x", "y"] = "x") -> None:
    """Log scale for measured values (not a grid): ticks at 1, 2, 5 x 10^k labelled plainly, no minor labels."""
    which = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    which.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    which.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    which.set_minor_formatter(NullFormatter())


def _seed_grid(x: Any, ys_by_seed: Any) -> tuple[np.ndarray, np.ndarray]:
    xv = np.asarray(x, dtype=float)
    y = np.asarray(ys_by_seed, dtype=float)
    if y.ndim == 1:
        y = y[None, :]
    if xv.ndim != 1 or y.ndim != 2 or y.shape[1] != len(xv):
        raise ValueError(f"ys_by_seed must be seeds x len(x) = (*, {len(xv)}), got shape {y.shape}")
    return xv, y


def _with_n(label: str | None, n: np.ndarray) -> str | None:
    if label is None or n.size == 0:
        return label
    lo, hi = int(n.min()), int(n.max())
    return f"{label} (n={lo})" if lo == hi else f"{label} (n={lo}-{hi})"


def _spread(s: Summary, kind: str) -> np.ndarray:
    if kind not in ("sd", "sem"):
        raise ValueError(f"spread must be 'sd' or 'sem', got {kind!r}")
    return np.asarray(s.std if kind == "sd" else s.sem, dtype=float)


def line_with_band(
    ax: Axes,
    x: Any,
    ys_by_seed: Any,
    label: str | None = None,
    *,
    band: Literal["sd", "sem"] = "sd",
    color: str | None = None,
    show_n: bool = True,
) -> Summary:
    """Mean over seeds as a line, mean ± sd (or sem) as a band; NaN cells skipped. Returns the summary."""
    xv, y = _seed_grid(x, ys_by_seed)
    s = summarize(y, axis=0)
    mean, err = np.asarray(s.mean, dtype=float), _spread(s, band)
    (line,) = ax.plot(xv, mean, color=color, linewidth=1.5, label=_with_n(label, s.n) if show_n else label)
    ax.fill_between(xv, mean - err, mean + err, color=line.get_color(), alpha=BAND_ALPHA, linewidth=0)
    if label is not None:
        ax.legend(fontsize=8, frameon=False)
    return s


def errorbar_points(
    ax: Axes,
    x: Any,
    ys_by_seed: Any,
    label: str | None = None,
    *,
    err: Literal["sd", "sem"] = "sd",
    color: str | None = None,
    show_seeds: bool = True,
    show_n: bool = True,
) -> Summary:
    """Mean over seeds ± sd (or sem) at each x, with the single seeds as faint dots. Returns the summary."""
    xv, y = _seed_grid(x, ys_by_seed)
    s = summarize(y, axis=0)
    bars = ax.errorbar(
        xv, np.asarray(s.mean, dtype=float), yerr=_spread(s, err), color=color, marker="o", markersize=4,
        capsize=3, linewidth=1.2, label=_with_n(label, s.n) if show_n else label,
    )
    if show_seeds:
        c = bars[0].get_color()
        xs = np.broadcast_to(xv, y.shape)
        ax.scatter(xs[np.isfinite(y)], y[np.isfinite(y)], s=8, color=c, alpha=0.35, linewidths=0, zorder=1)
    if label is not None:
        ax.legend(fontsize=8, frameon=False)
    return s


def save(fig: Figure, out_dir: str | Path, name: str) -> Path:
    """Write `fig` as out_dir/name.png and return the path."""
    name = name.removesuffix(".png")
    if not _NAME.match(name):
        raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-', '.' (no path)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    # Fixed metadata: the same figure gives the same bytes, whatever matplotlib version wrote it.
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path
