"""``python -m ddcore``: see :mod:`ddcore.cli`."""

import sys

from ddcore.cli import main

sys.exit(main())
