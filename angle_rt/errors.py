"""Typed errors. Each subclass also inherits the built-in a caller would catch."""

from __future__ import annotations


class AngleRTError(Exception):
    """Base class of every error angle_rt raises on purpose."""


class BundleError(AngleRTError, ValueError):
    """A bundle is missing, damaged or mismatched; the message says what to rebuild."""


class ChecksumError(BundleError):
    """A bundle file's sha256 differs from the manifest."""


class BundleVersionError(BundleError):
    """The bundle was written in a format this angle_rt cannot read."""


class BackendUnavailableError(AngleRTError, RuntimeError):
    """The requested backend (or its package) is not usable here."""


class ParityError(AngleRTError, RuntimeError):
    """Exported outputs diverge from the reference beyond the precision's threshold."""


class ClosedError(AngleRTError, RuntimeError):
    """The Encoder (or session) was closed; open a new one to encode again."""
