#!/usr/bin/env python
"""Train the patch model and/or the slide aggregator from one YAML config.

    python train.py --config configs/demo.yaml [--set train.epochs=2 --set seed=1] [--quiet]
    python train.py --config my.yaml --check     # validate config and data, print the counts, train nothing

The config schema is ``pipeline/training/config.py`` (unknown keys are errors). The run folder
(``output_dir``) receives the resolved config, splits, logs, metrics and the model bundle; run
the same command again to resume an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pipeline  # noqa: F401 - sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported
from pipeline.core.cli import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )
    ap.add_argument("--quiet", action="store_true", help="warnings and errors only")
    ap.add_argument(
        "--check",
        action="store_true",
        help="validate the config and the data (tables, annotations, splits, minimum data), print the counts "
        "as JSON and exit without training or writing into the run folder",
    )
    args = ap.parse_args(argv)
    setup_logging(quiet=args.quiet)
    from pipeline.core.config import load_config
    from pipeline.training.config import RunConfig

    cfg = load_config(RunConfig, args.config, args.overrides)  # config errors surface before heavy imports
    if args.check:
        import json

        from pipeline.training.run import prepare_run

        prepared = prepare_run(cfg, write=False)
        print(json.dumps({"ok": True, "task": cfg.task, "output_dir": str(prepared.run_dir), **prepared.counts}))
        return 0
    from pipeline.training.run import run_training

    bundle = run_training(cfg)
    from pipeline.training.distributed import env_ranks

    ranks = env_ranks()
    if ranks is None or ranks[0] == 0:  # under torchrun only rank 0 reports
        print("\n".join(closing_lines(bundle)))
    return 0


def closing_lines(bundle: Path) -> list[str]:
    """What the run made: the bundle, where a fine-tune started, which reviews it learnt from, and
    whether ``infer.py`` can run it (a ``task: patch`` bundle has no slide aggregator)."""
    from models.bundle import read_contract

    contract = read_contract(bundle)
    lines = [f"bundle: {bundle}"]
    start = contract.training.init_bundle
    if start:
        lines.append(f"fine-tuned from: {start.get('path')} ({start.get('name')} {start.get('version')})")
    for src in contract.training.reviews or []:
        n = len(src.get("slides", []))
        lines.append(
            f"reviews: {n} slide(s) of {src.get('out_dir')} by {', '.join(src.get('reviewers') or ['?'])} "
            f"(last {src.get('last_review_at')}), used for {' and '.join(src.get('used_for') or ['nothing'])}; "
            "recorded in bundle.json (training.reviews)"
        )
    if contract.aggregator is None:
        lines.append(
            "note: patch model only (task: patch): infer.py needs a slide aggregator too; train one with "
            f"task: pipeline, or task: aggregator with aggregator.patch_bundle: {bundle}"
        )
    else:
        lines.append(f"run it:  {sys.executable} infer.py SLIDES_DIR --out OUT_DIR --model {bundle}")
    return lines


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
