"""One progress bar style for long work: samples/s and ETA; a no-op when disabled."""

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
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="cyan")


@contextlib.contextmanager
def progress_bar(
    label: str, total: int, enabled: bool = True, unit: str = "samples"
) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def note(text: str, enabled: bool = True) -> None:
    """One dim line on stderr (what a command chose for the user), or nothing when progress is off."""
    if enabled:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[dim]{text}[/]", highlight=False)
