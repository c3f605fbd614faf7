"""``auto`` is never silently slow: the agreement record when it covers this runtime, else a check
in this environment (cached per environment), else ``torch-fp32`` with the reason."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO

DEMO_BUNDLE = REPO / "models" / "demo_bundle"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A private copy of the demo bundle without its agreement record (tests write their own)."""
    d = tmp_path_factory.mktemp("bundle") / "demo"
    shutil.copytree(DEMO_BUNDLE, d, ignore=shutil.ignore_patterns("agreement.json"))
    return d


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    from models.bundle import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def scorer(bundle):
    from pipeline.slide_model.aggregation import SlidePredictor

    return SlidePredictor.from_bundle(bundle.contract, bundle.extra)


@pytest.fixture(scope="module")
def small_calibration():
    """A one-slide int8 calibration set so quantisation takes seconds here."""
    from pipeline.patch.backends import int8

    old = int8.DEFAULT_CALIBRATION
    int8.DEFAULT_CALIBRATION = int8.CalibrationSet(n_slides=1, classes=("nme",), size_um=(1200.0, 1000.0), n_tiles=24)
    yield
    int8.DEFAULT_CALIBRATION = old


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the module: slides and exports are made once, verdicts are keyed anyway."""
    return tmp_path_factory.mktemp("cache")


def _write_record(bundle, bundle_dir: Path, runtime_matches: bool) -> None:
    """An agreement record in which every backend passed, for this runtime or another one."""
    from pipeline.patch.backends.record import RECORD_FORMAT, runtime_of, write_record

    backends = ("torch-bf16", "onnx-fp32", "onnx-int8")
    write_record(
        bundle_dir,
        {
            "format": RECORD_FORMAT,
            "bundle": {"weights_sha256": bundle.weights_sha256},
            "versions": {"torch": "0.1.0", "onnxruntime": "0.1.0"},
            "backends": {
                b: {
                    "passed": True,
                    "reasons": [],
                    "device_type": "cpu",
                    "runtime": runtime_of(b) if runtime_matches else {"x": "0.1"},
                    "band_agreement": 1.0,
                    "model_tiles_per_s": 100.0,
                    "machine_id": "elsewhere",
                }
                for b in backends
            },
        },
    )


def test_a_matching_record_decides_without_a_check(bundle, bundle_dir, scorer, tmp_path):
    from pipeline.patch.backends import PREFERENCE, resolve_backend, unavailable_reason

    _write_record(bundle, bundle_dir, runtime_matches=True)
    res = resolve_backend(bundle, CPU, "auto", scorer=scorer, cache_dir=tmp_path)
    first_runnable = next(b for b in PREFERENCE["cpu"] if unavailable_reason(b, CPU) is None)
    assert (res.backend, res.basis) == (first_runnable, "agreement record")
    assert "passed the agreement check" in res.reason
    assert not (tmp_path / "verified").exists()  # nothing was checked here


def test_a_mismatched_record_is_verified_here_once_and_cached(
    bundle, bundle_dir, scorer, shared_cache, small_calibration
):
    from pipeline.patch.backends import REFERENCE, resolve_backend
    from pipeline.patch.backends.verify import cached_verdicts, verdict_path

    _write_record(bundle, bundle_dir, runtime_matches=False)
    res = resolve_backend(bundle, CPU, "auto", scorer=scorer, cache_dir=shared_cache)
    path = verdict_path(bundle, CPU, shared_cache)
    assert path.is_file()
    verdicts = cached_verdicts(bundle, CPU, shared_cache)
    ref_speed = verdicts[REFERENCE]["model_tiles_per_s"]
    assert ref_speed > 0
    checked = {k: v for k, v in verdicts.items() if k != REFERENCE}
    assert checked and all(v["n_slides"] == 6 and v["n_tiles"] > 0 for v in checked.values())
    faster = {k: v for k, v in checked.items() if v["passed"] and v["model_tiles_per_s"] > ref_speed}
    if faster:  # the fastest verified backend, saying so
        assert res.backend == max(faster, key=lambda k: faster[k]["model_tiles_per_s"])
        assert res.basis == "verified here" and "verified for this environment now" in res.reason
        assert "agreement record is for" in res.reason
    else:  # on a machine where none beats the reference: the reference, with the verdicts as reason
        assert res.backend == REFERENCE and res.basis == "fallback"
    # onnx-fp32 computes what torch-fp32 does: it must pass
    if "onnx-fp32" in checked:
        assert checked["onnx-fp32"]["passed"] and checked["onnx-fp32"]["tile_prob_abs_diff_max"] < 1e-3
    stamp = path.stat().st_mtime_ns
    again = resolve_backend(bundle, CPU, "auto", scorer=scorer, cache_dir=shared_cache)
    assert again.backend == res.backend and path.stat().st_mtime_ns == stamp
    if again.basis == "verified here":
        assert "earlier (cached)" in again.reason


def test_the_cache_key_follows_the_runtime_and_the_weights(bundle, monkeypatch):
    from pipeline.patch.backends import record, verify

    key = verify.environment_key(bundle, CPU)
    assert key["weights_sha256"] == bundle.weights_sha256 and key["cpu_flags_sha256"]
    monkeypatch.setattr(record, "runtime_versions", lambda: {"torch": "9.9.9", "onnxruntime": "9.9.9"})
    assert verify.environment_key(bundle, CPU) != key
    assert verify.verdict_path(bundle, CPU, "/x") != verify.verdict_path(bundle, CPU, "/x").with_name("other")


def test_a_failed_check_falls_back_to_fp32_with_the_reason(
    bundle, bundle_dir, scorer, shared_cache, small_calibration, monkeypatch, caplog
):
    """A stricter rule than any approximate backend can meet stands in for a backend that disagrees:
    the real check runs, fails, and ``auto`` keeps to torch-fp32, saying why (a WARNING on bf16 hardware)."""
    from pipeline.patch.backends import record, resolve_backend, unavailable_reason
    from pipeline.patch.backends.verify import cached_verdicts

    _write_record(bundle, bundle_dir, runtime_matches=False)
    monkeypatch.setattr(record, "MIN_BAND_AGREEMENT", 1.5)  # a new rule is a new cache key: checked again
    with caplog.at_level(logging.INFO, logger="pipeline.patch.backends"):
        res = resolve_backend(bundle, CPU, "auto", scorer=scorer, cache_dir=shared_cache)
    assert res.backend == "torch-fp32" and res.basis == "fallback"
    assert "verification here" in res.reason and "band agreement 1.000 < 1.5" in res.reason
    verdicts = cached_verdicts(bundle, CPU, shared_cache)
    assert all(not v["passed"] for k, v in verdicts.items() if k != "torch-fp32")
    bf16_here = unavailable_reason("torch-bf16", CPU) is None
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "torch-fp32" in r.getMessage()]
    assert bool(warned) == bf16_here
    if bf16_here:
        assert "Fix:" in warned[0].getMessage() and "make install" in warned[0].getMessage()


def test_without_a_slide_model_auto_keeps_to_fp32_and_says_why(bundle, bundle_dir):
    from pipeline.patch.backends import resolve_backend

    (bundle_dir / "agreement.json").unlink(missing_ok=True)
    res = resolve_backend(bundle, CPU, "auto")
    assert res.backend == "torch-fp32" and res.basis == "fallback"
    assert "no agreement record" in res.reason and "no slide model" in res.reason


def test_run_json_and_the_summary_name_the_backend_and_why(tmp_path, bundle_dir, shared_cache, monkeypatch):
    from pipeline.batch.runner import BatchOptions, final_screen, run_batch
    from pipeline.synthetic import generate_dataset

    (bundle_dir / "agreement.json").unlink(missing_ok=True)
    generate_dataset(tmp_path / "in", n=1, seed=7, mpp=0.5, classes=["normal"], size_um=(1000, 1000), overwrite=True)
    out = tmp_path / "out"
    opts = BatchOptions(
        slides_dir=tmp_path / "in" / "slides", out_dir=out, model=bundle_dir, backend="torch-fp32", quiet=True
    )
    record = run_batch(opts)
    run = json.loads((out / "run.json").read_text())
    assert run["backend"] == {"name": "torch-fp32", "basis": "requested", "reason": "chosen with --backend"}
    assert "backend: torch-fp32 (chosen with --backend)" in final_screen(record, out)
