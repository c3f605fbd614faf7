"""NME patterns painted onto real skin (pipeline.synthetic.painted): layout, polygons, pixels, determinism.

Needs the real slides in ../shared/data/slides (skipped with the reason when they are absent).
Small crops (600 x 450 µm at 0.5 µm/px) keep the whole file at about 20 s on two cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import ConfigError
from pipeline.reading.slide import open_slide
from pipeline.synthetic.catalog import PATTERNS
from pipeline.synthetic.dataset import LABEL_COLUMNS
from pipeline.synthetic.paint_ops import FEATHER_PX, RGB_FROM_HED, rgb_to_od
from pipeline.synthetic.painted import (
    PAINT_DIAGNOSES,
    OpenSource,
    PaintedCrop,
    PaintPlan,
    generate_painted_dataset,
    paint_slide,
    read_sources,
)
from pipeline.tiles.annotations import read_annotations

pytestmark = pytest.mark.shared

REPO = Path(__file__).resolve().parent.parent
SOURCES = REPO / "data" / "real_skin"
CROP_UM = (600.0, 450.0)
CLASSES = ("epidermis", *PATTERNS)
EQUAL_MIX = dict.fromkeys(PAINT_DIAGNOSES, 1.0)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


@pytest.fixture(scope="module")
def painted_set(shared_slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One slide of each painted diagnosis (n=5), written once for the module."""
    out = tmp_path_factory.mktemp("painted") / "set"
    generate_painted_dataset(out, n=5, seed=11, sources_root=SOURCES, mpp=0.5, mix=EQUAL_MIX, crop_um=CROP_UM)
    return out


@pytest.fixture(scope="module")
def sources(shared_slides: Path):
    opened = {s.slide_id: OpenSource.open(s) for s in read_sources(SOURCES)}
    yield opened
    for s in opened.values():
        s.close()


def _paint(sources: dict[str, OpenSource], source_id: str, diagnosis: str, seed: int) -> PaintedCrop:
    idx = list(sources).index(source_id)
    return paint_slide(PaintPlan(0, "t", diagnosis, "trunk", idx, seed), sources[source_id], 0.5, CROP_UM)


def _masks(geojson: Path, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    out = {k: np.zeros(shape, np.uint8) for k in CLASSES}
    for a in read_annotations(geojson, CLASSES):
        m = np.zeros(shape, np.uint8)
        cv2.fillPoly(m, [np.round(a.exterior - 0.5).astype(np.int32)], 1)
        if a.holes:
            cv2.fillPoly(m, [np.round(h - 0.5).astype(np.int32) for h in a.holes], 0)
        out[a.class_name] |= m
    return {k: v.astype(bool) for k, v in out.items()}


def _hed(rgb: np.ndarray) -> np.ndarray:
    return rgb_to_od(rgb) @ HED_FROM_RGB


def _near_patterns(pc: PaintedCrop) -> np.ndarray:
    near = np.zeros(pc.before.shape[:2], np.uint8)
    for p in PATTERNS:
        near |= pc.zones[p].astype(np.uint8)
    k = 2 * FEATHER_PX + 3
    return cv2.dilate(near, np.ones((k, k), np.uint8)).astype(bool)


def _elongated_dark(rgb: np.ndarray, zone: np.ndarray, px_um: float) -> int:
    """Dark blobs standing out of their surroundings, long axis > 2x the short one, >= 3 µm²."""
    od = cv2.GaussianBlur(rgb_to_od(rgb).sum(-1), (0, 0), 0.6)
    bg = cv2.medianBlur(np.clip(od * 60, 0, 255).astype(np.uint8), 2 * int(6 / px_um) + 1).astype(np.float32) / 60
    blobs = ((od - bg > 0.25) & zone).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(blobs)
    count = 0
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] * px_um**2 < 3.0:
            continue
        x, y, w, h = stats[i, :4]
        ys, xs = np.nonzero(lab[y : y + h, x : x + w] == i)
        ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
        if ev[1] > 4.0 * max(ev[0], 1e-3):
            count += 1
    return count


# ----------------------------------------------------------------------------- the written set


def test_layout_and_labels(painted_set: Path) -> None:
    rows = list(csv.DictReader((painted_set / "labels.csv").open()))
    assert tuple(rows[0]) == LABEL_COLUMNS
    assert sorted(r["diagnosis"] for r in rows) == sorted(PAINT_DIAGNOSES)
    manifest = json.loads((painted_set / "manifest.json").read_text())
    assert (manifest["n"], manifest["seed"], manifest["mpp"], manifest["generator"]) == (5, 11, 0.5, "painted")
    assert manifest["version"]
    expected = {
        "nme": ("1", "1", "1", "1"),
        "nme_subtle": ("1", "1", "1", "1"),
        "normal": ("0", "0", "0", "0"),
        "pallor_only": ("0", "1", "0", "0"),
        "parakeratosis_only": ("0", "0", "0", "1"),
    }
    for r in rows:
        assert r["patient_id"] == r["slide_id"]
        flags = (r["nme_pattern"], r["pallor"], r["necrolysis"], r["parakeratosis"])
        assert flags == expected[r["diagnosis"]], r
        slide = open_slide(painted_set / "slides" / f"{r['slide_id']}.tiff")
        assert slide.mpp == pytest.approx(0.5, rel=1e-6)
        assert slide.level_count >= 3
        w, h = slide.dimensions
        masks = _masks(painted_set / "annotations" / f"{r['slide_id']}.geojson", (h, w))
        assert masks["epidermis"].sum() * 0.25 > 2000, "the crop holds a stretch of epidermis"
        for p in PATTERNS:
            assert bool(masks[p].any()) == (r[p] == "1"), (r["slide_id"], p)
            if masks[p].any():
                inside = (masks[p] & masks["epidermis"]).sum() / masks[p].sum()
                assert inside >= 0.95, (r["slide_id"], p, inside)
        slide.close()


