"""QuPath-native GeoJSON: per-tile scores as locked ``tile`` objects, tissue as editable annotations.

Conventions (QuPath >= 0.4, see ``shared/docs/anchors.md``):

* one ``FeatureCollection``; coordinates in **level-0 pixels, origin top-left**, minus
  ``offset``. ``offset`` is the slide's OpenSlide bounds origin (``openslide.bounds-x/y``)
  for formats such as MRXS where QuPath shows the bounds-cropped image; (0, 0) otherwise.
* every ``Feature`` has a deterministic ``"id"`` (UUID v5 of slide id + object kind + level-0
  position), so re-running a slide gives identical ids and files that diff cleanly.
* tiles: ``properties = {"objectType": "tile", "isLocked": true, "measurements": {name:
  number}}`` — measurements as an object (QuPath 0.4+), floats rounded to 4 decimals,
  non-finite values left out (QuPath shows a missing measurement as NaN). Pathologists use
  *Measure → Show measurement maps* on them.
* tissue: ``properties = {"objectType": "annotation", "isLocked": false,
  "classification": {"name": "Tissue", "color": [r, g, b]}}`` — editable and re-importable.

Files are written compactly (no indentation) and atomically via :mod:`pipeline.io`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_write_text

log = logging.getLogger(__name__)

#: Namespace for the deterministic feature ids (UUID v5).
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://nme-pathology.invalid/outputs/geojson")

#: Decimals kept for measurement values (probabilities, attention).
MEASUREMENT_DECIMALS = 4
#: Decimals kept for coordinates (level-0 px); tile sizes in level-0 px are often fractional.
COORD_DECIMALS = 2

#: Display colours (RGB) for the classes this product writes; others get a stable hash colour.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "Tissue": (40, 160, 90),
    "pallor": (230, 180, 40),
    "necrolysis": (200, 50, 50),
    "parakeratosis": (60, 110, 210),
    "NME pattern": (170, 60, 170),
}


def class_colour(name: str) -> list[int]:
    """QuPath ``[r, g, b]`` (0-255) for a class name: fixed for known classes, hash-stable otherwise."""
    if name in CLASS_COLOURS:
        return list(CLASS_COLOURS[name])
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return [64 + digest[0] % 160, 64 + digest[1] % 160, 64 + digest[2] % 160]


def feature_id(slide_id: str, kind: str, *key: object) -> str:
    """Deterministic UUID (string) for a feature of ``kind`` on ``slide_id`` at ``key``."""
    name = "|".join([slide_id, kind, *(str(k) for k in key)])
    return str(uuid.uuid5(ID_NAMESPACE, name))


def _num(v: float) -> int | float:
    """Round a coordinate; integral values become ints (smaller files, exact)."""
    r = round(float(v), COORD_DECIMALS)
    return int(r) if r.is_integer() else r


def _classification(name: str | None, colour: Sequence[int] | None = None) -> dict[str, Any] | None:
    if name is None:
        return None
    col = [int(c) for c in colour] if colour is not None else class_colour(name)
    if len(col) != 3 or not all(0 <= c <= 255 for c in col):
        raise ValueError(f"classification colour for {name!r} must be 3 ints 0-255, got {colour!r}")
    return {"name": str(name), "color": col}


def _check_coords(coords: np.ndarray) -> np.ndarray:
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2) (level-0 top-left x, y), got {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError("coords contain non-finite values")
    return arr


def tiles_feature_collection(
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray],
    offset: tuple[int, int] = (0, 0),
    classification: str | None = None,
    slide_id: str = "",
) -> dict[str, Any]:
    """Per-tile scores as a QuPath ``FeatureCollection`` of locked ``tile`` objects.

    Args:
        coords: (N, 2) int, level-0 top-left (x, y) of each tile, in level-0 pixels.
        tile_size_l0: tile edge length in level-0 pixels (e.g. 224 px at 0.5 µm/px on a
            0.25 µm/px slide = 448.0); may be fractional.
        measurements: name -> (N,) numbers, e.g. ``{"pallor": p, "necrolysis": p,
            "parakeratosis": p, "attention": a}``; rounded to 4 decimals, non-finite left out.
        offset: level-0 (x, y) subtracted from every coordinate (OpenSlide bounds origin for
            bounds-cropped formats in QuPath; (0, 0) otherwise).
        classification: optional class name given to every tile (``{"name", "color"}``).
        slide_id: slide identifier; with the coordinates it makes the deterministic feature ids.

    Returns:
        A GeoJSON dict ``{"type": "FeatureCollection", "features": [...]}``, one feature per tile.
    """
    arr = _check_coords(coords)
    n = arr.shape[0]
    size = float(tile_size_l0)
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"tile_size_l0 must be a positive number of level-0 pixels, got {tile_size_l0!r}")
    ox, oy = (float(offset[0]), float(offset[1]))

    columns: list[tuple[str, list[float | None]]] = []
    for name, values in measurements.items():
        v = np.asarray(values, dtype=np.float64).reshape(-1) if np.ndim(values) else None
        if v is None or v.shape[0] != n:
            raise ValueError(f"measurement {name!r} must have shape ({n},), got {np.shape(values)}")
        finite = np.isfinite(v)
        if not finite.all():
            log.debug("measurement %r: %d non-finite value(s) left out", name, int((~finite).sum()))
        rounded = np.round(v, MEASUREMENT_DECIMALS).tolist()
        columns.append((str(name), [r if ok else None for r, ok in zip(rounded, finite.tolist())]))

    cls = _classification(classification)
    features: list[dict[str, Any]] = []
    for i, (x, y) in enumerate(arr.tolist()):
        x0, y0 = x - ox, y - oy
        x1, y1 = x0 + size, y0 + size
        a, b, c, d = _num(x0), _num(y0), _num(x1), _num(y1)
        ring = [[a, b], [c, b], [c, d], [a, d], [a, b]]
        meas = {name: col[i] for name, col in columns if col[i] is not None}
        props: dict[str, Any] = {"objectType": "tile", "isLocked": True}
        if cls is not None:
            props["classification"] = cls
        props["measurements"] = meas
        features.append(
            {
                "type": "Feature",
                "id": feature_id(slide_id, "tile", _num(x), _num(y)),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _ring(points: np.ndarray, ox: float, oy: float, what: str) -> list[list[int | float]] | None:
    """Closed ring (first point repeated at the end) in offset-corrected level-0 px, or None if degenerate."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{what} must have shape (K, 2) level-0 (x, y), got {pts.shape}")
    if pts.shape[0] and not np.all(np.isfinite(pts)):
        raise ValueError(f"{what} contains non-finite coordinates")
    if pts.shape[0] >= 2 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if pts.shape[0] < 3 or len(np.unique(pts, axis=0)) < 3:
        return None
    rel = pts - np.array([ox, oy])
    if np.all(np.abs(rel) < 2.0 ** 52) and np.all(rel == np.floor(rel)):
        ring = rel.astype(np.int64).tolist()  # whole level-0 pixels (the usual case): what _num gives, at once
    else:
        ring = [[_num(x), _num(y)] for x, y in rel.tolist()]
    ring.append(list(ring[0]))
    return ring


