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

import json
import logging
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.batch.discovery import SlideJob, discover, read_slide_table
from pipeline.batch.process import HEATMAP_FORMAT, HEATMAP_MPP, InferenceContext, process_slides, versions
from pipeline.batch.state import OutputLock, is_done, read_result
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_write_json
from pipeline.slide import SLIDE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass
class BatchOptions:
    """What the user asked for (``infer.py`` flags)."""

    slides_dir: Path | None
    out_dir: Path
    model: Path
    clinical: Path | None = None
    mpp: float | None = None
    slides_table: Path | None = None
    workers: int | None = None  # slides processed in parallel: local engine 1; ray: actors (None = sized to the cluster)
    reader_threads: int = 2  # tile reader threads per slide (both engines)
    batch_size: int | None = None  # tiles per model batch; None: DEFAULT_BATCH_SIZE for the device
    heatmap_mpp: float = HEATMAP_MPP  # µm/px of the heatmap images and the report thumbnail
    heatmap_format: str = HEATMAP_FORMAT  # jpeg | png
    force: bool = False
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    engine: str = "local"  # local | ray
    address: str | None = None  # ray: "auto", "HOST:PORT" or "ray://HOST:PORT"; None starts a local Ray instance
    gpus_per_worker: float = 0.0  # ray: GPUs reserved per actor (0: CPU inference)
    cpus_per_worker: float | None = None  # ray: CPUs reserved per actor (None: the cluster's CPUs shared out)
    quiet: bool = False
    command: list[str] = field(default_factory=list)


ENGINES = ("local", "ray")

#: Tiles per model batch when none is given, by device type. On the 2-core CPU, batches of 64
#: made the peak RSS of a slide 4x larger in area 8-19 % above that of a small slide (the heap
#: that the model's larger activations are freed into fragments with the number of batches),
#: 32 kept it at 4-8 % for ~10 % less throughput with torch-bf16 (ONNX Runtime: the same speed).
#: GPUs keep the earlier default (not measured here: no GPU was lent).
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 64}


def default_batch_size(device) -> int:
    """:data:`DEFAULT_BATCH_SIZE` for ``device`` (a ``torch.device``); 32 for other device types."""
    return DEFAULT_BATCH_SIZE.get(getattr(device, "type", "cpu"), 32)


@dataclass(frozen=True)
class RunFacts:
    """What ``run.json`` records about the model and the device that ran it.

    Taken from this process's :class:`InferenceContext` (local engine) or reported by a worker
    that built its own (Ray engine: the driver never loads the model).
    """

    model_info: dict[str, Any]
    model_label: str
    ruleset_version: str | None
    device: str
    reader_threads: int

    @classmethod
    def of(cls, ctx: InferenceContext) -> RunFacts:
        return cls(model_info=ctx.model_info(), model_label=ctx.bundle.contract.label,
                   ruleset_version=getattr(ctx.ruleset, "ruleset_version", None),
                   device=str(ctx.runner.device) if hasattr(ctx.runner, "device") else "cpu",
                   reader_threads=ctx.reader_threads)


def check_options(opts: BatchOptions) -> None:
    """Engine-related option errors, one line each, before anything is read or written."""
    from pipeline.backends import check_backend_name
    from pipeline.outputs.heatmap import HEATMAP_FORMATS

    check_backend_name(opts.backend)
    if opts.engine not in ENGINES:
        raise ConfigError(f"unknown engine {opts.engine!r}; choose one of {', '.join(ENGINES)}")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {opts.batch_size})")
    if opts.reader_threads < 1:
        raise ConfigError(f"--reader-threads must be at least 1 (got {opts.reader_threads})")
    if not opts.heatmap_mpp > 0:
        raise ConfigError(f"--heatmap-mpp must be a positive µm/px (got {opts.heatmap_mpp})")
    if opts.heatmap_format not in HEATMAP_FORMATS:
        raise ConfigError(f"unknown --heatmap-format {opts.heatmap_format!r}; choose one of {', '.join(HEATMAP_FORMATS)}")
    if opts.workers is not None and opts.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {opts.workers})")
    if opts.engine == "local":
        if opts.workers not in (None, 1):
            raise ConfigError(f"--workers {opts.workers}: the local engine processes one slide at a time; use --engine ray "
                              "for parallel slide workers (tile reader threads per slide are --reader-threads)")
        ray_only = {"--address": opts.address is not None, "--gpus-per-worker": bool(opts.gpus_per_worker),
                    "--cpus-per-worker": opts.cpus_per_worker is not None}
        given = [k for k, v in ray_only.items() if v]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --engine ray")
    else:
        if opts.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must not be negative (got {opts.gpus_per_worker})")
        if opts.gpus_per_worker > 1 and opts.gpus_per_worker != int(opts.gpus_per_worker):
            raise ConfigError(f"--gpus-per-worker {opts.gpus_per_worker}: fractions are only allowed below 1")
        if opts.cpus_per_worker is not None and opts.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be positive (got {opts.cpus_per_worker})")


