"""The per-slide time limit (``--slide-timeout``): a slide whose read never returns is abandoned,
marked ``failed`` with the stage it was stuck at, its worker replaced, and the batch goes on.

The stuck read is real: a DICOM folder holding a FIFO named ``.dcm``. OpenSlide's DICOM reader
opens every ``.dcm`` of the folder, and opening a FIFO with no writer blocks in the kernel, just
like a read from a stalled network mount. No timer is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, skin_like_image, write_pyramid_tiff

DEMO_BUNDLE = REPO / "models" / "demo_bundle"
pytestmark = pytest.mark.slow
LIMIT_S = 12


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@pytest.fixture
def stalled_folder(tmp_path: Path, shared_slides: Path) -> Path:
    """``in/a_stalled/`` (a DICOM WSI whose folder holds a FIFO: opening it never returns) and a good slide."""
    src = tmp_path / "in"
    stalled = src / "a_stalled"
    stalled.mkdir(parents=True)
    for f in (shared_slides / "CMU-1-Small-Region_DICOM").glob("*.dcm"):
        shutil.copy(f, stalled / f.name)
    os.mkfifo(stalled / "zz_stalled_mount.dcm")
    write_pyramid_tiff(src / "b_good.tiff", skin_like_image(1200, 900), mpp=0.5)
    return src


def _check_outcome(out: Path, t_run: float) -> dict:
    stalled = json.loads((out / "a_stalled" / "result.json").read_text())
    good = json.loads((out / "b_good" / "result.json").read_text())
    assert stalled["status"] == "failed"
    err = stalled["error"]
    assert f"timed out after {LIMIT_S} s at opening the slide" in err and "a_stalled" in err and "\n" not in err
    assert good["status"] in ("ok", "non_diagnostic"), good.get("error")
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["slide_timeout"] == LIMIT_S
    assert run["counts"]["failed"] == 1 and run["counts"]["slides"] == 2
    assert t_run < 300, f"the batch took {t_run:.0f} s"
    assert not list(out.glob("*/.stage"))
    return run


def test_local_engine_abandons_a_stalled_read(tmp_path, stalled_folder):
    out = tmp_path / "out"
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "infer.py"), str(stalled_folder), "--out", str(out), "--quiet"]
        + ["--slide-timeout", str(LIMIT_S)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    t_run = time.perf_counter() - t
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run = _check_outcome(out, t_run)
    (restart,) = run["engine"]["worker_restarts"]
    assert restart["why"] == "timeout" and restart["slide_id"] == "a_stalled"
    assert not _pid_alive(restart["worker_pid"]), "the stuck worker is still running"
    assert run["engine"]["slide_timeout_s"] == LIMIT_S


def test_rejects_a_negative_limit(tmp_path, tiny_slide):
    proc = subprocess.run(
        [sys.executable, str(REPO / "infer.py"), str(tiny_slide.parent), "--out", str(tmp_path / "o")]
        + ["--slide-timeout", "-1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --slide-timeout"), proc.stderr


def test_ray_engine_abandons_a_stalled_read(tmp_path, stalled_folder):
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
    from pipeline.batch.runner import BatchOptions, run_batch

    out = tmp_path / "out"
    opts = BatchOptions(
        slides_dir=stalled_folder,
        out_dir=out,
        model=DEMO_BUNDLE,
        quiet=True,
        engine="ray",
        workers=1,
        slide_timeout=LIMIT_S,
    )
    t = time.perf_counter()
    record = run_batch(opts)
    run = _check_outcome(out, time.perf_counter() - t)
    assert record["counts"] == run["counts"]
    (timed_out,) = run["engine"]["timeouts"]
    assert timed_out["slide_id"] == "a_stalled"
    deadline = time.monotonic() + 30  # ray.kill is asynchronous
    while _pid_alive(timed_out["worker_pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _pid_alive(timed_out["worker_pid"]), "the stuck Ray worker is still running"
