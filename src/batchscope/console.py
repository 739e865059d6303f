"""What `batchscope` prints, shared by the CLI and the data-parallel workers that `launch` starts."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

out = Console()
err = Console(stderr=True)


def progress_bars() -> Progress:
    # rich stays quiet when stdout is not a terminal (CI logs, pipes)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=out,
        disable=not out.is_terminal,
        transient=True,
    )


def final_line(final: dict) -> str:
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "weight_distance", "steps")
    return "  ".join(f"{k}={final[k]:.4g}" for k in keys if isinstance(final.get(k), (int, float)))
