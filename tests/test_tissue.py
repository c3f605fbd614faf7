"""Skin-aware tissue detection on hand-made thumbnails with known ground truth."""

from __future__ import annotations

import numpy as np

from pipeline.tiles.tissue import TissueDetector

BG = (244, 243, 241)


def _canvas(h=400, w=600):
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), BG, np.uint8)
    return img, rng


def _noisy(img, rng):
    return np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)


def test_pale_keratin_and_thin_strip_are_tissue():
    img, rng = _canvas()
    img[100:140, 50:550] = (236, 224, 233)  # pale basket-weave orthokeratin (barely pink)
    img[140:220, 50:550] = (160, 100, 170)  # epidermis
    img[300:306, 100:500] = (230, 205, 222)  # thin detached corneum strip, 12 µm at 2 µm/px
    m = TissueDetector().detect(_noisy(img, rng), mpp=2.0)
    assert m.mask[105:135, 60:540].mean() > 0.95
    assert m.mask[150:210, 60:540].mean() > 0.99
    assert m.mask[301:305, 110:490].mean() > 0.9
    assert m.mask[:80].mean() < 0.01 and m.mask[350:].mean() < 0.01


def test_pallor_epidermis_is_tissue():
    img, rng = _canvas()
    img[100:200, 100:500] = (228, 214, 228)  # pale, vacuolated upper epidermis
    m = TissueDetector().detect(_noisy(img, rng), mpp=2.0)
    assert m.mask[110:190, 110:490].mean() > 0.95


def test_ink_pen_and_dust_are_not_tissue():
    img, rng = _canvas()
    img[100:250, 100:400] = (210, 140, 180)  # tissue
    img[100:250, 400:420] = (60, 150, 120)  # green margin ink at the tissue edge
    img[100:250, 80:100] = (50, 70, 160)  # blue ink on the other edge
    img[320:330, 50:550] = (30, 30, 35)  # black pen line
    img[50:54, 500:504] = (90, 60, 100)  # dust speck (8x8 µm)
    m = TissueDetector().detect(_noisy(img, rng), mpp=2.0)
    assert m.mask[110:240, 120:380].mean() > 0.99
    assert m.mask[110:240, 404:420].mean() < 0.05
    assert m.mask[110:240, 80:96].mean() < 0.05
    assert m.mask[318:332].mean() < 0.01
    assert m.mask[48:56, 498:506].sum() == 0
    assert "ink_or_pen_removed" in m.flags


def test_tinted_background_is_not_tissue():
    img, rng = _canvas()
    img[:] = (236, 238, 244)  # bluish glass tint
    img[150:250, 150:450] = (200, 130, 175)
    m = TissueDetector().detect(_noisy(img, rng), mpp=2.0)
    assert m.mask[:100].mean() < 0.01
    assert m.mask[160:240, 160:440].mean() > 0.99


def test_dark_field_gives_no_tissue_and_a_flag():
    img = np.zeros((200, 200, 3), np.uint8)
    img[50:80, 50:80] = (40, 60, 200)  # DAPI-like nuclei on black
    m = TissueDetector().detect(img, mpp=2.0)
    assert not m.mask.any()
    assert m.flags == ["dark_background"]


def test_contours_in_level0(tiny_slide):
    from pipeline.reading.slide import open_slide
    from pipeline.tiles.tissue import detect_tissue

    with open_slide(tiny_slide) as s:
        m, thumb = detect_tissue(s)
        assert thumb.shape[:2] == m.mask.shape
        contours = m.contours_level0(s.mpp)
        assert contours
        pts = np.concatenate(contours)
        assert pts[:, 0].max() <= 1600 and pts[:, 1].max() <= 1200
        assert pts[:, 1].min() > 300  # nothing above the keratin (glass)
