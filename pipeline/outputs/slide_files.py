"""The files of one analysed slide in ``OUT/<slide_id>/``: QuPath GeoJSON, heatmaps, FHIR, report.

:func:`write_slide_files` draws everything from the :class:`~pipeline.analysis.SlideAnalysis`
(no second model pass) and returns the names of the files it wrote; ``result.json`` is written
after it by the batch runner, listing them. :func:`write_failure_report` is the small report of a
slide that failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.patch import PATTERN_CLASSES
from pipeline.analysis import SlideAnalysis
from pipeline.clinical.fhir import build_bundle
from pipeline.core.io import atomic_write_bytes, atomic_write_json
from pipeline.outputs.geojson import write_tiles_geojson, write_tissue_geojson
from pipeline.outputs.heatmap import (
    ATTENTION_LEGEND,
    HEATMAP_FORMATS,
    PROBABILITY_LEGEND,
    TileCoverage,
    encode_heatmap,
    encode_jpeg,
    heatmap_base,
    normalise_attention,
    render_heatmap,
)
from pipeline.outputs.report import write_report
from pipeline.patch.reader import read_tiles_at
from pipeline.result import SlideResult

log = logging.getLogger(__name__)

HEATMAPS = ("pallor", "necrolysis", "parakeratosis", "attention")
GALLERY_SIZE = 6


@dataclass
class SlideFileOptions:
    """How a slide's files are drawn: heatmap resolution (µm/px) and file format."""

    heatmap_mpp: float
    heatmap_format: str
    tile_pixels: dict[int, np.ndarray] = field(default_factory=dict)  # gallery candidates kept from the model pass


def write_slide_files(
    result: SlideResult, analysis: SlideAnalysis, slide_dir: Path, opts: SlideFileOptions, timings: dict[str, float]
) -> list[str]:
    """Write GeoJSON, heatmaps, FHIR and the report of a judged slide; returns the file names written.

    Sets ``result.heatmap_mpp`` (the report shows it) and adds ``outputs`` and
    ``outputs.heatmaps_report_cpu`` to ``timings`` (seconds).
    """
    prep, feats = analysis.prepared, analysis.features
    mask, classes, slide_id = prep.mask, feats.classes, result.slide_id
    ok = analysis.status == "ok"
    attention = analysis.attention()
    t = time.perf_counter()
    files: list[str] = []
    meas = {p: feats.column(p) for p in PATTERN_CLASSES if p in classes}
    if "epidermis" in classes:
        meas["epidermis"] = feats.column("epidermis")
    meas["attention"] = attention
    write_tiles_geojson(
        slide_dir / "tiles.geojson",
        feats.coords,
        feats.tile_size_l0,
        meas,
        offset=prep.bounds_origin,
        slide_id=slide_id,
    )
    write_tissue_geojson(slide_dir / "tissue.geojson", prep.contours, offset=prep.bounds_origin, slide_id=slide_id)
    files += ["tiles.geojson", "tissue.geojson"]
    view0 = time.thread_time()  # CPU of the heatmaps and the report (the rest: GeoJSON, FHIR)
    overlays: dict[str, bytes] = {}
    base, base_mpp, base_mask = heatmap_base(prep.thumb, mask.mpp, mask.mask, opts.heatmap_mpp)
    result.heatmap_mpp = round(base_mpp, 4)
    if ok:
        # the tiles' footprint on the base is the same for every heatmap: fitted once
        coverage = TileCoverage(
            base.shape[:2], feats.coords, feats.tile_size_l0, prep.slide_mpp / base_mpp, mask.origin
        )
        for name in HEATMAPS:
            values = normalise_attention(attention) if name == "attention" else feats.column(name)
            img = render_heatmap(
                base,
                base_mpp,
                prep.slide_mpp,
                feats.coords,
                feats.tile_size_l0,
                values,
                base_mask,
                origin=mask.origin,
                title=f"{slide_id} - {name}",
                coverage=coverage,
                legend_label=ATTENTION_LEGEND if name == "attention" else PROBABILITY_LEGEND,
            )
            data = encode_heatmap(img, opts.heatmap_format)
            file = f"heatmap_{name}{HEATMAP_FORMATS[opts.heatmap_format]}"
            atomic_write_bytes(slide_dir / file, data)
            # the report embeds the file's JPEG bytes, or a compact JPEG beside a lossless PNG
            overlays[name] = data if opts.heatmap_format == "jpeg" else encode_heatmap(img, "jpeg")
            files.append(file)
            del img, data
        del coverage
    gallery = _gallery(analysis, opts.tile_pixels) if ok and len(feats) else {}
    thumb_png = encode_jpeg(base)
    del base, base_mask
    view_cpu = time.thread_time() - view0
    if result.recommendations is not None and not result.recommendations.error:
        atomic_write_json(slide_dir / "fhir.json", build_bundle(result, result.recommendations))
        files.append("fhir.json")
    result.files = files + ["report.html"]
    timings["outputs"] = round(time.perf_counter() - t, 4)  # what the report shows (it cannot time itself)
    report0 = time.thread_time()
    write_report(slide_dir / "report.html", result, thumb_png, overlays, gallery)
    timings["outputs"] = round(time.perf_counter() - t, 4)  # result.json: including the report
    timings["outputs.heatmaps_report_cpu"] = round(view_cpu + time.thread_time() - report0, 4)
    return result.files


def _gallery(analysis: SlideAnalysis, tile_pixels: dict[int, np.ndarray]) -> dict[str, list[Mapping[str, Any]]]:
    """Top tiles per pattern for the report: JPEG bytes, score and level-0 position."""
    feats, prep = analysis.features, analysis.prepared
    with_tiles = [(p, np.argsort(-feats.column(p))[:GALLERY_SIZE]) for p in PATTERN_CLASSES if p in feats.classes]
    if not with_tiles:
        return {}
    all_idx = np.unique(np.concatenate([o for _, o in with_tiles]))
    crops = {i: tile_pixels[i] for i in all_idx.tolist() if i in tile_pixels}
    missing = np.array([i for i in all_idx.tolist() if i not in crops], np.int64)  # features from the cache, or ties
    if len(missing):
        grid = prep.grid
        crops.update(
            zip(
                missing.tolist(),
                read_tiles_at(prep.path, prep.mpp, feats.coords[missing], grid.plan, grid.tile_px),
                strict=True,
            )
        )
    jpegs = {i: encode_jpeg(crop) for i, crop in crops.items()}  # once per tile, also when it tops several patterns
    return {
        p: [
            {
                "png": jpegs[int(i)],
                "score": float(feats.column(p)[i]),
                "x": int(feats.coords[i][0]),
                "y": int(feats.coords[i][1]),
            }
            for i in order
        ]
        for p, order in with_tiles
    }


def write_failure_report(result: SlideResult, slide_dir: Path) -> list[str]:
    """The small report of a failed slide; returns the file names written (none when it could not be written)."""
    try:
        write_report(slide_dir / "report.html", result, None)
        return ["report.html"]
    except Exception as exc:  # noqa: BLE001 - the failure itself is what matters
        log.warning("%s: could not write the failure report (%s)", result.slide_id, exc)
        return []
