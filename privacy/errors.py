"""Exceptions raised by ``privacy``; every message says what is wrong and how to fix it."""

from __future__ import annotations

from ddcore.errors import DDCoreError


class PrivacyError(DDCoreError):
    """Base class: a privacy setting or model cannot give the privacy that was asked for.

    A ``ValueError`` (through :class:`ddcore.errors.DDCoreError`), so command lines report it
    as one line and exit with code 2.
    """


class InvalidPrivacyParameterError(PrivacyError):
    """epsilon, delta, clipping norm, noise multiplier, sample rate or steps out of range."""


class DeltaTooLargeError(InvalidPrivacyParameterError):
    """delta >= 1/n: a mechanism that publishes one whole record at random would satisfy it."""


class UnsupportedModelError(PrivacyError):
    """The model cannot be trained with per-sample gradients (e.g. BatchNorm)."""


class PrivateInitError(PrivacyError):
    """DP distillation was asked to start from real (private) images."""


class AuditError(PrivacyError):
    """An audit was asked with arguments it cannot use (confidence, canary or guess counts, scores)."""
