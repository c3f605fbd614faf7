"""Errors raised by ``models/`` for files the user points us at (weights, bundles).

Both subclass :class:`pipeline.core.errors.ConfigError` (the path comes from a config or the
command line), so command-line layers print them as one-line ``error: ...`` messages.
"""

from __future__ import annotations

from pipeline.core.errors import ConfigError


class WeightsError(ConfigError):
    """An initial-weights file is missing, unreadable, or does not fit the backbone."""


class BundleError(ConfigError):
    """A model bundle is missing files, has the wrong format version, or was tampered with."""
