"""Exceptions whose message is a complete, one-line explanation for the user.

Command-line layers catch :class:`PipelineError` and print ``error: <message>`` without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: the message names the file or field and the cause, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class SlideError(PipelineError):
    """A slide cannot be opened or read (missing, empty, unsupported, corrupt)."""


class MPPError(SlideError):
    """The slide's resolution (microns per pixel) is missing or implausible."""


class ConfigError(PipelineError):
    """A configuration file or command-line value is invalid."""


class DataError(PipelineError):
    """Training/inference data (labels, annotations, clinical context) is invalid."""
