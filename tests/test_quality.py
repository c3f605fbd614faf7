"""Quality gate: each rule on crafted measurements, and the measurements on real slides."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.slide_model.quality import DARK_FIELD_REASON, HARD_FLAGS, QualityConfig, QualityInputs, assess_quality
from pipeline.tiles.measurements import StainAccumulator, stain_statistics, tile_sharpness, tile_sharpness_many

N = 200
GOOD_STAIN = {"he_like_fraction": 0.93, "dab_like_fraction": 0.01, "dark_pixel_fraction": 0.006}


def good_inputs(**overrides) -> QualityInputs:
    """A 4 mm punch-like slide: 200 tiles, 20 epidermal, all sharp, H&E colours, 0.5 µm/px."""
    epi = np.zeros(N)
    epi[:20] = 0.9
    kw = dict(
        n_tiles=N,
        tissue_area_mm2=5.0,
        tissue_flags=[],
        epidermis_probs=epi,
        tile_blur=np.full(N, 900.0),
        stain_stats=dict(GOOD_STAIN),
        mpp_effective=0.499,
    )
    kw.update(overrides)
    return QualityInputs(**kw)


def check_report(r, status, flag):
    assert r.status == status
    assert flag in r.flags
    assert len(r.flags) == len(r.reasons)
    assert all("\n" not in x and x.strip() for x in r.reasons)  # one-line sentences
    json.dumps(r.to_dict(), allow_nan=False)
    return r.reasons[r.flags.index(flag)]


# ---------------------------------------------------------------------------- rules
def test_good_slide_passes():
    r = assess_quality(good_inputs())
    assert r.status == "ok" and r.diagnostic
    assert r.flags == [] and r.reasons == []
    assert r.metrics["n_epidermis_tiles"] == 20 and r.metrics["blurred_fraction"] == 0.0
    json.dumps(r.to_dict(), allow_nan=False)


def test_zero_tiles():
    r = assess_quality(QualityInputs(n_tiles=0, tissue_area_mm2=0.0, mpp_effective=0.5))
    reason = check_report(r, "non_diagnostic", "no_tissue_tiles")
    assert reason.startswith("no tissue tiles")
    # nothing else can be judged: no epidermis/blur/stain flags piled on top
    assert r.flags == ["no_tissue_tiles"]


def test_dark_background_flag_is_out_of_scope_stain():
    r = assess_quality(
        QualityInputs(n_tiles=0, tissue_area_mm2=0.0, tissue_flags=["dark_background"], mpp_effective=0.5)
    )
    reason = check_report(r, "non_diagnostic", "dark_field")
    assert reason.startswith(DARK_FIELD_REASON)
    assert r.flags[0] == "dark_field"  # the most informative reason first
    # also from the tile pixels when the tissue detector did not flag it
    r = assess_quality(good_inputs(stain_stats={"he_like_fraction": 0.0, "dark_pixel_fraction": 0.82}))
    assert "82% of tile pixels are near-black" in check_report(r, "non_diagnostic", "dark_field")
    assert "non_he_stain" not in r.flags  # one stain reason is enough


def test_too_little_epidermis_by_count_and_by_fraction():
    epi = np.zeros(N)
    epi[:2] = 0.8
    epi[2:10] = 0.5  # exactly 0.5 is not "> 0.5"
    r = assess_quality(good_inputs(epidermis_probs=epi))
    reason = check_report(r, "non_diagnostic", "too_little_epidermis")
    assert reason.startswith("too little epidermis to judge upper-epidermal patterns")
    assert "2 of 200 tiles (1.0%)" in reason
    # 5 epidermis tiles pass the count but not the fraction on a 2000-tile slide (0.25 % < 0.5 %)
    big = np.zeros(2000)
    big[:5] = 0.9
    r = assess_quality(good_inputs(n_tiles=2000, epidermis_probs=big, tile_blur=np.full(2000, 900.0)))
    assert "5 of 2000 tiles (0.2%)" in check_report(r, "non_diagnostic", "too_little_epidermis")
    big[:12] = 0.9  # 0.6 %: enough
    assert assess_quality(good_inputs(n_tiles=2000, epidermis_probs=big, tile_blur=np.full(2000, 900.0))).status == "ok"
    assert assess_quality(good_inputs(), QualityConfig(min_epidermis_tiles=25)).status == "non_diagnostic"


def test_blur_rules():
    blur = np.full(N, 900.0)
    blur[:120] = 30.0  # 60 % blurred
    r = assess_quality(good_inputs(tile_blur=blur))
    reason = check_report(r, "non_diagnostic", "mostly_blurred")
    assert "60% of 200 tiles are below the sharpness threshold 120" in reason
    blur[:] = 900.0
    blur[:40] = 30.0  # 20 %: soft
    r = assess_quality(good_inputs(tile_blur=blur))
    assert "20% of 200 tiles" in check_report(r, "ok", "some_blur")
    blur[:] = 900.0
    blur[:100] = 30.0  # exactly 50 % is not "more than half"
    assert assess_quality(good_inputs(tile_blur=blur)).status == "ok"


def test_non_he_stain():
    r = assess_quality(
        good_inputs(stain_stats={"he_like_fraction": 0.25, "dab_like_fraction": 0.7, "dark_pixel_fraction": 0.0})
    )
    reason = check_report(r, "non_diagnostic", "non_he_stain")
    assert "only 25% of stained pixels" in reason and "70% DAB-like" in reason
    r = assess_quality(good_inputs(stain_stats={"he_like_fraction": None, "dark_pixel_fraction": 0.0}))
    assert "no stained pixels" in check_report(r, "non_diagnostic", "non_he_stain")


def test_he_fraction_alias_from_per_tile_features():
    # pipeline.patch.features stores the per-tile mean as "he_fraction"; it is read like he_like_fraction
    r = assess_quality(good_inputs(stain_stats={"he_fraction": 0.3, "mean_od": [0.2, 0.4, 0.2]}))
    assert "only 30% of stained pixels" in check_report(r, "non_diagnostic", "non_he_stain")
    assert assess_quality(good_inputs(stain_stats={"he_fraction": 0.9})).status == "ok"


def test_wrong_resolution():
    r = assess_quality(good_inputs(mpp_effective=0.25))
    assert "0.250 µm/px" in check_report(r, "non_diagnostic", "wrong_resolution")
    assert assess_quality(good_inputs(mpp_effective=0.54)).status == "ok"  # within 10 %


def test_soft_flags_keep_status_ok():
    r = assess_quality(good_inputs(tissue_area_mm2=0.59, tissue_flags=["ink_or_pen_removed", "folded_tissue"]))
    assert r.status == "ok"
    assert r.flags == ["small_biopsy", "ink_or_pen_removed", "folded_tissue"]
    assert "0.59 mm²" in r.reasons[0]
    assert not set(r.flags) & HARD_FLAGS


def test_missing_measurements_are_not_silently_passed():
    bare = QualityInputs(n_tiles=N, tissue_area_mm2=5.0)
    r = assess_quality(bare)
    assert r.status == "non_diagnostic"
    assert {"epidermis_not_assessed", "sharpness_not_assessed", "stain_not_assessed", "resolution_not_assessed"} <= set(
        r.flags
    )
    r = assess_quality(bare, QualityConfig(require_all_measurements=False))
    assert r.status == "ok" and "epidermis_not_assessed" in r.flags


def test_several_hard_rules_are_all_reported():
    epi = np.zeros(N)
    r = assess_quality(good_inputs(epidermis_probs=epi, tile_blur=np.zeros(N), mpp_effective=1.0))
    assert {"too_little_epidermis", "mostly_blurred", "wrong_resolution"} <= set(r.flags)


def test_inputs_and_config_are_validated():
    with pytest.raises(ValueError, match="epidermis_probs: 5 values for 200 tiles"):
        good_inputs(epidermis_probs=np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        good_inputs(tile_blur=np.full(N, np.nan))
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        good_inputs(epidermis_probs=np.full(N, 1.5))
    with pytest.raises(ValueError, match="n_tiles"):
        QualityInputs(n_tiles=-1, tissue_area_mm2=0.0)
    with pytest.raises(ValidationError, match="extra"):
        QualityConfig(blur_treshold=100)
    with pytest.raises(ValidationError):
        QualityConfig(some_blur_fraction=0.6, max_blurred_fraction=0.5)


# ---------------------------------------------------------------------------- measurements
def stain_image(od_vectors, conc, shape=(64, 64), seed=0):
    """RGB uint8 from Beer-Lambert: I = 255 * 10^-(sum_k c_k v_k), c_k per pixel."""
    rng = np.random.default_rng(seed)
    od = np.zeros((*shape, 3))
    for v, (lo, hi) in zip(od_vectors, conc):
        v = np.asarray(v) / np.linalg.norm(v)
        od += rng.uniform(lo, hi, shape)[..., None] * v
    return np.clip(255 * 10 ** (-od), 0, 255).astype(np.uint8)


# Ruifrok & Johnston (2001) stain OD vectors (R, G, B)
HAEM, EOSIN, DAB = (0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78)


def test_stain_statistics_on_synthetic_stains():
    he = stain_image([HAEM, EOSIN], [(0.0, 0.8), (0.1, 0.9)])
    s = stain_statistics(he)
    assert s["he_like_fraction"] > 0.95 and s["dark_pixel_fraction"] == 0.0
    ihc = stain_image([HAEM, DAB], [(0.0, 0.2), (0.4, 1.2)])  # DAB-dominated IHC
    s = stain_statistics(ihc)
    assert s["he_like_fraction"] < 0.2 and s["dab_like_fraction"] > 0.8
    ink = np.zeros((32, 32, 3), np.uint8)
    ink[:] = (50, 70, 160)  # blue marking ink
    assert stain_statistics(ink)["he_like_fraction"] == 0.0
    glass = np.full((32, 32, 3), 250, np.uint8)
    s = stain_statistics(glass)
    assert s["he_like_fraction"] is None and s["stained_fraction"] == 0.0
    json.dumps(s, allow_nan=False)
    # streaming equals one shot
    acc = StainAccumulator().update(he).update(np.stack([ihc, ihc]))
    assert acc.result() == stain_statistics(np.stack([he, ihc, ihc]))
    with pytest.raises(ValueError, match="uint8"):
        stain_statistics(he.astype(float))


def test_sharpness_on_synthetic_texture():
    rng = np.random.default_rng(0)
    tex = np.clip(
        cv2.resize(rng.integers(60, 230, (56, 56, 3)).astype(np.uint8), (224, 224), interpolation=cv2.INTER_NEAREST),
        0,
        255,
    )
    flat = np.full((224, 224, 3), 200, np.uint8)
    assert tile_sharpness(flat) == 0.0
    s0 = tile_sharpness(tex)
    s2 = tile_sharpness(cv2.GaussianBlur(tex, (0, 0), 2))
    assert s0 > 10 * s2 > 0
    np.testing.assert_allclose(tile_sharpness_many(np.stack([tex, flat])), [s0, 0.0])
    with pytest.raises(ValueError, match="uint8"):
        tile_sharpness(tex.astype(np.float32))


def test_sharpness_is_the_variance_of_the_float_laplacian():
    """The int16 Laplacian and OpenCV's variance give the documented definition (float64 Laplacian, numpy var)."""
    rng = np.random.default_rng(4)
    checker = (np.indices((224, 224)).sum(axis=0) % 2 * 255).astype(np.uint8)  # the largest |Laplacian|: 4 * 255
    tiles = [
        rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        np.repeat(checker[:, :, None], 3, axis=2),
        rng.integers(100, 110, (57, 91, 3), dtype=np.uint8),
        np.zeros((3, 3, 3), np.uint8),
    ]
    for t in tiles:
        grey = cv2.cvtColor(t, cv2.COLOR_RGB2GRAY)
        want = float(cv2.Laplacian(grey, cv2.CV_64F, ksize=1).var())
        assert tile_sharpness(t) == pytest.approx(want, rel=1e-12, abs=1e-9)


