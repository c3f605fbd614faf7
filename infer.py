#!/usr/bin/env python
"""Batch inference: NME-pattern probability, heatmaps, QuPath tiles, reports and proposed orders per slide.

    python infer.py SLIDES_DIR --out OUT_DIR [--model BUNDLE] [--clinical FILE]
                    [--mpp M | --slides-table CSV] [--reader-threads N] [--force]
                    [--engine ray [--address auto|HOST:PORT] [--workers N] [--gpus-per-worker G]]

With no arguments it runs the embedded demo: a few synthetic slides (made on first use in
demo_slides/), the shipped demo model (trained on synthetic slides only, not for clinical use),
results in demo_output/. Re-running skips finished slides; --force redoes them.

Engines: `local` (default) processes one slide at a time in this process; `ray` spreads slides
over Ray actors (N parallel slide workers, each loading the model once), on this machine or on an
existing Ray cluster (--address). The Ray engine needs `pip install '.[ray]'` and a filesystem
shared by all workers (slides, model and --out at the same paths); see docs/cluster.md.

Decision support only: a clinician confirms every order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pipeline  # noqa: F401 - sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported
from pipeline.core.cli import run_cli, setup_logging


def main(argv: list[str] | None = None) -> int:
    from pipeline.batch.stages import DEFAULT_SLIDE_TIMEOUT_S
    from pipeline.core.paths import DEMO_BUNDLE, DEMO_OUTPUT, DEMO_SLIDES
    from pipeline.outputs.heatmap import DEFAULT_HEATMAP_FORMAT, HEATMAP_FORMATS
    from pipeline.patch.backends import BACKEND_HELP

    ap = argparse.ArgumentParser(
        prog="infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "slides_dir", nargs="?", type=Path, help="folder of slides (searched recursively); omit for the demo"
    )
    ap.add_argument("--out", type=Path, help="output folder (default for the demo: demo_output/)")
    ap.add_argument("--model", type=Path, default=DEMO_BUNDLE, help="model bundle folder (default: the demo model)")
    ap.add_argument("--clinical", type=Path, help="clinical context CSV/JSON (slide_id or patient_id column)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--mpp", type=float, help="level-0 µm/px for slides whose metadata lacks it")
    group.add_argument("--slides-table", type=Path, help="CSV with path[, slide_id, mpp, patient_id] columns")
    ap.add_argument("--reader-threads", type=int, default=2, help="tile reader threads per slide (default 2)")
    ap.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: one slide at a time in this process (default); ray: slides in parallel on Ray actors",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="slides processed in parallel (Ray actors). The local engine runs 1; with --engine ray the "
        "default fills the cluster (CPUs // 2, or GPUs // --gpus-per-worker)",
    )
    ap.add_argument(
        "--address",
        default=None,
        help="--engine ray: Ray cluster to join: auto (the cluster running on this node), HOST:PORT (head "
        "node GCS) or ray://HOST:PORT (Ray Client); default: start a local Ray instance sized to this machine",
    )
    ap.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="--engine ray: GPUs reserved per actor (e.g. 1, or 0.5 to share a GPU); default 0 = CPU",
    )
    ap.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="--engine ray: CPUs reserved per actor (default: the cluster's CPUs shared out, at most one node's)",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per model batch (default: 32 on the CPU, 64 on a GPU; recorded in run.json)",
    )
    ap.add_argument(
        "--heatmap-mpp",
        type=float,
        default=4.0,
        help="µm/px of the heatmap images and the report thumbnail (default 4; never finer than the "
        "2 µm/px tissue thumbnail, and coarser where the image would exceed 2896x2896 px; finer costs "
        "time per slide)",
    )
    ap.add_argument(
        "--heatmap-format",
        choices=list(HEATMAP_FORMATS),
        default=DEFAULT_HEATMAP_FORMAT,
        help="heatmap image files: jpeg (default; quality 90, the bytes the report embeds) or png "
        "(lossless, ~7x the encoding time and ~3.5x the size)",
    )
    ap.add_argument(
        "--slide-timeout",
        type=float,
        default=DEFAULT_SLIDE_TIMEOUT_S,
        metavar="SECONDS",
        help=f"time limit per slide (default {DEFAULT_SLIDE_TIMEOUT_S:g}; 0: none): a slide that takes longer "
        "(a stalled read, a broken decoder) is marked failed, its worker replaced, and the batch goes on",
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--backend", default="auto", help=BACKEND_HELP + "; the backend used is recorded in run.json")
    ap.add_argument("--force", action="store_true", help="redo slides that are already done")
    ap.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    args = ap.parse_args(argv)
    setup_logging(quiet=args.quiet)

    from pipeline.batch.runner import BatchOptions, final_screen, run_batch

    demo = args.slides_dir is None and args.slides_table is None
    if demo:
        from pipeline.demo import ensure_demo_slides

        args.slides_dir = ensure_demo_slides(DEMO_SLIDES)
        args.out = args.out or DEMO_OUTPUT
    if args.out is None:
        ap.error("--out is required (except for the demo)")
    opts = BatchOptions(
        slides_dir=args.slides_dir,
        out_dir=args.out,
        model=args.model,
        clinical=args.clinical,
        mpp=args.mpp,
        slides_table=args.slides_table,
        workers=args.workers,
        reader_threads=args.reader_threads,
        batch_size=args.batch_size,
        heatmap_mpp=args.heatmap_mpp,
        heatmap_format=args.heatmap_format,
        force=args.force,
        slide_timeout=args.slide_timeout,
        device=args.device,
        backend=args.backend,
        engine=args.engine,
        address=args.address,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        quiet=args.quiet,
        command=["infer.py", *(argv or [])],
    )
    record = run_batch(opts)
    print(final_screen(record, args.out.resolve()))
    print(f"review:  {sys.executable} -m pipeline.review {args.out.resolve()}")
    if demo and args.out.resolve() == DEMO_OUTPUT.resolve():  # the loop's next step: this config names demo_output
        repo = Path(__file__).resolve().parent
        print(
            f"then:    {sys.executable} {repo / 'train.py'} --config {repo / 'configs' / 'finetune_from_review.yaml'}"
        )
    return 1 if record["counts"]["failed"] else 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
