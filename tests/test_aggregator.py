"""Slide aggregator training and its bad inputs (issue 5), on simulated tile outputs.

The tile outputs are drawn so that NME slides hold tiles high in all three patterns and the
mimics in one or two; no slide images are needed, so these run in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.patch import DEFAULT_CLASSES
from pipeline.core.errors import DataError
from pipeline.patch.cache import load_features, save_features
from pipeline.patch.features import SlideFeatures
from pipeline.slide_model.aggregation import SlidePredictor
from pipeline.training.aggregator_trainer import SlideExample, train_aggregator
from pipeline.training.config import AggregatorConfig

DIAGNOSES = {"nme": (1, 1, 1), "nme_early": (1, 1, 0), "psoriasiform": (0, 0, 1), "normal": (0, 0, 0)}


def _feats(flags, n, rng) -> SlideFeatures:
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 224
    probs = rng.uniform(0.0, 0.08, (n, 4)).astype(np.float32)
    probs[:, 3] = rng.uniform(0, 1, n)
    for j, on in enumerate(flags):
        if on:
            hot = rng.choice(n, size=max(2, n // 10), replace=False)
            probs[hot, j] = rng.uniform(0.6, 1.0, hot.size)
    return SlideFeatures(
        coords=coords.astype(np.int64),
        probs=probs,
        embeddings=rng.normal(size=(n, 8)).astype(np.float32),
        sharpness=np.ones(n, np.float32),
        stain={},
        classes=list(DEFAULT_CLASSES),
        tile_size_l0=224.0,
    )


def _examples(n_per_dx=6, seed=0, diagnoses=DIAGNOSES):
    rng = np.random.default_rng(seed)
    out = []
    for dx, flags in diagnoses.items():
        for i in range(n_per_dx):
            out.append(
                SlideExample(
                    slide_id=f"{dx}-{i}",
                    patient_id=f"P-{dx}-{i}",
                    diagnosis=dx,
                    y=int(dx == "nme"),
                    patterns=np.array(flags),
                    feats=_feats(flags, int(rng.integers(40, 90)), rng),
                )
            )
    return out


def _folds(examples, k=3):
    return [[e.slide_id for e in examples[i::k]] for i in range(k)]


@pytest.mark.parametrize("kind", ["pattern_stats", "gated_attention"])
def test_training_writes_reports_and_separates_the_full_pattern(tmp_path, kind):
    ex = _examples()
    cfg = AggregatorConfig(type=kind, use_embeddings=False, hidden_dim=16, epochs=30, bootstrap=50)
    thr = {"pallor": 0.5, "necrolysis": 0.5, "parakeratosis": 0.5, "epidermis": 0.5}
    pred, metrics = train_aggregator(cfg, ex, _folds(ex), list(DEFAULT_CLASSES), thr, tmp_path, seed=0)
    for name in ("slide_metrics.json", "per_diagnosis.csv", "reliability.png", "oof_predictions.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "slide_metrics.json").read_text())["n_slides"] == len(ex)
    assert metrics["auroc"]["value"] >= 0.9  # nme vs nme_early needs the third pattern
    p = {e.diagnosis: [] for e in ex}
    for e in ex:
        out = pred.predict(e.feats)
        assert np.isfinite(out.probability) and out.band in ("LOW", "INDETERMINATE", "HIGH")
        p[e.diagnosis].append(out.probability)
    assert np.mean(p["nme"]) > max(np.mean(p[d]) for d in ("nme_early", "psoriasiform", "normal"))


def test_zero_tile_slides_are_left_out_and_refused_at_prediction(tmp_path, caplog):
    ex = _examples(n_per_dx=4)
    empty = SlideExample("empty", "P-empty", "normal", 0, np.zeros(3), _feats((0, 0, 0), 4, np.random.default_rng(1)))
    empty.feats = SlideFeatures(
        coords=np.zeros((0, 2), np.int64),
        probs=np.zeros((0, 4), np.float32),
        embeddings=np.zeros((0, 8), np.float32),
        sharpness=np.zeros(0, np.float32),
        stain={},
        classes=list(DEFAULT_CLASSES),
        tile_size_l0=224.0,
    )
    cfg = AggregatorConfig(type="pattern_stats", bootstrap=0)
    pred, metrics = train_aggregator(cfg, [*ex, empty], _folds([*ex, empty]), list(DEFAULT_CLASSES), {}, tmp_path)
    assert metrics["n_slides"] == len(ex) and "empty" in caplog.text
    with pytest.raises(ValueError, match="no tiles"):
        pred.predict(empty.feats)  # the caller reports the slide non-diagnostic, never a NaN probability


def test_single_class_training_set_is_refused_before_training(tmp_path):
    ex = _examples(n_per_dx=4, diagnoses={"normal": (0, 0, 0), "psoriasiform": (0, 0, 1)})
    cfg = AggregatorConfig(type="gated_attention", bootstrap=0)
    with pytest.raises(DataError, match="2 patients of each class"):
        train_aggregator(cfg, ex, _folds(ex), list(DEFAULT_CLASSES), {}, tmp_path)
    assert not (tmp_path / "slide_metrics.json").exists()


def test_feature_cache_from_another_model_or_slide_is_ignored(tmp_path):
    f = _feats((1, 1, 1), 30, np.random.default_rng(2))
    path = tmp_path / "s.features.h5"
    save_features(path, f, fingerprint="slide-A", model_sha256="model-1")
    same = load_features(path, "slide-A", "model-1")
    assert same is not None and np.array_equal(same.probs, f.probs) and np.array_equal(same.coords, f.coords)
    assert load_features(path, "slide-A", "model-2") is None  # another model's cache: recomputed, never reused
    assert load_features(path, "slide-B", "model-1") is None  # the slide file changed
    path.write_bytes(b"not hdf5")
    assert load_features(path, "slide-A", "model-1") is None  # unreadable cache: recomputed


def test_predictor_round_trips_through_bundle_sections(tmp_path):
    ex = _examples(n_per_dx=4)
    cfg = AggregatorConfig(type="pattern_stats", bootstrap=0)
    pred, _ = train_aggregator(cfg, ex, _folds(ex), list(DEFAULT_CLASSES), {}, tmp_path)
    params, state = pred.to_bundle_sections()
    assert state is None and json.loads(json.dumps(params)) == params  # JSON only, no pickle
    assert isinstance(pred, SlidePredictor)
