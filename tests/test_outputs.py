"""Output layer: QuPath GeoJSON, heatmaps, HTML report text, summary CSV and index page.

Inputs are built like the batch runner's: a synthetic H&E-like thumbnail with a pink tissue
blob, a tile grid over the tissue at 224 px / 0.5 µm/px on a 0.25 µm/px slide, and smooth
per-pattern tile scores. (The real-browser checks of the HTML live in test_report_browser.py.)
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline import DEMO_MODEL_LABEL
from pipeline.outputs.geojson import (
    tiles_feature_collection,
    tissue_feature_collection,
    write_tiles_geojson,
    write_tissue_geojson,
)
from pipeline.outputs.heatmap import (
    ATTENTION_LEGEND,
    colormap_lut,
    encode_png,
    normalise_attention,
    overlay_values,
    render_heatmap,
    tile_mean_map,
    values_to_rgb,
    write_png,
)
from pipeline.outputs.report import render_report, write_report
from pipeline.outputs.summary import format_orders, render_index, write_index_html, write_summary_csv

PATTERNS = ("pallor", "necrolysis", "parakeratosis")
SLIDE_MPP = 0.25  # µm/px at level 0
THUMB_MPP = 16.0  # µm/px of the thumbnail
TILE_L0 = 224 * 0.5 / SLIDE_MPP  # 224 px at 0.5 µm/px = 448 level-0 px


# ---------------------------------------------------------------------------------------------
# realistic inputs
# ---------------------------------------------------------------------------------------------


def make_case(
    seed: int = 0, slide_id: str = "S-001", shape: tuple[int, int] = (420, 600), origin: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    """A synthetic slide at thumbnail scale, its tissue mask, a tile grid over tissue and scores."""
    rng = np.random.default_rng(seed)
    h, w = shape
    thumb = np.empty((h, w, 3), np.float32)
    thumb[:] = (242, 241, 245)
    thumb += rng.normal(0, 1.5, thumb.shape)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w * (0.5 + 0.05 * rng.standard_normal()), h * 0.52
    ang = np.arctan2(yy - cy, xx - cx)
    radius = 1 + 0.12 * np.sin(3 * ang + seed) + 0.06 * np.cos(5 * ang)
    r = np.sqrt(((xx - cx) / (0.36 * w)) ** 2 + ((yy - cy) / (0.34 * h)) ** 2) / radius
    mask = r < 1.0
    dermis = np.array([232, 168, 200], np.float32)
    epidermis = np.array([196, 120, 178], np.float32)
    rim = (r > 0.82) & mask & (yy < cy)  # epidermis along the upper edge
    thumb[mask] = dermis + rng.normal(0, 6, (int(mask.sum()), 3))
    thumb[rim] = epidermis + rng.normal(0, 6, (int(rim.sum()), 3))
    nuclei = mask & (rng.random(shape) < 0.04)
    thumb[nuclei] = (120, 70, 150)
    thumb = np.clip(thumb, 0, 255).astype(np.uint8)

    scale = SLIDE_MPP / THUMB_MPP  # thumbnail px per level-0 px
    ext_x, ext_y = w / scale, h / scale
    gx, gy = np.meshgrid(np.arange(0, ext_x - TILE_L0, TILE_L0), np.arange(0, ext_y - TILE_L0, TILE_L0))
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64) + np.asarray(origin)
    centre = ((coords - np.asarray(origin)) + TILE_L0 / 2) * scale
    ci = np.clip(centre.astype(int), 0, [w - 1, h - 1])
    on = mask[ci[:, 1], ci[:, 0]]
    coords, centre = coords[on], centre[on]

    top = 1.0 - (centre[:, 1] - (cy - 0.34 * h)) / (0.68 * h)  # 1 at the top of the tissue
    hot = np.exp(-(((centre[:, 0] - cx * 0.8) / (0.1 * w)) ** 2 + ((centre[:, 1] - cy * 0.8) / (0.1 * h)) ** 2))
    noise = lambda: rng.normal(0, 0.05, len(coords))  # noqa: E731
    scores = {
        "pallor": np.clip(0.15 + 0.7 * top**2 + noise(), 0, 1),
        "necrolysis": np.clip(0.05 + 0.9 * hot + noise(), 0, 1),
        "parakeratosis": np.clip(0.1 + 0.8 * (top > 0.8) + noise(), 0, 1),
    }
    logits = 4 * scores["necrolysis"] + 2 * scores["pallor"]
    att = np.exp(logits - logits.max())
    att /= att.sum()
    return {
        "slide_id": slide_id,
        "thumb": thumb,
        "mask": mask,
        "coords": coords,
        "scores": scores,
        "attention": att,
        "origin": origin,
    }


def make_tile_png(rng: np.random.Generator, tint: tuple[int, int, int]) -> bytes:
    """A 224 x 224 H&E-like tile (pink texture with nuclei) as PNG bytes."""
    tile = np.clip(np.asarray(tint, np.float32) + rng.normal(0, 10, (224, 224, 3)), 0, 255).astype(np.uint8)
    for _ in range(40):
        c = (int(rng.integers(0, 224)), int(rng.integers(0, 224)))
        cv2.circle(tile, c, int(rng.integers(3, 7)), (110, 60, 140), -1)
    return encode_png(tile)


def make_result(
    slide_id: str = "S-001", status: str = "ok", prob: float | None = 0.87, band: str | None = "HIGH"
) -> dict[str, Any]:
    """A result dict as the batch runner writes it."""
    return {
        "slide_id": slide_id,
        "status": status,
        "error": None,
        "nme_probability": prob,
        "band": band,
        "patterns": {"pallor": 0.81, "necrolysis": 0.64, "parakeratosis": 0.72},
        "n_tiles": 1432,
        "mpp": {"slide": 0.25, "requested": 0.5, "effective": 0.5, "source": "openslide.mpp-x"},
        "tissue": {"fraction": 0.312, "area_mm2": 18.4, "flags": ["pale_tissue"]},
        "reader": "openslide",
        "dimensions_level0": [38400, 26880],
        "fingerprint": "9f" * 32,
        "quality": {"flags": ["pale_tissue"], "reasons": ["tissue is pale; mask checked with optical density"]},
        # the shape pipeline.clinical.rules.recommend() returns
        "recommendations": {
            "status": status,
            "ruleset_version": "1.0.0",
            "orders": [
                {
                    "id": "cbc",
                    "display": "Complete blood count",
                    "category": "laboratory",
                    "priority": "routine",
                    "code": {
                        "system": "http://loinc.org",
                        "code": "58410-2",
                        "display": "CBC panel - Blood by Automated count",
                    },
                    "code_verified": True,
                    "additional_codes": [],
                    "rules": ["R4"],
                    "rationale": ["R4: NME-pattern band HIGH (p = 0.87): fasting glucagon first with first-line labs."],
                    "evidence": ["WORKUP"],
                    "note": None,
                },
                {
                    "id": "glucagon",
                    "display": "Fasting plasma glucagon",
                    "category": "laboratory",
                    "priority": "urgent",
                    "code": {
                        "system": "http://loinc.org",
                        "code": "2338-2",
                        "display": "Glucagon [Mass/volume] in Serum or Plasma",
                    },
                    "code_verified": True,
                    "additional_codes": [],
                    "rules": ["R4"],
                    "rationale": ["R4: NME-pattern band HIGH (p = 0.87): fasting glucagon first with first-line labs."],
                    "evidence": ["MAYO_9358"],
                    "note": "Pre-analytics: 8 h fast, pre-chilled EDTA tube kept on ice. Imaging waits for this result.",
                },
                {
                    "id": "rebiopsy",
                    "display": "Skin re-biopsy of an early active lesion",
                    "category": "procedure",
                    "priority": "routine",
                    "code": {
                        "system": "urn:nme-pathology:local-orders",
                        "code": "skin-rebiopsy",
                        "display": "Skin re-biopsy",
                    },
                    "code_verified": False,
                    "additional_codes": [
                        {"system": "http://loinc.org", "code": "1558-6", "display": "Fasting glucose"}
                    ],
                    "rules": ["R9"],
                    "rationale": ["Pale tissue: confirm on a fresh biopsy."],
                    "evidence": [],
                    "note": "",
                },
            ],
            "differential": [
                {
                    "id": "zinc_deficiency",
                    "name": "Zinc deficiency / acrodermatitis enteropathica",
                    "why": ["R4: shares the necrolytic histology; check zinc"],
                    "rules": ["R4"],
                },
                {
                    "id": "pellagra",
                    "name": "Pellagra (niacin deficiency)",
                    "why": ["R4: sun-exposed rash, alcohol, malnutrition"],
                    "rules": ["R4"],
                },
            ],
            "flags": [{"id": "quality_warning", "message": "quality gate warnings: pale tissue", "rules": []}],
            "notes": ["Histology alone cannot separate NME from nutritional deficiency dermatoses."],
            "clinical_context": {"diabetes": True, "weight_loss": True, "site": "perineal"},
            "evidence": {
                "MAYO_9358": "[E: Mayo Clinic Labs test 9358]",
                "WORKUP": "[S: laboratory work-up per ARUP, Medscape and MSD Manual 2024]",
            },
            "disclaimer": "Rule set proposals must be confirmed by the treating clinician.",
        },
        "model": {"name": "nme-patch-cnn", "version": "0.1.0", "sha256": "ab" * 32, "label": DEMO_MODEL_LABEL},
        "timings": {"open": 0.12, "tissue": 0.4, "tiling": 0.3, "features": 6.2, "aggregate": 0.05, "outputs": 0.9},
        "versions": {"python": "3.11.9", "numpy": np.__version__, "opencv": cv2.__version__},
    }


def render_overlays(case: dict[str, Any]) -> dict[str, bytes]:
    """Heatmap PNGs for the three patterns and attention, as the batch runner makes them."""
    out = {}
    common = dict(
        thumbnail=case["thumb"],
        thumb_mpp=THUMB_MPP,
        slide_mpp=SLIDE_MPP,
        coords=case["coords"],
        tile_size_l0=TILE_L0,
        tissue_mask=case["mask"],
        origin=case["origin"],
    )
    for p in PATTERNS:
        out[p] = encode_png(render_heatmap(values=case["scores"][p], title=f"{case['slide_id']} - {p}", **common))
    out["attention"] = encode_png(
        render_heatmap(
            values=normalise_attention(case["attention"]),
            title=f"{case['slide_id']} - attention",
            legend_label=ATTENTION_LEGEND,
            **common,
        )
    )
    return out


def make_gallery(case: dict[str, Any], k: int = 4) -> dict[str, list[dict[str, Any]]]:
    rng = np.random.default_rng(7)
    tints = {"pallor": (238, 200, 222), "necrolysis": (214, 150, 190), "parakeratosis": (200, 120, 170)}
    gallery = {}
    for p in PATTERNS:
        order = np.argsort(-case["scores"][p])[:k]
        gallery[p] = [
            {
                "png": make_tile_png(rng, tints[p]),
                "score": float(case["scores"][p][i]),
                "x": int(case["coords"][i, 0]),
                "y": int(case["coords"][i, 1]),
            }
            for i in order
        ]
    return gallery


def no_tmp_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# GeoJSON
# ---------------------------------------------------------------------------------------------


def _strict_load(path: Path) -> Any:
    def bad(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token} in {path.name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


def test_tiles_geojson_follows_qupath_conventions(tmp_path: Path) -> None:
    case = make_case()
    coords, n = case["coords"], len(case["coords"])
    att = case["attention"]
    meas = {**case["scores"], "attention": att}
    offset = (1024, 512)
    path = write_tiles_geojson(tmp_path / "tiles.geojson", coords, TILE_L0, meas, offset=offset, slide_id="S-001")

    fc = _strict_load(path)
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == n > 100
    ids = set()
    for i, f in enumerate(fc["features"]):
        assert f["type"] == "Feature"
        ids.add(str(uuid.UUID(f["id"])))
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = np.asarray(geom["coordinates"][0], dtype=float)
        assert ring.shape == (5, 2) and np.array_equal(ring[0], ring[-1]), "ring must be closed"
        x0, y0 = coords[i] - np.asarray(offset)
        assert ring[:, 0].min() == pytest.approx(x0) and ring[:, 1].min() == pytest.approx(y0)
        assert ring[:, 0].max() - ring[:, 0].min() == pytest.approx(TILE_L0)
        assert ring[:, 1].max() - ring[:, 1].min() == pytest.approx(TILE_L0)
        props = f["properties"]
        assert props["objectType"] == "tile" and props["isLocked"] is True
        m = props["measurements"]
        assert isinstance(m, dict) and set(m) == {"pallor", "necrolysis", "parakeratosis", "attention"}
        for name, value in m.items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool)
            assert value == pytest.approx(float(meas[name][i]), abs=5e-5)
            assert round(value, 4) == value
    assert len(ids) == n, "feature ids must be unique"
    # a compact file: no indentation
    assert "\n  " not in path.read_text(encoding="utf-8")
    assert no_tmp_left(tmp_path)


def test_tile_ids_deterministic_per_slide_and_position() -> None:
    case = make_case()
    a = tiles_feature_collection(case["coords"], TILE_L0, case["scores"], slide_id="S-001")
    b = tiles_feature_collection(case["coords"], TILE_L0, case["scores"], slide_id="S-001")
    c = tiles_feature_collection(case["coords"], TILE_L0, case["scores"], slide_id="S-002")
    assert [f["id"] for f in a["features"]] == [f["id"] for f in b["features"]]
    assert not {f["id"] for f in a["features"]} & {f["id"] for f in c["features"]}
    assert json.loads(json.dumps(a)) == a  # JSON round trip


def test_tiles_geojson_fractional_size_nan_and_classification(tmp_path: Path) -> None:
    coords = np.array([[1000, 2000], [1426, 2000]])
    size = 224 * 0.5 / 0.263  # a 0.263 µm/px scanner: 425.855 level-0 px
    meas = {"pallor": np.array([0.123456, np.nan]), "attention": np.array([1e-5, 0.9])}
    path = write_tiles_geojson(tmp_path / "t.geojson", coords, size, meas, classification="pallor", slide_id="x")
    fc = _strict_load(path)
    f0, f1 = fc["features"]
    ring = np.asarray(f0["geometry"]["coordinates"][0])
    assert ring[1, 0] - ring[0, 0] == pytest.approx(size, abs=0.01)
    assert f0["properties"]["measurements"] == {"pallor": 0.1235, "attention": 0.0}
    assert f1["properties"]["measurements"] == {"attention": 0.9}, "a NaN measurement is left out, not written"
    cls = f0["properties"]["classification"]
    assert cls["name"] == "pallor" and len(cls["color"]) == 3 and all(isinstance(c, int) for c in cls["color"])


def test_tiles_geojson_rejects_mismatched_measurements_without_writing(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [448, 0], [896, 0]])
    with pytest.raises(ValueError, match="pallor"):
        write_tiles_geojson(tmp_path / "bad.geojson", coords, 448, {"pallor": np.array([0.1, 0.2])})
    with pytest.raises(ValueError, match="shape"):
        tiles_feature_collection(np.array([1, 2, 3]), 448, {})
    assert not list(tmp_path.iterdir()), "nothing (not even a temp file) is left after a failed write"


def test_tissue_geojson_editable_annotations_with_holes_and_offset(tmp_path: Path) -> None:
    case = make_case()
    mask = case["mask"].astype(np.uint8)
    cv2.circle(mask, (300, 220), 20, 0, -1)  # a hole (e.g. a fold removed from the mask)
    contours, hier = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    l0 = THUMB_MPP / SLIDE_MPP  # level-0 px per thumbnail px
    outer = [i for i in range(len(contours)) if hier[0][i][3] < 0]
    polygons = [contours[i].reshape(-1, 2) * l0 for i in outer]
    holes = [[contours[j].reshape(-1, 2) * l0 for j in range(len(contours)) if hier[0][j][3] == i] for i in outer]
    assert sum(len(h) for h in holes) == 1
    degenerate = np.array([[5.0, 5.0], [5.0, 5.0], [6.0, 6.0]])
    offset = (300, 700)
    path = write_tissue_geojson(
        tmp_path / "tissue.geojson", polygons + [degenerate], holes + [[]], offset=offset, slide_id="S-001"
    )
    fc = _strict_load(path)
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == len(polygons), "the degenerate contour is skipped"
    n_holes = 0
    for f, poly in zip(fc["features"], polygons):
        uuid.UUID(f["id"])
        p = f["properties"]
        assert p["objectType"] == "annotation" and p["isLocked"] is False
        assert p["classification"]["name"] == "Tissue"
        assert len(p["classification"]["color"]) == 3
        rings = f["geometry"]["coordinates"]
        assert f["geometry"]["type"] == "Polygon"
        for ring in rings:
            assert ring[0] == ring[-1] and len(ring) >= 4
        ext = np.asarray(rings[0], dtype=float)
        assert ext[:-1] == pytest.approx(poly - np.asarray(offset), abs=0.01)
        n_holes += len(rings) - 1
    assert n_holes == 1
    assert (
        tissue_feature_collection(polygons, slide_id="a")["features"][0]["id"]
        == tissue_feature_collection(polygons, slide_id="a")["features"][0]["id"]
    )


# ---------------------------------------------------------------------------------------------
# heatmap
# ---------------------------------------------------------------------------------------------


def _grey(h: int, w: int, v: int = 200) -> np.ndarray:
    return np.full((h, w, 3), v, np.uint8)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    return np.rint(base.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)


def test_overlap_is_averaged_to_the_mid_colour() -> None:
    thumb = _grey(60, 100)
    # slide and thumbnail at the same scale x 4: a 80 level-0 px tile is 20 thumbnail px
    coords = np.array([[40, 40], [80, 40]])  # thumbnail x: [10, 30) and [20, 40): overlap [20, 30)
    out = overlay_values(
        thumb, thumb_mpp=2.0, slide_mpp=0.5, coords=coords, tile_size_l0=80, values=np.array([0.0, 1.0]), alpha=0.5
    )
    lut = colormap_lut()
    assert not np.array_equal(lut[0], lut[255])
    np.testing.assert_array_equal(out[15, 15], _blend(thumb[15, 15], lut[0], 0.5))
    np.testing.assert_array_equal(out[15, 35], _blend(thumb[15, 35], lut[255], 0.5))
    mid = _blend(thumb[15, 25], values_to_rgb(np.array(0.5)), 0.5)
    np.testing.assert_array_equal(out[12:28, 20:30], np.broadcast_to(mid, (16, 10, 3)))
    # exactly the tiles' pixels are coloured: rows 10-29, columns 10-39
    changed = np.any(out != thumb, axis=2)
    expected = np.zeros_like(changed)
    expected[10:30, 10:40] = True
    np.testing.assert_array_equal(changed, expected)


def test_masked_pixels_keep_the_thumbnail_and_origin_is_applied() -> None:
    rng = np.random.default_rng(1)
    thumb = rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)
    mask = np.zeros((50, 80), bool)
    mask[:, :40] = True
    origin = (1000, 2000)
    coords = np.array([[1000, 2000], [1000 + 30 * 8, 2000]])  # scale 1/8: tiles at thumb x 0 and 30, 20 px wide
    out = overlay_values(
        thumb,
        thumb_mpp=4.0,
        slide_mpp=0.5,
        coords=coords,
        tile_size_l0=160,
        values=np.array([0.9, 0.9]),
        tissue_mask=mask,
        origin=origin,
    )
    changed = np.any(out != thumb, axis=2)
    assert changed[0:20, 0:20].all() and changed[0:20, 30:40].all()
    np.testing.assert_array_equal(out[:, 40:], thumb[:, 40:])  # masked: unchanged
    np.testing.assert_array_equal(out[20:], thumb[20:])  # no tile: unchanged
    # a mask at another resolution is resized, not refused
    out2 = overlay_values(
        thumb,
        4.0,
        0.5,
        coords,
        160,
        np.array([0.9, 0.9]),
        tissue_mask=cv2.resize(mask.astype(np.uint8), (160, 100), interpolation=cv2.INTER_NEAREST) > 0,
        origin=origin,
    )
    np.testing.assert_array_equal(out, out2)


def test_fixed_scale_same_value_same_colour_on_two_slides() -> None:
    a, b = make_case(seed=1, slide_id="A"), make_case(seed=2, slide_id="B", shape=(300, 500))
    va = np.full(len(a["coords"]), 0.1)
    vb = np.full(len(b["coords"]), 0.95)
    va[0] = vb[0] = 0.7  # the one tile both slides share in value
    outs = []
    for c, v in ((a, va), (b, vb)):
        img = overlay_values(c["thumb"], THUMB_MPP, SLIDE_MPP, c["coords"], TILE_L0, v, alpha=1.0)
        x, y = ((c["coords"][0] + TILE_L0 / 2) * SLIDE_MPP / THUMB_MPP).astype(int)
        outs.append(img[y, x])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], values_to_rgb(np.array(0.7)))
    # out-of-range values are clipped to the scale's ends, never rescaled per slide
    np.testing.assert_array_equal(values_to_rgb(np.array([-3.0, 7.0])), colormap_lut()[[0, 255]])


def test_render_heatmap_has_title_legend_and_the_overlay() -> None:
    case = make_case()
    vals = case["scores"]["pallor"]
    body = overlay_values(case["thumb"], THUMB_MPP, SLIDE_MPP, case["coords"], TILE_L0, vals, case["mask"])
    img = render_heatmap(
        case["thumb"], THUMB_MPP, SLIDE_MPP, case["coords"], TILE_L0, vals, case["mask"], title="S-001 - pallor"
    )
    h, w = body.shape[:2]
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.shape[0] > h and img.shape[1] >= w
    # the overlay is in there, pixel for pixel
    res = cv2.matchTemplate(img, body, cv2.TM_SQDIFF)
    _, _, (x0, y0), _ = cv2.minMaxLoc(res)
    np.testing.assert_array_equal(img[y0 : y0 + h, x0 : x0 + w], body)
    assert y0 > 10, "a title band sits above the image"
    assert (img[:y0] < 100).all(axis=2).sum() > 50, "title text drawn"
    # legend: a row below the image runs through the colormap from its first to its last colour
    lut = colormap_lut().astype(int)
    legend = img[y0 + h :].astype(int)
    found = False
    for row in legend:
        near0 = np.abs(row - lut[0]).sum(axis=1) <= 6
        near1 = np.abs(row - lut[255]).sum(axis=1) <= 6
        if near0.any() and near1.any() and np.argmax(near0) < np.argmax(near1):
            found = True
            break
    assert found, "legend colour bar 0 ... 1 not found under the image"
    assert (legend < 100).all(axis=2).sum() > 50, "legend labels drawn"


def test_heatmap_10k_tiles_on_2000px_thumbnail_is_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    thumb = rng.integers(150, 255, (2000, 2000, 3), dtype=np.uint8)
    mask = np.zeros((2000, 2000), bool)
    cv2.ellipse(mask.view(np.uint8), (1000, 1000), (900, 700), 0, 0, 360, 1, -1)
    coords = rng.integers(0, 64000 - 448, (10_000, 2))
    vals = rng.random(10_000)
    render_heatmap(thumb, 8.0, 0.25, coords, 448, vals, mask)  # warm-up
    t0 = time.perf_counter()
    img = render_heatmap(thumb, 8.0, 0.25, coords, 448, vals, mask, title="speed")
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"rendering took {elapsed:.2f} s"
    path = write_png(tmp_path / "h.png", img)
    back = cv2.imread(str(path))[:, :, ::-1]
    np.testing.assert_array_equal(back, img)
    assert no_tmp_left(tmp_path)


def test_mean_map_matches_a_per_tile_loop() -> None:
    """The vectorised accumulation equals the obvious loop (pixel centre inside the tile), edges included."""
    rng = np.random.default_rng(42)
    for _ in range(25):
        h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        scale = float(rng.uniform(0.05, 0.6))
        size = float(rng.uniform(4, 80))
        origin = (int(rng.integers(-50, 50)), int(rng.integers(-50, 50)))
        n = int(rng.integers(1, 40))
        coords = np.stack(
            [
                rng.integers(origin[0] - 100, origin[0] + int(w / scale), n),
                rng.integers(origin[1] - 100, origin[1] + int(h / scale), n),
            ],
            axis=1,
        )
        vals = rng.random(n)
        vals[rng.random(n) < 0.1] = np.nan
        got = tile_mean_map((h, w), coords, size, vals, scale, origin)
        s_, c_ = np.zeros((h, w)), np.zeros((h, w))
        cy, cx = np.mgrid[0:h, 0:w] + 0.5
        for (x, y), v in zip(coords, vals):
            if np.isnan(v):
                continue
            u0x, u0y = (x - origin[0]) * scale, (y - origin[1]) * scale
            inside = (cx >= u0x) & (cx < u0x + size * scale) & (cy >= u0y) & (cy < u0y + size * scale)
            if not inside.any():  # a tile under one pixel still marks the pixel it starts in
                px, py = int(np.ceil(u0x - 0.5)), int(np.ceil(u0y - 0.5))
                if 0 <= px < w and 0 <= py < h:
                    inside[py, px] = True
            s_[inside] += v
            c_[inside] += 1
        want = np.where(c_ > 0, s_ / np.maximum(c_, 1), np.nan)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_tiles_smaller_than_a_pixel_still_show() -> None:
    thumb = _grey(20, 20)
    out = overlay_values(
        thumb,
        thumb_mpp=64.0,
        slide_mpp=0.25,
        coords=np.array([[2560, 2560]]),
        tile_size_l0=100,
        values=np.array([1.0]),
        alpha=1.0,
    )
    changed = np.argwhere(np.any(out != thumb, axis=2))
    assert changed.tolist() == [[10, 10]]


def test_normalise_attention() -> None:
    att = np.array([0.001, 0.004, 0.002, np.nan])
    out = normalise_attention(att)
    np.testing.assert_allclose(out[:3], [0.25, 1.0, 0.5], rtol=1e-6)
    assert math.isnan(out[3])
    np.testing.assert_allclose(normalise_attention(np.array([-2.0, 0.0, 2.0])), [0, 0.5, 1])
    assert normalise_attention(np.zeros(3)).tolist() == [0, 0, 0]
    assert normalise_attention(np.array([])).shape == (0,)


# ---------------------------------------------------------------------------------------------
# report text (the browser checks are in test_report_browser.py)
# ---------------------------------------------------------------------------------------------

_EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class _Refs(HTMLParser):
    """Every URL-bearing attribute of the real tags of a page (escaped text is not a tag)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "action", "srcset", "poster", "data") and v is not None:
                self.refs.append(v)


