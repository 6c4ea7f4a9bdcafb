"""``python -m logitcache ...`` (and ``torchrun -m logitcache ...``) runs the command-line app."""

from .cli import main

main()
