"""Batch inference: checks inputs, takes the output lock, processes slides (skipping finished ones),
and writes ``summary.csv``, ``index.html`` and ``run.json``.

Two engines run the same :func:`~pipeline.batch.process.process_slide` into the same output
layout: ``local`` (this module: one slide at a time in one worker process, replaced when a slide
passes ``--slide-timeout`` or the worker dies; :mod:`pipeline.batch.supervisor`) and ``ray``
(:mod:`pipeline.batch.ray_engine`: slides spread over Ray actors, one model load per actor).
:func:`run_batch` picks the engine from :attr:`BatchOptions.engine`.

Nothing finished is ever lost: every file is written atomically and a slide counts as done only
when its ``result.json`` and the files it lists are complete; ``kill -9`` loses at most the slide
in progress. An output folder that fails mid-run (full, read-only, deleted) stops the batch with
one line (:class:`~pipeline.core.io.OutputWriteError`); a re-run finishes what is missing.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from pipeline.batch.context import InferenceContext, build_context  # noqa: F401  (re-exported)
from pipeline.batch.discovery import Skipped
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
from pipeline.batch.state import OutputLock, is_done, summary_write
from pipeline.batch.supervisor import Supervisor
from pipeline.core.io import ensure_dir
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
    """The local engine: one worker process, one slide at a time (stages overlapped), under the time limit."""
    skipped_inputs: list[Skipped] = []
    jobs = check_inputs(opts, skipped_inputs)
    ensure_dir(opts.out_dir)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    with OutputLock(opts.out_dir):
        todo = [j for j in jobs if opts.force or not is_done(opts.out_dir / j.slide_id)]
        skipped = len(jobs) - len(todo)
        if skipped:
            log.info("%d slide(s) already done, skipped (use --force to redo)", skipped)
        bar = tqdm(total=len(todo), desc="slides", unit="slide", disable=opts.quiet or None)
        try:
            sup = Supervisor(opts, jobs, bar)
            sup.run(todo)
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        results = [r for r in (read_result_or_none(opts.out_dir / j.slide_id) for j in jobs) if r is not None]
        assert sup.facts is not None
        engine = {
            "name": "local",
            "workers": 1,
            "reader_threads": sup.facts.reader_threads,
            "slide_timeout_s": opts.slide_timeout,
            "worker_restarts": sup.restarts,
        }
        with summary_write(len(todo)):
            record = write_summary(
                opts,
                sup.facts,
                results,
                started,
                elapsed,
                processed=len(todo),
                skipped=skipped,
                n_tiles=sup.n_tiles,
                engine=engine,
                skipped_inputs=skipped_inputs,
            )
    return record
