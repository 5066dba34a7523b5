"""Console output shared by every stage: one rich Console on stderr, progress bars, rank-0 only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Pipes and CI logs get long unwrapped lines; a terminal gets rich wrapping and live bars.
console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """Print a line on rank 0 only (every rank would repeat it under torchrun)."""
    if is_main_process():
        console.print(msg)


@contextmanager
def progress(description: str, total: float | None, unit: str = "") -> Iterator[callable]:
    """Yield `advance(n, **fields)`; draws a bar on rank 0 when stderr is a terminal or CI log."""
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    disable = not is_main_process()
    with Progress(*cols, console=console, disable=disable, transient=False) as bar:
        task = bar.add_task(description, total=total, info=unit)

        def advance(n: float = 1, info: str | None = None) -> None:
            if info is not None:
                bar.update(task, advance=n, info=info)
            else:
                bar.update(task, advance=n)

        yield advance