def _parse(text: str) -> _Refs:
    p = _Refs()
    p.feed(text)
    return p


def _external_refs(text: str) -> list[str]:
    refs = _parse(text).refs + re.findall(r"url\(\s*['\"]?([^'\")]+)", text, flags=re.I)
    return [r for r in refs if not r.startswith(("data:", "#"))]


def test_report_escapes_untrusted_text_and_is_self_contained(tmp_path: Path) -> None:
    case = make_case()
    result = make_result(slide_id=_EVIL)
    result["recommendations"]["orders"][1]["note"] = _EVIL
    result["recommendations"]["differential"][0]["why"] = _EVIL
    result["recommendations"]["differential"].append({"entity": _EVIL, "why": "brief-style entry"})
    result["recommendations"]["flags"].append(_EVIL)
    result["recommendations"]["clinical_context"]["note"] = _EVIL
    result["recommendations"]["evidence"]["X"] = _EVIL
    result["quality"]["reasons"] = [_EVIL]
    path = write_report(
        tmp_path / "r.html", result, encode_png(case["thumb"]), render_overlays(case), make_gallery(case)
    )
    text = path.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    tags = _parse(text).tags
    assert tags.count("script") == 1, "only the report's own inline script"
    assert "img" in tags and tags.count("img") == 1 + 4 + 12
    assert _external_refs(text) == []
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert text.count("data:image/png;base64,") == 1 + 4 + 12  # thumbnail, 4 overlays, 3 x 4 tiles
    assert DEMO_MODEL_LABEL in text and "Fasting plasma glucagon" in text
    assert no_tmp_left(tmp_path)


