"""Large, well-formed slides cost memory by their thumbnail and heatmap size, not by their dimensions.

Issue 21, item 5: tissue detection works on its thumbnail in strips (same mask as the whole image
at once), small components and holes are labelled strip by strip, the tile grid is laid out a
block of rows at a time, and heatmaps are capped in size and drawn over the tiles' window only.
``benchmarks/slide_memory.py`` measures the whole of ``infer.py`` on 40000² and 100000x80000 px slides.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import skin_like_image

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20


def _traced_peak(fn, *args, **kwargs):
    """(result, peak bytes traced by tracemalloc while ``fn`` ran, above what was traced before)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = fn(*args, **kwargs)
        return out, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _thumbnail_with_ink(h: int = 700, w: int = 900, seed: int = 3) -> np.ndarray:
    """A crude section with pale keratin, ink, a pen line, dust and small holes (every detector step has work)."""
    import cv2

    img = skin_like_image(w, h, seed=seed)
    rng = np.random.default_rng(seed)
    img[h // 2 : h // 2 + 80, w // 3 : w // 3 + 18] = (60, 150, 120)  # green margin ink
    img[h - 40 : h - 34, 20 : w - 20] = (30, 30, 35)  # black pen line
    for _ in range(40):  # dust specks and small holes
        y, x = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
        img[y : y + 4, x : x + 4] = (90, 60, 100) if rng.random() < 0.5 else (244, 243, 241)
    return cv2.GaussianBlur(img, (3, 3), 0)


@pytest.mark.parametrize("mpp", [2.0, 1.0])
def test_tissue_found_strip_by_strip_is_the_whole_image_result(mpp):
    from pipeline.tiles.tissue import TissueDetector, estimate_background

    thumb = _thumbnail_with_ink()
    whole = TissueDetector().detect(thumb, mpp)  # one strip: the image at once
    assert whole.mask.any() and "ink_or_pen_removed" in whole.flags
    for rows in (1, 6, 23, 128):
        strips = TissueDetector(rows=rows).detect(thumb, mpp)
        assert np.array_equal(strips.mask, whole.mask), rows
        assert strips.background_rgb == whole.background_rgb and strips.flags == whole.flags
        assert strips.ink_fraction == whole.ink_fraction
        assert np.array_equal(estimate_background(thumb, rows=rows), estimate_background(thumb))


def test_components_labelled_strip_by_strip_match_the_definition():
    import cv2

    from pipeline.tiles.tissue import _fill_small_holes, _remove_small

    def remove_ref(mask, min_px):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
        return keep[labels]

    def fill_ref(mask, max_px):
        n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
        h, w = mask.shape
        x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        border = (x == 0) | (y == 0) | (x + stats[:, cv2.CC_STAT_WIDTH] == w) | (y + stats[:, cv2.CC_STAT_HEIGHT] == h)
        small = (stats[:, cv2.CC_STAT_AREA] <= max_px) & ~border
        small[0] = False
        return mask | small[labels]

    rng = np.random.default_rng(21)
    for trial in range(25):
        h, w = int(rng.integers(1, 90)), int(rng.integers(1, 120))
        noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), float(rng.uniform(0.5, 4)))
        mask = noise > np.quantile(noise, rng.uniform(0.2, 0.8))
        for rows in (1, 2, 7, 40):
            for px in (2, 5, 30, 400):
                assert np.array_equal(_remove_small(mask, px, rows=rows), remove_ref(mask, px)), (trial, rows, px)
                assert np.array_equal(_fill_small_holes(mask, px, rows=rows), fill_ref(mask, px)), (trial, rows, px)
                inplace = mask.copy()
                _remove_small(inplace, px, rows=rows, inplace=True)
                assert np.array_equal(inplace, remove_ref(mask, px))


def test_grid_laid_out_in_blocks_of_rows_is_the_same_grid(tiny_slide, monkeypatch):
    from pipeline.reading.slide import open_slide
    from pipeline.tiles import tiling
    from pipeline.tiles.tissue import detect_tissue

    with open_slide(tiny_slide) as s:
        mask, _ = detect_tissue(s)
        for overlap in (0.0, 0.5):
            cfg = tiling.TilingConfig(tile_px=64, overlap=overlap, min_tissue=0.05)
            whole = tiling.make_grid(s, mask, cfg)
            assert len(whole) > 20
            for block in (1, 5, 37):
                monkeypatch.setattr(tiling, "GRID_BLOCK_TILES", block)
                got = tiling.make_grid(s, mask, cfg)
                assert np.array_equal(got.coords, whole.coords)
                assert got.tissue_fraction.tobytes() == whole.tissue_fraction.tobytes()
            monkeypatch.undo()


