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

Files are written compactly (no indentation) and atomically via :mod:`pipeline.core.io`; the writers
assemble the JSON text directly, byte for byte what ``json.dumps`` makes of the feature dicts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.io import atomic_write_text

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


_ID_NAMESPACE_BYTES = ID_NAMESPACE.bytes  # UUID.bytes is computed on each access
#: First hex digit of the 9th byte of a UUID given the RFC 4122 variant (``0b10xx``), by the digest's digit.
_VARIANT_DIGIT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def _uuid5_text(name: bytes) -> str:
    """``str(uuid.uuid5(ID_NAMESPACE, name))`` for the UTF-8 ``name``, without the ``UUID`` object (4x faster)."""
    hx = hashlib.sha1(_ID_NAMESPACE_BYTES + name).hexdigest()
    # as uuid.UUID(bytes=digest[:16], version=5): version 5 in the 13th hex digit, the variant in the 17th
    return f"{hx[:8]}-{hx[8:12]}-5{hx[13:16]}-{_VARIANT_DIGIT[hx[16]]}{hx[17:20]}-{hx[20:32]}"


def feature_id(slide_id: str, kind: str, *key: object) -> str:
    """Deterministic UUID (string) for a feature of ``kind`` on ``slide_id`` at ``key``."""
    name = "|".join([slide_id, kind, *(str(k) for k in key)])
    return _uuid5_text(name.encode("utf-8"))


def _num(v: float) -> int | float:
    """Round a coordinate; integral values become ints (smaller files, exact)."""
    r = round(float(v), COORD_DECIMALS)
    return int(r) if r.is_integer() else r


def _nums(values: np.ndarray) -> list[int | float]:
    """:func:`_num` of each value of a 1-D float array; all at once when all are whole (the usual case)."""
    if np.all(np.abs(values) < 2.0**52) and np.all(values == np.floor(values)):
        return values.astype(np.int64).tolist()
    return [_num(v) for v in values.tolist()]


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


class _TileParts(NamedTuple):
    """What a tile FeatureCollection is made of, as its dict and its JSON text both need it."""

    ids: list[str]
    corners: tuple[list[int | float], ...]  # rounded x0, y0, x1, y1 of every tile (offset applied)
    columns: list[tuple[str, list[float | None]]]  # measurement name -> rounded value per tile, None if left out
    cls: dict[str, Any] | None
    finite: bool  # False when a number is not finite (overflow, a NaN/inf offset): the JSON writer refuses it


