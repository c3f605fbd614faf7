"""Training on a lab's own slides without silent traps (issue 22): every trap is a one-line error
(or handled) before anything is trained or written.

Misplaced annotations (scaled by 1/4 or 4), unknown classes in several files, slide files without
a labels.csv row, a split that changed under old checkpoints, a failed start that must not lock its
run folder, too little data for a stage, an inverted Platt calibration, a slide without MPP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, skin_like_image, write_pyramid_tiff

from pipeline.core.errors import ConfigError, DataError, MPPError
from pipeline.slide_model.calibration import TemperatureScaling, calibrator_from_json
from pipeline.tiles.tiling import TilingConfig
from pipeline.training.calibration_guard import MIN_ISOTONIC_PER_CLASS, fit_calibration
from pipeline.training.checks import same_config
from pipeline.training.config import DataConfig, LabelConfig, RunConfig
from pipeline.training.data import index_slide, load_slide_table
from pipeline.training.run import prepare_run

COVERAGE = {"pallor": 0.05, "necrolysis": 0.05, "parakeratosis": 0.05, "epidermis": 0.1}


@pytest.fixture(scope="module")
def lab_set(tmp_path_factory) -> Path:
    """6 synthetic slides (2 NME, 2 other patients; every pattern in training and validation)."""
    from pipeline.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("lab_data")
    generate_dataset(root, n=6, seed=7, mpp=0.5, classes=["nme", "normal"], size_um=(1600, 1200), overwrite=True)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cfg(root: Path, run: Path, **extra) -> RunConfig:
    data = {
        "task": "patch",
        "output_dir": str(run),
        "data": {"root": str(root)},
        "labels": {"positive_coverage": COVERAGE},
        "split": {"val_fraction": 0.34, "k_folds": 2},
        **extra,
    }
    return RunConfig.model_validate(data)


def _scale_geojson(path: Path, factor: float) -> None:
    gj = json.loads(path.read_text())

    def scale(c):
        return [c[0] * factor, c[1] * factor] if isinstance(c[0], (int, float)) else [scale(x) for x in c]

    for feat in gj["features"]:
        feat["geometry"]["coordinates"] = scale(feat["geometry"]["coordinates"])
    path.write_text(json.dumps(gj))


@pytest.mark.parametrize(
    ("factor", "cause"), [(0.25, "4x too small: exported from a downsampled image"), (4, "4x too large")]
)
def test_misplaced_annotations_name_the_slide_and_the_cause(tmp_path, lab_set, factor, cause):
    root = _copy(lab_set, tmp_path / "set")
    rec = load_slide_table(DataConfig(root=root), root)[0]
    labels = LabelConfig(positive_coverage=COVERAGE)
    assert len(index_slide(rec, TilingConfig(), labels).coords) > 0  # as exported: accepted
    _scale_geojson(rec.annotation, factor)
    with pytest.raises(DataError, match=cause) as info:
        index_slide(rec, TilingConfig(), labels)
    assert rec.slide_id in str(info.value) and "\n" not in str(info.value)


def test_all_problem_slides_are_listed_at_once_and_nothing_is_written(tmp_path, lab_set):
    root = _copy(lab_set, tmp_path / "set")
    anns = sorted((root / "annotations").glob("*.geojson"))
    for path in anns[:2]:  # two files with a class the config does not know
        gj = json.loads(path.read_text())
        gj["features"][0]["properties"]["classification"]["name"] = "Tumor"
        path.write_text(json.dumps(gj))
    _scale_geojson(anns[2], 0.25)
    run = tmp_path / "run"
    with pytest.raises(DataError) as info:
        prepare_run(_cfg(root, run))
    msg = str(info.value)
    assert msg.startswith("3 slides cannot be used") and "\n" not in msg
    assert anns[0].name in msg and anns[1].name in msg and "'Tumor'" in msg and "4x too small" in msg
    assert not run.exists()  # a failed start leaves no config.resolved.yaml / splits.json behind
    # the documented fix: map the class and re-export the scaled file; the same folder then works
    _scale_geojson(anns[2], 4)
    fixed = _cfg(root, run, labels={"positive_coverage": COVERAGE, "class_map": {"Tumor": "pallor"}})
    prepare_run(fixed)
    assert (run / "config.resolved.yaml").is_file() and (run / "splits.json").is_file()


def test_slide_file_without_a_row_is_listed_unless_ignored(tmp_path, lab_set, caplog):
    root = _copy(lab_set, tmp_path / "set")
    slide = next((root / "slides").iterdir())
    shutil.copy(slide, slide.with_name("forgotten" + slide.suffix))
    (root / "annotations" / "orphan.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(DataError, match=r"1 slide file\(s\) in .* have no row: forgotten") as info:
        prepare_run(_cfg(root, tmp_path / "run"), write=False)
    assert "orphan.geojson" in str(info.value) and "data.ignore_unlisted: true" in str(info.value)
    cfg = _cfg(root, tmp_path / "run", data={"root": str(root), "ignore_unlisted": True})
    prepare_run(cfg, write=False)
    assert "forgotten" in caplog.text and "skipped" in caplog.text


def test_a_changed_split_never_resumes_old_checkpoints(tmp_path, lab_set):
    root = _copy(lab_set, tmp_path / "set")
    run = tmp_path / "run"
    prepare_run(_cfg(root, run))
    (run / "checkpoints").mkdir()
    # a checkpoint recorded as trained on another split (what train.py writes: see patch_trainer._state)
    torch.save({"epoch": 1, "step": 0, "split_sha256": "0" * 64}, run / "checkpoints" / "last.pt")
    with pytest.raises(DataError, match="was trained on another split"):
        prepare_run(_cfg(root, run))
    # old checkpoints and the split file deleted, as an older message advised: still refused
    torch.save({"epoch": 1, "step": 0}, run / "checkpoints" / "last.pt")
    (run / "splits.json").unlink()
    with pytest.raises(DataError, match="splits.json was deleted"):
        prepare_run(_cfg(root, run))
    # slides added after training: the split file no longer matches and checkpoints exist
    prepare_run(_cfg(root, tmp_path / "run2"))
    (tmp_path / "run2" / "checkpoints").mkdir()
    torch.save({"epoch": 1, "step": 0}, tmp_path / "run2" / "checkpoints" / "last.pt")
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")  # one slide fewer
    (root / "slides").joinpath(lines[-1].split(",")[0] + ".tiff").unlink(missing_ok=True)
    for p in (root / "slides").glob(lines[-1].split(",")[0] + ".*"):
        p.unlink()
    (root / "annotations" / (lines[-1].split(",")[0] + ".geojson")).unlink()
    with pytest.raises(DataError, match="does not match the slide table .* use a new output_dir"):
        prepare_run(_cfg(root, tmp_path / "run2"))


def test_a_start_that_trained_nothing_does_not_lock_the_folder(tmp_path, lab_set, caplog):
    run = tmp_path / "run"
    run.mkdir()
    stale = _cfg(lab_set, run, seed=99).model_dump(mode="json")
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(stale, sort_keys=False))
    prepare_run(_cfg(lab_set, run), write=False)  # nothing trained there: allowed, with a warning
    assert "trained nothing" in caplog.text
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        prepare_run(_cfg(lab_set, run), write=False)


def test_a_config_key_added_since_does_not_make_an_old_run_different(tmp_path, lab_set):
    cfg = _cfg(lab_set, tmp_path / "run")
    old = cfg.model_dump(mode="json")
    del old["data"]["ignore_unlisted"]  # written before the key existed
    assert same_config(yaml.safe_dump(old, sort_keys=False), cfg)
    old["seed"] = 5
    assert not same_config(yaml.safe_dump(old, sort_keys=False), cfg)


def test_minimum_data_is_checked_before_the_patch_stage(tmp_path, lab_set):
    root = _copy(lab_set, tmp_path / "set")
    table = root / "labels.csv"
    rows = table.read_text().splitlines()
    nme = [r.split(",")[1] for r in rows[1:] if r.split(",")[3] == "1"]
    # one NME patient only: every NME slide under the same patient id
    table.write_text(
        "\n".join([rows[0]] + [r.replace(r.split(",")[1], nme[0]) if r.split(",")[3] == "1" else r for r in rows[1:]])
        + "\n"
    )
    with pytest.raises(
        DataError, match="needs at least 2 patients of each class; have 1 with nme_pattern=1.*add 1 more patient"
    ):
        prepare_run(_cfg(root, tmp_path / "run", task="pipeline"), write=False)
    # validation without a pattern: its AUROC would be undefined
    cfg = _cfg(lab_set, tmp_path / "run", labels={"positive_coverage": {**COVERAGE, "necrolysis": 0.9}})
    with pytest.raises(DataError, match="split .* has no positive tile for necrolysis"):
        prepare_run(cfg, write=False)


def test_check_prints_counts_and_writes_nothing(tmp_path, lab_set):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(lab_set, run).model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--check", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["ok"] and out["patch"]["val"]["positive_tiles"]["necrolysis"] > 0
    assert out["patch"]["train"]["slides"] + out["patch"]["val"]["slides"] == 6
    assert not run.exists()


def test_slide_without_mpp_names_the_mpp_column(tmp_path):
    root = tmp_path / "set"
    (root / "slides").mkdir(parents=True)
    write_pyramid_tiff(root / "slides" / "A.tiff", skin_like_image(400, 300), mpp=None)
    (root / "labels.csv").write_text("slide_id,patient_id,nme_pattern\nA,p1,0\n")
    rec = load_slide_table(DataConfig(root=root), root, require_annotations=False)[0]
    with pytest.raises(MPPError) as info:
        index_slide(rec, TilingConfig(), LabelConfig())
    msg = str(info.value)
    assert "'mpp' column of" in msg and str(root / "labels.csv") in msg and "--mpp" not in msg


def test_an_inverted_platt_fit_falls_back_to_temperature_scaling(caplog):
    rng = np.random.default_rng(0)
    y = np.array([0] * 12 + [1] * 4)
    scores = np.where(y == 1, -2.0, 1.0) + rng.normal(0, 0.3, len(y))  # scores rank the classes backwards
    fit = fit_calibration("platt", scores, y)
    assert isinstance(fit.calibrator, TemperatureScaling) and "non-positive slope" in (fit.fallback_reason or "")
    assert "using temperature scaling instead" in caplog.text
    p = fit.calibrator.transform(np.array([-3.0, 0.0, 3.0]))
    assert p[0] <= p[1] <= p[2]  # cannot invert
    # the bundle section keeps the note and still loads as a calibrator
    section = {**fit.calibrator.to_json(), "requested": "platt", "fallback_reason": fit.fallback_reason}
    assert np.allclose(calibrator_from_json(section).transform(scores), fit.calibrator.transform(scores))
    good = fit_calibration("platt", -scores, y)
    assert good.fallback_reason is None and good.kind == "platt"
    few = fit_calibration("isotonic", -scores, y)
    assert few.kind == "temperature" and f"needs {MIN_ISOTONIC_PER_CLASS} of each" in (few.fallback_reason or "")
