"""``python -m logitcache ...`` (and ``torchrun -m logitcache ...``) runs the command-line app."""

from cli.main import main

main()
