"""What a person sees in an 80-column terminal: one line per progress bar, --help readable (no squeezed column)."""

import re

import pytest
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from logitcache.cli import app
from logitcache.progress import progress_columns


@pytest.mark.parametrize("label", ["epoch 10/10 acc 0.8123", "build view 3/4, unit 118/118"])
def test_a_progress_bar_is_one_line_at_80_columns(label):
    console = Console(width=80, record=True)
    bar = Progress(*progress_columns(label), console=console, auto_refresh=False)
    task = bar.add_task(label, total=1_281_167)
    bar.advance(task, 1_281_000)
    console.print(bar.make_tasks_table(bar.tasks))
    lines = console.export_text().splitlines()
    assert len(lines) == 1 and "/s" in lines[0] and "1281000/1281167" in lines[0], lines


@pytest.mark.parametrize("command", ["build", "train", "verify", "sweep"])
def test_help_at_80_columns_wraps_descriptions_under_their_flags(command):
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    # every description column starts at the same indent, at most 34 characters in: 45 or more are left for text
    indents = {len(m.group(1)) for line in lines if (m := re.match(r"^(\s{20,})\S", line))}
    assert indents and max(indents) <= 34, indents
    if command in ("build", "train"):
        assert "--workers" in r.output and "auto: the CPUs" in r.output
