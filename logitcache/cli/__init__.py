"""The ``logitcache`` command line: a thin Typer app over the library (``logitcache.cli.commands``, and
``logitcache.cli.sweep`` for ``logitcache sweep``)."""

from logitcache.cli.commands import app, main
from logitcache.cli.sweep import sweep

app.command(name="sweep")(sweep)

__all__ = ["app", "main"]
