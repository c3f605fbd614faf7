"""Batch inference: checks inputs, takes the output lock, processes slides (skipping finished ones),
and writes ``summary.csv``, ``index.html`` and ``run.json``.

Two engines run the same :func:`~pipeline.batch.process.process_slide` into the same output
layout: ``local`` (this module: one slide at a time in this process) and ``ray``
(:mod:`pipeline.batch.ray_engine`: slides spread over Ray actors, one model load per actor).
:func:`run_batch` picks the engine from :attr:`BatchOptions.engine`.

Nothing finished is ever lost: every file is written atomically and a slide counts as done only
when its ``result.json`` and the files it lists are complete; ``kill -9`` loses at most the slide
in progress.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from pipeline.batch.context import InferenceContext, build_context  # noqa: F401  (re-exported)
from pipeline.batch.options import (  # noqa: F401  (re-exported: the batch API in one place)
    ENGINES,
    HEATMAP_FORMAT,
    HEATMAP_MPP,
    BatchOptions,
    RunFacts,
    check_inputs,
    check_options,
    final_screen,
    load_run,
    versions,
    write_summary,
)
from pipeline.batch.process import process_slides
from pipeline.batch.state import OutputLock, is_done
from pipeline.patch.backends import DEFAULT_BATCH_SIZE, default_batch_size  # noqa: F401  (re-exported)
from pipeline.result import read_result_or_none

log = logging.getLogger(__name__)


def run_batch(opts: BatchOptions) -> dict[str, Any]:
    """Process every slide with the engine ``opts.engine``; returns the run record (also written to run.json)."""
    check_options(opts)
    if opts.engine == "ray":
        from pipeline.batch.ray_engine import run_batch_ray

        return run_batch_ray(opts)
    return run_batch_local(opts)


def run_batch_local(opts: BatchOptions) -> dict[str, Any]:
    """The local engine: one slide at a time in this process."""
    jobs = check_inputs(opts)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    with OutputLock(opts.out_dir):
        ctx = build_context(opts, jobs)
        todo = [j for j in jobs if opts.force or not is_done(opts.out_dir / j.slide_id)]
        skipped = len(jobs) - len(todo)
        if skipped:
            log.info("%d slide(s) already done, skipped (use --force to redo)", skipped)
        n_tiles = 0
        bar = tqdm(total=len(todo), desc="slides", unit="slide", disable=opts.quiet or None)
        # the next slide is opened and its tissue found in the background while this one runs
        for job, result in zip(todo, process_slides(todo, ctx)):
            bar.update(1)
            bar.set_postfix_str(job.slide_id[:30])
            n_tiles += result.n_tiles
            log.info("%s: %s", job.slide_id, result.describe())
        bar.close()
        elapsed = time.perf_counter() - t0
        results = [r for r in (read_result_or_none(opts.out_dir / j.slide_id) for j in jobs) if r is not None]
        record = write_summary(
            opts, ctx, results, started, elapsed, processed=len(todo), skipped=skipped, n_tiles=n_tiles
        )
    return record