def check_inputs(opts: BatchOptions) -> list[SlideJob]:
    """Validate folders and find slides; every problem is a one-line error before any slide is processed."""
    out = opts.out_dir.resolve()
    if opts.slides_table is not None:
        jobs = read_slide_table(opts.slides_table)
    else:
        if opts.slides_dir is None:
            raise ConfigError("give a slide folder or --slides-table")
        src = opts.slides_dir.resolve()
        if not src.exists():
            raise DataError(f"{opts.slides_dir}: input folder not found")
        if not src.is_dir():
            raise DataError(f"{opts.slides_dir}: not a folder")
        if out == src or src in out.parents:
            raise ConfigError(f"{opts.out_dir}: output folder is inside the input folder {opts.slides_dir}; choose another --out")
        jobs = discover(src)
        if not jobs:
            raise DataError(f"{opts.slides_dir}: no slide files found (looked for {', '.join(sorted(SLIDE_SUFFIXES))} and DICOM folders)")
    if opts.mpp is not None:
        jobs = [SlideJob(j.slide_id, j.path, j.mpp if j.mpp is not None else opts.mpp, j.patient_id) for j in jobs]
    return jobs


def build_context(opts: BatchOptions, jobs: list[SlideJob]) -> InferenceContext:
    """Load model bundle, aggregator, rules and clinical context (errors before any slide)."""
    from models.bundle import load_bundle
    from pipeline.aggregation import SlidePredictor
    from pipeline.backends import make_runner
    from pipeline.rules import load_clinical, load_ruleset
    from pipeline.runtime import keep_freed_memory, resolve_device

    device = resolve_device(opts.device)
    keep_freed_memory()  # no page faults per batch; memory goes back per slide (pipeline.runtime)
    bundle = load_bundle(opts.model, device="cpu")
    predictor = SlidePredictor.from_bundle(bundle.contract, bundle.extra)
    ruleset = load_ruleset()
    clinical = None
    if opts.clinical is not None:
        clinical = load_clinical(opts.clinical, slide_ids={j.slide_id for j in jobs})
    runner, backend = make_runner(bundle, device, opts.precision, opts.backend, batch_size=opts.batch_size)
    return InferenceContext(bundle=bundle, predictor=predictor, runner=runner, ruleset=ruleset, clinical=clinical,
                            out_dir=opts.out_dir, cache_dir=opts.out_dir / ".cache",
                            batch_size=opts.batch_size or default_batch_size(runner.device),
                            reader_threads=max(1, opts.reader_threads), backend=backend, heatmap_mpp=opts.heatmap_mpp,
                            heatmap_format=opts.heatmap_format)


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
    started = datetime.now(timezone.utc)
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
            n_tiles += int(result.get("n_tiles") or 0)
            log.info("%s: %s%s", job.slide_id, result["status"],
                     f" p={result['nme_probability']:.3f} {result['band']}" if result.get("nme_probability") is not None else
                     f" ({result.get('error') or '; '.join(result['quality']['reasons'])})")
        bar.close()
        elapsed = time.perf_counter() - t0
        results = [r for r in (read_result(opts.out_dir / j.slide_id) for j in jobs) if r is not None]
        record = write_summary(opts, ctx, results, started, elapsed, processed=len(todo), skipped=skipped, n_tiles=n_tiles)
    return record


def write_summary(opts: BatchOptions, ctx: InferenceContext | RunFacts, results: list[dict[str, Any]], started: datetime,
                  elapsed: float, processed: int, skipped: int, n_tiles: int, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write summary.csv, index.html and run.json (atomically); returns the run record."""
    from pipeline.outputs.summary import write_index_html, write_summary_csv

    facts = ctx if isinstance(ctx, RunFacts) else RunFacts.of(ctx)

    write_summary_csv(opts.out_dir / "summary.csv", results)
    write_index_html(opts.out_dir / "index.html", results, {r["slide_id"]: f"{r['slide_id']}/report.html" for r in results})
    counts = {s: sum(r.get("status") == s for r in results) for s in ("ok", "non_diagnostic", "failed")}
    record = {
        "command": opts.command or sys.argv,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items() if k != "command"},
        "model": facts.model_info,
        "model_label": facts.model_label,
        "ruleset_version": facts.ruleset_version,
        "engine": engine or {"name": "local", "workers": 1, "reader_threads": facts.reader_threads},
        "versions": versions(),
        "host": {"name": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "device": facts.device},
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 3),
        "counts": {"slides": len(results), **counts, "processed_this_run": processed, "skipped_done": skipped},
        "throughput": {"tiles": n_tiles, "tiles_per_s": round(n_tiles / elapsed, 2) if elapsed > 0 else None,
                       "slides_per_hour": round(processed / elapsed * 3600, 2) if elapsed > 0 and processed else None},
    }
    atomic_write_json(opts.out_dir / "run.json", record)
    return record


def final_screen(record: dict[str, Any], out_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    c = record["counts"]
    lines = [
        "",
        f"NME-pattern batch: {c['slides']} slide(s): {c['ok']} ok, {c['non_diagnostic']} non-diagnostic, {c['failed']} failed "
        f"({c['processed_this_run']} processed now, {c['skipped_done']} already done) in {record['seconds']:.1f} s",
        f"model: {record['model']['name']} {record['model']['version']} — {record['model_label']}",
        f"results: {out_dir / 'index.html'}",
        f"         {out_dir / 'summary.csv'}",
        "Decision support only: a clinician confirms every order.",
    ]
    return "\n".join(lines)


def load_run(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
