"""``python -m pipeline.evaluate``: measure a model bundle (see :mod:`pipeline.evaluation.evaluate`)."""

from __future__ import annotations

from pipeline.evaluation.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    from pipeline.core.cli import run_cli

    run_cli(main)