def test_report_failed_and_sparse_results_render() -> None:
    case = make_case()
    failed = {
        "slide_id": "S-9",
        "status": "failed",
        "error": "S-9.svs: cannot open (truncated file)",
        "nme_probability": None,
        "band": None,
    }
    text = render_report(failed, None, render_overlays(case), make_gallery(case))
    assert "cannot open (truncated file)" in text and "Processing failed" in text
    assert "data:image" not in text, "no overlays or tiles for a failed slide"
    nd = make_result(slide_id="S-8", status="non_diagnostic", prob=0.9, band="HIGH")
    nd["quality"] = {"flags": ["too_little_tissue"], "reasons": ["only 3 tissue tiles (minimum 50)"]}
    text = render_report(nd, encode_png(case["thumb"]), render_overlays(case), {})
    assert "only 3 tissue tiles" in text and "Non-diagnostic" in text
    assert 'id="probability">\u2014<' in text, "no probability shown for a non-diagnostic slide"
    assert text.count("data:image/png") == 1, "the thumbnail only"
    # wrong types and missing sections must not crash
    for weird in (
        {},
        {"status": None},
        {
            "slide_id": 5,
            "recommendations": None,
            "model": "x",
            "patterns": [1],
            "timings": {"a": "slow"},
            "quality": {"flags": "one"},
            "mpp": None,
            "nme_probability": "nan",
            "status": "ok",
        },
    ):
        assert "<!DOCTYPE html>" in render_report(weird, b"", None, None)


