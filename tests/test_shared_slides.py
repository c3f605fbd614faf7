"""Every file in ../shared/data/slides behaves as its MANIFEST says."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.core.errors import MPPError, SlideError
from pipeline.reading.slide import open_slide
from pipeline.tiles.tiling import tile_slide

pytestmark = pytest.mark.shared

GOOD = {
    "CMU-1-Small-Region.svs": ("openslide", 0.499, (2220, 2967)),
    "CMU-1-Small-Region_DICOM": ("openslide", 0.499, (2220, 2967)),
    "hamamatsu_test3-DAPI-2-387.ndpi": ("openslide", 0.2282, (3968, 4864)),
    "OS-1-detail.ome.tif": ("tifffile", 0.2271, (1101, 1101)),
}
BAD = {
    "pathml_small_dicom_TCGA-XK-AAJU_sparse.dcm": (SlideError, "Couldn't get image flavor"),
    "synthetic_openslide_fixtures/unopenable.tiff": (SlideError, "Unsupported TIFF compression"),
    "synthetic_openslide_fixtures/boxes.tiff": (MPPError, "implausible"),
}
TINY = [
    "synthetic_openslide_fixtures/small.svs",
    "synthetic_openslide_fixtures/boxes_0.dcm",
    "synthetic_openslide_fixtures/boxes_1.dcm",
]


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_slides_open_and_tile(shared_slides, name):
    reader, mpp, dims = GOOD[name]
    with open_slide(shared_slides / name) as s:
        assert s.reader_name == reader
        assert s.mpp == pytest.approx(mpp, rel=1e-3)
        assert s.dimensions == dims
        grid, mask, _, secs = tile_slide(s)
        assert grid.plan.effective_mpp == pytest.approx(0.5, rel=0.1)
        if "DAPI" in name:
            assert "dark_background" in mask.flags and len(grid) == 0
        else:
            assert len(grid) > 0


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_slides_fail_cleanly(shared_slides, name):
    exc, match = BAD[name]
    with pytest.raises(exc, match=match) as info:
        open_slide(shared_slides / name)
    assert "\n" not in str(info.value) and name.split("/")[-1] in str(info.value)


@pytest.mark.parametrize("name", TINY)
def test_tiny_slides_smaller_than_a_tile(shared_slides, name):
    with open_slide(shared_slides / name) as s, pytest.raises(SlideError, match="smaller than one tile"):
        tile_slide(s)


def test_corrupt_tiles_fail_and_handle_recovers(shared_slides):
    with open_slide(shared_slides / "synthetic_openslide_fixtures/unreadable.svs") as s:
        with pytest.raises(SlideError, match="corrupt image data"):
            s.read_region((0, 0), (16, 16), s.plan(0.5))
        with pytest.raises(SlideError, match="corrupt image data"):  # reopened, fails again, cleanly
            s.read_region((0, 0), (16, 16), s.plan(0.5))
    # other slides are unaffected
    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as s:
        assert s.read_region((1000, 1000), (64, 64), s.plan(0.5)).std() > 5


def test_boxes_with_explicit_mpp_opens(shared_slides):
    with open_slide(shared_slides / "synthetic_openslide_fixtures/boxes.tiff", mpp=0.5) as s:
        assert s.level_count == 4


def test_cmu_svs_and_dicom_same_tiles(shared_slides):
    with (
        open_slide(shared_slides / "CMU-1-Small-Region.svs") as a,
        open_slide(shared_slides / "CMU-1-Small-Region_DICOM") as b,
    ):
        ga, ma, _, _ = tile_slide(a)
        gb, mb, _, _ = tile_slide(b)
        assert {tuple(c) for c in ga.coords} == {tuple(c) for c in gb.coords}
        assert (ma.mask != mb.mask).sum() < 0.05 * ma.mask.sum()  # edge pixels differ by JPEG noise
        x, y = ga.coords[len(ga) // 2]
        ta = a.read_region((x, y), (224, 224), ga.plan).astype(int)
        tb = b.read_region((x, y), (224, 224), gb.plan).astype(int)
        # Same pixels up to JPEG re-encoding noise (chroma subsampling): compare 8x8 means and correlation.
        import cv2

        sa = cv2.resize(ta.astype(np.float32), (28, 28), interpolation=cv2.INTER_AREA)
        sb = cv2.resize(tb.astype(np.float32), (28, 28), interpolation=cv2.INTER_AREA)
        assert np.abs(sa - sb).mean() < 4
        assert np.corrcoef(ta.ravel(), tb.ravel())[0, 1] > 0.95


def test_cmu_epidermis_and_keratin_in_ink_out(shared_slides):
    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as s:
        grid, mask, thumb, secs = tile_slide(s)
    assert secs < 1.0
    scale = s.mpp / mask.mpp

    def at(x0, y0):  # level-0 -> mask pixel
        return mask.mask[int(y0 * scale), int(x0 * scale)]

    # orthokeratin filling the follicle (pale lamellae) and the surrounding epidermis
    assert at(340 / scale, 390 / scale) or at(330 / scale, 380 / scale)
    assert at(300 / scale, 450 / scale)
    # green/blue ink at the right margin is not tissue
    ink = thumb[..., 1].astype(int) - thumb[..., 0].astype(int) > 15
    assert ink.sum() > 50
    assert (mask.mask & ink).sum() < 0.1 * ink.sum()
    # white glass is not tissue; the tissue fraction is plausible for this section
    assert 0.25 < mask.tissue_fraction < 0.55


def test_tiling_cli_on_real_slide(shared_slides, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.tiles.tiling",
            str(shared_slides / "hamamatsu_test3-DAPI-2-387.ndpi"),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line["mpp"] == pytest.approx(0.228, rel=1e-2) and line["effective_mpp"] == pytest.approx(0.456, rel=1e-2)
    assert "dark_background" in line["flags"]
