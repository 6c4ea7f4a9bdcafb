"""``python -m logitcache ...`` (and ``torchrun -m logitcache ...``) runs the command-line app."""

from logitcache.cli import main

main()
