"""One slide of a batch: analysis, rules, files, and its ``result.json`` in ``OUT/<slide_id>/``.

    analysis (pipeline.analysis) → SlideResult → rules → files (pipeline.outputs.slide_files) → result.json

:func:`process_slide` never raises for a bad slide: the slide gets ``status: failed`` with a
one-line ``error`` and the batch goes on. Every file is written atomically; ``result.json`` is
written last and lists the files it belongs with, so a slide is either complete or redone.

The one exception is the output folder itself: when a file cannot be written (full disk,
read-only, deleted folder: :class:`~pipeline.core.io.OutputWriteError`), the slide is marked
``failed`` with "cannot write <file>: <cause>" where that can still be written, and the error is
raised from :func:`output_stage` so that the engine stops the batch instead of failing every slide.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.analysis import PreparedSlide, SlideAnalysis
from pipeline.batch.context import InferenceContext
from pipeline.batch.discovery import SlideJob
from pipeline.batch.options import versions
from pipeline.batch.stages import DONE, MODEL, OUTPUTS, READING, RULES, WAITING
from pipeline.clinical.rules import recommend
from pipeline.core.errors import PipelineError
from pipeline.core.io import OutputWriteError, ensure_dir
from pipeline.outputs.gallery import TopTiles
from pipeline.outputs.slide_files import GALLERY_SIZE, SlideFileOptions, write_failure_report, write_slide_files
from pipeline.patch.features import runs_on_cpu
from pipeline.reading.diagnose import check_file, file_kind
from pipeline.result import (
    PatternScores,
    QualitySummary,
    Recommendations,
    ResultMPP,
    SlideResult,
    Status,
    TissueSummary,
    parse_result,
)

log = logging.getLogger(__name__)

CALIBRATION_NOTE = (
    "Calibrated on out-of-fold validation slides of the model's training data: among slides given about 0.8, "
    "about 8 in 10 showed the NME pattern there. Calibration does not transfer automatically to another "
    "laboratory's slides; bands LOW < {low:.2f} ≤ INDETERMINATE < {high:.2f} ≤ HIGH."
)


def new_result(
    job: SlideJob, ctx: InferenceContext, status: Status = "failed", error: str | None = None
) -> SlideResult:
    """A slide's result before any step ran (``failed`` until a step says otherwise)."""
    return SlideResult(
        slide_id=job.slide_id,
        slide_path=str(job.path),
        patient_id=job.patient_id,
        status=status,
        error=error,
        mpp=ResultMPP(slide=job.mpp, requested=ctx.bundle.contract.input.mpp),
        model=ctx.model_info(),
        versions=versions(),
        produced_by=ctx.produced_by(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


@dataclass
class Prepared:
    """The first stage of a slide (:func:`prepare_slide`): the opened slide, or what went wrong.

    ``error`` is raised again when the slide is processed, so it fails exactly as if run in line.
    """

    slide: PreparedSlide | None = None
    error: BaseException | None = None


def prepare_slide(job: SlideJob, ctx: InferenceContext) -> Prepared:
    """Open ``job``'s slide, detect tissue and lay out the tile grid; never raises (see ``error``).

    Pure with respect to the output folder (writes nothing), so it can run ahead of time.
    """
    ctx.tracker.enter(job.slide_id, READING)
    try:
        out = Prepared(slide=ctx.analyser.prepare(job.path, job.mpp, job.slide_id))
    except BaseException as exc:  # noqa: BLE001 - raised again by model_stage, in the slide's own try
        out = Prepared(error=exc)
    ctx.tracker.enter(job.slide_id, WAITING)
    ctx.heap.release()  # the detector's full-thumbnail temporaries (beyond the model's working memory)
    return out


def process_slides(jobs: list[SlideJob], ctx: InferenceContext, overlap: bool = True) -> Iterator[SlideResult]:
    """:func:`process_slide` for each job in order, yielding each result as it is written.

    With ``overlap`` (default) the slides go through three stages at once: while slide *i* is
    in the patch model, slide *i + 1* is opened, its tissue detected and its grid laid out
    (:func:`prepare_slide`) in one background thread, and slide *i - 1*'s heatmaps, GeoJSON,
    report, FHIR and ``result.json`` are written in another (both kept in ``ctx.stages`` for
    the next batch). Tissue detection and the outputs use one core each; on their own they
    leave the other core idle, overlapped they fill the gaps the model and the tile readers
    leave (on the model's CPU both threads run at the lowest priority, so they never pre-empt
    it). Measured on the 2-core CPU (4 synthetic slides, onnx-int8): about 1.2-1.4x the slides
    per hour of running the stages one after the other. At most three slides are in flight;
    results and files are the same either way.
    """
    if not overlap or len(jobs) < 2:
        for job in jobs:
            yield process_slide(job, ctx)
        return
    prep_pool, out_pool = ctx.stages.pools(low_priority=runs_on_cpu(ctx.runner))
    upcoming: Future | None = None
    writing: Future | None = None
    try:
        upcoming = prep_pool.submit(prepare_slide, jobs[0], ctx)
        for i, job in enumerate(jobs):
            current = upcoming
            if i + 1 < len(jobs):
                upcoming = prep_pool.submit(prepare_slide, jobs[i + 1], ctx)
            modelled = model_stage(job, ctx, prepared=current)
            if writing is not None:
                yield writing.result()
            writing = out_pool.submit(output_stage, modelled, ctx)
        if writing is not None:
            yield writing.result()
    finally:  # stopped early (consumer gone, an error): nothing of this batch left running in the threads
        left = [f for f in (upcoming, writing) if f is not None and not f.cancel()]
        wait(left)


@dataclass
class ModelledSlide:
    """A slide after :func:`model_stage`: its result so far, and what :func:`output_stage` draws from.

    ``analysis`` is None when the slide failed before its outputs (then only the failure report
    is written); ``seconds`` is the time the slide spent in the first stages.
    """

    job: SlideJob
    result: SlideResult
    slide_dir: Path
    seconds: float
    analysis: SlideAnalysis | None = None
    gallery: TopTiles | None = None
    write_error: OutputWriteError | None = None  # the output folder failed: the batch stops after this slide


def process_slide(job: SlideJob, ctx: InferenceContext, prepared: Prepared | Future | None = None) -> SlideResult:
    """Run the whole per-slide pipeline; returns the result (also written as result.json).

    ``prepared``: the slide's :func:`prepare_slide` output (or a future of it) when it was made
    ahead of time; None runs that stage here. Never raises for a bad slide.
    """
    return output_stage(model_stage(job, ctx, prepared), ctx)


def model_stage(job: SlideJob, ctx: InferenceContext, prepared: Prepared | Future | None = None) -> ModelledSlide:
    """The slide's analysis (open, tissue, tiles, patch model, quality, aggregation) and rules; never raises."""
    slide_dir = ctx.out_dir / job.slide_id
    result = new_result(job, ctx)
    t_start = time.perf_counter()
    analysis = gallery = None
    write_error = None
    try:
        ensure_dir(slide_dir, parents=False)  # never recreates a deleted output folder
        waited = None
        if isinstance(prepared, Future):
            t = time.perf_counter()
            prep: Prepared = prepared.result()
            waited = time.perf_counter() - t
        else:
            prep = prepared if prepared is not None else prepare_slide(job, ctx)
        if prep.slide is not None:
            _record_slide(result, prep.slide)
            result.timings.update(prep.slide.seconds)
        if waited is not None:  # prepared in the background: only the wait was on this slide's critical path
            result.timings["tissue_tiling.wait"] = round(waited, 4)
        if prep.error is not None:
            raise prep.error
        assert prep.slide is not None
        ctx.tracker.enter(job.slide_id, MODEL)
        classes = ctx.analyser.classes
        gallery = TopTiles(
            {p: classes.index(p) for p in ("pallor", "necrolysis", "parakeratosis") if p in classes}, GALLERY_SIZE
        )
        analysis = ctx.analyser.analyse(job.path, job.mpp, job.slide_id, prepared=prep.slide, observer=gallery)
        ctx.tracker.enter(job.slide_id, RULES)
        if "patch_model.model" in analysis.timings:
            ctx.heap.note_model_done()  # activations and tile batches: kept for the next slide
        _record_analysis(result, analysis, ctx)
        t = time.perf_counter()
        _recommend(result, ctx, job)
        result.timings["rules"] = round(time.perf_counter() - t, 4)
    except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
        _mark_failed(result, job, exc)
        write_error = exc if isinstance(exc, OutputWriteError) and exc.folder_unusable else None
    failed = result.status == "failed"
    return ModelledSlide(
        job,
        result,
        slide_dir,
        time.perf_counter() - t_start,
        None if failed else analysis,
        None if failed else gallery,
        write_error,
    )


def _record_slide(result: SlideResult, prep: PreparedSlide) -> None:
    """What opening the slide and laying out its grid found."""
    result.mpp.slide, result.mpp.source = prep.slide_mpp, prep.mpp_source
    result.mpp.effective, result.mpp.read_level = prep.grid.plan.effective_mpp, prep.grid.plan.level
    result.reader, result.dimensions_level0, result.fingerprint = prep.reader, prep.dimensions, prep.fingerprint


def _record_analysis(result: SlideResult, analysis: SlideAnalysis, ctx: InferenceContext) -> None:
    """The analysis' tissue, quality, probability, band and patterns in the result."""
    mask, q = analysis.prepared.mask, analysis.quality
    result.timings.update({k: v for k, v in analysis.timings.items() if k not in ("open", "tissue_tiling")})
    result.n_tiles = len(analysis.prepared.grid)
    result.tissue = TissueSummary(
        fraction=round(mask.tissue_fraction, 5), area_mm2=round(mask.tissue_area_mm2, 4), flags=list(mask.flags)
    )
    result.quality = QualitySummary(flags=list(q.flags), reasons=list(q.reasons), metrics=_finite_metrics(q.metrics))
    pred = analysis.prediction
    if pred is not None:
        result.status, result.error = "ok", None
        result.nme_probability, result.band = round(pred.probability, 6), pred.band  # type: ignore[assignment]
        result.nme_logit = round(pred.logit, 6)
        result.patterns = PatternScores(**{k: round(v, 6) for k, v in pred.patterns.items()})
        b = ctx.predictor.bands
        result.calibration_note = CALIBRATION_NOTE.format(low=b.low, high=b.high)
    else:
        result.status, result.error = "non_diagnostic", None
        tile_max = analysis.pattern_tile_max()
        result.patterns_tile_max = {k: round(v, 6) for k, v in tile_max.items()} or None


def _finite_metrics(metrics: dict) -> dict[str, float | int | None]:
    """Quality measurements as JSON numbers (NaN/inf → None)."""
    out: dict[str, float | int | None] = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, bool):
            out[str(k)] = None if v is None else int(v)
        elif isinstance(v, (int,)) or hasattr(v, "dtype") and v.dtype.kind in "iu":
            out[str(k)] = int(v)
        else:
            f = float(v)
            out[str(k)] = f if f == f and abs(f) != float("inf") else None
    return out


def _recommend(result: SlideResult, ctx: InferenceContext, job: SlideJob) -> None:
    """The rule layer's proposals for the slide (a rules error is recorded as a quality flag, not a failure)."""
    clinical = ctx.clinical.lookup(job.slide_id, job.patient_id) if ctx.clinical is not None else None
    try:
        result.recommendations = Recommendations.model_validate(recommend(result, clinical, ctx.ruleset))
    except PipelineError as exc:
        result.recommendations = Recommendations(error=str(exc))
        result.quality.flags.append("recommendations_failed")
        result.quality.reasons.append(f"recommendations could not be made: {exc}")


def _mark_failed(result: SlideResult, job: SlideJob, exc: Exception) -> None:
    """The slide failed: a pipeline error's own one-line message, or a one-line 'unexpected error' naming the file."""
    result.status = "failed"
    if isinstance(exc, PipelineError):
        result.error = str(exc)
        return
    log.debug("slide %s failed:\n%s", job.slide_id, traceback.format_exc())
    problem = check_file(job.path) if file_kind(job.path) == "regular" else None
    if problem is not None:
        result.error = f"{job.path}: {problem}"
        return
    detail = " ".join(str(exc).split())[:200] or "no detail"
    result.error = (
        f"{job.path}: could not be read: damaged in a way not recognised, or a layout this reader "
        f"does not handle ({detail})"
    )


def output_stage(m: ModelledSlide, ctx: InferenceContext) -> SlideResult:
    """Heatmaps, GeoJSON, gallery, FHIR, report, then ``result.json`` (written last).

    Never raises for a bad slide; raises :class:`OutputWriteError` when the output folder fails.
    """
    job, result, slide_dir = m.job, m.result, m.slide_dir
    ctx.tracker.enter(job.slide_id, OUTPUTS)
    t_start = time.perf_counter()
    if m.analysis is not None:
        try:
            cpu0 = time.thread_time()
            opts = SlideFileOptions(
                heatmap_mpp=ctx.heatmap_mpp,
                heatmap_format=ctx.heatmap_format,
                tile_pixels=m.gallery.pixels() if m.gallery is not None else {},
            )
            write_slide_files(result, m.analysis, slide_dir, opts, result.timings)
            # CPU of this thread: when the stage overlaps the next slide's model, its wall time says little
            result.timings["outputs.cpu"] = round(time.thread_time() - cpu0, 4)
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            _mark_failed(result, job, exc)
            if isinstance(exc, OutputWriteError) and exc.folder_unusable:
                m.write_error = exc
    m.analysis = m.gallery = None  # the thumbnail and features can go
    try:
        if result.status == "failed":
            _finish_failed(result, job, ctx, slide_dir)
        result.timings["total"] = round(m.seconds + time.perf_counter() - t_start, 4)
        result = parse_result(result.to_json_dict(), source=str(slide_dir / "result.json"))  # the schema holds
        ensure_dir(slide_dir, parents=False)
        result.write(slide_dir)
    except OutputWriteError as exc:  # not even the failure could be recorded: the first cause is the news
        ctx.tracker.enter(job.slide_id, DONE)
        raise (m.write_error or exc) from None
    ctx.tracker.enter(job.slide_id, DONE)
    ctx.heap.release()  # heatmap temporaries: memory between slides stays that of the model
    if m.write_error is not None:
        raise m.write_error
    return result


def failed_result(job: SlideJob, ctx: InferenceContext, error: str) -> SlideResult:
    """Write what :func:`process_slide` leaves for a failed slide (result.json + report.html) without running it.

    For engines that lose a slide outside :func:`process_slide` (e.g. a Ray worker that died).
    """
    slide_dir = ensure_dir(ctx.out_dir / job.slide_id, parents=False)
    result = new_result(job, ctx, error=" ".join(error.split()))
    _finish_failed(result, job, ctx, slide_dir)
    result.write(slide_dir)
    return result


def _finish_failed(result: SlideResult, job: SlideJob, ctx: InferenceContext, slide_dir: Path) -> None:
    """No probability for a failed slide; the rule layer's failure flags; a small failure report."""
    result.nme_probability = result.band = result.patterns = result.nme_logit = None
    result.calibration_note = None
    result.recommendations = None
    try:
        _recommend(result, ctx, job)
    except Exception:  # noqa: BLE001 - the failure itself is what matters
        result.recommendations = None
    log.warning("%s: failed: %s", job.slide_id, result.error)
    result.files = write_failure_report(result, slide_dir)