def test_report_renders_the_rule_layers_real_output() -> None:
    rules = pytest.importorskip(
        "pipeline.clinical.rules", reason="the rule layer (pipeline.clinical.rules) is not in this checkout"
    )
    result = make_result()
    rec = rules.recommend(result, None, rules.load_ruleset())
    assert any(o["id"] == "glucagon" for o in rec["orders"]), "a HIGH slide gets a glucagon proposal"
    result["recommendations"] = rec
    text = render_report(result, encode_png(make_case()["thumb"]), {}, {})
    first = re.search(r'<tr data-order-id="([^"]+)"', text)
    assert first is not None and first.group(1) == "glucagon", "the urgent order comes first"
    for o in rec["orders"]:
        assert html.escape(o["display"]) in text and html.escape(o["code"]["code"]) in text
    for d in rec["differential"]:
        assert html.escape(d["name"]) in text
    for f in rec["flags"]:
        assert html.escape(f["message"]) in text
    assert html.escape(rec["disclaimer"]) in text
    assert text.count(html.escape(rec["orders"][0]["rationale"][0])) == 1, "a shared rationale is printed once"


# ---------------------------------------------------------------------------------------------
# summary.csv and index.html
# ---------------------------------------------------------------------------------------------


def _batch() -> list[dict[str, Any]]:
    r1 = make_result("S-001", prob=0.87, band="HIGH")
    r2 = make_result("S-002", prob=0.12, band="LOW")
    r2["recommendations"]["orders"] = []
    r3 = make_result('=HYPERLINK("http://x")', prob=0.55, band="INDETERMINATE")
    r4 = {
        "slide_id": "S-004",
        "status": "failed",
        "error": "S-004.ndpi: unsupported format\nsecond line",
        "nme_probability": None,
        "band": None,
    }
    r5 = make_result("S-005", status="non_diagnostic", prob=None, band=None)
    return [r1, r2, r3, r4, r5]


