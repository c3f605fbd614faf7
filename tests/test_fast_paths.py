"""The throughput fast paths give the answers of their reference definitions.

Reading straight from OpenSlide's buffer, table-lookup optical density, histogram background
estimate, sampled stain statistics and the coarser heatmap base are speed changes (issue #8):
each is checked here against the plain definition it replaces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import skin_like_image, write_pyramid_tiff


# ------------------------------------------------------------------------------------ reading
def _public_read(reader, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    from pipeline.reading.slide import _rgba_over_white

    return _rgba_over_white(np.asarray(reader._h.read_region((x, y), level, (w, h)), dtype=np.uint8))


def _check_reads_equal(path: Path) -> None:
    from pipeline.reading.slide import OpenSlideReader

    reader = OpenSlideReader(path, str(path))
    try:
        w0, h0 = reader.level_dimensions[0]
        regions = [
            (0, 0, min(w0, 700), min(h0, 500), 0),
            (-64, -32, 300, 200, 0),  # partly outside: transparent
            (w0 - 150, h0 - 100, 300, 250, 0),
            (0, 0, 200, 200, len(reader.level_dimensions) - 1),
        ]
        for x, y, w, h, lvl in regions:
            fast = reader.read(x, y, lvl, w, h)
            assert reader._read_raw(x, y, lvl, w, h) is not None  # the fast path is the one in use
            assert fast.shape == (h, w, 3) and fast.dtype == np.uint8
            assert np.array_equal(fast, _public_read(reader, x, y, lvl, w, h)), (path.name, x, y, lvl)
        assert (reader.read(-64, -32, 0, 32, 16) == 255).all()  # outside the image: white
    finally:
        reader.close()


def test_direct_openslide_read_equals_the_public_api_on_a_tiled_tiff(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tiff", skin_like_image(900, 700, seed=3), mpp=0.5)
    _check_reads_equal(path)


def test_direct_openslide_read_equals_the_public_api_on_real_slides(shared_slides):
    for name in ("CMU-1-Small-Region.svs", "hamamatsu_test3-DAPI-2-387.ndpi"):
        _check_reads_equal(shared_slides / name)


def test_premultiplied_alpha_is_composited_over_white():
    from pipeline.reading.slide import _premultiplied_bgra_over_white, _rgba_over_white

    rng = np.random.default_rng(0)
    straight = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)  # straight RGBA
    a = straight[..., 3:4].astype(np.float64)
    premul = np.rint(straight[..., :3] * a / 255.0).astype(np.uint8)
    bgra = np.concatenate([premul[..., ::-1], straight[..., 3:4]], axis=2)  # OpenSlide's memory order
    got = _premultiplied_bgra_over_white(np.ascontiguousarray(bgra))
    want = _rgba_over_white(straight)
    assert got.dtype == np.uint8 and got.shape == (40, 50, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    opaque = bgra.copy()
    opaque[..., 3] = 255
    assert np.array_equal(_premultiplied_bgra_over_white(opaque), opaque[..., 2::-1])
    clear = np.zeros((3, 4, 4), np.uint8)
    assert (_premultiplied_bgra_over_white(clear) == 255).all()


def test_a_corrupt_tile_still_fails_the_read_with_a_one_line_error(shared_slides):
    from pipeline.core.errors import SlideError
    from pipeline.reading.slide import OpenSlideReader

    reader = OpenSlideReader(shared_slides / "synthetic_openslide_fixtures" / "unreadable.svs", "unreadable.svs")
    with pytest.raises(SlideError, match="unreadable.svs: corrupt image data") as exc:
        reader.read(0, 0, 0, 16, 16)
    assert "\n" not in str(exc.value)
    reader.close()


# ------------------------------------------------------------------------------------ tissue
def test_od_planes_are_the_optical_density_values():
    from pipeline.tiles.tissue import _od_planes, optical_density

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (63, 81, 3), dtype=np.uint8)
    bg = np.array([243, 239, 250], np.uint8)
    r, g, b, total = _od_planes(img, bg)
    od = optical_density(img, bg)
    assert np.array_equal(r, od[..., 0]) and np.array_equal(g, od[..., 1]) and np.array_equal(b, od[..., 2])
    assert np.array_equal(total, od.sum(axis=2, dtype=np.float32))


@pytest.mark.parametrize("seed", range(6))
def test_background_estimate_is_the_median_of_the_brightest_tenth(seed):
    from pipeline.tiles.tissue import estimate_background

    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 120, size=2)
    img = rng.integers(150, 256, (h, w, 3), dtype=np.uint8)
    if seed % 2:  # few distinct levels: ties at the cut and even-sized medians
        img = (img // 32 * 32 + 20).astype(np.uint8)
    flat = img.reshape(-1, 3)
    lum = flat.astype(np.float32).mean(axis=1)
    want = np.median(flat[lum >= np.percentile(lum, 90)], axis=0).astype(np.uint8)
    assert np.array_equal(estimate_background(img), want)


# ------------------------------------------------------------------------------------ stain statistics
def test_stain_statistics_on_a_pixel_sample():
    from pipeline.slide_model.quality import InvalidInputError
    from pipeline.tiles.measurements import StainAccumulator

    tiles = np.stack([skin_like_image(224, 224, seed=s) for s in range(6)])
    full = StainAccumulator().update(tiles).result()
    sampled = StainAccumulator(pixel_stride=4).update(tiles).result()
    explicit = StainAccumulator().update(np.ascontiguousarray(tiles[:, ::4, ::4])).result()
    assert sampled["n_tiles"] == 6 and sampled["pixel_stride"] == 4 and sampled["n_pixels"] == 6 * 56 * 56
    assert {k: v for k, v in sampled.items() if k not in ("n_tiles", "pixel_stride")} == {
        k: v for k, v in explicit.items() if k not in ("n_tiles", "pixel_stride")
    }
    for k in ("stained_fraction", "he_like_fraction", "dark_pixel_fraction", "saturated_fraction"):
        assert abs(sampled[k] - full[k]) < 0.01, k
    with pytest.raises(InvalidInputError, match="pixel_stride"):
        StainAccumulator(pixel_stride=0)
    with pytest.raises(InvalidInputError, match="cannot merge"):
        StainAccumulator().merge(StainAccumulator(pixel_stride=4))


# ------------------------------------------------------------------------------------ heatmaps
def test_heatmap_base_is_coarser_never_finer():
    from pipeline.outputs.heatmap import heatmap_base

    thumb = skin_like_image(600, 400, seed=2)
    mask = np.zeros((400, 600), bool)
    mask[100:300, 150:450] = True
    img, mpp, m = heatmap_base(thumb, 2.0, mask, 4.0)
    assert img.shape == (200, 300, 3) and mpp == pytest.approx(4.0) and m.shape == (200, 300)
    assert m[50:150, 75:225].all() and not m[:40].any()
    same, mpp2, m2 = heatmap_base(thumb, 2.0, mask, 1.0)  # finer than the thumbnail: unchanged
    assert same.shape == thumb.shape and mpp2 == 2.0 and np.array_equal(m2, mask)
    with pytest.raises(ValueError, match="positive"):
        heatmap_base(thumb, 2.0, mask, 0.0)


def test_heatmap_mpp_option_is_checked(tmp_path):
    from pipeline.batch.runner import BatchOptions, check_options
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--heatmap-mpp must be a positive") as exc:
        check_options(BatchOptions(slides_dir=tmp_path, out_dir=tmp_path / "o", model=tmp_path, heatmap_mpp=0.0))
    assert "\n" not in str(exc.value)


def test_batch_size_option_is_checked_and_defaults_by_device(tmp_path):
    import torch

    from pipeline.batch.runner import BatchOptions, check_options, default_batch_size
    from pipeline.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--batch-size must be at least 1") as exc:
        check_options(BatchOptions(slides_dir=tmp_path, out_dir=tmp_path / "o", model=tmp_path, batch_size=0))
    assert "\n" not in str(exc.value)
    assert default_batch_size(torch.device("cpu")) == 32 and default_batch_size(torch.device("cuda", 0)) == 64


def test_colour_lookup_of_images_matches_the_plain_definition():
    from pipeline.outputs.heatmap import _LUT, values_to_rgb

    rng = np.random.default_rng(4)
    for shape in [(), (9,), (1, 1), (120, 170), (3, 4, 5)]:
        v = rng.normal(0.5, 0.6, shape).astype(np.float32)
        if v.ndim:
            v.flat[::7] = np.nan
        for vmin, vmax in [(0.0, 1.0), (-1.0, 2.5)]:
            norm = np.clip((np.nan_to_num(v, nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0)
            want = _LUT[np.rint(norm * 255.0).astype(np.uint8)]
            got = values_to_rgb(v, vmin, vmax)
            assert got.shape == want.shape and np.array_equal(got, want), (shape, vmin)


def _random_tiles(rng: np.random.Generator, h: int, w: int, scale: float, n: int, origin=(0, 0)) -> np.ndarray:
    """(n, 2) level-0 tile corners around an (h, w) thumbnail at ``scale`` thumbnail px per level-0 px."""
    return np.stack(
        [
            rng.integers(origin[0] - 150, origin[0] + int(w / scale), n),
            rng.integers(origin[1] - 150, origin[1] + int(h / scale), n),
        ],
        axis=1,
    ).astype(np.float64)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 37, 3), (29, 1, 3), (61, 83, 3), (1, 1), (1, 40), (33, 1), (47, 52)])
def test_png_encoder_round_trips_rgb_and_grey(shape):
    import io

    import cv2
    from PIL import Image

    from pipeline.outputs.heatmap import encode_png

    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    img[:, : shape[1] // 2] = 255  # flat areas as well as noise
    for level in (0, 1, 9):
        data = encode_png(img, level)
        back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(back[..., ::-1] if img.ndim == 3 else back, img), (shape, level)
        with Image.open(io.BytesIO(data)) as pil:
            assert pil.mode == ("RGB" if img.ndim == 3 else "L")
            assert np.array_equal(np.asarray(pil), img), (shape, level)
    if img.ndim == 2:  # (H, W, 1) is grey too
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(img[:, :, None])))), img)


def test_png_encoder_refuses_what_it_cannot_write():
    from pipeline.outputs.heatmap import encode_png

    for bad in (
        np.zeros((4, 5, 4), np.uint8),
        np.zeros((4, 5, 3), np.uint16),
        np.zeros((0, 5, 3), np.uint8),
        np.zeros(5, np.uint8),
        np.zeros((4, 5), np.float32),
    ):
        with pytest.raises(ValueError, match=r"shape \(" + ", ".join(map(str, bad.shape))):
            encode_png(bad)


def test_tile_coverage_gives_the_tile_mean_map_bit_for_bit():
    from pipeline.outputs.heatmap import TileCoverage, tile_mean_map

    rng = np.random.default_rng(11)
    for trial in range(40):
        h, w = int(rng.integers(1, 70)), int(rng.integers(1, 90))
        scale, size = float(rng.uniform(0.04, 0.6)), float(rng.uniform(3, 120))
        origin = (int(rng.integers(-40, 40)), int(rng.integers(-40, 40)))
        n = int(rng.integers(0, 50))
        coords = _random_tiles(rng, h, w, scale, n, origin)
        if n and trial % 5 == 0:
            coords[0] = np.nan  # a tile without coordinates is left out
        cov = TileCoverage((h, w), coords, size, scale, origin)
        for with_nan in (False, True):
            vals = rng.normal(0.5, 0.7, n)
            if with_nan:
                vals[rng.random(n) < 0.3] = np.nan  # other counts for this map: computed apart
            want = tile_mean_map((h, w), coords, size, vals, scale, origin)
            got = cov.mean(vals)
            assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), (trial, with_nan)
        assert np.array_equal(cov.covered, np.isfinite(tile_mean_map((h, w), coords, size, np.ones(n), scale, origin)))
    with pytest.raises(ValueError, match="differ in length"):
        cov.mean(np.ones(n + 1))


def test_tile_coverage_without_overlaps_gives_each_pixel_its_tile_value():
    """A non-overlapping grid (the pipeline's): the per-tile labels give the accumulated means, exactly the values."""
    from pipeline.outputs.heatmap import TileCoverage

    rng = np.random.default_rng(12)
    for _trial in range(30):
        size = float(rng.uniform(20, 300))
        scale = float(rng.uniform(0.02, 0.5))
        origin = (int(rng.integers(-300, 300)), int(rng.integers(-300, 300)))
        nx, ny = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        grid = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * size + origin
        coords = grid[rng.random(len(grid)) < 0.7]  # tissue: some grid cells only
        h, w = max(1, int(ny * size * scale) + 3), max(1, int(nx * size * scale) + 3)
        cov = TileCoverage((h, w), coords, size, scale, origin)
        if not cov._single:  # sub-pixel tiles can share a pixel: the general path, tested above
            continue
        general = TileCoverage((h, w), coords, size, scale, origin)
        general._single = False
        vals = rng.random(len(coords))
        vals[rng.random(len(coords)) < 0.2] = np.nan
        got, want = cov.mean(vals), general.mean(vals)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, equal_nan=True)
        assert np.isin(got[np.isfinite(got)], vals.astype(np.float32)).all()  # each pixel: one tile's value, exactly
        assert np.array_equal(np.isfinite(got), np.isfinite(want))