def tissue_feature_collection(
    polygons: Sequence[np.ndarray],
    holes: Sequence[Sequence[np.ndarray]] | None = None,
    offset: tuple[int, int] = (0, 0),
    slide_id: str = "",
    class_name: str = "Tissue",
    colour: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Tissue contours as editable QuPath ``annotation`` objects classified ``Tissue``.

    Args:
        polygons: outer contours, each (K, 2) float level-0 (x, y) pixels (closed or not).
        holes: optional, parallel to ``polygons``: for each contour a list of hole rings
            (each (M, 2) float level-0 px). ``None`` = no holes.
        offset: level-0 (x, y) subtracted from every coordinate (see module docstring).
        slide_id: used for the deterministic feature ids.
        class_name: classification name (default ``"Tissue"``).
        colour: classification colour ``[r, g, b]``; default from :data:`CLASS_COLOURS`.

    Returns:
        A GeoJSON ``FeatureCollection``; contours with fewer than 3 distinct points are skipped
        (logged), as are degenerate holes.
    """
    if holes is not None and len(holes) != len(polygons):
        raise ValueError(f"holes must be parallel to polygons ({len(polygons)}), got {len(holes)} entries")
    ox, oy = (float(offset[0]), float(offset[1]))
    cls = _classification(class_name, colour)
    features: list[dict[str, Any]] = []
    for i, poly in enumerate(polygons):
        outer = _ring(poly, ox, oy, f"tissue polygon {i}")
        if outer is None:
            log.warning("tissue polygon %d skipped: fewer than 3 distinct points", i)
            continue
        rings = [outer]
        for j, hole in enumerate((holes[i] if holes is not None else None) or []):
            r = _ring(hole, ox, oy, f"hole {j} of tissue polygon {i}")
            if r is not None:
                rings.append(r)
        features.append(
            {
                "type": "Feature",
                "id": feature_id(slide_id, "tissue", hashlib.sha256(json.dumps(rings).encode()).hexdigest()[:32]),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {"objectType": "annotation", "isLocked": False, "classification": cls},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _dump(fc: dict[str, Any]) -> str:
    return json.dumps(fc, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n"


def write_tiles_geojson(
    path: str | Path,
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray],
    offset: tuple[int, int] = (0, 0),
    classification: str | None = None,
    slide_id: str = "",
) -> Path:
    """Write :func:`tiles_feature_collection` to ``path`` (compact JSON, atomic); returns the path."""
    fc = tiles_feature_collection(coords, tile_size_l0, measurements, offset=offset,
                                  classification=classification, slide_id=slide_id)
    out = atomic_write_text(path, _dump(fc))
    log.info("wrote %d tile(s) to %s", len(fc["features"]), out)
    return out


def write_tissue_geojson(
    path: str | Path,
    polygons: Sequence[np.ndarray],
    holes: Sequence[Sequence[np.ndarray]] | None = None,
    offset: tuple[int, int] = (0, 0),
    slide_id: str = "",
    class_name: str = "Tissue",
    colour: Sequence[int] | None = None,
) -> Path:
    """Write :func:`tissue_feature_collection` to ``path`` (compact JSON, atomic); returns the path."""
    fc = tissue_feature_collection(polygons, holes=holes, offset=offset, slide_id=slide_id,
                                   class_name=class_name, colour=colour)
    out = atomic_write_text(path, _dump(fc))
    log.info("wrote %d tissue annotation(s) to %s", len(fc["features"]), out)
    return out