def test_summary_csv(tmp_path: Path) -> None:
    path = write_summary_csv(tmp_path / "summary.csv", _batch())
    raw = path.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    assert [r["slide_id"] for r in rows] == ["S-001", "S-002", '\'=HYPERLINK("http://x")', "S-004", "S-005"]
    assert rows[0]["status"] == "ok" and rows[0]["nme_probability"] == "0.8700" and rows[0]["band"] == "HIGH"
    assert rows[0]["top_orders"] == "glucagon(urgent);cbc(routine);rebiopsy(routine)"
    assert rows[0]["n_tiles"] == "1432" and rows[0]["quality_flags"] == "pale_tissue" and rows[0]["error"] == ""
    assert rows[1]["top_orders"] == ""
    assert rows[3]["status"] == "failed" and rows[3]["nme_probability"] == "" and rows[3]["band"] == ""
    assert rows[3]["error"] == "S-004.ndpi: unsupported format second line"
    assert rows[4]["status"] == "non_diagnostic" and rows[4]["nme_probability"] == ""
    two = {"recommendations": {"orders": [{"id": "a", "priority": "routine"}, {"id": "b", "priority": "stat"}]}}
    assert format_orders(two) == "b(stat);a(routine)"
    assert no_tmp_left(tmp_path)


def test_index_html_links_counts_and_escaping(tmp_path: Path) -> None:
    results = _batch()
    results.append(make_result("javascript:alert(1)", prob=0.3, band="LOW"))
    rel = {r["slide_id"]: f"slides/{r['slide_id']}/report.html" for r in results}
    rel["S-001"] = "slides/S 001#x/report.html"
    path = write_index_html(tmp_path / "index.html", results, rel)
    text = path.read_text(encoding="utf-8")
    hrefs = re.findall(r'href="([^"]*)"', text)
    assert "slides/S%20001%23x/report.html" in hrefs
    assert not [h for h in hrefs if ":" in h], "a slide id can never become a javascript: (or any scheme) link"
    assert 'data-count="ok"><div class="n">4<' in text
    assert 'data-count="failed"><div class="n">1<' in text
    assert 'data-count="non_diagnostic"><div class="n">1<' in text
    assert DEMO_MODEL_LABEL in text and "Decision support only" in text
    assert "<script>" in text and _external_refs(text.replace('href="slides/', 'href="#')) == []
    assert "<!DOCTYPE html>" in render_index([], {})


