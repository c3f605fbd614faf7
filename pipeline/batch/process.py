"""Everything one slide goes through, and the files it leaves in ``OUT/<slide_id>/``.

slide → tissue → tiles → patch model → aggregator → calibration → quality gate → rules → outputs.

:func:`process_slide` never raises for a bad slide: the slide gets ``status: failed`` with a
one-line ``error`` and the batch goes on. Every file is written atomically; ``result.json`` is
written last and lists the files it belongs with, so a slide is either complete or redone.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import LoadedBundle
from models.patch import PATTERN_CLASSES
from pipeline.aggregation import SlidePredictor
from pipeline.batch.discovery import SlideJob
from pipeline.errors import PipelineError
from pipeline.features import (PatchRunner, TopTiles, cache_path, extract_features, load_features, lower_thread_priority,
                               read_tiles_at, runs_on_cpu,
                               save_features)
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.outputs.heatmap import DEFAULT_HEATMAP_FORMAT
from pipeline.quality import QualityConfig, QualityInputs, assess_quality
from pipeline.runtime import HeapReserve
from pipeline.slide import open_slide
from pipeline.tiling import TilingConfig, make_grid, package_versions
from pipeline.tissue import TissueConfig, detect_tissue

log = logging.getLogger(__name__)

HEATMAPS = ("pallor", "necrolysis", "parakeratosis", "attention")
#: Default resolution of the heatmap images and of the report's thumbnail, µm/px (a 224 px tile at
#: 0.5 µm/px is 28 px wide there). Finer costs more: at 2 µm/px (the tissue thumbnail) drawing and
#: PNG-encoding the four heatmaps took ~0.5 s per 3 x 2 mm slide on the 2-core CPU.
HEATMAP_MPP = 4.0
#: Default file format of the heatmap images (:data:`pipeline.outputs.heatmap.HEATMAP_FORMATS`):
#: JPEG, whose bytes the report embeds too; ``png`` for lossless files (~7x the encoding time).
HEATMAP_FORMAT = DEFAULT_HEATMAP_FORMAT
GALLERY_SIZE = 6
CALIBRATION_NOTE = (
    "Calibrated on out-of-fold validation slides of the model's training data: among slides given about 0.8, "
    "about 8 in 10 showed the NME pattern there. Calibration does not transfer automatically to another "
    "laboratory's slides; bands LOW < {low:.2f} ≤ INDETERMINATE < {high:.2f} ≤ HIGH."
)


class StageThreads:
    """The two background threads of overlapped slide stages (:func:`process_slides`): one
    prepares the next slide, one writes the previous slide's outputs. Kept for the life of the
    context, so what a thread pays once (OpenCV's first text call in a thread: ~22 ms of CPU)
    is paid once per process, not once per batch. At the lowest CPU priority when the model
    runs on the CPU (they fill the gaps the model leaves instead of pre-empting it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._low_priority = False

    def pools(self, low_priority: bool) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        """(prepare, outputs) single-thread executors, made on first use."""
        with self._lock:
            if self._pools is not None and self._low_priority != low_priority:
                self._shutdown()
            if self._pools is None:
                init = lower_thread_priority if low_priority else None
                self._pools = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="nme-prepare", initializer=init),
                               ThreadPoolExecutor(max_workers=1, thread_name_prefix="nme-outputs", initializer=init))
                self._low_priority = low_priority
            return self._pools

    def close(self) -> None:
        """Stop the threads (after their current task); they are made again if needed."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._pools is not None:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=True)
            self._pools = None


@dataclass
class InferenceContext:
    """What every slide needs: model, aggregator, rules, options. Built once per process/actor."""

    bundle: LoadedBundle
    predictor: SlidePredictor
    runner: PatchRunner
    ruleset: Any
    clinical: Any | None
    out_dir: Path
    cache_dir: Path
    batch_size: int = 64
    reader_threads: int = 2
    quality: QualityConfig = field(default_factory=QualityConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    backend: str = "torch"
    heatmap_mpp: float = HEATMAP_MPP  # µm/px of heatmaps and report thumbnail (never finer than the tissue thumbnail)
    heatmap_format: str = HEATMAP_FORMAT  # jpeg | png (files heatmap_<name>.jpg | .png)
    heap: HeapReserve = field(default_factory=HeapReserve)  # when freed memory goes back to the OS
    stages: StageThreads = field(default_factory=StageThreads, repr=False, compare=False)  # overlapped stages' threads

    @property
    def tiling(self) -> TilingConfig:
        inp = self.bundle.contract.input
        return TilingConfig(target_mpp=inp.mpp, mpp_tolerance=inp.mpp_tolerance, tile_px=inp.tile_size_px, tissue=self.tissue)

    def model_info(self) -> dict[str, Any]:
        c = self.bundle.contract
        return {"name": c.name, "version": c.version, "sha256": self.bundle.sha256, "label": c.label,
                "backbone": c.architecture.backbone, "aggregator": c.aggregator.type if c.aggregator else None,
                "backend": self.backend, "batch_size": self.batch_size}


def versions() -> dict[str, str]:
    v = package_versions()
    v["python"] = platform.python_version()
    return v


def _base_result(job: SlideJob, ctx: InferenceContext) -> dict[str, Any]:
    return {
        "slide_id": job.slide_id,
        "slide_path": str(job.path),
        "patient_id": job.patient_id,
        "status": "failed",
        "error": None,
        "nme_probability": None,
        "band": None,
        "patterns": None,  # {pallor, necrolysis, parakeratosis} only for slides the model judged (status ok)
        "n_tiles": 0,
        "mpp": {"slide": job.mpp, "requested": ctx.bundle.contract.input.mpp, "effective": None},
        "quality": {"flags": [], "reasons": [], "metrics": {}},
        "recommendations": None,
        "model": ctx.model_info(),
        "timings": {},
        "versions": versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": [],
    }


def _recommend(result: dict[str, Any], ctx: InferenceContext, job: SlideJob) -> None:
    from pipeline.rules import recommend

    clinical = ctx.clinical.lookup(job.slide_id, job.patient_id) if ctx.clinical is not None else None
    try:
        result["recommendations"] = recommend(result, clinical, ctx.ruleset)
    except PipelineError as exc:
        result["recommendations"] = {"error": str(exc), "orders": [], "disclaimer": None}
        result["quality"]["flags"].append("recommendations_failed")
        result["quality"]["reasons"].append(f"recommendations could not be made: {exc}")


def _write_fhir(result: dict[str, Any], slide_dir: Path) -> str | None:
    from pipeline.fhir import build_bundle

    recs = result.get("recommendations")
    if not recs or recs.get("error"):
        return None
    atomic_write_json(slide_dir / "fhir.json", build_bundle(result, recs))
    return "fhir.json"


@dataclass
class PreparedSlide:
    """The first stage of a slide: opened, tissue found, tile grid laid out (see :func:`prepare_slide`).

    ``facts`` are the result fields this stage sets, ``timings`` its stage times; ``error`` is what
    went wrong (raised when the slide is processed, so it fails exactly as if run in line).
    """

    facts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    mask: Any = None
    thumb: np.ndarray | None = None
    grid: Any = None
    bounds_origin: tuple[int, int] = (0, 0)
    slide_mpp: float = 0.0
    contours: list[np.ndarray] = field(default_factory=list)
    error: BaseException | None = None


def prepare_slide(job: SlideJob, ctx: InferenceContext) -> PreparedSlide:
    """Open ``job``'s slide, detect tissue and lay out the tile grid; never raises (see ``error``).

    Pure with respect to the output folder (writes nothing), so it can run ahead of time.
    """
    prep = PreparedSlide()
    t = time.perf_counter()
    try:
        with open_slide(job.path, mpp=job.mpp, slide_id=job.slide_id) as slide:
            prep.facts.update(mpp_slide=slide.mpp, mpp_source=slide.mpp_source, reader=slide.reader_name,
                              dimensions_level0=list(slide.dimensions))
            prep.facts["fingerprint"] = slide.fingerprint()
            prep.timings["open"] = round(time.perf_counter() - t, 4)
            t = time.perf_counter()
            mask, thumb = detect_tissue(slide, ctx.tiling.tissue)
            grid = make_grid(slide, mask, ctx.tiling)
            prep.timings["tissue_tiling"] = round(time.perf_counter() - t, 4)
            prep.facts.update(mpp_effective=grid.plan.effective_mpp, mpp_read_level=grid.plan.level)
            prep.mask, prep.thumb, prep.grid = mask, thumb, grid
            prep.bounds_origin, prep.slide_mpp = slide.bounds[:2], slide.mpp
            prep.contours = mask.contours_level0(slide.mpp)
    except BaseException as exc:  # noqa: BLE001 - raised again by process_slide, in the slide's own try
        prep.error = exc
    ctx.heap.release()  # the detector's full-thumbnail temporaries (beyond the model's working memory)
    return prep


def process_slides(jobs: list[SlideJob], ctx: InferenceContext, overlap: bool = True) -> Iterator[dict[str, Any]]:
    """:func:`process_slide` for each job in order, yielding each result as it is written.

    With ``overlap`` (default) the slides go through three stages at once: while slide *i* is
    in the patch model, slide *i + 1* is opened, its tissue detected and its grid laid out
    (:func:`prepare_slide`) in one background thread, and slide *i - 1*'s heatmaps, GeoJSON,
    report, FHIR and ``result.json`` are written in another (both kept in ``ctx.stages`` for
    the next batch). Tissue detection and the outputs
    use one core each; on their own they leave the other core idle, overlapped they fill the
    gaps the model and the tile readers leave (on the model's CPU both threads run at the
    lowest priority, so they never pre-empt it). Measured on the 2-core CPU (4 synthetic slides,
    onnx-int8): about 1.2-1.4x the slides per hour of running the stages one after the other.
    At most three slides are in flight (one prepared, one in the model, one being written);
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

    ``outputs`` is None when the slide failed before its outputs (then only the failure report
    is written); ``seconds`` is the time the slide spent in the first stages.
    """

    job: SlideJob
    result: dict[str, Any]
    slide_dir: Path
    seconds: float
    outputs: OutputInputs | None = None


@dataclass
class OutputInputs:
    """What the heatmaps, GeoJSON, gallery, report and FHIR of a judged slide are made from."""

    feats: Any
    attention: np.ndarray
    quality_ok: bool
    mask: Any
    thumb: np.ndarray
    grid: Any
    bounds_origin: tuple[int, int]
    slide_mpp: float
    contours: list[np.ndarray]
    tile_pixels: dict[int, np.ndarray] = field(default_factory=dict)  # gallery candidates kept from the model pass


def process_slide(job: SlideJob, ctx: InferenceContext, prepared: PreparedSlide | Future | None = None) -> dict[str, Any]:
    """Run the whole per-slide pipeline; returns the result dict (also written as result.json).

    ``prepared``: the slide's :func:`prepare_slide` output (or a future of it) when it was made
    ahead of time; None runs that stage here. Never raises for a bad slide.
    """
    return output_stage(model_stage(job, ctx, prepared), ctx)


def model_stage(job: SlideJob, ctx: InferenceContext, prepared: PreparedSlide | Future | None = None) -> ModelledSlide:
    """Open/tissue/tiling (unless ``prepared``), patch model, quality gate, aggregator, rules; never raises."""
    slide_dir = ctx.out_dir / job.slide_id
    slide_dir.mkdir(parents=True, exist_ok=True)
    result = _base_result(job, ctx)
    timings: dict[str, float] = result["timings"]
    t_start = time.perf_counter()
    outputs = None
    try:
        if isinstance(prepared, Future):
            t = time.perf_counter()
            prepared = prepared.result()
            waited = time.perf_counter() - t
        else:
            waited = None
        outputs = _run(job, ctx, result, slide_dir, timings, prepared if prepared is not None else prepare_slide(job, ctx), waited)
    except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
        _mark_failed(result, job, exc)
    return ModelledSlide(job, result, slide_dir, time.perf_counter() - t_start, outputs if result["status"] != "failed" else None)


def _mark_failed(result: dict[str, Any], job: SlideJob, exc: Exception) -> None:
    """The slide failed: a pipeline error's own one-line message, or a one-line 'unexpected error' naming the file."""
    if isinstance(exc, PipelineError):
        result.update(status="failed", error=str(exc))
        return
    log.debug("slide %s failed:\n%s", job.slide_id, traceback.format_exc())
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    result.update(status="failed", error=f"{job.path}: unexpected error ({msg})")


