"""Batch inference end to end: mixed folder, failure isolation, outputs, resume after kill -9, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from conftest import REPO

DEMO_BUNDLE = REPO / "models" / "demo_bundle"
pytestmark = pytest.mark.slow


def _infer(*args, timeout=900, **kw):
    return subprocess.run(
        [sys.executable, str(REPO / "infer.py"), *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kw,
    )


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory) -> Path:
    from pipeline.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, n=2, seed=77, mpp=0.5, classes=["nme", "normal"], size_um=(2600, 2000), overwrite=True)
    return root / "slides"


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, synthetic_pair, shared_slides):
    assert (DEMO_BUNDLE / "bundle.json").is_file(), "the shipped demo bundle models/demo_bundle is missing"
    src = tmp_path_factory.mktemp("mixed") / "in"
    src.mkdir()
    for f in synthetic_pair.glob("*.tiff"):
        shutil.copy(f, src / f.name)
    shutil.copy(shared_slides / "CMU-1-Small-Region.svs", src / "CMU-1-Small-Region.svs")
    shutil.copy(shared_slides / "hamamatsu_test3-DAPI-2-387.ndpi", src / "dapi.ndpi")
    shutil.copy(shared_slides / "synthetic_openslide_fixtures" / "unreadable.svs", src / "corrupt.svs")
    (src / "empty.svs").write_bytes(b"")
    (src / "notes.txt").write_text("not a slide")
    out = src.parent / "out"
    proc = _infer(src, "--out", out)
    return src, out, proc


def _results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}


def test_mixed_folder_outputs_and_exit_status(mixed_run, synthetic_pair):
    src, out, proc = mixed_run
    assert proc.returncode == 1, proc.stderr[-2000:]  # some slides failed
    res = _results(out)
    ids = {f.stem for f in synthetic_pair.glob("*.tiff")}
    assert set(res) == ids | {"CMU-1-Small-Region", "dapi", "corrupt", "empty"}
    for sid in ids | {"CMU-1-Small-Region"}:
        r = res[sid]
        assert r["status"] == "ok", (sid, r.get("error"), r["quality"])
        assert 0.0 <= r["nme_probability"] <= 1.0 and r["band"] in ("LOW", "INDETERMINATE", "HIGH")
        for name in (
            "tiles.geojson",
            "tissue.geojson",
            "heatmap_pallor.jpg",
            "heatmap_necrolysis.jpg",
            "heatmap_parakeratosis.jpg",
            "heatmap_attention.jpg",
            "report.html",
            "fhir.json",
        ):
            assert (out / sid / name).is_file(), (sid, name)
            assert name in r["files"], (sid, name)
        heatmap = cv2.imread(str(out / sid / "heatmap_pallor.jpg"))  # a real JPEG: title band, thumbnail, legend
        assert heatmap is not None and heatmap.shape[1] >= 560 and heatmap.shape[0] > 100
        assert r["mpp"]["requested"] == 0.5 and r["mpp"]["effective"] == pytest.approx(0.5, rel=0.1)
        assert r["model"]["sha256"] and "synthetic" in r["model"]["label"]
        assert r["recommendations"]["disclaimer"]
    assert res["CMU-1-Small-Region"]["band"] == "LOW"
    assert res["dapi"]["status"] == "non_diagnostic" and res["dapi"]["nme_probability"] is None
    assert any("fluorescence" in x or "dark" in x for x in res["dapi"]["quality"]["reasons"])
    for sid, cause in (("corrupt", "corrupt"), ("empty", "empty file")):
        assert res[sid]["status"] == "failed" and cause in res[sid]["error"] and "\n" not in res[sid]["error"]
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + len(res)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["failed"] == 2 and run["counts"]["non_diagnostic"] == 1
    assert run["model"]["sha256"] and run["versions"]["torch"]
    assert run["model"]["batch_size"] == 32 and run["options"]["batch_size"] is None  # the CPU default, recorded
    assert "index.html" in os.listdir(out) and not list(out.rglob("*.tmp"))


def test_qupath_tiles_geojson(mixed_run):
    _, out, _ = mixed_run
    gj = json.loads((out / "CMU-1-Small-Region" / "tiles.geojson").read_text())
    r = json.loads((out / "CMU-1-Small-Region" / "result.json").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == r["n_tiles"]
    for f in gj["features"][:20]:
        props = f["properties"]
        assert props["objectType"] == "tile" and props["isLocked"] is True
        assert set(props["measurements"]) >= {"pallor", "necrolysis", "parakeratosis", "attention"}
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
        xs = [p[0] for p in ring]
        assert max(xs) - min(xs) == pytest.approx(224, abs=1)  # 0.499 µm/px slide, level-0 pixels
    tissue = json.loads((out / "CMU-1-Small-Region" / "tissue.geojson").read_text())
    assert all(f["properties"]["objectType"] == "annotation" for f in tissue["features"])


def test_rerun_skips_done_and_retries_failed(mixed_run):
    src, out, _ = mixed_run
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    proc = _infer(src, "--out", out)
    assert proc.returncode == 1
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    for sid in ("CMU-1-Small-Region", "dapi"):
        assert after[sid] == before[sid], f"{sid} was recomputed"
    assert after["corrupt"] != before["corrupt"]  # failed slides are retried
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped_done"] >= 3


def test_kill_9_loses_only_the_slide_in_progress(tmp_path, synthetic_pair, shared_slides):
    src = tmp_path / "in"
    src.mkdir()
    for f in synthetic_pair.glob("*.tiff"):
        shutil.copy(f, src / f.name)
    shutil.copy(shared_slides / "CMU-1-Small-Region.svs", src / "CMU-1-Small-Region.svs")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "infer.py"), str(src), "--out", str(out), "--quiet"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while time.time() < deadline and not list(out.glob("*/result.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert done, "no slide finished before the kill"
    assert (out / ".nme-run.lock").exists()  # stale lock left by the killed run
    proc2 = _infer(src, "--out", out)
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    for sid, mtime in done.items():
        assert (out / sid / "result.json").stat().st_mtime_ns == mtime
    assert len(list(out.glob("*/result.json"))) == 3
    assert not (out / ".nme-run.lock").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "inside", "clinical", "model"])
def test_bad_input_before_any_slide(tmp_path, synthetic_pair, case):
    src = tmp_path / "in"
    src.mkdir()
    out = tmp_path / "out"
    args = [src, "--out", out]
    if case == "missing":
        args = [tmp_path / "nope", "--out", out]
    elif case != "empty":
        shutil.copy(next(synthetic_pair.glob("*.tiff")), src / "a.tiff")
    if case == "inside":
        args = [src, "--out", src / "results"]
    elif case == "clinical":
        bad = tmp_path / "clinical.csv"
        bad.write_text("slide_id,site\nnot-a-slide,acral\n")
        args += ["--clinical", bad]
    elif case == "model":
        args += ["--model", tmp_path]
    proc = _infer(*args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not list(out.glob("*/result.json")) if out.exists() else True
