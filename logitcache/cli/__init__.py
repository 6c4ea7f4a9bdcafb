"""The ``logitcache`` command line: a thin Typer app over the library (``logitcache.cli.commands``, and
``logitcache.cli.sweep`` for ``logitcache sweep``)."""

from .commands import app, main
from .sweep import sweep

app.command(name="sweep")(sweep)

__all__ = ["app", "main"]
