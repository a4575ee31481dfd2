"""DP variants of ddcore's methods; importing this package registers ``dp-gm`` and ``dp-dm``."""

from privacy.methods import dp_dm, dp_gm
from privacy.methods.base import dp_plan, private_start

__all__ = ["dp_dm", "dp_gm", "dp_plan", "private_start"]
