"""What a batch run was asked to do (:class:`BatchOptions`), the checks made before any slide is
read, and the run record (``run.json``, ``summary.csv``, ``index.html``) both engines write."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.batch.discovery import Skipped, SlideJob, discover, read_slide_table
from pipeline.batch.stages import DEFAULT_SLIDE_TIMEOUT_S
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import atomic_write_json
from pipeline.outputs.heatmap import DEFAULT_HEATMAP_FORMAT, HEATMAP_FORMATS
from pipeline.outputs.summary import write_index_html, write_summary_csv
from pipeline.patch.backends import check_backend_name
from pipeline.reading.slide import SLIDE_SUFFIXES
from pipeline.result import SlideResult
from pipeline.tiles.tiling import package_versions

#: Default resolution of the heatmap images and of the report's thumbnail, µm/px (a 224 px tile at
#: 0.5 µm/px is 28 px wide there). Finer costs more: at 2 µm/px (the tissue thumbnail) drawing and
#: PNG-encoding the four heatmaps took ~0.5 s per 3 x 2 mm slide on the 2-core CPU.
HEATMAP_MPP = 4.0
#: Default file format of the heatmap images (:data:`pipeline.outputs.heatmap.HEATMAP_FORMATS`):
#: JPEG, whose bytes the report embeds too; ``png`` for lossless files (~7x the encoding time).
HEATMAP_FORMAT = DEFAULT_HEATMAP_FORMAT


def versions() -> dict[str, str]:
    """Versions of the packages that shape a result, and of Python."""
    v = package_versions()
    v["python"] = platform.python_version()
    return v


@dataclass
class BatchOptions:
    """What the user asked for (``infer.py`` flags)."""

    slides_dir: Path | None
    out_dir: Path
    model: Path
    clinical: Path | None = None
    mpp: float | None = None
    slides_table: Path | None = None
    workers: int | None = (
        None  # slides processed in parallel: local engine 1; ray: actors (None = sized to the cluster)
    )
    reader_threads: int = 2  # tile reader threads per slide (both engines)
    batch_size: int | None = None  # tiles per model batch; None: DEFAULT_BATCH_SIZE for the device
    heatmap_mpp: float = HEATMAP_MPP  # µm/px of the heatmap images and the report thumbnail
    heatmap_format: str = HEATMAP_FORMAT  # jpeg | png
    force: bool = False
    slide_timeout: float = DEFAULT_SLIDE_TIMEOUT_S  # seconds one slide may take before it is abandoned (0: no limit)
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
    backend: dict[str, str] = field(default_factory=dict)  # name, basis, reason of the patch-model backend

    @classmethod
    def of(cls, ctx: Any) -> RunFacts:
        """From an :class:`~pipeline.batch.context.InferenceContext`."""
        return cls(
            model_info=ctx.model_info().model_dump(mode="json"),
            model_label=ctx.bundle.contract.label,
            ruleset_version=getattr(ctx.ruleset, "ruleset_version", None),
            device=str(ctx.runner.device) if hasattr(ctx.runner, "device") else "cpu",
            reader_threads=ctx.reader_threads,
            backend=dict(getattr(ctx, "backend_choice", None) or {}),
        )


def check_options(opts: BatchOptions) -> None:
    """Engine-related option errors, one line each, before anything is read or written."""
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
        raise ConfigError(
            f"unknown --heatmap-format {opts.heatmap_format!r}; choose one of {', '.join(HEATMAP_FORMATS)}"
        )
    if not opts.slide_timeout >= 0:
        raise ConfigError(f"--slide-timeout must be a number of seconds, 0 for no limit (got {opts.slide_timeout})")
    if opts.workers is not None and opts.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (got {opts.workers})")
    if opts.engine == "local":
        if opts.workers not in (None, 1):
            raise ConfigError(
                f"--workers {opts.workers}: the local engine processes one slide at a time; use --engine ray "
                "for parallel slide workers (tile reader threads per slide are --reader-threads)"
            )
        ray_only = {
            "--address": opts.address is not None,
            "--gpus-per-worker": bool(opts.gpus_per_worker),
            "--cpus-per-worker": opts.cpus_per_worker is not None,
        }
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


def check_inputs(opts: BatchOptions, skipped: list[Skipped] | None = None) -> list[SlideJob]:
    """Validate folders and find slides; every problem is a one-line error before any slide is processed.

    ``skipped`` (when given) receives the folder's entries that are not processed, with the reason.
    """
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
            raise ConfigError(
                f"{opts.out_dir}: output folder is inside the input folder {opts.slides_dir}; choose another --out"
            )
        jobs = discover(src, skipped=skipped)
        if not jobs:
            raise DataError(
                f"{opts.slides_dir}: no slide files found (looked for {', '.join(sorted(SLIDE_SUFFIXES))} and DICOM folders)"
            )
    if opts.mpp is not None:
        jobs = [SlideJob(j.slide_id, j.path, j.mpp if j.mpp is not None else opts.mpp, j.patient_id) for j in jobs]
    return jobs


def write_summary(
    opts: BatchOptions,
    ctx: Any,
    results: list[SlideResult],
    started: datetime,
    elapsed: float,
    processed: int,
    skipped: int,
    n_tiles: int,
    engine: dict[str, Any] | None = None,
    skipped_inputs: list[Skipped] | None = None,
) -> dict[str, Any]:
    """Write summary.csv, index.html and run.json (atomically); returns the run record.

    ``ctx``: the run's :class:`RunFacts`, or an InferenceContext to take them from.
    """

    facts = ctx if isinstance(ctx, RunFacts) else RunFacts.of(ctx)

    write_summary_csv(opts.out_dir / "summary.csv", results)
    write_index_html(opts.out_dir / "index.html", results, {r.slide_id: f"{r.slide_id}/report.html" for r in results})
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "non_diagnostic", "failed")}
    record = {
        "command": opts.command or sys.argv,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items() if k != "command"},
        "model": facts.model_info,
        "model_label": facts.model_label,
        "backend": facts.backend,  # which patch-model backend ran and why
        "ruleset_version": facts.ruleset_version,
        "engine": engine or {"name": "local", "workers": 1, "reader_threads": facts.reader_threads},
        "versions": versions(),
        "host": {
            "name": socket.gethostname(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "device": facts.device,
        },
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 3),
        "counts": {
            "slides": len(results),
            **counts,
            "processed_this_run": processed,
            "skipped_done": skipped,
        },
        "skipped_inputs": [{"path": s.path, "reason": s.reason} for s in skipped_inputs or []],
        "throughput": {
            "tiles": n_tiles,
            "tiles_per_s": round(n_tiles / elapsed, 2) if elapsed > 0 else None,
            "slides_per_hour": round(processed / elapsed * 3600, 2) if elapsed > 0 and processed else None,
        },
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
        *_skipped_lines(record.get("skipped_inputs") or []),
        f"model: {record['model']['name']} {record['model']['version']} — {record['model_label']}",
        *([f"backend: {b['name']} ({b['reason']})"] if (b := record.get("backend")) else []),
        f"results: {out_dir / 'index.html'}",
        f"         {out_dir / 'summary.csv'}",
        "Decision support only: a clinician confirms every order.",
    ]
    return "\n".join(lines)


def _skipped_lines(skipped: list[dict[str, str]], limit: int = 10) -> list[str]:
    """The final screen's lines for inputs that were not processed (non-slide files summed up)."""
    if not skipped:
        return []
    worth = [s for s in skipped if not s["reason"].startswith("not a slide file type")]
    lines = [f"skipped {len(skipped)} input(s) that are not slides:"]
    lines += [f"  {s['path']}: {s['reason']}" for s in worth[:limit]]
    if len(worth) > limit:
        lines.append(f"  ... and {len(worth) - limit} more (run.json lists them all)")
    if len(skipped) > len(worth):
        lines.append(f"  {len(skipped) - len(worth)} file(s) of other types (run.json lists them)")
    return lines


def load_run(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
