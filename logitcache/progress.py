"""One progress bar style for long work: done/total, samples/s, elapsed and remaining time, on one line of an
80-column terminal; a no-op when disabled."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.console import Console
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "--/s", style="cyan")


def progress_columns(label: str, unit: str = "samples") -> list[ProgressColumn]:
    """The columns: ``label``, a short bar, done/total, rate, elapsed and remaining time (about 75 characters with a
    30-character label, so a line fits 80 columns)."""
    return [
        TextColumn(f"[bold]{label}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(compact=True),
    ]


@contextlib.contextmanager
def progress_bar(
    label: str, total: int, enabled: bool = True, unit: str = "samples", console: Console | None = None
) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` for ``total`` units of work (``unit``: what the rate counts, per second)."""
    if not enabled:
        yield lambda n: None
        return
    with Progress(*progress_columns(label, unit), console=console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def note(text: str, enabled: bool = True) -> None:
    """One dim line on stderr (what a command chose for the user), or nothing when progress is off."""
    if enabled:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[dim]{text}[/]", highlight=False)
