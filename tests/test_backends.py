"""Inference backends: agreement with torch-fp32, ``auto`` resolution, errors, the agreement CLI, the benchmark."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

DEMO_BUNDLE = REPO / "models" / "demo_bundle"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def small_calibration():
    """A one-slide calibration set so int8 quantisation takes seconds in tests."""
    from pipeline.patch.backends import int8

    spec = int8.CalibrationSet(n_slides=1, classes=("nme",), size_um=(1200.0, 1000.0), n_tiles=24)
    old = int8.DEFAULT_CALIBRATION
    int8.DEFAULT_CALIBRATION = spec
    yield spec
    int8.DEFAULT_CALIBRATION = old


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A private copy of the demo bundle (tests write agreement.json into it)."""
    assert (DEMO_BUNDLE / "bundle.json").is_file(), "the shipped demo bundle models/demo_bundle is missing"
    d = tmp_path_factory.mktemp("bundle") / "demo"
    shutil.copytree(DEMO_BUNDLE, d, ignore=shutil.ignore_patterns("agreement.json"))
    return d


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    from models.bundle import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Three tiny labelled synthetic slides (NME and not)."""
    from pipeline.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("agreement-slides")
    generate_dataset(root, n=3, seed=31, mpp=0.5, classes=["nme", "normal"], size_um=(1200, 1000), overwrite=True)
    return root


@pytest.fixture(scope="module")
def tiles(slides, bundle) -> np.ndarray:
    """Up to 24 real tissue tiles, uint8 (N, 224, 224, 3)."""
    from pipeline.patch.backends.int8 import calibration_tiles
    from pipeline.tiles.tiling import TilingConfig

    return calibration_tiles(sorted((slides / "slides").glob("*.tiff")), TilingConfig(), n_tiles=24, seed=1)


@pytest.fixture
def no_record(bundle_dir):
    (bundle_dir / "agreement.json").unlink(missing_ok=True)
    yield
    (bundle_dir / "agreement.json").unlink(missing_ok=True)


def _reference(bundle, tiles):
    from pipeline.patch.backends import make_runner

    runner, name = make_runner(bundle, CPU, backend="torch-fp32")
    assert name == "torch-fp32"
    return runner(tiles)


# tolerance on |tile probability difference| (max, mean) and on the embedding (max, relative to its range)
# (max, mean tile-probability difference, max embedding difference) against torch-fp32. int8 is judged
# at slide level by the agreement record; here, with a small calibration set, single tiles of the
# 2026-12-02 bundle move up to 0.27 (an epidermis tile), the mean stays under 0.01.
TOLERANCE = {"onnx-fp32": (1e-4, 1e-5, 1e-4), "torch-bf16": (0.05, 0.01, 0.05), "onnx-int8": (0.35, 0.03, 0.25)}


@pytest.mark.parametrize("backend", ["onnx-fp32", "torch-bf16", "onnx-int8"])
def test_backend_agrees_with_fp32(backend, bundle, tiles, cache_dir, small_calibration):
    from pipeline.patch.backends import make_runner
    from pipeline.patch.backends.torch_runner import bf16_available

    if backend == "torch-bf16" and not bf16_available(CPU):
        pytest.skip("this CPU has no native bf16")
    ref_p, ref_e = _reference(bundle, tiles)
    runner, name = make_runner(bundle, CPU, backend=backend, cache_dir=cache_dir)
    assert name == backend and runner.device.type == "cpu"
    p, e = runner(tiles)
    assert p.dtype == np.float32 and e.dtype == np.float32
    assert p.shape == ref_p.shape == (len(tiles), len(bundle.contract.architecture.classes))
    assert e.shape == ref_e.shape == (len(tiles), bundle.contract.architecture.embedding_dim)
    d = np.abs(p - ref_p)
    max_tol, mean_tol, emb_tol = TOLERANCE[backend]
    assert d.max() <= max_tol and d.mean() <= mean_tol, (backend, d.max(), d.mean())
    scale = float(np.abs(ref_e).max())
    assert np.abs(e - ref_e).max() <= emb_tol * max(scale, 1.0), backend
    # a different batch size works (dynamic batch axis) and gives the same per-tile results
    p1, _ = runner(tiles[:3])
    assert np.allclose(p1, p[:3], atol=1e-4 if backend != "torch-bf16" else 0.02)


def test_exports_are_cached_and_the_bundle_model_is_untouched(bundle, cache_dir, small_calibration):
    from pipeline.patch.backends.int8 import ensure_int8_onnx
    from pipeline.patch.backends.onnx_runner import ensure_fp32_onnx

    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    was_training = bundle.model.training
    a = ensure_fp32_onnx(bundle, cache_dir)
    mtime = a.stat().st_mtime_ns
    assert ensure_fp32_onnx(bundle, cache_dir) == a and a.stat().st_mtime_ns == mtime  # reused, not re-exported
    q = ensure_int8_onnx(bundle, cache_dir)
    assert q != a and q.is_file() and "onnx-int8" in q.name and bundle.contract.weights_sha256[:16] in q.name
    assert not list(Path(cache_dir).rglob("*.tmp"))
    assert bundle.model.training == was_training
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())


def test_int8_calibration_is_deterministic(bundle, slides, cache_dir, tmp_path):
    from pipeline.patch.backends.int8 import calibration_tiles, quantise_int8
    from pipeline.patch.backends.onnx_runner import ensure_fp32_onnx
    from pipeline.tiles.tiling import TilingConfig

    paths = sorted((slides / "slides").glob("*.tiff"))
    t1 = calibration_tiles(paths, TilingConfig(), n_tiles=16, seed=5)
    t2 = calibration_tiles(paths, TilingConfig(), n_tiles=16, seed=5)
    assert t1.shape == (16, 224, 224, 3) and np.array_equal(t1, t2)
    fp32 = ensure_fp32_onnx(bundle, cache_dir)
    a = quantise_int8(fp32, tmp_path / "a.onnx", t1).read_bytes()
    b = quantise_int8(fp32, tmp_path / "b.onnx", t2).read_bytes()
    assert a == b


def test_unknown_backend_is_a_one_line_error(bundle):
    from pipeline.core.errors import ConfigError
    from pipeline.patch.backends import make_runner

    with pytest.raises(ConfigError) as exc:
        make_runner(bundle, CPU, backend="tensorrt")
    msg = str(exc.value)
    assert "tensorrt" in msg and "onnx-int8" in msg and "torch-fp32" in msg and "\n" not in msg


def test_missing_onnxruntime_and_missing_bf16_are_one_line_errors(bundle, monkeypatch):
    from pipeline.core.errors import ConfigError
    from pipeline.patch.backends import make_runner, onnx_runner, torch_runner

    monkeypatch.setattr(onnx_runner, "onnxruntime_available", lambda: False)
    with pytest.raises(ConfigError, match=r"onnx-fp32 needs onnxruntime.*pip install"):
        make_runner(bundle, CPU, backend="onnx-fp32")
    monkeypatch.setattr(torch_runner, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="no native bf16") as exc:
        make_runner(bundle, CPU, backend="torch-bf16")
    assert "\n" not in str(exc.value)


def test_compiled_backend_agrees_with_fp32_and_runs_other_batch_sizes_eagerly(bundle, tiles):
    """torch-bf16-compile: compiled once at construction for its batch size; full batches go
    through the compiled graph, others (a slide's last batch) through the same model eagerly."""
    from pipeline.patch.backends import make_runner
    from pipeline.patch.backends.torch_runner import bf16_available, compile_unavailable_reason

    if not bf16_available(CPU) or compile_unavailable_reason(CPU):
        pytest.skip(compile_unavailable_reason(CPU) or "this CPU has no native bf16")
    ref_p, ref_e = _reference(bundle, tiles[:8])
    runner, name = make_runner(bundle, CPU, backend="torch-bf16-compile", batch_size=8)
    assert name == "torch-bf16-compile" and runner.batch_size == 8 and runner.compile_seconds > 0
    compiled_calls: list[int] = []
    compiled = runner._compiled
    runner._compiled = lambda x: (compiled_calls.append(x.shape[0]), compiled(x))[1]
    p, e = runner(tiles[:8])
    p3, _ = runner(tiles[:3])
    assert compiled_calls == [8]  # the full batch only
    max_tol, mean_tol, emb_tol = TOLERANCE["torch-bf16"]
    d = np.abs(p - ref_p)
    assert d.max() <= max_tol and d.mean() <= mean_tol, (d.max(), d.mean())
    assert np.abs(e - ref_e).max() <= emb_tol * max(float(np.abs(ref_e).max()), 1.0)
    assert np.abs(p3 - ref_p[:3]).max() <= max_tol
    # the bundle's own model is untouched (the runner compiled a private, batch-norm-folded copy)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bundle.model.modules())


def test_compiled_backend_without_a_compiler_is_a_one_line_error(bundle, monkeypatch):
    from pipeline.core.errors import ConfigError
    from pipeline.patch.backends import make_runner, unavailable_reason

    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    _fake_bf16(monkeypatch, True)
    with pytest.raises(ConfigError, match="torch-bf16-compile needs a C\\+\\+ compiler") as exc:
        make_runner(bundle, CPU, backend="torch-bf16-compile")
    assert "\n" not in str(exc.value) and "--backend torch-bf16" in str(exc.value)
    assert unavailable_reason("torch-bf16-compile", CPU) == str(exc.value)
    _fake_bf16(monkeypatch, False)
    assert "no native bf16" in unavailable_reason("torch-bf16-compile", CPU)


def _fake_bf16(monkeypatch, supported: bool) -> None:
    from pipeline.core import runtime
    from pipeline.patch.backends import torch_runner

    monkeypatch.setattr(torch_runner, "cpu_bf16_supported", lambda: supported)
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: supported)


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_without_record_or_check_keeps_to_fp32(bundle, no_record, monkeypatch, caplog, bf16):
    """Nothing unverified runs: without a record and without a slide model to check with, torch-fp32,
    a WARNING with the fix where bf16 would have been possible (tests/test_auto_backend.py: the check)."""
    from pipeline.patch.backends import resolve_backend

    _fake_bf16(monkeypatch, bf16)
    with caplog.at_level("WARNING"):
        res = resolve_backend(bundle, CPU, "auto")
    assert res.backend == "torch-fp32" and "no agreement record" in res.reason
    assert ("Fix:" in caplog.text) == bf16