def _tile_parts(
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray],
    offset: tuple[int, int],
    classification: str | None,
    slide_id: str,
) -> _TileParts:
    arr = _check_coords(coords)
    n = arr.shape[0]
    size = float(tile_size_l0)
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"tile_size_l0 must be a positive number of level-0 pixels, got {tile_size_l0!r}")
    ox, oy = (float(offset[0]), float(offset[1]))

    finite_all = True
    columns: list[tuple[str, list[float | None]]] = []
    for name, values in measurements.items():
        v = np.asarray(values, dtype=np.float64).reshape(-1) if np.ndim(values) else None
        if v is None or v.shape[0] != n:
            raise ValueError(f"measurement {name!r} must have shape ({n},), got {np.shape(values)}")
        finite = np.isfinite(v)
        rounded = np.round(v, MEASUREMENT_DECIMALS)
        finite_all = finite_all and bool(np.isfinite(rounded[finite]).all())
        kept = rounded.tolist()
        if not finite.all():
            log.debug("measurement %r: %d non-finite value(s) left out", name, int((~finite).sum()))
            kept = [r if ok else None for r, ok in zip(kept, finite.tolist())]
        columns.append((str(name), kept))

    cls = _classification(classification)
    # the same float64 arithmetic as on each (x, y) one by one: x - ox, then + size
    xy = arr.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: refused when written (as json.dumps does)
        x0, y0 = xy[:, 0] - ox, xy[:, 1] - oy
        x1, y1 = x0 + size, y0 + size
    finite_all = finite_all and bool(np.isfinite(x1).all() and np.isfinite(y1).all())
    prefix = "|".join([slide_id, "tile", ""]).encode()  # what feature_id(slide_id, "tile", x, y) hashes, less x|y
    ids = [_uuid5_text(prefix + f"{kx}|{ky}".encode()) for kx, ky in zip(_nums(xy[:, 0]), _nums(xy[:, 1]))]
    return _TileParts(ids, (_nums(x0), _nums(y0), _nums(x1), _nums(y1)), columns, cls, finite_all)


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
    parts = _tile_parts(coords, tile_size_l0, measurements, offset, classification, slide_id)
    features: list[dict[str, Any]] = []
    for i, (fid, a, b, c, d) in enumerate(zip(parts.ids, *parts.corners)):
        ring = [[a, b], [c, b], [c, d], [a, d], [a, b]]
        meas = {name: col[i] for name, col in parts.columns if col[i] is not None}
        props: dict[str, Any] = {"objectType": "tile", "isLocked": True}
        if parts.cls is not None:
            props["classification"] = parts.cls
        props["measurements"] = meas
        features.append(
            {
                "type": "Feature",
                "id": fid,
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


#: One tile feature as compact JSON: id, ring corners (a, b, c, d = x0, y0, x1, y1), classification, measurements.
_TILE_JSON = (
    '{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":[[[%s,%s],[%s,%s],[%s,%s],'
    '[%s,%s],[%s,%s]]]},"properties":{"objectType":"tile","isLocked":true%s,"measurements":{%s}}}'
)


def _tiles_json(parts: _TileParts) -> str:
    """``_dump`` of the tiles' FeatureCollection, written directly (no per-tile dicts).

    The numbers are Python ints and floats, whose ``str`` is what :func:`json.dumps` writes.
    """
    if not parts.finite:
        raise ValueError("Out of range float values are not JSON compliant")
    cls = f',"classification":{_compact(parts.cls)}' if parts.cls is not None else ""
    n = len(parts.ids)
    cells = [
        [None if v is None else f"{key}:{v}" for v in col]
        for key, col in ((_compact(name), col) for name, col in parts.columns)
    ]
    meas = [",".join([c for c in row if c is not None]) for row in zip(*cells)] if cells else [""] * n
    feats = [
        _TILE_JSON % (fid, a, b, c, b, c, d, a, d, a, b, cls, m)
        for fid, a, b, c, d, m in zip(parts.ids, *parts.corners, meas)
    ]
    return '{"type":"FeatureCollection","features":[' + ",".join(feats) + "]}\n"


def _has_3_distinct(pts: np.ndarray) -> bool:
    """True if the (K, 2) points hold at least 3 distinct (x, y) (``len(np.unique(pts, axis=0)) >= 3``, no sort)."""
    if pts.shape[0] < 3:
        return False
    not_first = np.any(pts != pts[0], axis=1)
    if not not_first.any():
        return False
    second = pts[int(not_first.argmax())]
    return bool(np.any(not_first & np.any(pts != second, axis=1)))


def _ring(points: np.ndarray, ox: float, oy: float, what: str) -> list[list[int | float]] | None:
    """Closed ring (first point repeated at the end) in offset-corrected level-0 px, or None if degenerate."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{what} must have shape (K, 2) level-0 (x, y), got {pts.shape}")
    if pts.shape[0] and not np.all(np.isfinite(pts)):
        raise ValueError(f"{what} contains non-finite coordinates")
    if pts.shape[0] >= 2 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if not _has_3_distinct(pts):
        return None
    rel = pts - np.array([ox, oy])
    if np.all(np.abs(rel) < 2.0**52) and np.all(rel == np.floor(rel)):
        ring = rel.astype(np.int64).tolist()  # whole level-0 pixels (the usual case): what _num gives, at once
    else:
        ring = [[_num(x), _num(y)] for x, y in rel.tolist()]
    ring.append(list(ring[0]))
    return ring


def _tissue_parts(
    polygons: Sequence[np.ndarray],
    holes: Sequence[Sequence[np.ndarray]] | None,
    offset: tuple[int, int],
    slide_id: str,
    class_name: str,
    colour: Sequence[int] | None,
) -> tuple[list[tuple[str, list[list[list[int | float]]], str]], dict[str, Any]]:
    """Each kept contour as (feature id, rings, rings as compact JSON), and the classification.

    The id hashes ``json.dumps(rings)`` (default separators); the compact JSON is that text without
    the spaces (rings hold numbers only), so the rings are encoded once.
    """
    if holes is not None and len(holes) != len(polygons):
        raise ValueError(f"holes must be parallel to polygons ({len(polygons)}), got {len(holes)} entries")
    ox, oy = (float(offset[0]), float(offset[1]))
    cls = _classification(class_name, colour)
    assert cls is not None  # class_name is a str
    kept: list[tuple[str, list[list[list[int | float]]], str]] = []
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
        text = json.dumps(rings)
        fid = feature_id(slide_id, "tissue", hashlib.sha256(text.encode()).hexdigest()[:32])
        kept.append((fid, rings, text.replace(", ", ",")))
    return kept, cls


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
    kept, cls = _tissue_parts(polygons, holes, offset, slide_id, class_name, colour)
    features = [
        {
            "type": "Feature",
            "id": fid,
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "isLocked": False, "classification": cls},
        }
        for fid, rings, _ in kept
    ]
    return {"type": "FeatureCollection", "features": features}


#: One tissue feature as compact JSON: id, rings (compact JSON), classification (compact JSON).
_TISSUE_JSON = (
    '{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":%s},'
    '"properties":{"objectType":"annotation","isLocked":false,"classification":%s}}'
)


def _tissue_json(kept: list[tuple[str, list[list[list[int | float]]], str]], cls: dict[str, Any]) -> str:
    """``_dump`` of the tissue FeatureCollection from the rings' JSON text (no second encoding)."""
    if any("Infinity" in text or "NaN" in text for _, _, text in kept):  # rings hold numbers only
        raise ValueError("Out of range float values are not JSON compliant")  # as json.dumps(allow_nan=False)
    cls_text = _compact(cls)
    feats = [_TISSUE_JSON % (fid, text, cls_text) for fid, _, text in kept]
    return '{"type":"FeatureCollection","features":[' + ",".join(feats) + "]}\n"


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _dump(fc: dict[str, Any]) -> str:
    return _compact(fc) + "\n"


def write_tiles_geojson(
    path: str | Path,
    coords: np.ndarray,
    tile_size_l0: float,
    measurements: Mapping[str, np.ndarray],
    offset: tuple[int, int] = (0, 0),
    classification: str | None = None,
    slide_id: str = "",
) -> Path:
    """Write :func:`tiles_feature_collection` to ``path`` (compact JSON, atomic); returns the path.

    The text is written directly from the tiles' parts, byte for byte what ``json.dumps`` makes of
    the dict (tests/test_geojson_bytes.py checks it).
    """
    parts = _tile_parts(coords, tile_size_l0, measurements, offset, classification, slide_id)
    if len({name for name, _ in parts.columns}) < len(parts.columns):  # names equal as text: the dict's rules
        text = _dump(
            tiles_feature_collection(
                coords, tile_size_l0, measurements, offset=offset, classification=classification, slide_id=slide_id
            )
        )
    else:
        text = _tiles_json(parts)
    out = atomic_write_text(path, text)
    log.info("wrote %d tile(s) to %s", len(parts.ids), out)
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
    """Write :func:`tissue_feature_collection` to ``path`` (compact JSON, atomic); returns the path.

    The text is written directly, byte for byte what ``json.dumps`` makes of the dict
    (tests/test_geojson_bytes.py checks it).
    """
    kept, cls = _tissue_parts(polygons, holes, offset, slide_id, class_name, colour)
    out = atomic_write_text(path, _tissue_json(kept, cls))
    log.info("wrote %d tissue annotation(s) to %s", len(kept), out)
    return out