def test_normal_slide_is_the_source_crop(painted_set: Path, sources: dict[str, OpenSource]) -> None:
    manifest = json.loads((painted_set / "manifest.json").read_text())
    rec = next(s for s in manifest["slides"] if s["diagnosis"] == "normal")
    out = open_slide(painted_set / "slides" / f"{rec['slide_id']}.tiff")
    w, h = out.dimensions
    got = out.read_region((0, 0), (w, h), out.plan(0.5))
    src = sources[rec["source"]].slide
    want = src.read_region((int(rec["origin"][0]), int(rec["origin"][1])), (w, h), src.plan(max(0.5, src.mpp)))
    blur = [cv2.GaussianBlur(a.astype(np.float32), (0, 0), 1.5) for a in (got, want)]
    assert np.abs(blur[0] - blur[1]).mean() < 2.0  # JPEG noise only (a 2 px shift gives ~8)


def test_same_seed_same_bytes(painted_set: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_painted_dataset(again, n=5, seed=11, sources_root=SOURCES, mpp=0.5, mix=EQUAL_MIX, crop_um=CROP_UM)
    assert (again / "labels.csv").read_bytes() == (painted_set / "labels.csv").read_bytes()
    for f in sorted((painted_set / "annotations").glob("*.geojson")):
        assert (again / "annotations" / f.name).read_bytes() == f.read_bytes(), f.name
    for f in sorted((painted_set / "slides").glob("*.tiff")):
        assert (again / "slides" / f.name).read_bytes() == f.read_bytes(), f.name
    with pytest.raises(ConfigError, match="not empty"):
        generate_painted_dataset(again, n=5, seed=11, sources_root=SOURCES, mix=EQUAL_MIX, crop_um=CROP_UM)


# ----------------------------------------------------------------------------- the painted pixels


@pytest.mark.parametrize("source_id", ["morphea_section3", "CMU-1-Small-Region"])
def test_nme_pixels(sources: dict[str, OpenSource], source_id: str) -> None:
    pc = _paint(sources, source_id, "nme", seed=4)
    assert all(pc.zones[p].any() for p in PATTERNS)
    assert not any((pc.zones[a] & pc.zones[b]).any() for a in PATTERNS for b in PATTERNS if a < b)
    # nothing changes further than the feather from a pattern polygon (before JPEG: bit-identical)
    assert np.array_equal(pc.after[~_near_patterns(pc)], pc.before[~_near_patterns(pc)])
    for p in PATTERNS:
        assert (pc.zones[p] & ~pc.epidermis).sum() == 0
    hb, ha = _hed(pc.before), _hed(pc.after)
    pal, nec = pc.zones["pallor"], pc.zones["necrolysis"]
    assert ha[..., 1][pal].mean() < hb[..., 1][pal].mean() - 0.01, "pallor: less eosin"
    assert ha[..., 1][nec].mean() > hb[..., 1][nec].mean() + 0.01, "necrolysis: more eosin"
    thr = np.percentile(hb[..., 0][nec], 85)
    assert (ha[..., 0][nec] > thr).sum() < 0.8 * (hb[..., 0][nec] > thr).sum(), "necrolysis: fewer nuclei"


def test_parakeratosis_adds_flat_nuclei(sources: dict[str, OpenSource]) -> None:
    pc = _paint(sources, "morphea_section3", "parakeratosis_only", seed=5)
    z = pc.zones["parakeratosis"]
    assert z.any() and not pc.zones["pallor"].any() and not pc.zones["necrolysis"].any()
    assert np.array_equal(pc.after[~_near_patterns(pc)], pc.before[~_near_patterns(pc)])
    before, after = _elongated_dark(pc.before, z, pc.px_um), _elongated_dark(pc.after, z, pc.px_um)
    assert after >= before + 5, (before, after)


def test_pallor_only_and_normal(sources: dict[str, OpenSource]) -> None:
    pc = _paint(sources, "morphea_section3", "pallor_only", seed=3)
    assert pc.zones["pallor"].any() and not pc.zones["parakeratosis"].any()
    z = pc.zones["pallor"]
    assert _hed(pc.after)[..., 1][z].mean() < _hed(pc.before)[..., 1][z].mean()
    normal = _paint(sources, "CMU-1-Small-Region", "normal", seed=3)
    assert np.array_equal(normal.after, normal.before)
    assert not any(normal.zones[p].any() for p in PATTERNS)