def _record(bundle, entries: dict[str, bool], weights: str | None = None, machine_id: str = "elsewhere") -> dict:
    from pipeline.patch.backends.record import RECORD_FORMAT, runtime_of

    return {
        "format": RECORD_FORMAT,
        "bundle": {"weights_sha256": weights or bundle.contract.weights_sha256},
        "backends": {
            name: {
                "passed": ok,
                "reasons": [] if ok else ["band agreement 0.9 < 0.99"],
                "device_type": "cpu",
                "runtime": runtime_of(name),
                "band_agreement": 1.0 if ok else 0.9,
                "model_tiles_per_s": 100.0 + i,
                "machine_id": machine_id,
            }
            for i, (name, ok) in enumerate(entries.items())
        },
    }


def test_auto_with_failing_record_falls_back_to_fp32(bundle, bundle_dir, no_record, monkeypatch, caplog):
    from pipeline.patch.backends import make_runner, resolve_backend
    from pipeline.patch.backends.record import write_record

    _fake_bf16(monkeypatch, True)
    write_record(bundle_dir, _record(bundle, {"torch-bf16": False, "onnx-fp32": False, "onnx-int8": False}))
    assert resolve_backend(bundle, CPU, "auto").backend == "torch-fp32"
    runner, name = make_runner(bundle, CPU, backend="auto")
    assert name == "torch-fp32" and runner.channels_last is False and runner.precision == "fp32"
    # an explicit request is honoured, with a warning
    with caplog.at_level("WARNING"):
        assert resolve_backend(bundle, CPU, "torch-bf16").backend == "torch-bf16"
    assert "failed the agreement check" in caplog.text