def output_stage(m: ModelledSlide, ctx: InferenceContext) -> dict[str, Any]:
    """Heatmaps, GeoJSON, gallery, FHIR, report, then ``result.json`` (written last); never raises."""
    job, result, slide_dir = m.job, m.result, m.slide_dir
    t_start = time.perf_counter()
    if m.outputs is not None:
        try:
            cpu0 = time.thread_time()
            _write_outputs(job, ctx, result, slide_dir, result["timings"], m.outputs)
            # CPU of this thread: when the stage overlaps the next slide's model, its wall time says little
            result["timings"]["outputs.cpu"] = round(time.thread_time() - cpu0, 4)
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            _mark_failed(result, job, exc)
    m.outputs = None  # the thumbnail and features can go
    if result["status"] == "failed":
        _finish_failed(result, job, ctx, slide_dir)
    result["timings"]["total"] = round(m.seconds + time.perf_counter() - t_start, 4)
    atomic_write_json(slide_dir / "result.json", _jsonable(result))
    ctx.heap.release()  # heatmap temporaries: memory between slides stays that of the model
    return result


def failed_result(job: SlideJob, ctx: InferenceContext, error: str) -> dict[str, Any]:
    """Write what :func:`process_slide` leaves for a failed slide (result.json + report.html) without running it.

    For engines that lose a slide outside :func:`process_slide` (e.g. a Ray worker that died).
    """
    slide_dir = ctx.out_dir / job.slide_id
    slide_dir.mkdir(parents=True, exist_ok=True)
    result = _base_result(job, ctx)
    result.update(status="failed", error=" ".join(error.split()))
    _finish_failed(result, job, ctx, slide_dir)
    atomic_write_json(slide_dir / "result.json", _jsonable(result))
    return result


