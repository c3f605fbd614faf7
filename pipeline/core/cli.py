"""Shared plumbing for the thin command-line layers: logging set-up and one-line errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.core.errors import PipelineError

EXIT_BAD_INPUT = 2


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Log to stderr: WARNING when quiet, DEBUG when verbose, INFO otherwise."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run ``main`` and exit with its status; a PipelineError prints ``error: <message>``, no traceback."""
    try:
        code = main(argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