def test_auto_picks_the_fastest_passing_backend(bundle, bundle_dir, no_record, monkeypatch):
    from pipeline.patch.backends import resolve_backend
    from pipeline.patch.backends.record import machine_id, write_record

    _fake_bf16(monkeypatch, True)
    write_record(bundle_dir, _record(bundle, {"torch-bf16": True, "onnx-fp32": True, "onnx-int8": False}))
    assert resolve_backend(bundle, CPU, "auto").backend == "torch-bf16"  # preference order (other machine)
    # measured on this machine: the faster one wins (onnx-fp32 has the higher tiles/s in _record)
    write_record(bundle_dir, _record(bundle, {"torch-bf16": True, "onnx-fp32": True}, machine_id=machine_id(CPU)))
    assert resolve_backend(bundle, CPU, "auto").backend == "onnx-fp32"
    # the compiled backend is never auto's choice, even when it passed and was measured fastest
    write_record(
        bundle_dir, _record(bundle, {"torch-bf16": True, "torch-bf16-compile": True}, machine_id=machine_id(CPU))
    )
    assert resolve_backend(bundle, CPU, "auto").backend == "torch-bf16"
    # no bf16 here: the bf16 entry cannot be used
    _fake_bf16(monkeypatch, False)
    write_record(bundle_dir, _record(bundle, {"torch-bf16": True, "onnx-int8": False}))
    assert resolve_backend(bundle, CPU, "auto").backend == "torch-fp32"


