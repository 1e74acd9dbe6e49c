"""`python -m mammodp` runs the CLI (the path torchrun and subprocess tests use)."""

from mammodp.cli import main

main()
