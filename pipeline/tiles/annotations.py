"""QuPath GeoJSON annotations → per-tile label coverage.

Reads what QuPath exports (a ``FeatureCollection``, a bare list of features, or one
``Feature``) and what the synthetic generator writes: polygons in **level-0 pixels** with
``properties.classification.name``. For each class the polygons are rasterised into a mask
at a coarse resolution (default 2 µm/px) and the fraction of every tile covered by the class
is read off an integral image — exact enough for tile labels and fast for any slide size.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Annotation:
    """One polygon (exterior ring + holes) of a class, level-0 pixel coordinates (x, y)."""

    class_name: str
    exterior: np.ndarray  # (K, 2) float64
    holes: list[np.ndarray]


def _features(data: Any, source: str) -> list[Mapping[str, Any]]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
        if not isinstance(feats, list):
            raise DataError(f"{source}: FeatureCollection without a 'features' list")
        return feats
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise DataError(
        f"{source}: not GeoJSON annotations (expected a FeatureCollection, a Feature or a list of features)"
    )


def _ring(coords: Any, source: str, idx: int) -> np.ndarray:
    try:
        ring = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: feature {idx}: polygon coordinates are not numbers") from None
    if ring.ndim != 2 or ring.shape[1] < 2 or ring.shape[0] < 4:
        raise DataError(f"{source}: feature {idx}: invalid polygon ring (need >= 4 [x, y] points, closed)")
    if not np.isfinite(ring).all():
        raise DataError(f"{source}: feature {idx}: polygon has non-finite coordinates")
    return ring[:, :2]


def _class_name(props: Mapping[str, Any]) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, Mapping):
        return cls.get("name")
    if isinstance(cls, str):
        return cls
    return props.get("name") if isinstance(props.get("name"), str) else None


def read_annotations(
    path: str | Path,
    known_classes: Iterable[str],
    class_map: Mapping[str, str] | None = None,
    ignore_classes: Iterable[str] = (),
) -> list[Annotation]:
    """Parse a GeoJSON file into annotations of ``known_classes``.

    Args:
        path: GeoJSON file (QuPath export or synthetic generator).
        known_classes: class names the model is trained on.
        class_map: optional renames (e.g. ``{"Pallor": "pallor"}``), applied first.
        ignore_classes: names skipped silently (e.g. ``"Tissue"``, ``"Region*"``).

    Raises:
        DataError: unreadable file, unknown class names, invalid polygons (one line, naming the file).
    """
    p = Path(path)
    source = str(p)
    known = set(known_classes)
    ignore = set(ignore_classes)
    mapping = dict(class_map or {})
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{source}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: not valid JSON ({exc})") from None
    out: list[Annotation] = []
    unknown: set[str] = set()
    for i, feat in enumerate(_features(data, source)):
        if not isinstance(feat, Mapping):
            raise DataError(f"{source}: feature {i} is not an object")
        props = feat.get("properties") or {}
        name = _class_name(props)
        if name is None:
            raise DataError(f"{source}: feature {i} has no classification name")
        name = mapping.get(name, name)
        if name in ignore:
            continue
        if name not in known:
            unknown.add(name)
            continue
        geom = feat.get("geometry") or {}
        gtype = geom.get("type")
        coords = geom.get("coordinates")
        polys: object  # validated below
        if gtype == "Polygon":
            polys = [coords]
        elif gtype == "MultiPolygon":
            polys = coords
        else:
            raise DataError(f"{source}: feature {i} ({name}): geometry {gtype!r} is not a Polygon/MultiPolygon")
        if not isinstance(polys, list) or not polys:
            raise DataError(f"{source}: feature {i} ({name}): empty geometry")
        for poly in polys:
            if not isinstance(poly, list) or not poly:
                raise DataError(f"{source}: feature {i} ({name}): empty polygon")
            rings = [_ring(r, source, i) for r in poly]
            out.append(Annotation(name, rings[0], rings[1:]))
    if unknown:
        raise DataError(
            f"{source}: unknown annotation class(es) {sorted(unknown)}; known: {sorted(known)} "
            "(map names with labels.class_map or skip them with labels.ignore_classes)"
        )
    return out


def rasterise(
    annotations: list[Annotation],
    classes: list[str],
    shape_l0: tuple[int, int],
    slide_mpp: float,
    mask_mpp: float = 2.0,
) -> dict[str, np.ndarray]:
    """Per-class bool masks (H, W) at ``mask_mpp`` µm/px covering ``shape_l0`` = (width, height) level-0 px."""
    scale = slide_mpp / mask_mpp
    w = max(1, int(math.ceil(shape_l0[0] * scale)))
    h = max(1, int(math.ceil(shape_l0[1] * scale)))
    shift = 4  # sub-pixel precision for fillPoly
    masks: dict[str, np.ndarray] = {}
    for cls in classes:
        m = np.zeros((h, w), np.uint8)
        for ann in annotations:
            if ann.class_name != cls:
                continue
            ext = np.round(ann.exterior * scale * (1 << shift)).astype(np.int32)
            cv2.fillPoly(m, [ext], 1, lineType=cv2.LINE_8, shift=shift)
            for hole in ann.holes:
                cv2.fillPoly(m, [np.round(hole * scale * (1 << shift)).astype(np.int32)], 0, shift=shift)
        masks[cls] = m.astype(bool)
    return masks


def tile_coverage(
    masks: Mapping[str, np.ndarray],
    classes: list[str],
    coords: np.ndarray,
    tile_size_l0: float,
    slide_mpp: float,
    mask_mpp: float = 2.0,
) -> np.ndarray:
    """Fraction (N, C) float32 of each tile covered by each class's mask.

    ``coords`` (N, 2) level-0 top-left; ``tile_size_l0`` tile side in level-0 px.
    """
    n = coords.shape[0]
    out = np.zeros((n, len(classes)), np.float32)
    if n == 0:
        return out
    scale = slide_mpp / mask_mpp
    for j, cls in enumerate(classes):
        m = masks[cls]
        h, w = m.shape
        integral = cv2.integral(m.astype(np.uint8)).astype(np.float64)
        x0 = np.clip(np.round(coords[:, 0] * scale), 0, w).astype(np.int64)
        y0 = np.clip(np.round(coords[:, 1] * scale), 0, h).astype(np.int64)
        x1 = np.clip(np.round((coords[:, 0] + tile_size_l0) * scale), 0, w).astype(np.int64)
        y1 = np.clip(np.round((coords[:, 1] + tile_size_l0) * scale), 0, h).astype(np.int64)
        full = max(1.0, (tile_size_l0 * scale) ** 2)
        s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        out[:, j] = np.clip(s / full, 0.0, 1.0)
    return out


def labels_from_coverage(
    coverage: np.ndarray,
    positive_at: np.ndarray,
    negative_below: np.ndarray,
    sparse: bool = False,
    basis: np.ndarray | None = None,
    min_positive: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile targets and a mask of which targets count.

    Args:
        coverage: (N, C) fraction of each tile inside each class.
        positive_at: (C,) coverage at or above which a tile is positive; for a class with a basis,
            the share of the basis class's area in the tile.
        negative_below: (C,) coverage at or below which a tile is negative (0 = "does not touch").
        sparse: sparse annotation mode: tiles not covered by any annotation are ignored.
        basis: (C,) int, optional: for each class the index of the class whose area its positive
            coverage is measured against (e.g. a pattern against the epidermis), -1 for the whole tile.
        min_positive: for classes with a basis, the least fraction of the whole tile to be positive.

    Returns:
        (targets float32 (N, C) in {0, 1}, mask bool (N, C)); ambiguous coverage is masked out.
    """
    share = coverage
    pos_floor = np.zeros(coverage.shape[1], np.float32)
    if basis is not None and (basis >= 0).any():
        relative = basis >= 0
        base = coverage[:, np.where(relative, basis, 0)]  # (N, C)
        share = np.where(relative[None, :], coverage / np.maximum(np.maximum(base, coverage), 1e-6), coverage)
        pos_floor = np.where(relative, min_positive, 0.0).astype(np.float32)
    pos = (share >= positive_at[None, :]) & (coverage >= pos_floor[None, :]) & (coverage > 0)
    neg = coverage <= negative_below[None, :]
    mask = pos | neg
    if sparse:
        annotated = (coverage > 0).any(axis=1, keepdims=True)  # (N, 1)
        mask &= annotated
    return pos.astype(np.float32), mask