def _finish_failed(result: dict[str, Any], job: SlideJob, ctx: InferenceContext, slide_dir: Path) -> None:
    """No probability for a failed slide; the rule layer's failure flags; a small failure report."""
    from pipeline.outputs.report import write_report

    result["nme_probability"], result["band"] = None, None
    result["recommendations"] = None
    try:
        _recommend(result, ctx, job)
    except Exception:  # noqa: BLE001 - the failure itself is what matters
        result["recommendations"] = None
    log.warning("%s: failed: %s", job.slide_id, result["error"])
    try:
        write_report(slide_dir / "report.html", _jsonable(result), None)
        result["files"] = ["report.html"]
    except Exception as exc:  # noqa: BLE001
        log.warning("%s: could not write the failure report (%s)", job.slide_id, exc)


def _apply_prepared(prep: PreparedSlide, result: dict[str, Any], timings: dict[str, float]) -> None:
    """Copy what :func:`prepare_slide` found into the result, in the order the stage sets it."""
    f = prep.facts
    if "mpp_slide" in f:
        result["mpp"]["slide"] = f["mpp_slide"]
        result["mpp"]["source"] = f["mpp_source"]
        result["reader"] = f["reader"]
        result["dimensions_level0"] = f["dimensions_level0"]
    if "fingerprint" in f:
        result["fingerprint"] = f["fingerprint"]
    timings.update(prep.timings)
    if "mpp_effective" in f:
        result["mpp"]["effective"] = f["mpp_effective"]
        result["mpp"]["read_level"] = f["mpp_read_level"]


