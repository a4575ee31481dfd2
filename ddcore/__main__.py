"""``python -m ddcore``: see :mod:`ddcore.cli`."""

import sys

from ddcore.cli import build_parser, main

__all__ = ["build_parser", "main"]  # the parser of this command line, for tests that check the docs

if __name__ == "__main__":
    sys.exit(main())