# ---------------------------------------------------------------------------------------------
# report file bytes (written as bytes with the images spliced in)
# ---------------------------------------------------------------------------------------------


def test_report_file_is_exactly_the_rendered_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collections.abc import Mapping

    import pipeline.outputs.report as report_mod

    case = make_case()
    overlays = render_overlays(case)
    overlays["pallor"] = cv2.imencode(".jpg", case["thumb"])[1].tobytes()  # JPEG as the batch runner embeds
    gallery = make_gallery(case)
    gallery["pallor"].append({"png": gallery["necrolysis"][0]["png"], "score": 0.5, "x": 1, "y": 2})  # same bytes twice
    gallery["pallor"].append({"png": b"", "score": 0.4, "x": 3, "y": 4})  # no image: skipped
    ok = make_result(slide_id="S-ü <nme-report-image> µm·—")
    ok["calibration_note"] = "<nme-report-image> in the text is escaped"
    failed = make_result(slide_id="S-9", status="failed", prob=None, band=None)

    class FreshTile(Mapping):  # hands out a new bytes object each time: short-lived images, ids reused
        def __init__(self, tile: dict[str, Any]) -> None:
            self.tile = tile

        def __getitem__(self, key: str) -> Any:
            return bytes(bytearray(self.tile[key])) if key == "png" else self.tile[key]

        def __iter__(self) -> Any:
            return iter(self.tile)

        def __len__(self) -> int:
            return len(self.tile)

    fresh = {p: [FreshTile(t) for t in tiles] for p, tiles in make_gallery(case).items()}
    cases = [
        (ok, encode_png(case["thumb"]), overlays, gallery),
        (ok, None, None, None),
        (ok, b"", {}, {}),
        (failed, encode_png(case["thumb"]), overlays, gallery),
        ({}, None, None, None),
        (ok, None, {}, fresh),
    ]
    plain: list[int] = []  # calls of the plain rendering, the fallback
    monkeypatch.setattr(report_mod, "render_report", lambda *a: plain.append(1) or render_report(*a))
    for i, args in enumerate(cases):
        want = render_report(*args).encode("utf-8")
        assert write_report(tmp_path / f"r{i}.html", *args).read_bytes() == want, i
    assert not plain, "the images are spliced in as bytes"
    # the stand-in for the images also in the text itself (cannot come out of esc()): rendered plainly
    monkeypatch.setattr(report_mod, "_IMAGE_MARK", "card")
    args = cases[0]
    assert write_report(tmp_path / "r.html", *args).read_bytes() == render_report(*args).encode("utf-8")
    assert plain
    assert no_tmp_left(tmp_path)
    with pytest.raises(ValueError, match="not PNG"):
        write_report(tmp_path / "bad.html", ok, b"not an image", None, None)
    assert not (tmp_path / "bad.html").exists()


def test_data_uri_types() -> None:
    import base64

    from pipeline.outputs._html import data_uri, data_uri_parts

    samples = {
        "image/png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        "image/jpeg": b"\xff\xd8\xff\xe0 jpeg",
        "image/gif": b"GIF89a gif",
        "image/webp": b"RIFF\x10\x00\x00\x00WEBPVP8 ",
    }
    for mime, data in samples.items():
        want = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        assert data_uri(data) == want
        head, body = data_uri_parts(data)
        assert (head + body).decode("ascii") == want
    assert data_uri(b"") is None and data_uri(None) is None and data_uri_parts(b"") is None
    with pytest.raises(ValueError):
        data_uri(b"BM bitmap")