# ---------------------------------------------------------------------------- real slides
@pytest.fixture(scope="module")
def cmu_tiles(shared_slides):
    from pipeline.reading.slide import open_slide
    from pipeline.tiles.tiling import tile_slide

    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as s:
        grid, mask, _, _ = tile_slide(s)
        tiles = np.stack([s.read_region((int(x), int(y)), (224, 224), grid.plan) for x, y in grid.coords])
        return tiles, grid, mask


@pytest.mark.shared
def test_real_skin_tiles_are_sharp_and_blurred_copies_are_not(cmu_tiles):
    tiles, grid, mask = cmu_tiles
    cfg = QualityConfig()
    sharp = tile_sharpness_many(tiles)
    blurred = tile_sharpness_many(np.stack([cv2.GaussianBlur(t, (0, 0), 2.0) for t in tiles]))
    assert len(tiles) > 50
    assert np.mean(sharp >= cfg.blur_threshold) > 0.95
    assert np.all(blurred < cfg.blur_threshold)
    # through the gate: the real slide passes on sharpness, its blurred copy does not
    epi = np.zeros(len(tiles))
    epi[:10] = 0.9  # stand-in for the patch model's epidermis output (not part of this check)
    kw = dict(
        n_tiles=len(tiles),
        tissue_area_mm2=mask.tissue_area_mm2,
        tissue_flags=mask.flags,
        epidermis_probs=epi,
        stain_stats=stain_statistics(tiles),
        mpp_effective=grid.plan.effective_mpp,
    )
    ok = assess_quality(QualityInputs(tile_blur=sharp, **kw))
    assert ok.status == "ok", ok.reasons
    assert "mostly_blurred" not in ok.flags and "some_blur" not in ok.flags
    assert "ink_or_pen_removed" in ok.flags and "small_biopsy" in ok.flags  # the crop has margin ink; 0.59 mm²
    bad = assess_quality(QualityInputs(tile_blur=blurred, **kw))
    assert "100% of" in check_report(bad, "non_diagnostic", "mostly_blurred")