def test_record_for_other_weights_or_runtime_is_ignored(bundle, bundle_dir, no_record, monkeypatch):
    from pipeline.patch.backends import resolve_backend
    from pipeline.patch.backends.record import write_record

    _fake_bf16(monkeypatch, False)
    write_record(bundle_dir, _record(bundle, {"onnx-fp32": True}, weights="0" * 64))
    assert resolve_backend(bundle, CPU, "auto").backend == "torch-fp32"  # stale: as without a record
    rec = _record(bundle, {"onnx-fp32": True})
    rec["backends"]["onnx-fp32"]["runtime"] = {"onnxruntime": "0.0.1"}
    write_record(bundle_dir, rec)
    assert resolve_backend(bundle, CPU, "auto").backend == "torch-fp32"


def test_agreement_cli_writes_a_valid_record(
    bundle, bundle_dir, slides, cache_dir, small_calibration, no_record, capsys, monkeypatch
):
    from pipeline.evaluation.agreement import main
    from pipeline.patch.backends import resolve_backend
    from pipeline.patch.backends.record import AGREEMENT_FILE, read_record

    assert (
        main(
            [
                "--bundle",
                str(bundle_dir),
                "--slides",
                str(slides),
                "--backends",
                "onnx-fp32,onnx-int8",
                "--write",
                "--cache-dir",
                str(cache_dir),
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    printed = json.loads(out[0])
    rec = read_record(bundle_dir)
    assert rec is not None and (bundle_dir / AGREEMENT_FILE).is_file()
    assert rec["backends"].keys() == printed["backends"].keys() == {"onnx-fp32", "onnx-int8"}
    assert rec["bundle"]["weights_sha256"] == bundle.contract.weights_sha256
    assert rec["data"]["n_slides"] == 3 and rec["data"]["n_positive"] >= 1 and rec["data"]["n_tiles"] > 0
    classes = set(bundle.contract.architecture.classes)
    for _name, e in rec["backends"].items():
        assert set(e["tile_prob_abs_diff"]) == classes
        assert all(0 <= v["mean"] <= v["max"] <= 1 for v in e["tile_prob_abs_diff"].values())
        assert 0 <= e["slide_prob_abs_diff"]["mean"] <= e["slide_prob_abs_diff"]["max"] <= 1
        assert 0 <= e["band_agreement"] <= 1 and isinstance(e["passed"], bool)
        assert e["device_type"] == "cpu" and e["model_tiles_per_s"] > 0
        if e["passed"]:
            assert e["band_agreement"] >= 0.99 and e["auroc_diff"] <= 0.01
    fp = rec["backends"]["onnx-fp32"]
    assert fp["passed"] and fp["band_agreement"] == 1.0 and fp["slide_prob_abs_diff"]["max"] < 1e-4
    # the record now drives auto (no bf16 on this fake CPU: onnx-int8 if it passed, else onnx-fp32)
    _fake_bf16(monkeypatch, False)
    want = "onnx-int8" if rec["backends"]["onnx-int8"]["passed"] else "onnx-fp32"
    if (
        rec["backends"]["onnx-int8"]["passed"]
        and rec["backends"]["onnx-fp32"]["model_tiles_per_s"] > rec["backends"]["onnx-int8"]["model_tiles_per_s"]
    ):
        want = "onnx-fp32"  # measured on this machine: the faster passing backend
    assert resolve_backend(bundle, CPU, "auto").backend == want


def _cli_error(main, argv, capsys) -> str:
    from pipeline.core.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_agreement_cli_errors_are_one_line(bundle_dir, tmp_path, capsys):
    from pipeline.evaluation.agreement import main

    err = _cli_error(main, ["--bundle", str(bundle_dir), "--slides", str(tmp_path), "--backends", "onnx-fp32"], capsys)
    assert "labels.csv" in err and "pipeline.synthetic" in err
    err = _cli_error(main, ["--bundle", str(bundle_dir), "--slides", str(tmp_path), "--backends", "onnx-fp64"], capsys)
    assert "unknown backend 'onnx-fp64'" in err


def test_infer_records_the_backend(tmp_path, slides, bundle_dir, cache_dir, no_record):
    import os

    env = dict(os.environ, NME_PIPELINE_CACHE=str(cache_dir))
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(next((slides / "slides").glob("*.tiff")), src / "a.tiff")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "infer.py"), str(src), "--out", str(out), "--model", str(bundle_dir), "--quiet"]
    proc = subprocess.run(
        cmd + ["--backend", "onnx-fp32"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["backend"] == "onnx-fp32" and run["options"]["backend"] == "onnx-fp32"
    assert run["backend"]["name"] == "onnx-fp32" and run["backend"]["basis"] == "requested"
    assert "backend: onnx-fp32 (chosen with --backend)" in proc.stdout
    res = json.loads((out / "a" / "result.json").read_text())
    assert res["model"]["backend"] == "onnx-fp32"
    assert res["timings"]["patch_model.model"] > 0 and "patch_model.tile_wait" in res["timings"]


def test_infer_unknown_backend_is_a_one_line_error(tmp_path, slides, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_cli", REPO / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(next((slides / "slides").glob("*.tiff")), src / "a.tiff")
    err = _cli_error(infer.main, [str(src), "--out", str(tmp_path / "out"), "--backend", "nope", "--quiet"], capsys)
    assert err.startswith("error: unknown backend 'nope'") and "onnx-int8" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*/result.json"))


REQUIRED = (
    "e2e_tiles_per_s",
    "model_tiles_per_s",
    "ratio",
    "fp32_eager_e2e_tiles_per_s",
    "speedup_vs_fp32_eager",
    "peak_rss_mb_small",
    "peak_rss_mb_large",
    "backend",
    "machine",
    "batch_size",
    "stage_share_of_slide_time",
)


@pytest.mark.slow
def test_throughput_benchmark_quick_json(tmp_path, bundle_dir, no_record):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "throughput.py"),
            "--quick",
            "--json",
            "--cache-dir",
            str(tmp_path),
            "--model",
            str(bundle_dir),
            "--batch-size",
            "32",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    r = json.loads(lines[0])
    for key in REQUIRED:
        assert key in r, key
    # auto: torch-fp32, or a backend verified for this environment (no record in this bundle copy)
    assert r["batch_size"] == 32 and r["backend"] in ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
    assert r["e2e_tiles_per_s"] > 0 and r["model_tiles_per_s"] > 0 and r["fp32_eager_e2e_tiles_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["e2e_tiles_per_s"] / r["model_tiles_per_s"], rel=1e-2)
    assert r["peak_rss_mb_small"] > 0 and r["peak_rss_mb_large"] > 0
    assert r["machine"]["cpu"] and r["machine"]["torch_threads"] >= 1
    assert abs(sum(r["stage_share_of_slide_time"].values()) - 1.0) < 0.05
    assert 0 < r["heatmaps_reports_share"] < r["outputs_share"] < 1 and r["outputs_cpu_ms_per_slide"] > 0
    assert set(r["targets"]) == {"ratio", "speedup_vs_fp32_eager", "rss_large_over_small", "heatmaps_reports_share"}


def test_speed_bundle_runs_the_pipeline_with_another_backbone(tmp_path, slides, monkeypatch):
    """benchmarks/speed_bundle.py: an untrained ResNet18 bundle, labelled as such, that infer.py runs."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from speed_bundle import LABEL, make_speed_bundle

    from models.bundle import load_bundle
    from pipeline.batch.process import process_slides
    from pipeline.batch.runner import BatchOptions, build_context, check_inputs

    monkeypatch.setenv("NME_PIPELINE_CACHE", str(tmp_path / "cache"))
    make_speed_bundle("resnet18", tmp_path / "r18")
    b = load_bundle(tmp_path / "r18")
    demo = load_bundle(DEMO_BUNDLE)
    assert b.contract.architecture.backbone == "resnet18" and b.contract.label == LABEL
    assert b.contract.input == demo.contract.input and set(b.extra) == set(demo.extra)  # same contract, aggregator
    src = tmp_path / "in"
    src.mkdir()
    slide = sorted((slides / "slides").glob("*.tiff"))[0]
    shutil.copy(slide, src / slide.name)
    opts = BatchOptions(
        slides_dir=src, out_dir=tmp_path / "out", model=tmp_path / "r18", backend="torch-fp32", quiet=True
    )
    jobs = check_inputs(opts)
    opts.out_dir.mkdir()  # process_slides writes into an existing output folder, as run_batch makes it
    (r,) = (x.to_json_dict() for x in process_slides(jobs, build_context(opts, jobs)))
    assert r["status"] in ("ok", "non_diagnostic"), r.get("error")
    assert r["n_tiles"] > 0 and r["model"]["label"] == LABEL and r["model"]["backbone"] == "resnet18"


# --------------------------------------------------------------------------- streaming tile reader


@pytest.mark.parametrize("slide_mpp", [0.5, 0.3])  # 0.3 µm/px: tiles are resized, read one by one
def test_tile_reader_strips_give_the_same_tiles(tmp_path, slide_mpp):
    from conftest import skin_like_image, write_pyramid_tiff

    from pipeline.patch.reader import TileReader
    from pipeline.reading.slide import open_slide
    from pipeline.tiles.tiling import TilingConfig, tile_slide

    path = write_pyramid_tiff(tmp_path / "s.tiff", skin_like_image(2400, 1800, seed=3), mpp=slide_mpp)
    with open_slide(path) as slide:
        grid, mask, _, _ = tile_slide(slide, TilingConfig(min_tissue=0.01))
        per_tile = np.stack(
            [slide.read_region((int(x), int(y)), (grid.tile_px, grid.tile_px), grid.plan) for x, y in grid.coords]
        )
    assert len(grid) > 8

    def read(**kw):
        r = TileReader(path, None, grid.coords, grid.plan, grid.tile_px, batch_size=5, threads=2, **kw)
        out = list(r)
        assert [int(i[0]) for i, _, _ in out] == list(range(0, len(grid), 5))  # batches in tile order
        return np.concatenate([t for _, t, _ in out]), np.concatenate([s for _, _, s in out]), r.stain()

    strips, sharp, stain = read()
    single, sharp1, stain1 = read(max_strip_tiles=1, low_priority=True)
    assert np.array_equal(strips, per_tile) and np.array_equal(single, per_tile)
    assert np.array_equal(sharp, sharp1) and stain == stain1 and stain["n_tiles"] == len(grid)


def test_stain_accumulator_matches_a_plain_numpy_reference():
    from pipeline.tiles.measurements import StainAccumulator

    rng = np.random.default_rng(4)
    tiles = rng.integers(0, 256, (9, 40, 56, 3), dtype=np.uint8)
    tiles[3] //= 6  # dark
    for bg in ((255, 255, 255), (240, 236, 238)):
        acc = StainAccumulator(bg)
        got = acc.update(tiles).result()
        px = tiles.reshape(-1, 3)
        od = np.stack([acc._lut[c][px[:, c]] for c in range(3)], axis=1)
        stained = od.sum(axis=1) >= acc.stained_od_min
        usable = stained & (px.max(axis=1) >= acc.dark_max_value) & (px.min(axis=1) >= acc.saturated_min_value)
        r, g, b = od.T
        assert got["n_pixels"] == len(px) and got["stained_fraction"] == stained.mean()
        assert got["dark_pixel_fraction"] == (px.max(axis=1) < acc.dark_max_value).mean()
        assert got["he_like_fraction"] == (usable & (g >= r) & (g >= b)).sum() / stained.sum()
        assert got["dab_like_fraction"] == (usable & (b > g) & (b > r)).sum() / stained.sum()
        assert got["red_dominant_fraction"] == (usable & (r > g)).sum() / stained.sum()
        assert np.allclose(got["mean_od"], od[stained].astype(np.float64).mean(axis=0), rtol=1e-9)
        assert np.allclose(got["mean_rgb"], px.mean(axis=0), rtol=1e-12)


def test_overlapping_the_slide_stages_changes_nothing(tmp_path, slides, bundle_dir, cache_dir, no_record, monkeypatch):
    from pipeline.batch.process import process_slides
    from pipeline.batch.runner import BatchOptions, build_context, check_inputs

    monkeypatch.setenv("NME_PIPELINE_CACHE", str(cache_dir))
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((slides / "slides").glob("*.tiff"))[:2]:
        shutil.copy(f, src / f.name)
    (src / "broken.tiff").write_bytes(b"not a tiff")
    results = {}
    for overlap in (True, False):
        opts = BatchOptions(
            slides_dir=src, out_dir=tmp_path / f"out{overlap}", model=bundle_dir, backend="onnx-fp32", quiet=True
        )
        jobs = check_inputs(opts)
        opts.out_dir.mkdir()  # process_slides writes into an existing output folder, as run_batch makes it
        ctx = build_context(opts, jobs)
        got = {j.slide_id: r.to_json_dict() for j, r in zip(jobs, process_slides(jobs, ctx, overlap=overlap))}
        assert set(got) == {j.slide_id for j in jobs} and len(got) == 3
        results[overlap] = {
            k: {f: v for f, v in r.items() if f not in ("timings", "created_at", "produced_by")} for k, r in got.items()
        }
        if overlap:
            assert any("tissue_tiling.wait" in r["timings"] for r in got.values())
            assert ctx.stages._pools is not None  # the context's stage threads, kept for its next batch
            ctx.stages.close()
    assert results[True] == results[False]
    assert results[True]["broken"]["status"] == "failed" and "broken" in results[True]["broken"]["error"]
    for sid, r in results[True].items():
        if sid != "broken":
            assert r["status"] in ("ok", "non_diagnostic") and r["n_tiles"] > 0
            for name in ("tiles.geojson", "heatmap_pallor.jpg", "heatmap_attention.jpg"):
                a = (tmp_path / "outTrue" / sid / name).read_bytes()
                assert a == (tmp_path / "outFalse" / sid / name).read_bytes(), name


def test_heatmap_files_jpeg_by_default_png_on_request(tmp_path, slides, bundle_dir, cache_dir, no_record, monkeypatch):
    """The same rendered heatmaps as JPEG files (default, the bytes the report embeds) or lossless PNG files."""
    import base64

    import cv2

    from pipeline.batch.process import process_slides
    from pipeline.batch.runner import BatchOptions, build_context, check_inputs
    from pipeline.batch.state import is_done

    monkeypatch.setenv("NME_PIPELINE_CACHE", str(cache_dir))
    src = tmp_path / "in"
    src.mkdir()
    slide = next(f for f in sorted((slides / "slides").glob("*.tiff")))
    shutil.copy(slide, src / slide.name)
    images = {}
    for fmt, suffix in (("jpeg", ".jpg"), ("png", ".png")):
        opts = BatchOptions(
            slides_dir=src,
            out_dir=tmp_path / fmt,
            model=bundle_dir,
            backend="onnx-fp32",
            quiet=True,
            heatmap_format=fmt,
        )
        jobs = check_inputs(opts)
        opts.out_dir.mkdir()  # process_slides writes into an existing output folder, as run_batch makes it
        (r,) = (x.to_json_dict() for x in process_slides(jobs, build_context(opts, jobs)))
        assert r["status"] == "ok", r.get("error")
        d = tmp_path / fmt / slide.stem
        names = [f"heatmap_{m}{suffix}" for m in ("pallor", "necrolysis", "parakeratosis", "attention")]
        assert [f for f in r["files"] if f.startswith("heatmap_")] == names
        assert not list(d.glob("heatmap_*" + (".png" if fmt == "jpeg" else ".jpg")))
        assert is_done(d)
        images[fmt] = cv2.imread(str(d / names[0]))
        report = (d / "report.html").read_text()
        if fmt == "jpeg":  # the report shows the file's bytes
            assert base64.b64encode((d / names[0]).read_bytes()).decode() in report
        else:  # lossless file, compact JPEG in the report
            assert base64.b64encode((d / names[0]).read_bytes()).decode() not in report
        assert report.count("data:image/jpeg;base64,") >= 5
    assert images["jpeg"].shape == images["png"].shape
    assert cv2.PSNR(images["jpeg"], images["png"]) > 36  # quality 90


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "resnet18"])
def test_batchnorm_folding_keeps_the_function(backbone):
    import torch

    from models.patch import PatchClassifier
    from pipeline.patch.backends.torch_runner import fold_batchnorm

    torch.manual_seed(0)
    model = PatchClassifier(backbone).eval()
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        want = model.forward_with_embedding(x)
        model.backbone = fold_batchnorm(model.backbone)
        got = model.forward_with_embedding(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for w, g in zip(want, got):
        assert torch.allclose(w, g, rtol=1e-4, atol=1e-4), (w - g).abs().max()
