"""Reviewed output folders as training data (config ``reviewed:``).

Each source is a batch output folder with reviews written by the review app
(:mod:`pipeline.outputs.review_labels` reads them). Its reviewed tiles become
:class:`~pipeline.training.data.SlideTiles` with sparse targets (only the reviewed (tile, pattern)
pairs count in the masked loss) for the patch model's training split; its slide verdicts become
:class:`~pipeline.training.data.SlideRecord` rows for the aggregator (``nme_pattern`` from the
band, a pattern flag set where a tile of that pattern was labelled positive, each slide its own
patient). :func:`provenance` is what the bundle records: which reviews, by whom, when.

Tile coordinates: reviews are in the frame of ``tiles.geojson`` (level-0 px minus the slide's bounds
origin); the origin is added back here, and a training tile (``tiling``) is read centred on the
reviewed tile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError, SlideError
from pipeline.core.paths import REPO_ROOT
from pipeline.outputs.review_labels import ReviewedLabels, ReviewedSlide, reviewed_labels
from pipeline.tiles.tiling import TilingConfig
from pipeline.training.config import ReviewedSource
from pipeline.training.data import SlideRecord, SlideTiles, open_training_slide

log = logging.getLogger(__name__)

#: Largest relative difference between the reviewed tile and the training tile (level-0 size).
TILE_SIZE_TOLERANCE = 0.25


@dataclass
class ReviewedSet:
    """One ``reviewed:`` source read: its config entry and its labels."""

    source: ReviewedSource
    labels: ReviewedLabels


def _resolve(p: Path) -> Path:
    return p if p.is_absolute() else REPO_ROOT / p


def read_reviewed(sources: list[ReviewedSource]) -> list[ReviewedSet]:
    """Read every source's reviews; a slide id in two sources is an error naming both folders.

    Raises:
        DataError: not a batch output folder, a corrupt review file, a duplicate slide id (one line).
    """
    out: list[ReviewedSet] = []
    where: dict[str, Path] = {}
    for src in sources:
        root = _resolve(src.output)
        labels = reviewed_labels(
            root, _resolve(src.slides_root) if src.slides_root else None, positive_at=src.positive_at
        )
        for s in labels.slides:
            if s.slide_id in where:
                raise DataError(f"{root}: reviewed slide {s.slide_id!r} is also reviewed in {where[s.slide_id]}")
            where[s.slide_id] = root
        if not labels.slides:
            log.warning("%s: reviewed: no reviewed slides in this output folder", root)
        out.append(ReviewedSet(src, labels))
    return out


def _record(s: ReviewedSlide, out_dir: Path, flags: dict[str, int]) -> SlideRecord:
    if s.slide_path is None:
        raise DataError(
            f"{out_dir / s.slide_id}: slide {s.slide_id!r} not found at the path in result.json; "
            "set slides_root of this reviewed: entry"
        )
    return SlideRecord(
        slide_id=s.slide_id,
        patient_id=s.slide_id,
        path=s.slide_path,
        annotation=None,
        flags=flags,
        diagnosis="",
        mpp=s.slide_mpp,
        table=out_dir / s.slide_id / "result.json",
    )


def _pattern_flags(s: ReviewedSlide) -> dict[str, int]:
    """Slide pattern flags: 1 where a tile was labelled positive for the pattern, else 0."""
    pos = (s.targets > 0) & s.mask
    return {c: int(pos[:, j].any()) for j, c in enumerate(s.classes)}


def reviewed_tiles(s: ReviewedSlide, out_dir: Path, classes: list[str], tiling: TilingConfig) -> SlideTiles:
    """The reviewed tiles of one slide as training tiles (targets and mask in ``classes`` order).

    Raises:
        DataError: slide not found, or its reviewed tiles are not the size of the training tiles.
        SlideError / MPPError: the slide cannot be read at ``tiling``'s resolution.
    """
    record = _record(s, out_dir, _pattern_flags(s))
    with open_training_slide(record) as slide:
        plan = slide.plan(tiling.target_mpp, tiling.mpp_tolerance)
        size_l0 = slide.level0_size(tiling.tile_px, plan)
        origin = np.array(slide.bounds[:2], np.float64)
    if len(s.coords) and abs(s.tile_size_l0 / size_l0 - 1) > TILE_SIZE_TOLERANCE:
        raise DataError(
            f"{out_dir / s.slide_id / 'review.geojson'}: reviewed tiles are {s.tile_size_l0:g} px at level 0 but "
            f"training tiles are {size_l0:g} px (tiling differs from the model that was reviewed)"
        )
    shift = (s.tile_size_l0 - size_l0) / 2.0  # centre the training tile on the reviewed one
    coords = np.round(s.coords.astype(np.float64) + origin + shift).astype(np.int64).reshape(-1, 2)
    n = len(coords)
    targets = np.zeros((n, len(classes)), np.float32)
    mask = np.zeros((n, len(classes)), bool)
    for j, c in enumerate(classes):
        if c in s.classes:
            k = s.classes.index(c)
            targets[:, j], mask[:, j] = s.targets[:, k], s.mask[:, k]
    return SlideTiles(record, coords, targets, mask, np.zeros((n, len(classes)), np.float32), plan, size_l0)


def reviewed_patch_data(
    sets: list[ReviewedSet], classes: list[str], tiling: TilingConfig, seen: set[str]
) -> list[SlideTiles]:
    """Training tiles of every reviewed slide with tile labels, each with its source's weight.

    ``seen``: slide ids of the other patch data sets; a reviewed slide among them is an error (its
    tiles would be labelled twice, or a validation slide would be trained on). Problems of all
    slides are reported together.
    """
    out: list[SlideTiles] = []
    problems: list[str] = []
    for rs in sets:
        clash = sorted(seen & {s.slide_id for s in rs.labels.slides if s.n_labels})
        if clash:
            raise DataError(
                f"{rs.labels.out_dir}: reviewed slides already in another patch data set: {', '.join(clash[:5])}"
            )
        for s in rs.labels.slides:
            if not s.n_labels:
                continue
            try:
                tiles = reviewed_tiles(s, rs.labels.out_dir, classes, tiling)
            except (DataError, SlideError) as exc:
                problems.append(str(exc))
                continue
            tiles.weight = rs.source.weight
            out.append(tiles)
        log.info(
            "%s: %d reviewed slide(s), %d labelled tile(s) for training (weight %g)",
            rs.labels.out_dir,
            sum(1 for s in rs.labels.slides if s.n_labels),
            sum(len(s.coords) for s in rs.labels.slides),
            rs.source.weight,
        )
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} reviewed slides cannot be used: " + " | ".join(problems))
    return out


def reviewed_slide_records(sets: list[ReviewedSet], seen: set[str]) -> list[SlideRecord]:
    """Aggregator rows of the reviewed slides with a slide label (sources with ``slide_labels``).

    ``seen``: the aggregator's other slide ids; a reviewed slide among them is an error.
    """
    out: list[SlideRecord] = []
    for rs in sets:
        if not rs.source.slide_labels:
            continue
        labelled = [s for s in rs.labels.slides if s.slide_label is not None]
        clash = sorted(seen & {s.slide_id for s in labelled})
        if clash:
            raise DataError(
                f"{rs.labels.out_dir}: reviewed slides already in the aggregator's data: {', '.join(clash[:5])}"
            )
        for s in labelled:
            assert s.slide_label is not None
            out.append(_record(s, rs.labels.out_dir, {"nme_pattern": s.slide_label, **_pattern_flags(s)}))
        log.info("%s: %d reviewed slide verdict(s) join the aggregator", rs.labels.out_dir, len(labelled))
    return out


def provenance(sets: list[ReviewedSet], task: str) -> list[dict[str, Any]]:
    """What the bundle records per source: folder, weight, what was used (by ``task``), and per
    slide its reviewers, last review time and label counts."""
    out = []
    for rs in sets:
        prov = rs.labels.provenance()
        people = sorted({p for s in prov["slides"] for p in s["reviewers"]})
        times = sorted(t for s in prov["slides"] if (t := s["updated_at"]))
        out.append(
            {
                **prov,
                "weight": rs.source.weight,
                "used_for": [
                    *(["tile labels"] if task in ("patch", "pipeline") else []),
                    *(["slide labels"] if rs.source.slide_labels and task in ("aggregator", "pipeline") else []),
                ],
                "reviewers": people,
                "last_review_at": times[-1] if times else None,
            }
        )
    return out