def _run(job: SlideJob, ctx: InferenceContext, result: dict[str, Any], slide_dir: Path, timings: dict[str, float],
         prep: PreparedSlide, waited: float | None = None) -> OutputInputs:
    """The model stages of one slide, filling ``result``; returns what its outputs are drawn from."""
    contract = ctx.bundle.contract
    _apply_prepared(prep, result, timings)
    if waited is not None:  # prepared in the background: only the wait was on this slide's critical path
        timings["tissue_tiling.wait"] = round(waited, 4)
    if prep.error is not None:
        raise prep.error
    mask, thumb, grid = prep.mask, prep.thumb, prep.grid
    fingerprint = result["fingerprint"]
    contract.check_mpp(grid.plan.effective_mpp, source=str(job.path))
    bounds_origin, slide_mpp, contours = prep.bounds_origin, prep.slide_mpp, prep.contours
    result["n_tiles"] = len(grid)
    result["tissue"] = {"fraction": round(mask.tissue_fraction, 5), "area_mm2": round(mask.tissue_area_mm2, 4), "flags": mask.flags}

    # patch model (cached by slide fingerprint + model hash)
    t = time.perf_counter()
    cp = cache_path(ctx.cache_dir, job.slide_id)
    feats = load_features(cp, fingerprint, ctx.bundle.sha256)
    gallery_tiles = None
    if feats is None or len(feats) != len(grid):
        classes = list(contract.architecture.classes)
        gallery_tiles = TopTiles({p: classes.index(p) for p in PATTERN_CLASSES if p in classes}, GALLERY_SIZE)
        feats = extract_features(job.path, job.mpp, grid.coords, grid.plan, grid.tile_px, grid.tile_size_l0, ctx.runner,
                                 classes, batch_size=ctx.batch_size, reader_threads=ctx.reader_threads,
                                 background_rgb=mask.background_rgb, keep_top=gallery_tiles)
        if len(grid):
            save_features(cp, feats, fingerprint, ctx.bundle.sha256)
        ctx.heap.note_model_done()  # activations and tile batches: kept for the next slide
    timings["patch_model"] = round(time.perf_counter() - t, 4)
    if "model_seconds" in feats.meta:  # sub-stages (dotted: not added into the total by the report)
        timings["patch_model.model"] = round(feats.meta["model_seconds"], 4)
        timings["patch_model.tile_wait"] = round(feats.meta["wait_seconds"], 4)
        timings["patch_model.reader_busy"] = round(feats.meta["read_seconds"], 4)

    # quality gate
    t = time.perf_counter()
    classes = feats.classes
    epi = feats.column("epidermis") if "epidermis" in classes else np.zeros(len(feats), np.float32)
    q = assess_quality(
        QualityInputs(
            n_tiles=len(feats),
            tissue_area_mm2=mask.tissue_area_mm2,
            tissue_flags=list(mask.flags),
            epidermis_probs=epi,
            tile_blur=feats.sharpness,
            stain_stats=feats.stain if len(feats) else None,
            mpp_effective=grid.plan.effective_mpp,
        ),
        ctx.quality,
    )
    result["quality"] = {"flags": list(q.flags), "reasons": list(q.reasons), "metrics": _jsonable(q.metrics)}
    timings["quality"] = round(time.perf_counter() - t, 4)

    # aggregator + calibration (only for slides the model can judge)
    t = time.perf_counter()
    attention = np.full(len(feats), np.nan, np.float32)  # no attention for slides not aggregated
    if q.status == "ok":
        pred = ctx.predictor.predict(feats)
        result.update(status="ok", nme_probability=round(pred.probability, 6), band=pred.band,
                      patterns={k: round(v, 6) for k, v in pred.patterns.items()}, nme_logit=round(pred.logit, 6))
        attention = pred.attention
        b = ctx.predictor.bands
        result["calibration_note"] = CALIBRATION_NOTE.format(low=b.low, high=b.high)
    else:
        result.update(status="non_diagnostic", error=None)
        if len(feats):
            result["patterns_tile_max"] = {p: round(float(feats.column(p).max()), 6) for p in PATTERN_CLASSES if p in classes}
    timings["aggregation"] = round(time.perf_counter() - t, 4)

    # rules
    t = time.perf_counter()
    _recommend(result, ctx, job)
    timings["rules"] = round(time.perf_counter() - t, 4)

    return OutputInputs(feats=feats, attention=attention, quality_ok=q.status == "ok", mask=mask, thumb=thumb, grid=grid,
                        bounds_origin=bounds_origin, slide_mpp=slide_mpp, contours=contours,
                        tile_pixels=gallery_tiles.pixels() if gallery_tiles is not None else {})


