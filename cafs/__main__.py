"""`python -m cafs`: the command line (cafs.cli), as the `cafs` script runs it."""

from cafs.cli import main

main()
