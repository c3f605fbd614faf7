"""Scaled JPEG decoding for reads coarser than the stored level, the SVS-like 40x benchmark slides,
and the benchmark's CPU breakdown (issue 20: overhead per tile, 40x slides)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import pipeline.reading.slide as slide_mod
from pipeline.reading.slide import open_slide, scaled_decode_factor
from pipeline.synthetic.tiff_writer import write_pyramid

REPO = Path(__file__).resolve().parent.parent


def _render(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Smooth, tissue-like texture with some edges (deterministic in level-0 px)."""
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    r = 200 + 40 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    g = 150 + 60 * np.sin((xx + yy) / 51.0)
    b = 190 + 30 * np.cos(xx / 13.0)
    img = np.stack([r, g, b], axis=2)
    img[(xx // 97 + yy // 89) % 5 == 0] *= 0.6
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def svs_like_slide(tmp_path_factory) -> Path:
    """A 2048x2048 px slide at 0.25 µm/px with levels 1, 4, 16 (SVS-like) and its source (1, 2, 4, ...)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import svs_like

    d = tmp_path_factory.mktemp("svs")
    src = d / "halving.tiff"
    write_pyramid(src, _render, 2048, 2048, 0.25, 90, "test slide")
    out = d / "svs.tiff"
    svs_like(src, out)
    return out


def test_scaled_decode_factor() -> None:
    assert scaled_decode_factor(1.0) == 1 and scaled_decode_factor(1.5) == 1
    assert scaled_decode_factor(2.0) == 2 and scaled_decode_factor(1.979) == 2  # 0.2527 µm/px read at 0.5
    assert scaled_decode_factor(3.9) == 2 or scaled_decode_factor(3.9) == 4
    assert scaled_decode_factor(4.0) == 4 and scaled_decode_factor(16.0) == 8


def test_svs_like_pyramid_keeps_level0(svs_like_slide: Path) -> None:
    with open_slide(svs_like_slide) as s:
        assert s.level_mpps[:2] == pytest.approx([0.25, 1.0])  # 2048 px: levels 1, 4 (the 16x one is under a tile)
        # level 0 decodes as it was written by the generator (JPEG: close to the render, not equal)
        d = np.abs(s.read_region((512, 512), (300, 200), s.plan(0.25)).astype(int) - _render(512, 512, 300, 200))
        assert d.mean() < 4


def test_scaled_read_is_close_to_full_decode_and_resize(svs_like_slide: Path, monkeypatch) -> None:
    with open_slide(svs_like_slide) as s:
        plan = s.plan(0.5)
        assert plan.level == 0 and plan.resized
        for xy in [(448, 448), (0, 0), (1792, 1344)]:  # inside, corner, across the right/bottom edge
            fast = s.read_region(xy, (224, 224), plan)
            monkeypatch.setattr(slide_mod, "SCALED_JPEG_DECODE", False)
            ref = s.read_region(xy, (224, 224), plan)
            monkeypatch.setattr(slide_mod, "SCALED_JPEG_DECODE", True)
            assert fast.shape == ref.shape == (224, 224, 3) and fast.dtype == np.uint8
            d = np.abs(fast.astype(int) - ref)
            assert d.mean() < 1.5 and d.max() <= 24, (xy, d.mean(), d.max())
        # the reduced grid: an origin off it falls back to the full decode (identical pixels)
        off = s.read_region((449, 448), (224, 224), plan)
        monkeypatch.setattr(slide_mod, "SCALED_JPEG_DECODE", False)
        assert np.array_equal(off, s.read_region((449, 448), (224, 224), plan))


def test_scaled_tiles_match_area_resize_of_the_level(svs_like_slide: Path) -> None:
    with open_slide(svs_like_slide) as s:
        direct = s.reader._direct_source(0)
        assert direct is not None
        src, ds = direct
        assert src.scaled_decode_ok(2) and src.scaled_decode_ok(4) and not src.scaled_decode_ok(3)
        half = src.read(0, 0, 512, 512, shrink=2)
        full = cv2.resize(src.read(0, 0, 1024, 1024), (512, 512), interpolation=cv2.INTER_AREA)
        assert np.abs(half.astype(int) - full).mean() < 1.5


def test_cpu_breakdown_adds_up() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import CPU_STAGES, cpu_breakdown

    b = cpu_breakdown(
        {
            "read_decode": 0.5,
            "tile_statistics": 0.1,
            "tissue_tiling_total": 0.4,
            "tissue_thumbnail": 0.1,
            "tissue_detection": 0.25,
        },
        0.2,
        5.0,
        2.0,
        1000,
    )
    assert tuple(b) == CPU_STAGES
    assert b["read_decode"] == pytest.approx(0.5) and b["tiling"] == pytest.approx(0.05)
    assert sum(b.values()) == pytest.approx(5.0)  # ms per tile: the run's CPU