def _write_outputs(job: SlideJob, ctx: InferenceContext, result: dict[str, Any], slide_dir: Path,
                   timings: dict[str, float], o: OutputInputs) -> None:
    """Heatmaps, GeoJSON, gallery, FHIR and report of a slide the model stages finished (no second model pass)."""
    from pipeline.outputs.geojson import write_tiles_geojson, write_tissue_geojson
    from pipeline.outputs.heatmap import (ATTENTION_LEGEND, HEATMAP_FORMATS, TileCoverage, encode_heatmap, encode_jpeg,
                                          heatmap_base, normalise_attention, render_heatmap)
    from pipeline.outputs.report import write_report

    feats, attention, mask, thumb, grid = o.feats, o.attention, o.mask, o.thumb, o.grid
    bounds_origin, slide_mpp, contours, classes = o.bounds_origin, o.slide_mpp, o.contours, o.feats.classes
    ok = o.quality_ok
    # outputs (from the predictions above: no second model pass)
    t = time.perf_counter()
    files: list[str] = []
    meas = {p: feats.column(p) for p in PATTERN_CLASSES if p in classes}
    if "epidermis" in classes:
        meas["epidermis"] = feats.column("epidermis")
    meas["attention"] = attention
    write_tiles_geojson(slide_dir / "tiles.geojson", feats.coords, feats.tile_size_l0, meas, offset=bounds_origin,
                        slide_id=job.slide_id)
    write_tissue_geojson(slide_dir / "tissue.geojson", contours, offset=bounds_origin, slide_id=job.slide_id)
    files += ["tiles.geojson", "tissue.geojson"]
    view0 = time.thread_time()  # CPU of the heatmaps and the report (the rest: GeoJSON, FHIR)
    overlays: dict[str, bytes] = {}
    base, base_mpp, base_mask = heatmap_base(thumb, mask.mpp, mask.mask, ctx.heatmap_mpp)
    result["heatmap_mpp"] = round(base_mpp, 4)
    if ok:
        # the tiles' footprint on the base is the same for every heatmap: fitted once
        coverage = TileCoverage(base.shape[:2], feats.coords, feats.tile_size_l0, slide_mpp / base_mpp, mask.origin)
        for name in HEATMAPS:
            values = normalise_attention(attention) if name == "attention" else feats.column(name)
            img = render_heatmap(base, base_mpp, slide_mpp, feats.coords, feats.tile_size_l0, values, base_mask,
                                 origin=mask.origin, title=f"{job.slide_id} - {name}", coverage=coverage,
                                 **({"legend_label": ATTENTION_LEGEND} if name == "attention" else {}))
            data = encode_heatmap(img, ctx.heatmap_format)
            file = f"heatmap_{name}{HEATMAP_FORMATS[ctx.heatmap_format]}"
            atomic_write_bytes(slide_dir / file, data)
            # the report embeds the file's JPEG bytes, or a compact JPEG beside a lossless PNG
            overlays[name] = data if ctx.heatmap_format == "jpeg" else encode_heatmap(img, "jpeg")
            files.append(file)
            del img, data
        del coverage
    gallery: dict[str, list[dict[str, Any]]] = {}
    if ok and len(feats):
        with_tiles = []
        for p in PATTERN_CLASSES:
            if p not in classes:
                continue
            order = np.argsort(-feats.column(p))[:GALLERY_SIZE]
            with_tiles.append((p, order))
        all_idx = np.unique(np.concatenate([o for _, o in with_tiles]))
        crops = {i: o.tile_pixels[i] for i in all_idx.tolist() if i in o.tile_pixels}
        missing = np.array([i for i in all_idx.tolist() if i not in crops], np.int64)  # features from the cache, or ties
        if len(missing):
            crops.update(zip(missing.tolist(), read_tiles_at(job.path, job.mpp, feats.coords[missing], grid.plan, grid.tile_px)))
        jpegs = {i: encode_jpeg(crop) for i, crop in crops.items()}  # once per tile, also when it tops several patterns
        for p, order in with_tiles:
            gallery[p] = [{"png": jpegs[int(i)], "score": float(feats.column(p)[i]),
                           "x": int(feats.coords[i][0]), "y": int(feats.coords[i][1])} for i in order]
    thumb_png = encode_jpeg(base)
    del base, base_mask
    view_cpu = time.thread_time() - view0
    fhir = _write_fhir(result, slide_dir)
    if fhir:
        files.append(fhir)
    result["files"] = files + ["report.html"]
    timings["outputs"] = round(time.perf_counter() - t, 4)  # what the report shows (it cannot time itself)
    report0 = time.thread_time()
    write_report(slide_dir / "report.html", _jsonable(result), thumb_png, overlays, gallery)
    timings["outputs"] = round(time.perf_counter() - t, 4)  # result.json: including the report
    timings["outputs.heatmaps_report_cpu"] = round(view_cpu + time.thread_time() - report0, 4)


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays → Python; NaN/inf → None (result.json never holds NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj

