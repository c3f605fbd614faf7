"""Slide reading: formats, MPP handling, level choice, bad input."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import skin_like_image, write_pyramid_tiff

from pipeline.core.errors import MPPError, SlideError
from pipeline.reading import slide as slide_mod
from pipeline.reading.slide import open_slide, slide_id_for


def test_pyramid_tiff_mpp_from_resolution_tags(tiny_slide):
    with open_slide(tiny_slide) as s:
        assert s.reader_name == "openslide"
        assert s.mpp == pytest.approx(0.5, rel=1e-6)
        assert s.dimensions == (1600, 1200)
        assert s.level_count == 3
        assert s.level_mpps[1] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize(
    ("target", "level", "effective"),
    [(0.5, 0, 0.5), (0.52, 0, 0.5), (1.0, 1, 1.0), (0.7, 0, 0.7), (2.0, 2, 2.0), (3.0, 2, 3.0)],
)
def test_plan_picks_coarsest_level_within_tolerance(tiny_slide, target, level, effective):
    with open_slide(tiny_slide) as s:
        plan = s.plan(target)
        assert plan.level == level
        assert plan.effective_mpp == pytest.approx(effective, rel=1e-3)
        assert plan.requested_mpp == target


def test_plan_refuses_finer_than_slide(tiny_slide):
    with open_slide(tiny_slide) as s, pytest.raises(MPPError, match="coarser than the requested"):
        s.plan(0.25)


def test_read_region_resized_covers_same_physical_area(tiny_slide):
    with open_slide(tiny_slide) as s:
        native = s.read_region((0, 0), (400, 400), s.plan(0.5))
        coarse = s.read_region((0, 0), (200, 200), s.plan(1.0))
        resized = s.read_region((0, 0), (140, 140), s.plan(1.4286))  # resized from level 1 or 0
        assert native.shape == (400, 400, 3) and coarse.shape == (200, 200, 3) and resized.shape == (140, 140, 3)
        down = cv2.resize(native, (200, 200), interpolation=cv2.INTER_AREA)
        assert np.abs(down.astype(int) - coarse.astype(int)).mean() < 6
        # the band boundary (pale keratin -> epidermis) sits at the same physical height
        row_native = np.argmax(native[:, 200, 1] < 120)
        row_resized = np.argmax(resized[:, 70, 1] < 120)
        assert abs(row_native * 0.5 - row_resized * 1.4286) < 4.0


def test_missing_mpp_is_an_error_naming_override(tmp_path):
    path = write_pyramid_tiff(tmp_path / "nompp.tiff", skin_like_image(600, 400), mpp=None)
    with pytest.raises(MPPError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"


def test_implausible_mpp_rejected(tmp_path):
    path = write_pyramid_tiff(tmp_path / "absurd.tiff", skin_like_image(600, 400), mpp=5.0)
    with pytest.raises(MPPError, match="implausible"):
        open_slide(path)
    with pytest.raises(MPPError, match="implausible"):
        open_slide(path, mpp=0.01)


def test_plain_png_needs_mpp(tmp_path):
    png = tmp_path / "crop.png"
    cv2.imwrite(str(png), skin_like_image(500, 300))
    with pytest.raises(MPPError, match="--mpp"):
        open_slide(png)
    with open_slide(png, mpp=0.5) as s:
        assert s.reader_name == "pil"
        assert s.read_region((0, 0), (224, 224), s.plan(0.5)).shape == (224, 224, 3)


def test_plain_image_pixel_limit(tmp_path, monkeypatch):
    png = tmp_path / "big.png"
    cv2.imwrite(str(png), skin_like_image(400, 300))
    monkeypatch.setattr(slide_mod, "MAX_PLAIN_IMAGE_PIXELS", 100_000)
    with pytest.raises(SlideError, match="limit"):
        open_slide(png, mpp=0.5)


def test_region_outside_image_is_white(tiny_slide):
    with open_slide(tiny_slide) as s:
        r = s.read_region((1500, 1100), (224, 224), s.plan(0.5))
        assert (r[150:, 150:] > 240).all()


def test_thumbnail_is_bounded(tiny_slide):
    with open_slide(tiny_slide) as s:
        thumb, mpp = s.thumbnail(2.0)
        assert thumb.shape == (300, 400, 3)
        assert mpp == pytest.approx(2.0)
        thumb, mpp = s.thumbnail(0.5, max_side=200)
        assert max(thumb.shape[:2]) == 200 and mpp == pytest.approx(4.0)


def _make_bad(d, name):
    path = d / name
    content = {"empty.svs": b"", "notes.txt": b"hello", "junk.tiff": b"II*\x00garbage" * 10}
    if name == "sub":
        path.mkdir()
    elif name in content:
        path.write_bytes(content[name])
    return path


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("missing.svs", "no such file"),
        ("empty.svs", "empty file"),
        ("notes.txt", "unsupported format"),
        ("junk.tiff", "truncated: the first image directory lies beyond the end of the file"),
        ("sub", "no slide"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, name, match):
    path = _make_bad(tmp_path, name)
    with pytest.raises(SlideError, match=match) as info:
        open_slide(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_slide_id():
    assert slide_id_for("/a/b/case-01.svs") == "case-01"
    assert slide_id_for("/a/b/x.ome.tif") == "x"


def test_fingerprint_changes_with_content(tmp_path):
    a = write_pyramid_tiff(tmp_path / "a.tiff", skin_like_image(600, 400, seed=1), mpp=0.5)
    b = write_pyramid_tiff(tmp_path / "b.tiff", skin_like_image(600, 400, seed=2), mpp=0.5)
    with open_slide(a) as sa, open_slide(b) as sb, open_slide(a) as sa2:
        assert sa.fingerprint() == sa2.fingerprint() != sb.fingerprint()


def test_doctor_green():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "doctor"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torchvision" in proc.stdout and "openslide" in proc.stdout and "c++ compiler" in proc.stdout
