"""The ``logitcache`` command line: a thin Typer app over the library (``logitcache.cli.commands``)."""

from .commands import app, main

__all__ = ["app", "main"]
