"""The file job's errors; each also inherits the built-in a caller would catch."""

from __future__ import annotations

from angle_rt.errors import AngleRTError


class InputError(AngleRTError, ValueError):
    """The input cannot be embedded as asked: a missing column, a bad row, an unreadable
    file. The message names the column, row or id."""


class OutputExistsError(AngleRTError, FileExistsError):
    """OUTPUT (or an interrupted run's staging) exists and was written with other arguments
    or by something else; the message lists the differences and says to pass --overwrite."""


class OutputLockedError(OutputExistsError):
    """Another run is writing the same OUTPUT; the message names it (pid, host, start)."""
