"""Heatmap file formats: JPEG (default) and PNG encoders, option checks, and the resume check of JPEG files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.batch.runner import BatchOptions, check_options
from pipeline.batch.state import _file_ok
from pipeline.core.errors import ConfigError
from pipeline.outputs.heatmap import HEATMAP_FORMATS, encode_heatmap, encode_jpeg, render_heatmap


def _heatmap() -> np.ndarray:
    rng = np.random.default_rng(3)
    thumb = np.full((300, 400, 3), 235, np.uint8)
    cv2.ellipse(thumb, (200, 150), (150, 100), 0, 0, 360, (200, 120, 190), -1)
    mask = thumb[:, :, 1] < 200
    coords = np.stack(np.meshgrid(np.arange(0, 16000, 448), np.arange(0, 12000, 448)), -1).reshape(-1, 2)
    return render_heatmap(thumb, 4.0, 0.1, coords, 448, rng.random(len(coords)), mask, title="S-1 - pallor")


def test_formats_decode_to_the_rendered_image():
    img = _heatmap()
    png = encode_heatmap(img, "png")
    jpg = encode_heatmap(img, "jpeg")
    back_png = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    back_jpg = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(back_png, img)  # lossless
    assert back_jpg.shape == img.shape and cv2.PSNR(back_jpg, img) > 35
    assert jpg[:3] == b"\xff\xd8\xff" and jpg[-2:] == b"\xff\xd9"
    assert jpg == encode_jpeg(img, 90)  # the report's JPEG settings: one encoding serves file and report
    assert set(HEATMAP_FORMATS) == {"jpeg", "png"}


def test_unknown_format_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown heatmap format 'tiff'"):
        encode_heatmap(_heatmap(), "tiff")
    opts = BatchOptions(slides_dir=tmp_path, out_dir=tmp_path / "out", model=tmp_path, heatmap_format="gif")
    with pytest.raises(ConfigError, match=r"--heatmap-format 'gif'.*jpeg, png") as e:
        check_options(opts)
    assert "\n" not in str(e.value)


def test_resume_check_rejects_truncated_jpeg(tmp_path: Path):
    data = encode_heatmap(_heatmap(), "jpeg")
    good = tmp_path / "heatmap_pallor.jpg"
    good.write_bytes(data)
    assert _file_ok(good)
    cut = tmp_path / "heatmap_cut.jpg"
    cut.write_bytes(data[: len(data) // 2])  # a write killed half way (not possible with atomic writes, but checked)
    assert not _file_ok(cut)
    other = tmp_path / "heatmap_other.jpg"
    other.write_bytes(b"\x89PNG\r\n\x1a\n" + data[8:])
    assert not _file_ok(other)


def test_legend_band_drawn_once_gives_the_same_images():
    """The legend is drawn once per width/caption/scale and pasted: images as drawn from a cold cache."""
    from pipeline.outputs.heatmap import ATTENTION_LEGEND, PROBABILITY_LEGEND, _decorate, _legend_band

    rng = np.random.default_rng(8)
    bodies = [
        rng.integers(0, 255, (int(rng.integers(1, 400)), int(rng.integers(1, 1500)), 3), dtype=np.uint8)
        for _ in range(6)
    ]
    cases = [(b, f"S-{i} - pallor", PROBABILITY_LEGEND if i % 2 else ATTENTION_LEGEND) for i, b in enumerate(bodies)]
    warm = [_decorate(b, t, lab, 0.0, 1.0) for b, t, lab in cases]
    for (b, t, lab), img in zip(cases, warm):
        _legend_band.cache_clear()
        np.testing.assert_array_equal(_decorate(b, t, lab, 0.0, 1.0), img)
        band = _legend_band(max(b.shape[1], 560), lab, 0.0, 1.0)
        np.testing.assert_array_equal(img[-band.shape[0] :], band)  # the band is the image's bottom
        assert not band.flags.writeable  # shared: nobody draws into it