def test_tile_coverage_of_a_huge_thumbnail_is_sized_by_its_tiles():
    """A thumbnail claiming 40000 x 40000 px with tissue in one corner: a few MB, not (H + 1)(W + 1) sums."""
    from pipeline.outputs.heatmap import TileCoverage

    coords = np.stack(np.meshgrid(np.arange(20), np.arange(10)), -1).reshape(-1, 2) * 448.0 + 1000.0
    values = np.linspace(0, 1, len(coords))
    cov, peak = _traced_peak(TileCoverage, (40_000, 40_000), coords, 448.0, 0.125)
    strips, peak_mean = _traced_peak(lambda: list(cov.mean_strips(values)))
    assert peak < 8 * MB and peak_mean < 8 * MB, (peak / MB, peak_mean / MB)
    y0, y1, x0, x1 = cov.window
    assert (y0, y1, x0, x1) == (125, 685, 125, 1245)
    got = np.concatenate([s for _, _, s in strips])
    assert got.shape == (y1 - y0, x1 - x0) and np.isfinite(got).all()
    assert set(np.unique(got)) == set(values.astype(np.float32))


def test_heatmap_base_is_capped_in_pixels():
    from pipeline.outputs.heatmap import heatmap_base

    thumb = skin_like_image(1500, 1000, seed=4)
    mask = np.zeros((1000, 1500), bool)
    mask[300:700, 200:1300] = True
    img, mpp, m = heatmap_base(thumb, 2.0, mask, 4.0, max_pixels=100_000)  # 750 x 500 wanted
    assert img.shape[0] * img.shape[1] <= 100_000 and img.shape[0] * img.shape[1] > 95_000
    assert m.shape == img.shape[:2] and mpp == pytest.approx(2.0 * 1500 / img.shape[1])
    big, big_mpp, _ = heatmap_base(thumb, 2.0, None, 1.0, max_pixels=100_000)  # finer than the thumbnail: capped too
    assert big.shape == img.shape and big_mpp == mpp
    same, same_mpp, _ = heatmap_base(thumb, 2.0, mask, 4.0)  # within the default cap: the requested resolution
    assert same.shape == (500, 750, 3) and same_mpp == 4.0


def test_a_slide_claiming_large_dimensions_costs_memory_by_its_thumbnail(tmp_path, monkeypatch):
    """20000 x 20000 px at 0.5 µm/px (10 x 10 mm), glass with one small section: thumbnail, tissue,
    grid and a heatmap each stay near the size of their own images (the whole-image detector took
    ~38 bytes per thumbnail pixel, ~950 MB here; the old heatmap drawing ~60 bytes per pixel)."""
    from pipeline.outputs.heatmap import TileCoverage, encode_heatmap, heatmap_base, render_heatmap
    from pipeline.reading.slide import open_slide
    from pipeline.tiles.tiling import TilingConfig, make_grid
    from pipeline.tiles.tissue import TissueDetector

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import slide_memory

    path = tmp_path / "large.tiff"
    slide_memory.write_slide(path, 20_000, 20_000, 0.5, skin_like_image(3000, 1500), (244, 243, 241), pyramid=True)
    with open_slide(path) as s:
        (thumb, mpp), peak_thumb = _traced_peak(s.thumbnail, 2.0)
        assert thumb.shape == (5000, 5000, 3) and mpp == pytest.approx(2.0)
        assert peak_thumb < thumb.nbytes + 160 * MB, peak_thumb / MB  # plus one 4096² block read

        mask, peak_detect = _traced_peak(TissueDetector().detect, thumb, mpp)
        assert mask.mask[700:850, 600:1200].mean() > 0.9  # the section (level 0 from (2048, 2048))
        assert not mask.mask[:500].any() and not mask.mask[900:].any() and not mask.mask[:, 1300:].any()
        assert peak_detect < mask.mask.nbytes + 96 * MB, peak_detect / MB

        grid, peak_grid = _traced_peak(make_grid, s, mask, TilingConfig())
        assert len(grid) > 20 and peak_grid < 16 * MB, peak_grid / MB

        def heatmap():
            base, base_mpp, base_mask = heatmap_base(thumb, mpp, mask.mask, 4.0)
            cov = TileCoverage(base.shape[:2], grid.coords, grid.tile_size_l0, s.mpp / base_mpp, mask.origin)
            values = np.linspace(0, 1, len(grid))
            img = render_heatmap(base, base_mpp, s.mpp, grid.coords, grid.tile_size_l0, values, base_mask, coverage=cov)
            return base, encode_heatmap(img)

        (base, data), peak_heatmap = _traced_peak(heatmap)
        assert base.shape == (2500, 2500, 3) and data[:2] == b"\xff\xd8"
        assert peak_heatmap < 12 * base.shape[0] * base.shape[1] + 16 * MB, peak_heatmap / MB
