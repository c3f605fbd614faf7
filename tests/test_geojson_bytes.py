"""The GeoJSON writers write the same bytes as the straightforward dict + ``json.dumps`` builders.

``write_tiles_geojson`` and ``write_tissue_geojson`` assemble their text directly (no per-feature
dicts, the rings encoded once). Here they are compared with a reference: the plain per-tile /
per-contour builders they replaced (``uuid.uuid5`` ids, ``np.unique`` for degenerate contours,
``json.dumps`` of the whole dict), on frozen small inputs and on many random ones: NaN and
infinite measurements, fractional tile sizes, offsets, non-integer coordinates, holes,
degenerate contours, non-ASCII names.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.outputs import geojson as g

# ---------------------------------------------------------------------------------------------
# reference: the straightforward builders
# ---------------------------------------------------------------------------------------------


def ref_feature_id(slide_id: str, kind: str, *key: object) -> str:
    return str(uuid.uuid5(g.ID_NAMESPACE, "|".join([slide_id, kind, *(str(k) for k in key)])))


def ref_num(v: float) -> int | float:
    r = round(float(v), 2)
    return int(r) if r.is_integer() else r


def ref_tiles(coords, size, measurements, offset=(0, 0), classification=None, slide_id="") -> dict[str, Any]:
    arr = np.asarray(coords)
    n = arr.shape[0]
    ox, oy = float(offset[0]), float(offset[1])
    columns = []
    for name, values in measurements.items():
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(v)
        rounded = np.round(v, 4).tolist()
        columns.append((str(name), [r if ok else None for r, ok in zip(rounded, finite.tolist())]))
    assert all(len(c) == n for _, c in columns)
    cls = None if classification is None else {"name": classification, "color": g.class_colour(classification)}
    features = []
    for i, (x, y) in enumerate(arr.tolist()):
        x0, y0 = x - ox, y - oy
        x1, y1 = x0 + float(size), y0 + float(size)
        a, b, c, d = ref_num(x0), ref_num(y0), ref_num(x1), ref_num(y1)
        props: dict[str, Any] = {"objectType": "tile", "isLocked": True}
        if cls is not None:
            props["classification"] = cls
        props["measurements"] = {name: col[i] for name, col in columns if col[i] is not None}
        features.append(
            {
                "type": "Feature",
                "id": ref_feature_id(slide_id, "tile", ref_num(x), ref_num(y)),
                "geometry": {"type": "Polygon", "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def ref_ring(points, ox: float, oy: float):
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape[0] >= 2 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if pts.shape[0] < 3 or len(np.unique(pts, axis=0)) < 3:
        return None
    ring = [[ref_num(x - ox), ref_num(y - oy)] for x, y in pts.tolist()]
    ring.append(list(ring[0]))
    return ring


def ref_tissue(polygons, holes=None, offset=(0, 0), slide_id="", class_name="Tissue", colour=None) -> dict[str, Any]:
    ox, oy = float(offset[0]), float(offset[1])
    col = [int(c) for c in colour] if colour is not None else g.class_colour(class_name)
    cls = {"name": str(class_name), "color": col}
    features = []
    for i, poly in enumerate(polygons):
        outer = ref_ring(poly, ox, oy)
        if outer is None:
            continue
        hole_rings = [ref_ring(h, ox, oy) for h in (holes[i] if holes is not None else None) or []]
        rings = [outer] + [r for r in hole_rings if r is not None]
        fid = ref_feature_id(slide_id, "tissue", hashlib.sha256(json.dumps(rings).encode()).hexdigest()[:32])
        features.append(
            {
                "type": "Feature",
                "id": fid,
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {"objectType": "annotation", "isLocked": False, "classification": cls},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def ref_dump(fc: dict[str, Any]) -> str:
    return json.dumps(fc, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# frozen expected files
# ---------------------------------------------------------------------------------------------

FROZEN_TILES = (
    '{"type":"FeatureCollection","features":[{"type":"Feature","id":"0c84e4cb-5064-5802-a91d-8cd80342a827",'
    '"geometry":{"type":"Polygon","coordinates":[[[-10,-20],[415.86,-20],[415.86,405.86],[-10,405.86],[-10,-20]]]},'
    '"properties":{"objectType":"tile","isLocked":true,"classification":{"name":"pallor","color":[230,180,40]},'
    '"measurements":{"pallor":0.1234,"attention":0.0}}},{"type":"Feature","id":"a416125d-1812-5a6d-a7ea-a8ad937fa422",'
    '"geometry":{"type":"Polygon","coordinates":[[[438,-20],[863.86,-20],[863.86,405.86],[438,405.86],[438,-20]]]},'
    '"properties":{"objectType":"tile","isLocked":true,"classification":{"name":"pallor","color":[230,180,40]},'
    '"measurements":{"attention":0.9}}},{"type":"Feature","id":"e0660fed-61db-593a-8071-19fb11adc36c",'
    '"geometry":{"type":"Polygon","coordinates":[[[990.5,1980.25],[1416.36,1980.25],[1416.36,2406.11],'
    '[990.5,2406.11],[990.5,1980.25]]]},"properties":{"objectType":"tile","isLocked":true,'
    '"classification":{"name":"pallor","color":[230,180,40]},"measurements":{"pallor":1.0,"attention":0.3333}}}]}\n'
)
FROZEN_TISSUE = (
    '{"type":"FeatureCollection","features":[{"type":"Feature","id":"c7ba603e-e467-5201-b2cb-7c6f62e18f1f",'
    '"geometry":{"type":"Polygon","coordinates":[[[-3,-4],[97,-4],[97,76],[-3,76],[-3,-4]],'
    '[[7,6],[17.5,6],[17.5,16],[7,6]]]},"properties":{"objectType":"annotation","isLocked":false,'
    '"classification":{"name":"Tissue","color":[40,160,90]}}}]}\n'
)


def test_frozen_tiles_file(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [448, 0], [1000.5, 2000.25]])
    meas = {"pallor": np.array([0.12345, np.nan, 1.0]), "attention": np.array([1e-5, 0.9, 1 / 3], np.float32)}
    args = (coords, 224 * 0.5 / 0.263, meas)
    kw = {"offset": (10, 20), "classification": "pallor", "slide_id": "S-ü1"}
    path = g.write_tiles_geojson(tmp_path / "t.geojson", *args, **kw)
    assert path.read_bytes() == FROZEN_TILES.encode("utf-8")
    assert ref_dump(ref_tiles(*args, **kw)) == FROZEN_TILES
    assert g._dump(g.tiles_feature_collection(*args, **kw)) == FROZEN_TILES


def test_frozen_tissue_file(tmp_path: Path) -> None:
    square = np.array([[0, 0], [100, 0], [100, 80], [0, 80], [0, 0]], float)
    polys = [square, np.array([[5.0, 5.0], [5.0, 5.0], [6.0, 6.0]])]  # the second one is degenerate
    holes = [[np.array([[10, 10], [20.5, 10], [20.5, 20]]), np.array([[1, 1], [1, 1], [1, 1]], float)], []]
    path = g.write_tissue_geojson(tmp_path / "t.geojson", polys, holes, offset=(3, 4), slide_id="S-1")
    assert path.read_bytes() == FROZEN_TISSUE.encode("utf-8")
    assert ref_dump(ref_tissue(polys, holes, offset=(3, 4), slide_id="S-1")) == FROZEN_TISSUE
    assert g._dump(g.tissue_feature_collection(polys, holes, offset=(3, 4), slide_id="S-1")) == FROZEN_TISSUE


# ---------------------------------------------------------------------------------------------
# random inputs
# ---------------------------------------------------------------------------------------------

NAMES = ["pallor", "necrolysis", "parakeratosis", "epidermis", "attention", "Größe µm", 'q"uote\\', "tab\tnl\n", "ü"]
FRACTIONS = [0.0, 0.5, 0.25, 0.125, 1 / 3, 0.005, 0.015, 0.675, 2 / 3, 0.999]


def _random_coords(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = int(rng.integers(0, 5))
    if kind == 0:  # the usual case: a whole-pixel grid
        step = int(rng.choice([224, 448, 512, 1000]))
        return rng.integers(0, 200, (n, 2)) * step
    if kind == 1:  # fractional level-0 positions
        return rng.integers(-100, 100_000, (n, 2)) + rng.choice(FRACTIONS, (n, 2))
    if kind == 2:
        return rng.uniform(-1e4, 1e6, (n, 2)).astype(np.float32)
    if kind == 3:  # whole values stored as floats, with a negative zero
        c = rng.integers(-50, 50, (n, 2)).astype(np.float64)
        if n:
            c[0, 0] = -0.0
        return c
    return rng.integers(0, 2**40, (n, 2))


def _random_column(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.random(n)
    kind = int(rng.integers(0, 6))
    if kind == 1:
        v[rng.random(n) < 0.3] = np.nan
    elif kind == 2:
        v[rng.random(n) < 0.2] = rng.choice([np.inf, -np.inf, np.nan])
    elif kind == 3:  # halfway between 4-decimal values, tiny, negative, large
        v = rng.integers(0, 10_000, n) / 10_000 + 0.00005 * rng.choice([1, -1, 0], n)
        v[: n // 4] = rng.choice([1e-7, -1e-7, -0.0, 0.0, 1e20, -3.5, 12345.67891], n // 4)
    return v.astype(np.float32) if rng.random() < 0.5 else v


@pytest.mark.parametrize("seed", range(4))
def test_tiles_file_matches_the_reference_on_random_inputs(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for trial in range(60):
        n = int(rng.choice([0, 1, 2, 7, 150, 400]))
        coords = _random_coords(rng, n)
        size = float(rng.choice([448, 448.0, 224 * 0.5 / 0.263, 0.5, 1e-3, 1234.5678, rng.uniform(1, 1000)]))
        names = list(rng.choice(NAMES, int(rng.integers(0, 6)), replace=False))
        meas = {name: _random_column(rng, n) for name in names}
        offset = [(0, 0), (1024, 512), (-7, 3), (0.5, 1 / 3), (12.345, -0.005)][int(rng.integers(0, 5))]
        cls = [None, "pallor", "NME pattern", "Gewebe-ü", 'odd "name"'][int(rng.integers(0, 5))]
        sid = ["", "S-001", "SYN2024-0001", "slide|ü/名"][int(rng.integers(0, 4))]
        kw = {"offset": offset, "classification": cls, "slide_id": sid}
        want = ref_dump(ref_tiles(coords, size, meas, **kw))
        path = g.write_tiles_geojson(tmp_path / "t.geojson", coords, size, meas, **kw)
        assert path.read_bytes() == want.encode("utf-8"), (seed, trial)
        assert g._dump(g.tiles_feature_collection(coords, size, meas, **kw)) == want, (seed, trial)


def _random_ring(rng: np.random.Generator) -> np.ndarray:
    k = int(rng.choice([0, 1, 2, 3, 4, 5, 12, 60, 500]))
    kind = int(rng.integers(0, 6))
    if kind == 0:
        pts = rng.integers(0, 50_000, (k, 2)).astype(np.float64)
    elif kind == 1:
        pts = rng.integers(0, 50_000, (k, 2)) + rng.choice(FRACTIONS, (k, 2))
    elif kind == 2:  # few distinct points, many repeats (degenerate or barely not)
        base = rng.integers(0, 3, (int(rng.integers(1, 4)), 2)).astype(np.float64)
        pts = base[rng.integers(0, len(base), k)] if k else np.zeros((0, 2))
    elif kind == 3:  # with signed zeros
        pts = rng.choice([0.0, -0.0, 1.0], (k, 2))
    elif kind == 4:
        pts = rng.uniform(0, 1000, (k, 2))
    else:
        pts = (rng.integers(0, 100, (k, 2)) * 16.0).astype(np.float32)
    if k and rng.random() < 0.5:
        pts = np.vstack([pts, pts[:1]])  # closed
    return pts


@pytest.mark.parametrize("seed", range(4))
def test_tissue_file_matches_the_reference_on_random_inputs(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for trial in range(60):
        polys = [_random_ring(rng) for _ in range(int(rng.integers(0, 6)))]
        holes = None
        if rng.random() < 0.6:
            holes = [[_random_ring(rng) for _ in range(int(rng.integers(0, 4)))] for _ in polys]
        offset = [(0, 0), (300, 700), (0.5, 1 / 3), (-12, 0.005)][int(rng.integers(0, 4))]
        name, colour = [("Tissue", None), ("Gewebe-ü", None), ("x", (1, 2, 3)), ("Tissue", [0, 255, 128])][
            int(rng.integers(0, 4))
        ]
        sid = ["", "S-001", "slide|ü"][int(rng.integers(0, 3))]
        kw = {"offset": offset, "slide_id": sid, "class_name": name, "colour": colour}
        want = ref_dump(ref_tissue(polys, holes, **kw))
        path = g.write_tissue_geojson(tmp_path / "t.geojson", polys, holes, **kw)
        assert path.read_bytes() == want.encode("utf-8"), (seed, trial)
        assert g._dump(g.tissue_feature_collection(polys, holes, **kw)) == want, (seed, trial)


def test_feature_id_is_uuid5_text() -> None:
    rng = np.random.default_rng(3)
    alphabet = list("abcXYZ019|-_ .µüß名😀")
    for _ in range(2000):
        sid = "".join(rng.choice(alphabet, int(rng.integers(0, 20))))
        key = [int(rng.integers(-(10**6), 10**6)), round(float(rng.uniform(-1e5, 1e5)), 2), sid]
        assert g.feature_id(sid, "tile", *key) == ref_feature_id(sid, "tile", *key)


def test_three_distinct_points_as_np_unique() -> None:
    rng = np.random.default_rng(4)
    for _ in range(3000):
        k = int(rng.integers(0, 8))
        pts = rng.choice([0.0, -0.0, 1.0, 2.5], (k, 2))
        want = k >= 3 and len(np.unique(pts, axis=0)) >= 3
        assert g._has_3_distinct(pts) == want, pts


# ---------------------------------------------------------------------------------------------
# the same failures as json.dumps(allow_nan=False), nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflowing_numbers_are_refused_as_before(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [448, 0]])
    cases = [
        (coords, 448, {"pallor": np.array([0.5, 1e308])}, (0, 0)),  # rounding overflows to inf
        (np.array([[1.7e308, 0.0]]), 1e308, {}, (0, 0)),  # x + size overflows
        (coords, 448, {}, (float("inf"), 0)),
        (coords, 448, {}, (0, float("nan"))),
    ]
    for c, size, meas, offset in cases:
        with pytest.raises(ValueError):
            ref_dump(ref_tiles(c, size, meas, offset=offset))
        with pytest.raises(ValueError):
            g.write_tiles_geojson(tmp_path / "t.geojson", c, size, meas, offset=offset)
    square = [np.array([[0, 0], [10, 0], [10, 10]], float)]
    far = [np.array([[1.7e308, 0], [1.7e308, 10], [0, 10]])]
    for polys, offset in [(square, (float("inf"), 0)), (square, (0, float("nan"))), (far, (-1.7e308, 0))]:
        with pytest.raises(ValueError):
            ref_dump(ref_tissue(polys, offset=offset))
        with pytest.raises(ValueError):
            g.write_tissue_geojson(tmp_path / "s.geojson", polys, offset=offset)
    assert not list(tmp_path.iterdir()), "nothing (not even a temp file) is written"


def test_measurement_names_equal_as_text_follow_the_dict(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [448, 0], [896, 0]])
    meas = {1: np.array([0.1, np.nan, 0.3]), "x": np.array([0.5, 0.6, 0.7]), "1": np.array([np.nan, 0.2, 0.9])}
    want = ref_dump(ref_tiles(coords, 448, meas))
    assert g.write_tiles_geojson(tmp_path / "t.geojson", coords, 448, meas).read_bytes() == want.encode("utf-8")
