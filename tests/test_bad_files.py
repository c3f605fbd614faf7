"""Bad files get one-line reasons a user can act on: the file named, what is wrong in words, never an
internal exception type, never self-contradictory; non-regular entries of a folder are listed as
skipped with the reason. Real files throughout (real SVS truncated, crafted TIFF headers, a FIFO)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import sys
from pathlib import Path

import pytest
from conftest import REPO, skin_like_image, write_pyramid_tiff

from pipeline.core.errors import MPPError, SlideError

sys.path.insert(0, str(REPO / "benchmarks"))
from fuzz_slides import INTERNAL, png_bomb, tiff_bytes  # noqa: E402


def _error(path: Path, **kw) -> str:
    from pipeline.reading.slide import open_slide

    with pytest.raises(SlideError) as exc, open_slide(path, **kw):
        pass
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert not INTERNAL.search(msg), msg
    return msg


def test_truncated_svs_says_truncated_not_unsupported(tmp_path, shared_slides):
    data = (shared_slides / "CMU-1-Small-Region.svs").read_bytes()
    for frac in (0.02, 0.5, 0.97):
        bad = tmp_path / f"cut{frac}.svs"
        bad.write_bytes(data[: int(len(data) * frac)])
        msg = _error(bad)
        assert "truncated" in msg and "beyond the end of the file" in msg, msg
        assert "unsupported" not in msg


def test_claimed_dimensions_that_the_tile_data_cannot_hold(tmp_path):
    bad = tmp_path / "huge.tiff"
    bad.write_bytes(tiff_bytes(200_000, 200_000, n_tiles=1))
    msg = _error(bad)
    assert "200,000×200,000 px" in msg and "do not match the tile data" in msg, msg
    absurd = tmp_path / "absurd.tiff"
    absurd.write_bytes(tiff_bytes(3_000_000, 3_000_000, n_tiles=1))
    assert "larger than any glass slide" in _error(absurd)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.tiff"
    bomb.write_bytes(tiff_bytes(50_000, 50_000, tile=512))  # 7.5 GB of pixels from one 800-byte tile
    assert "decompression bomb" in _error(bomb)
    png = tmp_path / "bomb.png"
    png.write_bytes(png_bomb(11_000, 10_000))
    assert "exceeds" in _error(png)


def test_random_bytes_and_empty_files(tmp_path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(os.urandom(5000).replace(b"II*", b"xx*").replace(b"MM\x00", b"xx\x00"))
    msg = _error(junk)
    assert "not a slide: no TIFF, DICOM, JPEG or PNG header" in msg
    assert "unsupported" not in msg and ".svs" not in msg.split(str(junk), 1)[1]
    empty = tmp_path / "empty.tiff"
    empty.write_bytes(b"")
    assert "empty file (0 bytes)" in _error(empty)
    no_image = tmp_path / "noimage.tiff"
    no_image.write_bytes(b"II*\x00" + struct.pack("<I", 0))
    assert "holds no image" in _error(no_image)


def test_a_fifo_given_directly_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    assert "not a regular file (FIFO" in _error(fifo)


@pytest.mark.parametrize(
    ("resolution", "words"),
    [((0, 0), "--mpp"), ((1, 0), "--mpp"), ((10**9, 1), "implausible"), ((1, 10**6), "implausible")],
)
def test_bad_mpp_tags(tmp_path, resolution, words):
    bad = tmp_path / "mpp.tif"
    bad.write_bytes(tiff_bytes(1024, 1024, resolution=resolution))
    with pytest.raises(MPPError) as exc:
        from pipeline.reading.slide import open_slide

        open_slide(bad)
    msg = str(exc.value)
    assert words in msg and str(bad) in msg and not INTERNAL.search(msg), msg


def test_bad_svs_mpp_text(tmp_path, shared_slides):
    data = (shared_slides / "CMU-1-Small-Region.svs").read_bytes()
    m = re.search(rb"MPP = [0-9.]+", data)
    assert m is not None
    for new in (b"MPP = 0", b"MPP = x", b"MPP = 35"):
        bad = tmp_path / f"mpp{new[-1]}.svs"
        bad.write_bytes(data[: m.start()] + new.ljust(m.end() - m.start()) + data[m.end() :])
        from pipeline.reading.slide import open_slide

        with pytest.raises(SlideError) as exc:
            open_slide(bad)
        msg = str(exc.value)
        assert ("--mpp" in msg or "implausible" in msg) and not INTERNAL.search(msg), msg


def test_discovery_lists_skipped_entries_with_reasons(tmp_path):
    from pipeline.batch.discovery import Skipped, discover

    write_pyramid_tiff(tmp_path / "good.tiff", skin_like_image(600, 500), mpp=0.5)
    os.mkfifo(tmp_path / "stream.svs")
    (tmp_path / "dangling.svs").symlink_to(tmp_path / "gone.svs")
    (tmp_path / "notes.txt").write_text("hello")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.tiff"))
    try:
        skipped: list[Skipped] = []
        jobs = discover(tmp_path, skipped=skipped)
    finally:
        sock.close()
    assert [j.slide_id for j in jobs] == ["good"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons["stream.svs"] == "not a regular file (FIFO (named pipe))"
    assert reasons["s.tiff"] == "not a regular file (socket)"
    assert reasons["dangling.svs"] == "broken symbolic link"
    assert reasons["notes.txt"].startswith("not a slide file type")


def test_unrecognised_failure_never_shows_an_exception_type(tmp_path):
    """A failure no check recognises still reads as words (the process stage's fallback)."""
    from pipeline.batch.discovery import SlideJob
    from pipeline.batch.process import _mark_failed
    from pipeline.result import ResultMPP, SlideResult

    good = write_pyramid_tiff(tmp_path / "ok.tiff", skin_like_image(600, 500), mpp=0.5)
    result = SlideResult(slide_id="ok", slide_path=str(good), status="failed", mpp=ResultMPP())
    try:
        ().__getitem__(0)
    except IndexError as exc:
        _mark_failed(result, SlideJob("ok", good), exc)
    assert result.error is not None and str(good) in result.error and "IndexError" not in result.error
    huge = tmp_path / "huge.tiff"
    huge.write_bytes(tiff_bytes(200_000, 200_000, n_tiles=1))
    try:
        ().__getitem__(0)
    except IndexError as exc:
        _mark_failed(result, SlideJob("huge", huge), exc)
    assert "do not match the tile data" in (result.error or "")


def test_dicom_folder_with_a_truncated_file(tmp_path, shared_slides):
    folder = tmp_path / "dicom"
    shutil.copytree(shared_slides / "CMU-1-Small-Region_DICOM", folder)
    for f in folder.glob("*.dcm"):
        f.write_bytes(f.read_bytes()[:100])
    msg = _error(folder)
    assert "dicom" in msg
