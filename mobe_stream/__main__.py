"""`python -m mobe_stream` runs the CLI (torchrun and other launchers take a module)."""

from .cli import main

main()