@pytest.mark.shared
def test_real_he_is_he_like_and_dark_field_is_not(cmu_tiles, shared_slides):
    from pipeline.reading.slide import open_slide
    from pipeline.tiles.tiling import tile_slide

    tiles, _, _ = cmu_tiles
    cfg = QualityConfig()
    he = stain_statistics(tiles)
    assert he["he_like_fraction"] > 0.85 and he["dark_pixel_fraction"] < 0.05
    one = stain_statistics(tiles[len(tiles) // 2])  # a single real tile too
    assert one["he_like_fraction"] > cfg.min_he_like_fraction

    with open_slide(shared_slides / "hamamatsu_test3-DAPI-2-387.ndpi") as s:
        plan = s.plan(0.5)
        w, h = s.dimensions
        dapi = np.stack(
            [s.read_region((x, y), (224, 224), plan) for x in range(0, w - 500, 1000) for y in range(0, h - 500, 1000)]
        )
        grid, mask, _, _ = tile_slide(s)
    st = stain_statistics(dapi)
    assert st["he_like_fraction"] < 0.05
    assert st["dark_pixel_fraction"] > cfg.max_dark_pixel_fraction
    r = assess_quality(
        QualityInputs(
            n_tiles=len(dapi),
            tissue_area_mm2=1.0,
            epidermis_probs=np.full(len(dapi), 0.9),
            tile_blur=tile_sharpness_many(dapi),
            stain_stats=st,
            mpp_effective=plan.effective_mpp,
        )
    )
    assert check_report(r, "non_diagnostic", "dark_field").startswith(DARK_FIELD_REASON)
    # the whole slide as the pipeline sees it: the tissue detector finds no tissue on black
    r = assess_quality(
        QualityInputs(
            n_tiles=len(grid),
            tissue_area_mm2=mask.tissue_area_mm2,
            tissue_flags=mask.flags,
            mpp_effective=grid.plan.effective_mpp,
        )
    )
    assert r.status == "non_diagnostic" and r.flags[:2] == ["dark_field", "no_tissue_tiles"]
