"""Training: config validation, labels from annotations, bad data caught before training, resume after a kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError, DataError
from pipeline.tiles.annotations import labels_from_coverage, rasterise, read_annotations, tile_coverage
from pipeline.training.config import LabelConfig, RunConfig

CLASSES = ["pallor", "necrolysis", "parakeratosis", "epidermis"]


def _train(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_config_validates():
    cfg = load_config(RunConfig, REPO / "configs" / "demo.yaml")
    assert cfg.label == "trained on synthetic slides only, not for clinical use"
    assert cfg.aggregator.data is not None and cfg.aggregator.data.root != cfg.data.root


@pytest.mark.parametrize(
    ("data", "overrides", "match"),
    [
        ({"modle": {}}, [], "unknown key 'modle'; allowed keys here: aggregator"),
        ({"train": {"epochs": "two"}}, [], "train.epochs"),
        ({"train": {"epohcs": 2}}, [], "unknown key 'train.epohcs'; allowed keys here: batch_size"),
        ({}, ["model.backbone=resnet9"], "unknown backbone 'resnet9'"),
        ({}, ["model.init_weights=/nope.pth"], "weight file /nope.pth not found"),
        ({"aggregator": {"calibration": {"band_low": 0.7, "band_high": 0.6}}}, [], "band_low must be below band_high"),
    ],
)
def test_config_errors_are_one_line(tmp_path, data, overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(RunConfig, _write(tmp_path / "c.yaml", data), overrides)
    assert "\n" not in str(info.value)


def test_cli_typo_exit_code(tmp_path):
    proc = _train("--config", _write(tmp_path / "c.yaml", {"task": "patch", "modle": {}}))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def _feature(name, ring, holes=()):
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring, *holes]},
        "properties": {"objectType": "annotation", "classification": {"name": name, "color": [1, 2, 3]}},
    }


def test_annotation_coverage_and_labels(tmp_path):
    sq = lambda x0, y0, s: [[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]]  # noqa: E731
    gj = {
        "type": "FeatureCollection",
        "features": [
            _feature("pallor", sq(0, 0, 224)),  # exactly tile (0, 0)
            _feature("Parakeratosis", sq(224, 0, 112)),  # a quarter of tile (224, 0), via class_map
            _feature("epidermis", sq(0, 0, 448), holes=[sq(0, 224, 224)]),  # hole over tile (0, 224)
            _feature("Tissue", sq(0, 0, 1000)),  # ignored class
        ],
    }
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(gj))
    anns = read_annotations(path, CLASSES, class_map={"Parakeratosis": "parakeratosis"}, ignore_classes=["Tissue"])
    coords = np.array([[0, 0], [224, 0], [0, 224], [560, 560]])
    cov = tile_coverage(rasterise(anns, CLASSES, (1000, 1000), 0.5), CLASSES, coords, 224.0, 0.5)
    assert cov[0, 0] == pytest.approx(1.0, abs=0.02) and cov[1, 0] == pytest.approx(0.0, abs=0.02)
    assert cov[1, 2] == pytest.approx(0.25, abs=0.03)
    assert cov[2, 3] == pytest.approx(0.0, abs=0.02) and cov[0, 3] == pytest.approx(1.0, abs=0.02)
    t, m = labels_from_coverage(cov, np.array([0.5, 0.5, 0.2, 0.1]), np.zeros(4), sparse=False)
    assert t[0, 0] == 1 and t[1, 2] == 1 and t[3].sum() == 0 and m[3].all()
    t, m = labels_from_coverage(cov, np.array([0.5, 0.5, 0.5, 0.1]), np.zeros(4), sparse=True)
    assert not m[1, 2]  # 25 % coverage: ambiguous, ignored
    assert not m[3].any()  # unannotated tile ignored in sparse mode


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            {"type": "FeatureCollection", "features": [_feature("mystery", [[0, 0], [1, 0], [1, 1], [0, 0]])]},
            "unknown annotation class",
        ),
        ({"type": "FeatureCollection", "features": [_feature("pallor", [[0, 0], [1, 1]])]}, "invalid polygon ring"),
        (
            {"type": "FeatureCollection", "features": [_feature("pallor", [[0, 0], [1, "x"], [1, 1], [0, 0]])]},
            "not numbers",
        ),
        ({"hello": 1}, "not GeoJSON annotations"),
    ],
)
def test_bad_annotations(tmp_path, content, match):
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=match) as info:
        read_annotations(path, CLASSES)
    assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    from pipeline.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("train_data")
    generate_dataset(
        root, n=12, seed=41, mpp=0.5, classes=["nme", "normal", "psoriasiform"], size_um=(2000, 1500), overwrite=True
    )
    return root


def _tiny_config(tmp_path: Path, root: Path, **train) -> Path:
    cfg = {
        "task": "patch",
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"root": str(root)},
        "split": {"val_fraction": 0.34, "k_folds": 2},
        "model": {"backbone": "mobilenet_v3_small"},
        "train": {
            "epochs": 2,
            "tiles_per_epoch": 48,
            "batch_size": 8,
            "max_val_tiles": 50,
            "num_workers": 0,
            "checkpoint_every": 1,
            "threads": 1,
            **train,
        },
    }
    return _write(tmp_path / "tiny.yaml", cfg)


def test_labels_naming_missing_slides(tmp_path, tiny_set):
    bad = tmp_path / "bad"
    (bad / "slides").mkdir(parents=True)
    (bad / "annotations").mkdir()
    (bad / "labels.csv").write_text((tiny_set / "labels.csv").read_text())
    proc = _train("--config", _tiny_config(tmp_path, bad))
    assert proc.returncode == 2 and "slides listed but not found" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_killed_mid_epoch_resumes(tmp_path, tiny_set):
    cfg = _tiny_config(tmp_path, tiny_set)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not last.exists() and proc.poll() is None:
        time.sleep(0.1)
    assert last.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import torch

    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["step"] >= 1  # killed inside the first epoch
    done = _train("--config", cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert (run / "bundle" / "bundle.json").is_file() and (run / "patch_metrics.json").is_file()
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    contract = json.loads((run / "bundle" / "bundle.json").read_text())
    assert contract["input"]["mpp"] == 0.5 and contract["training"]["config_sha256"]


def test_balanced_sample_draws_epidermal_hard_negatives():
    from pipeline.training.data import SlideTiles, balanced_sample

    rng = np.random.default_rng(0)
    n = 400
    targets = np.zeros((n, 4), np.float32)  # pallor, necrolysis, parakeratosis, epidermis
    targets[:20, 0] = 1
    targets[20:40, 2] = 1
    targets[:120, 3] = 1  # 80 epidermal tiles negative for every pattern, 280 dermis/other tiles
    mask = np.ones_like(targets, bool)
    mask[40:50, :3] = False  # ambiguous coverage: never a clean negative
    slide = SlideTiles(
        record=None,
        coords=rng.integers(0, 10000, (n, 2)),
        targets=targets,
        mask=mask,
        coverage=targets.copy(),
        plan=None,
        tile_size_l0=224.0,
    )
    plain = balanced_sample([slide], 1000, 3, seed=1)
    hard = balanced_sample([slide], 1000, 3, seed=1, epidermis_col=3, epidermal_negative_fraction=0.6)
    is_epi_neg = lambda items: ((items[:, 1] >= 50) & (items[:, 1] < 120)).mean()  # noqa: E731
    assert is_epi_neg(hard) == pytest.approx(0.5 * 0.6 + 0.5 * 0.4 * 70 / 360, abs=0.05)
    assert is_epi_neg(hard) > 2 * is_epi_neg(plain)
    assert np.array_equal(
        hard, balanced_sample([slide], 1000, 3, seed=1, epidermis_col=3, epidermal_negative_fraction=0.6)
    )


def test_a_synthetic_set_is_reused_only_when_it_matches_the_config():
    from pipeline.training.config import SyntheticData
    from pipeline.training.run import _same_synthetic_set

    made = {"n": 8, "seed": 3, "mpp": [0.5], "size_um": [4000.0, 3000.0], "classes": ["normal", "nme"]}
    assert _same_synthetic_set(made, SyntheticData(n=8, seed=3, mpp=0.5))
    assert _same_synthetic_set(
        made, SyntheticData(n=8, seed=3, mpp=0.5, size_um=(4000, 3000), classes=["normal", "nme"])
    )
    for changed in ({"n": 9}, {"seed": 4}, {"mpp": 0.25}, {"size_um": (2000, 1000)}, {"classes": ["nme"]}):
        assert not _same_synthetic_set(made, SyntheticData(**{"n": 8, "seed": 3, "mpp": 0.5, **changed})), changed
    assert not _same_synthetic_set({}, SyntheticData(n=8, seed=3))  # no manifest: regenerate


def test_pattern_positives_as_a_share_of_the_epidermis():
    """A thin band of the upper epidermis is positive when it fills enough of the tile's epidermis."""
    # columns: pallor, necrolysis, parakeratosis, epidermis; rows: tiles
    cov = np.array(
        [
            [0.06, 0.0, 0.0, 0.30],  # thin epidermis, a fifth of it pale: positive as a share, not of the tile
            [0.06, 0.0, 0.0, 0.90],  # thick epidermis, 7 % of it pale: ambiguous, left out
            [0.01, 0.0, 0.0, 0.02],  # half of a sliver of epidermis: below the tile floor, left out
            [0.0, 0.0, 0.0, 0.50],  # untouched: negative
        ],
        np.float32,
    )
    pos_at = np.array([0.15, 0.15, 0.15, 0.1], np.float32)
    basis = LabelConfig(coverage_of={"pallor": "epidermis"}).basis_index()
    assert basis.tolist() == [3, -1, -1, -1]
    t, m = labels_from_coverage(cov, pos_at, np.zeros(4), basis=basis, min_positive=0.015)
    assert t[:, 0].tolist() == [1, 0, 0, 0] and m[:, 0].tolist() == [True, False, False, True]
    t_tile, _ = labels_from_coverage(cov, pos_at, np.zeros(4))  # as a share of the whole tile: none positive
    assert t_tile[:, 0].sum() == 0
    assert t[:, 3].tolist() == t_tile[:, 3].tolist()  # the epidermis itself is measured on the tile


def test_coverage_of_names_known_classes():
    with pytest.raises(ValueError, match="coverage_of"):
        LabelConfig(coverage_of={"pallor": "dermis"})
    with pytest.raises(ValueError, match="another class"):
        LabelConfig(coverage_of={"pallor": "pallor"})
