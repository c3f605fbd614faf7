"""Tile grid geometry, provenance and the tiling CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import skin_like_image, write_pyramid_tiff

from pipeline.reading.slide import open_slide
from pipeline.tiles.tiling import TilingConfig, make_grid, read_tiles, tile_slide
from pipeline.tiles.tissue import detect_tissue


def test_grid_in_level0_over_tissue(tiny_slide):
    with open_slide(tiny_slide) as s:
        grid, mask, _, secs = tile_slide(s, TilingConfig(min_tissue=0.5))
        assert len(grid) > 0 and secs < 5
        assert grid.tile_size_l0 == pytest.approx(224)
        assert (grid.coords % 224 == 0).all()  # abutting grid from the origin
        # tissue spans y >= 400 (pale keratin starts at 1200/3)
        assert grid.coords[:, 1].min() >= 400 - 224
        assert (grid.tissue_fraction >= 0.5).all()


def test_overlap_and_coarser_target(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tiff", skin_like_image(1600, 1200), mpp=0.25)
    with open_slide(path) as s:
        mask, _ = detect_tissue(s)
        g = make_grid(s, mask, TilingConfig(target_mpp=0.5, overlap=0.5))
        assert g.plan.level == 1 and g.plan.effective_mpp == pytest.approx(0.5)
        assert g.tile_size_l0 == pytest.approx(448) and g.stride_l0 == pytest.approx(224)
        xs = np.unique(g.coords[:, 0])
        assert np.all(np.diff(xs) % 224 == 0)


def test_same_physical_tiles_at_two_resolutions(tmp_path):
    a = write_pyramid_tiff(tmp_path / "a.tiff", skin_like_image(1600, 1200), mpp=0.5)
    import cv2

    big = cv2.resize(skin_like_image(1600, 1200), (3200, 2400), interpolation=cv2.INTER_NEAREST)
    b = write_pyramid_tiff(tmp_path / "b.tiff", big, mpp=0.25)
    with open_slide(a) as sa, open_slide(b) as sb:
        ga, _, _, _ = tile_slide(sa)
        gb, _, _, _ = tile_slide(sb)
    assert {tuple(c) for c in ga.coords * 2} == {tuple(c) for c in gb.coords}


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.tiles.tiling", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_writes_coords_provenance_preview(tiny_slide, tmp_path):
    out = tmp_path / "out"
    proc = _cli(tiny_slide, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("n_tiles", "tissue_fraction", "mpp", "effective_mpp", "seconds"):
        assert key in line
    coords, attrs = read_tiles(out / "tiny.h5")
    assert coords.shape == (line["n_tiles"], 2)
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == 224
    assert attrs["patch_spacing_um_px"] == pytest.approx(0.5)
    prov = json.loads((out / "tiny.tiles.json").read_text())
    assert prov["fingerprint"] and prov["mpp"]["requested"] == 0.5 and "openslide-python" in prov["versions"]
    assert (out / "tiny_preview.png").stat().st_size > 1000
    assert not list(out.glob("*.tmp"))


def test_cli_missing_mpp_then_override(tmp_path):
    path = write_pyramid_tiff(tmp_path / "nompp.tiff", skin_like_image(1600, 1200), mpp=None)
    proc = _cli(path, "--out", tmp_path / "o")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "--mpp" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(path, "--out", tmp_path / "o", "--mpp", "0.5", "--quiet")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("bad", ["missing.svs", "empty.svs", "emptydir"])
def test_cli_bad_input(tmp_path, bad):
    p = tmp_path / bad
    if bad == "empty.svs":
        p.write_bytes(b"")
    if bad == "emptydir":
        p.mkdir()
    proc = _cli(p, "--out", tmp_path / "o")
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and str(p) in err


def test_cli_bad_parameters(tiny_slide, tmp_path):
    proc = _cli(tiny_slide, "--out", tmp_path / "o", "--tile", "0")
    assert proc.returncode != 0 and "tile_px" in proc.stderr and "Traceback" not in proc.stderr