def test_overlay_is_the_documented_blend_pixel_for_pixel():
    import cv2

    from pipeline.outputs.heatmap import _LUT, TileCoverage, overlay_values, tile_mean_map

    rng = np.random.default_rng(12)
    for trial in range(24):
        h, w = int(rng.integers(1, 90)), int(rng.integers(1, 120))
        thumb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        thumb_mpp, slide_mpp, size = 4.0, 0.5, float(rng.uniform(40, 400))
        scale = slide_mpp / thumb_mpp
        n = int(rng.integers(1, 60))
        coords = _random_tiles(rng, h, w, scale, n, (100, -50))
        vmin, vmax = [(0.0, 1.0), (-0.5, 2.0), (0.2, 0.3)][trial % 3]
        alpha = [0.5, 0.25, 0.75, 0.0, 1.0][trial % 5]  # exact in binary: the float reference is exact too
        vals = vmin + rng.normal(0.5, 0.8, n) * (vmax - vmin)  # out-of-range values too
        vals[rng.random(n) < 0.15] = np.nan
        tissue = [None, rng.random((h, w)) < 0.7, rng.random((2 * h + 1, w + 3)) < 0.7][trial % 3]
        # reference: (1 - alpha) * thumbnail + alpha * colour, rounded and saturated, on covered tissue pixels
        mean = tile_mean_map((h, w), coords, size, vals, scale, (100, -50))
        norm = np.clip((np.nan_to_num(mean, nan=vmin) - vmin) / (vmax - vmin), 0.0, 1.0)
        colour = _LUT[np.rint(norm * 255.0).astype(np.uint8)].astype(np.float64)
        blend = np.clip(np.rint((1 - alpha) * thumb + alpha * colour), 0, 255).astype(np.uint8)
        show = np.isfinite(mean)
        if tissue is not None:
            show &= cv2.resize(tissue.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        want = np.where(show[:, :, None], blend, thumb)
        for coverage in (None, TileCoverage((h, w), coords, size, scale, (100, -50))):
            got = overlay_values(
                thumb,
                thumb_mpp,
                slide_mpp,
                coords,
                size,
                vals,
                tissue,
                (100, -50),
                vmin=vmin,
                vmax=vmax,
                alpha=alpha,
                coverage=coverage,
            )
            assert got.dtype == np.uint8 and np.array_equal(got, want), (trial, coverage is None)
    with pytest.raises(ValueError, match="coverage fitted on"):
        wrong = TileCoverage((h + 1, w), coords, size, scale)
        overlay_values(thumb, thumb_mpp, slide_mpp, coords, size, vals, coverage=wrong)


def test_top_tiles_keep_the_pixels_of_the_best_tiles_per_class():
    from pipeline.outputs.gallery import TopTiles

    rng = np.random.default_rng(7)
    n, k = 300, 6
    tiles = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    probs = rng.random((n, 3)).astype(np.float32)
    probs[rng.choice(n, 20, replace=False), 1] = 1.0  # saturated scores: ties
    keeper = TopTiles({"a": 0, "b": 1, "c": 2}, k)
    for start in range(0, n, 64):
        sl = slice(start, min(n, start + 64))
        keeper.update(np.arange(n)[sl], tiles[sl], probs[sl])
    kept = keeper.pixels()
    assert len(kept) <= 3 * 2 * k
    for col in (0, 2):
        for i in np.argsort(-probs[:, col])[:k]:
            assert np.array_equal(kept[int(i)], tiles[i])
    ties = [i for i in np.argsort(-probs[:, 1])[:k] if int(i) in kept]
    assert len(ties) >= 1 and all(probs[i, 1] == 1.0 for i in ties)  # the rest is read again by the caller


def test_direct_tile_decoding_is_used_only_where_it_matches_openslide(tmp_path, shared_slides):
    from pipeline.reading.slide import OpenSlideReader

    path = write_pyramid_tiff(tmp_path / "s.tiff", skin_like_image(900, 700, seed=5), mpp=0.5)
    reader = OpenSlideReader(path, path.name)
    reader.read(0, 0, 0, 8, 8)
    reader.read(0, 0, 1, 8, 8)  # level 1: 450x350, downsample exactly 2
    reader.read(0, 0, 2, 8, 8)  # level 2: 225x175, downsample 4 (900/225) and 4 (700/175)
    assert reader._direct_ok == {0: True, 1: True, 2: True}
    # an origin off the level's pixel grid goes through OpenSlide, with the same pixels as its public API
    assert np.array_equal(reader.read(3, 5, 1, 64, 48), _public_read(reader, 3, 5, 1, 64, 48))
    reader.close()
    ndpi = OpenSlideReader(shared_slides / "hamamatsu_test3-DAPI-2-387.ndpi", "ndpi")
    ndpi.read(0, 0, 0, 8, 8)
    assert ndpi._direct == {} and ndpi._direct_ok == {}  # not a plain tiled TIFF level: OpenSlide only
    ndpi.close()


def test_the_direct_decoding_check_is_made_once_per_file_version(tmp_path, monkeypatch):
    import os

    from pipeline.reading import tiff_tiles
    from pipeline.reading.slide import OpenSlideReader

    path = write_pyramid_tiff(tmp_path / "v.tiff", skin_like_image(600, 400, seed=8), mpp=0.5, levels=1)
    calls = []
    original = OpenSlideReader._matches_openslide
    monkeypatch.setattr(
        OpenSlideReader, "_matches_openslide", lambda self, *a: calls.append(self) or original(self, *a)
    )
    for _ in range(3):  # the tissue stage and two reader threads each open the slide
        r = OpenSlideReader(path, "v.tiff")
        r.read(0, 0, 0, 8, 8)
        assert r._direct_ok == {0: True}
        key = (*r._direct[0].verdict_key, 0, 1.0)
        r.close()
    assert len(calls) == 1
    tiff_tiles.remember_verdict(key, False)  # a verdict against direct decoding holds for later handles too
    r = OpenSlideReader(path, "v.tiff")
    r.read(0, 0, 0, 8, 8)
    assert r._direct_ok == {0: False}
    r.close()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new version of the file: checked again
    r = OpenSlideReader(path, "v.tiff")
    r.read(0, 0, 0, 8, 8)
    assert r._direct_ok == {0: True} and len(calls) == 2
    r.close()


def test_a_corrupt_tile_in_a_direct_read_is_a_one_line_slide_error(tmp_path):
    import tifffile

    from pipeline.core.errors import SlideError
    from pipeline.reading.slide import OpenSlideReader

    path = write_pyramid_tiff(tmp_path / "c.tiff", skin_like_image(1024, 768, seed=6), mpp=0.5, levels=1)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offset, count = int(page.dataoffsets[0]), int(page.databytecounts[0])  # top-left tile
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count  # no JPEG markers left
    path.write_bytes(bytes(data))
    reader = OpenSlideReader(path, "c.tiff")
    reader.read(512, 384, 0, 16, 16)  # middle of the slide: the verification regions are intact
    assert reader._direct_ok == {0: True}
    with pytest.raises(SlideError, match=r"c.tiff: corrupt image data at \(0, 0\) level 0") as exc:
        reader.read(0, 0, 0, 64, 64)
    assert "\n" not in str(exc.value)
    reader.close()


def test_heap_trimming_waits_for_enough_free_memory():
    from pipeline.core import runtime

    if runtime._malloc_trim() is None or runtime.heap_free_bytes() is None:
        pytest.skip("not glibc: malloc_trim/mallinfo2 unavailable")
    assert runtime.heap_free_bytes() >= 0
    assert runtime.release_free_memory(min_free_bytes=1 << 62) is False  # never that much free: no trim
    assert runtime.release_free_memory(min_free_bytes=0) is True


def test_helper_threads_yield_the_cpu_to_the_model():
    import os
    import sys
    import threading

    from pipeline.patch.reader import lower_thread_priority

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are Linux-only")
    seen = {}

    def helper():
        lower_thread_priority()
        tid = threading.get_native_id()
        seen.update(nice=os.getpriority(os.PRIO_PROCESS, tid), policy=os.sched_getscheduler(tid))

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert seen == {"nice": 19, "policy": os.SCHED_OTHER}  # lowest priority, still a fair share on a busy machine
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19  # the calling thread only


def test_geojson_rings_round_coordinates_as_the_per_value_rule():
    import json

    from pipeline.outputs.geojson import _num, _ring

    rng = np.random.default_rng(21)
    for trial in range(20):
        pts = rng.integers(-5000, 90000, (int(rng.integers(3, 400)), 2)).astype(np.float64)
        if trial % 2:
            pts += rng.choice([0.0, 0.25, 0.125, 1 / 3, 0.005], size=pts.shape)  # fractional: the per-value path
        ox, oy = float(rng.integers(0, 500)), float(rng.integers(0, 500)) + (0.5 if trial % 4 == 3 else 0.0)
        want = [[_num(x - ox), _num(y - oy)] for x, y in pts.tolist()]
        want.append(list(want[0]))
        got = _ring(pts, ox, oy, "ring")
        assert json.dumps(got) == json.dumps(want), trial  # same numbers, same int/float types


def test_small_objects_and_holes_match_the_component_statistics_definition():
    import cv2

    from pipeline.tiles.tissue import _fill_small_holes, _remove_small

    def remove_ref(mask, min_px):  # the definition: OpenCV's component statistics
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

    rng = np.random.default_rng(31)
    for trial in range(60):
        h, w = int(rng.integers(1, 120)), int(rng.integers(1, 160))
        noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), float(rng.uniform(0.5, 4)))
        mask = noise > np.quantile(noise, rng.uniform(0.2, 0.8))
        for px in (0, 1, 2, 5, 30, 400):
            assert np.array_equal(_remove_small(mask, px), remove_ref(mask, px) if px > 1 else mask), (trial, px)
            assert np.array_equal(_fill_small_holes(mask, px), fill_ref(mask, px) if px > 0 else mask), (trial, px)
