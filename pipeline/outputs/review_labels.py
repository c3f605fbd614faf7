"""Reviews → training labels: sparse per-tile pattern labels and slide verdicts from a reviewed output folder.

Read by ``train.py`` (``reviewed:`` data sources, :mod:`pipeline.training.reviewed`) and re-exported
by :mod:`pipeline.review.labels`; pure file reading, no model.

For every slide with a review (``OUT/<slide_id>/review.geojson`` / ``review.json``):

* a confirmed tile is positive for its pattern, a false-positive tile negative (explicit marks win);
* a tile covered at least ``positive_at`` (default 50 %) by a drawn ``<pattern>`` region is positive,
  by a ``not_<pattern>`` region negative (coverage measured on a mask at ``mask_mpp`` µm/px);
* a tile touching an ``exclude`` region carries no label at all;
* every other (tile, pattern) pair is unlabelled: the labels are sparse (``mask``).

Coordinates are those of ``tiles.geojson`` (level-0 px minus the slide's bounds origin; (0, 0) for
most formats). The slide label comes from the verdict: ``agree`` keeps the model's band, ``disagree``
takes the reviewer's band; HIGH → 1, LOW → 0, INDETERMINATE or none → no slide label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.outputs.batch_folder import PATTERNS, OutputFolder, read_tiles
from pipeline.outputs.reviews import EXCLUDE, REVIEW_GEOJSON, REVIEW_JSON, Review, load_review, negative
from pipeline.tiles.annotations import Annotation, rasterise, tile_coverage

log = logging.getLogger(__name__)


@dataclass
class ReviewedSlide:
    """Sparse labels of one reviewed slide.

    ``coords``: (K, 2) level-0 top-left of each labelled tile (QuPath frame); ``tile_size_l0``: tile
    side in level-0 px; ``targets`` (K, C) float32 in {0, 1} and ``mask`` (K, C) bool (which count),
    columns in ``classes`` order; ``slide_mpp`` in µm/px.
    """

    slide_id: str
    slide_path: Path | None
    slide_mpp: float | None
    coords: np.ndarray
    tile_size_l0: float
    targets: np.ndarray
    mask: np.ndarray
    classes: tuple[str, ...] = PATTERNS
    model_band: str | None = None
    reviewer_band: str | None = None
    reviewers: list[str] = field(default_factory=list)
    updated_at: str | None = None

    @property
    def slide_label(self) -> int | None:
        """1 (NME pattern, band HIGH), 0 (LOW) or None (indeterminate or no verdict)."""
        return {"HIGH": 1, "LOW": 0}.get(self.reviewer_band or "")

    @property
    def n_labels(self) -> int:
        return int(self.mask.sum())


@dataclass
class ReviewedLabels:
    """All reviewed slides of an output folder, and where they came from (for the bundle's record)."""

    out_dir: Path
    slides: list[ReviewedSlide]

    def provenance(self) -> dict[str, Any]:
        """Which reviews, by whom and when: what a fine-tuned bundle should record."""
        return {
            "out_dir": str(self.out_dir),
            "slides": [
                {
                    "slide_id": s.slide_id,
                    "reviewers": s.reviewers,
                    "updated_at": s.updated_at,
                    "tile_labels": s.n_labels,
                    "slide_label": s.slide_label,
                }
                for s in self.slides
            ],
        }


def _region_coverage(
    review: Review, coords: np.ndarray, size: float, dims: tuple[int, int], mpp: float, mask_mpp: float
) -> tuple[list[str], np.ndarray]:
    """Fraction (N, K) of each tile covered by each region class present (names in column order)."""
    names = sorted({r.class_name for r in review.regions})
    anns: list[Annotation] = [Annotation(r.class_name, a.exterior, a.holes) for r in review.regions for a in r.polygons]
    masks = rasterise(anns, names, dims, mpp, mask_mpp)
    return names, tile_coverage(masks, names, coords.astype(np.float64), size, mpp, mask_mpp)


def slide_labels(
    folder: OutputFolder, key: str, positive_at: float = 0.5, mask_mpp: float = 2.0
) -> ReviewedSlide | None:
    """Labels of the slide listed under ``key``; None when it has no review.

    Raises:
        DataError: a corrupt review or tiles file (names the file).
    """
    entry = folder.slides[key]
    if not ((entry.folder / REVIEW_GEOJSON).is_file() or (entry.folder / REVIEW_JSON).is_file()):
        return None
    review = load_review(entry.folder, entry.slide_id)
    table = read_tiles(entry.folder / "tiles.geojson")
    res = entry.result
    size = table.size or next((m.size for m in review.tiles.values()), 0.0)
    # the tile grid, plus any marked tile that is not in it
    keys = {(int(round(x)), int(round(y))): i for i, (x, y) in enumerate(table.coords.tolist())}
    extra = sorted({(k[1], k[2]) for k in review.tiles} - set(keys))
    coords = np.vstack([table.coords.reshape(-1, 2), np.array(extra, float).reshape(-1, 2)])
    keys.update({k: len(table) + j for j, k in enumerate(extra)})
    n, c = len(coords), len(PATTERNS)
    targets = np.zeros((n, c), np.float32)
    mask = np.zeros((n, c), bool)
    mpp = res.mpp.slide if res else None
    dims = res.dimensions_level0 if res else None
    names: list[str] = []
    cov = np.zeros((n, 0))
    if review.regions and n:
        if mpp is None or dims is None:
            log.warning("%s: regions ignored (result.json lacks the slide's µm/px or size)", entry.slide_id)
        else:
            names, cov = _region_coverage(review, coords, size, (int(dims[0]), int(dims[1])), mpp, mask_mpp)
    for j, p in enumerate(PATTERNS):
        for cls, value in ((p, 1.0), (negative(p), 0.0)):
            if cls in names:
                hit = cov[:, names.index(cls)] >= positive_at
                targets[hit, j], mask[hit, j] = value, True
    for (p, x, y), m in review.tiles.items():  # explicit tile marks win over regions
        i, j = keys[(x, y)], PATTERNS.index(p)
        targets[i, j], mask[i, j] = (1.0 if m.verdict == "confirm" else 0.0), True
    if EXCLUDE in names:  # exclusion wins over everything
        mask[cov[:, names.index(EXCLUDE)] > 0] = False
    keep = mask.any(axis=1)
    v = review.verdict
    model_band = res.band if res else None
    reviewer_band = None if v is None else (model_band if v.verdict == "agree" else v.band)
    people = sorted({m.reviewer for m in review.tiles.values()} | {r.reviewer for r in review.regions})
    if v is not None:
        people = sorted(set(people) | {v.reviewer})
    return ReviewedSlide(
        entry.slide_id,
        folder.slide_path(entry),
        mpp,
        coords[keep],
        float(size),
        targets[keep],
        mask[keep],
        model_band=model_band,
        reviewer_band=reviewer_band,
        reviewers=[p for p in people if p],
        updated_at=review.updated_at,
    )


def reviewed_labels(
    out_dir: Path, slides_root: Path | None = None, positive_at: float = 0.5, mask_mpp: float = 2.0
) -> ReviewedLabels:
    """Every reviewed slide of a batch output folder as sparse tile labels and slide labels.

    Raises:
        DataError: not a batch output folder, or a corrupt review file (one line, names it).
    """
    folder = OutputFolder.open(out_dir, slides_root)
    slides = [s for k in folder.slides if (s := slide_labels(folder, k, positive_at, mask_mpp)) is not None]
    log.info("%s: %d reviewed slide(s), %d tile label(s)", folder.root, len(slides), sum(s.n_labels for s in slides))
    return ReviewedLabels(folder.root, slides)
