"""The epidermis / stratum corneum annotations of the real skin slides (data/real_skin/annotations).

They reference the slides in ../shared/data/slides (made by tools/annotate_real_skin.py, checked by
eye on docs/real_annotations_*.png). These tests check that they still parse with the project's own
reader, lie on the slide, sit on tissue, and keep the areas measured when they were made. The
checks against the slide pixels are marked ``shared`` (skipped with the reason when ../shared is
absent); the others need only the GeoJSON files kept in the repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.tiles.annotations import rasterise, read_annotations

ANN_DIR = Path(__file__).resolve().parent.parent / "data" / "real_skin" / "annotations"
CLASSES = ("epidermis", "stratum_corneum", "adnexa")
# the model's tile classes (models.patch.DEFAULT_CLASSES = LabelConfig.classes), written out here so
# that this file does not import torch
MODEL_CLASSES = ("pallor", "necrolysis", "parakeratosis", "epidermis")


@dataclass(frozen=True)
class RealSlide:
    slide: str  # relative to ../shared/data/slides
    mpp: float  # µm/px at level 0 (morphea: estimated, the file records none)
    dims: tuple[int, int]  # level-0 (width, height)
    level: int  # low-resolution level used for the tissue check
    area_mm2: dict[str, float] = field(default_factory=dict)  # measured when the annotations were made


SLIDES = {
    "CMU-1-Small-Region": RealSlide(
        "CMU-1-Small-Region.svs",
        0.499,
        (2220, 2967),
        0,
        {"epidermis": 0.1538, "stratum_corneum": 0.0452, "adnexa": 0.0048},
    ),
    "morphea_section3": RealSlide(
        "real_skin/morphea_section3.tif",
        0.25,
        (18785, 19224),
        3,
        {"epidermis": 0.1606, "stratum_corneum": 0.0697, "adnexa": 0.0807},
    ),
}


def _polygon_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _class_area_mm2(anns, cls: str, mpp: float) -> float:
    px = sum(_polygon_area(a.exterior) - sum(_polygon_area(h) for h in a.holes) for a in anns if a.class_name == cls)
    return px * mpp * mpp / 1e6


@pytest.fixture(scope="module")
def openslide_mod():
    return pytest.importorskip("openslide")


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_geojson_is_qupath_shaped(name):
    data = json.loads((ANN_DIR / f"{name}.geojson").read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    ids = [f["id"] for f in data["features"]]
    assert len(ids) == len(set(ids))
    for f in data["features"]:
        assert f["type"] == "Feature"
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in CLASSES
        assert len(props["classification"]["color"]) == 3


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_parse_with_project_reader_and_areas(name):
    spec = SLIDES[name]
    anns = read_annotations(ANN_DIR / f"{name}.geojson", CLASSES)
    names = {a.class_name for a in anns}
    assert {"epidermis", "stratum_corneum"} <= names
    # the way training reads them: the model's classes, the corneum / adnexa skipped (or mapped)
    train = read_annotations(ANN_DIR / f"{name}.geojson", MODEL_CLASSES, ignore_classes=("stratum_corneum", "adnexa"))
    assert train and {a.class_name for a in train} == {"epidermis"}
    # or with the synthetic slides' convention (their epidermis polygon includes the corneum)
    merged = read_annotations(
        ANN_DIR / f"{name}.geojson",
        MODEL_CLASSES,
        class_map={"stratum_corneum": "epidermis"},
        ignore_classes=("adnexa",),
    )
    assert len(merged) == sum(a.class_name in ("epidermis", "stratum_corneum") for a in anns)
    for cls, want in spec.area_mm2.items():
        got = _class_area_mm2(anns, cls, spec.mpp)
        assert 0.7 * want <= got <= 1.3 * want, f"{name} {cls}: {got:.4f} mm², measured {want:.4f} mm²"


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(SLIDES))
def test_polygons_inside_slide(shared_slides, openslide_mod, name):
    spec = SLIDES[name]
    with openslide_mod.OpenSlide(str(shared_slides / spec.slide)) as s:
        assert s.dimensions == spec.dims
    w, h = spec.dims
    for a in read_annotations(ANN_DIR / f"{name}.geojson", CLASSES):
        for ring in [a.exterior, *a.holes]:
            assert ring[:, 0].min() >= 0 and ring[:, 1].min() >= 0, a.class_name
            assert ring[:, 0].max() <= w and ring[:, 1].max() <= h, a.class_name


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(SLIDES))
def test_epidermis_on_tissue(shared_slides, openslide_mod, name):
    """>= 80 % of the epidermis area is tissue (not glass, not ink) on a low-resolution level."""
    spec = SLIDES[name]
    with openslide_mod.OpenSlide(str(shared_slides / spec.slide)) as s:
        lv = spec.level
        ds = s.level_downsamples[lv]
        img = np.asarray(s.read_region((0, 0), lv, s.level_dimensions[lv]).convert("RGB"))
    od = -np.log(np.clip(img.astype(np.float32), 1, 255) / 255).sum(2)
    glass_od = float(np.median(od[od < np.percentile(od, 30)]))
    tissue = od > glass_od + 0.12
    d = img.astype(np.int16)
    tissue &= ~(((d[..., 1] - d[..., 0]) > 15) & ((d[..., 2] - d[..., 0]) > 5))  # margin ink
    epi = np.zeros(tissue.shape, np.uint8)
    for a in read_annotations(ANN_DIR / f"{name}.geojson", CLASSES):
        if a.class_name != "epidermis":
            continue
        cv2.fillPoly(epi, [np.round(a.exterior / ds * 16).astype(np.int32)], 1, shift=4)
        for hole in a.holes:
            cv2.fillPoly(epi, [np.round(hole / ds * 16).astype(np.int32)], 0, shift=4)
    on = float((tissue & (epi > 0)).sum()) / max(1, int(epi.sum()))
    assert on >= 0.8, f"{name}: only {on:.0%} of the epidermis is on tissue"


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_epidermis_and_corneum_do_not_overlap(name):
    spec = SLIDES[name]
    anns = read_annotations(ANN_DIR / f"{name}.geojson", CLASSES)
    m = rasterise(anns, list(CLASSES), spec.dims, spec.mpp, mask_mpp=1.0)
    e, c = m["epidermis"], m["stratum_corneum"]
    overlap = float((e & c).sum()) / max(1, min(int(e.sum()), int(c.sum())))
    assert overlap < 0.03, f"{name}: epidermis and corneum overlap by {overlap:.1%}"
    if "adnexa" in m:
        assert float((e & m["adnexa"]).sum()) / max(1, int(m["adnexa"].sum())) < 0.03
