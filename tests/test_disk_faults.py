"""An output folder that fails mid-run: full, made read-only, or deleted.

Real conditions, no mocks: a small tmpfs that fills up, the same tmpfs remounted read-only while
``infer.py`` writes into it, and the output folder deleted under a running batch. Each run must
end with one line (``error: ...``, no traceback), leave no half-written file under a final name,
keep finished slides intact, and a re-run must finish what is missing.

Mounting needs root and a kernel that lets this sandbox mount tmpfs; otherwise those tests skip
with the reason. Permission bits are not tested: root ignores them (a read-only mount is used).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, skin_like_image, write_pyramid_tiff

pytestmark = pytest.mark.slow
N_SLIDES = 4


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 300 KiB tmpfs (too small for four slides' outputs), unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (this test runs as an ordinary user)")
    point = tmp_path / "mnt"
    point.mkdir()
    made = _mount("-t", "tmpfs", "-o", "size=300k", "tmpfs", str(point))
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in this sandbox: {made.stderr.strip() or made.returncode}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("disk_slides")
    for i in range(N_SLIDES):
        write_pyramid_tiff(src / f"s{i}.tiff", skin_like_image(1200, 900, seed=i), mpp=0.5)
    return src


def _infer(slides: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "infer.py"), str(slides), "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _check_stopped(rc: int, err: str, cause: str) -> str:
    """A stop is one ``error:`` line naming the file and ``cause``; no traceback."""
    assert rc != 0, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and cause in last, err
    assert "run again" in last
    return last


def _check_consistent(out: Path) -> list[str]:
    """No temporary file left, every result.json complete; the slides counted as done."""
    from pipeline.batch.state import is_done

    if not out.exists():
        return []
    leftovers = list(out.rglob("*.tmp"))
    assert not leftovers, leftovers
    done = []
    for rj in out.glob("*/result.json"):
        json.loads(rj.read_text())  # never half-written
        if is_done(rj.parent):
            done.append(rj.parent.name)
    return sorted(done)


def _rerun_completes(slides: Path, out: Path, kept: list[str]) -> None:
    before = {s: (out / s / "result.json").read_bytes() for s in kept}
    rc, err = _finish(_infer(slides, out))
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["slides"] == N_SLIDES and run["counts"]["failed"] == 0, run["counts"]
    assert run["counts"]["skipped_done"] == len(kept)
    for s, data in before.items():  # finished results were kept, not redone
        assert (out / s / "result.json").read_bytes() == data


def _wait_for_result(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob("*/result.json")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no slide finished in time"
        time.sleep(0.05)


def test_full_disk_stops_with_one_line_and_rerun_resumes(tmpfs: Path, slides: Path):
    out = tmpfs / "out"
    rc, err = _finish(_infer(slides, out))
    line = _check_stopped(rc, err, "no space left on device")
    assert f"cannot write {out}/" in line
    failed = [json.loads(p.read_text()) for p in out.glob("*/result.json")]
    failed = [r for r in failed if r["status"] == "failed"]
    for r in failed:  # the slide that met the full disk says so, in one line
        assert r["error"].startswith("cannot write ") and "no space left on device" in r["error"]
    kept = _check_consistent(out)
    assert len(kept) < N_SLIDES
    assert _mount("-o", "remount,size=20m", str(tmpfs)).returncode == 0
    _rerun_completes(slides, out, kept)


def test_output_folder_made_read_only_mid_run(tmpfs: Path, slides: Path):
    assert _mount("-o", "remount,size=20m", str(tmpfs)).returncode == 0
    out = tmpfs / "out"
    proc = _infer(slides, out)
    try:
        _wait_for_result(out, proc)
        for _ in range(200):  # EBUSY while a file is open for writing: try again at once
            if _mount("-o", "remount,ro", str(tmpfs)).returncode == 0:
                break
            time.sleep(0.01)
        else:
            pytest.skip("could not remount the tmpfs read-only while the batch was writing (busy)")
        rc, err = _finish(proc)
    finally:
        proc.kill()
        proc.wait()
    if rc == 0:
        pytest.skip("the batch finished before the folder became read-only")
    _check_stopped(rc, err, "read-only file system")
    kept = _check_consistent(out)
    assert kept, "the slide finished before the remount was lost"
    assert _mount("-o", "remount,rw", str(tmpfs)).returncode == 0
    _rerun_completes(slides, out, kept)


def test_output_folder_deleted_mid_run(tmp_path: Path, slides: Path):
    out = tmp_path / "out"
    proc = _infer(slides, out)
    try:
        _wait_for_result(out, proc)
        shutil.rmtree(out, ignore_errors=True)
        rc, err = _finish(proc)
    finally:
        proc.kill()
        proc.wait()
    if rc == 0:
        pytest.skip("the batch finished before the folder was deleted")
    line = _check_stopped(rc, err, str(out))
    assert "deleted" in line or "no such file or directory" in line
    kept = _check_consistent(out)
    _rerun_completes(slides, out, kept)


def test_write_errors_are_one_line_naming_the_file(tmp_path: Path):
    """What the atomic writers raise: the target and the OS's words, also for HDF5's embedded errno."""
    import errno
    import pickle

    from pipeline.core.io import OutputWriteError, atomic_write_text, write_error

    err = write_error(tmp_path / "a.h5", RuntimeError("file write failed: errno = 28, error message = 'x'"))
    assert isinstance(err, OutputWriteError) and err.errno == errno.ENOSPC and err.folder_unusable
    assert str(err) == f"cannot write {tmp_path / 'a.h5'}: no space left on device"
    again = pickle.loads(pickle.dumps(err))  # crosses the worker pipe and Ray intact
    assert str(again) == str(err) and again.errno == err.errno and isinstance(again, OSError)
    assert write_error(tmp_path / "b", ValueError("not an OS error")) is None
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(OutputWriteError, match=r"^cannot write .*blocked: (not a directory|file exists)"):
        atomic_write_text(blocked / "result.json", "{}")
    assert not list(tmp_path.rglob("*.tmp"))
