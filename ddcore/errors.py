"""Exceptions raised by ddcore; every message names the problem and the fix."""

from __future__ import annotations


class DDCoreError(ValueError):
    """Base class of the errors ddcore raises for bad input."""


class UnknownNameError(DDCoreError):
    """A registry lookup used a name that is not registered."""


class DataError(DDCoreError):
    """A dataset could not be found, read or split as asked."""


class ConfigError(DDCoreError):
    """A configuration value is out of its accepted range."""


class SummaryError(DDCoreError):
    """A summary is malformed (wrong shape, dtype, values or labels)."""
