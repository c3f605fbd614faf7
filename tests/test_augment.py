"""Tests of pipeline/augment.py: HED stain jitter and the training augmentation pipeline."""

from __future__ import annotations

import time

import albumentations as A
import numpy as np
import pytest

import pipeline  # noqa: F401  (NO_ALBUMENTATIONS_UPDATE before albumentations)
from pipeline.core.config import validate
from pipeline.core.errors import ConfigError
from pipeline.training.augment import (
    AugmentConfig,
    HEDJitter,
    build_eval_transform,
    build_train_augmentation,
    hed_to_rgb,
    rgb_to_hed,
    seed_transforms,
)


def _he_tile(size: int = 224, seed: int = 0) -> np.ndarray:
    """An H&E-like tile: white background, pink stroma, purple nuclei, plus pixel noise."""
    rng = np.random.default_rng(seed)
    tile = np.empty((size, size, 3), dtype=np.float64)
    tile[:] = (235, 232, 238)  # glass
    tile[size // 4 :] = (225, 140, 190)  # eosin-stained tissue
    for _ in range(12):  # haematoxylin nuclei
        y, x = rng.integers(size // 4, size - 8, 2)
        tile[y : y + 7, x : x + 7] = (90, 60, 150)
    tile += rng.normal(0, 6, tile.shape)
    return np.clip(tile, 0, 255).astype(np.uint8)


def _apply(t: A.BasicTransform, img: np.ndarray) -> np.ndarray:
    return t(image=img)["image"]


def test_hed_jitter_is_identity_without_jitter() -> None:
    rng = np.random.default_rng(1)
    for img in (_he_tile(), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)):
        out = _apply(HEDJitter(sigma=0.0, bias=0.0, p=1.0), img)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.abs(out.astype(int) - img.astype(int)).max() <= 1


def test_hed_round_trip_and_stain_separation() -> None:
    img = _he_tile(64)
    assert np.abs(hed_to_rgb(rgb_to_hed(img)).astype(int) - img.astype(int)).max() <= 1
    hed = rgb_to_hed(np.array([[90, 60, 150], [225, 140, 190]], dtype=np.uint8))
    assert hed[0, 0] > 0.4 > hed[0, 1]  # nucleus: mostly haematoxylin
    assert hed[1, 1] > hed[1, 0]  # stroma: more eosin than haematoxylin


def test_hed_jitter_acts_in_stain_space() -> None:
    pure_h = hed_to_rgb(np.array([0.6, 0.0, 0.0]))  # a pixel with haematoxylin only
    pure_e = hed_to_rgb(np.array([0.0, 0.3, 0.0]))  # a pixel with eosin only
    img = np.stack([np.full((8, 8, 3), pure_h), np.full((8, 8, 3), pure_e)]).reshape(16, 8, 3)
    from pipeline.training.augment import hed_jitter

    out = hed_jitter(img, alpha=np.array([1.0, 1.5, 1.0]), beta=np.zeros(3)).astype(int)
    assert np.abs(out[:8] - img[:8].astype(int)).max() <= 1  # no eosin -> unchanged
    assert np.abs(out[8:] - img[8:].astype(int)).max() >= 10  # eosin x1.5 -> visibly pinker
    assert (out[8:, :, 1] < img[8:, :, 1].astype(int)).all()  # eosin absorbs green


def test_hed_jitter_changes_colour_and_is_seeded() -> None:
    img = _he_tile()
    jitter = HEDJitter(sigma=0.3, bias=0.05, p=1.0)
    jitter.set_random_seed(7)
    first = _apply(jitter, img)
    assert first.dtype == np.uint8 and first.shape == img.shape
    assert np.abs(first.astype(int) - img.astype(int)).mean() > 2
    second = _apply(jitter, img)
    assert not np.array_equal(first, second)  # a new draw each call
    again = HEDJitter(sigma=0.3, bias=0.05, p=1.0)
    again.set_random_seed(7)
    assert np.array_equal(_apply(again, img), first)  # same seed, same output
    other = HEDJitter(sigma=0.3, bias=0.05, p=1.0)
    other.set_random_seed(8)
    assert not np.array_equal(_apply(other, img), first)


def test_hed_jitter_is_fast() -> None:
    img = _he_tile()
    jitter = HEDJitter(sigma=0.05, bias=0.02, p=1.0)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        _apply(jitter, img)
        times.append(time.perf_counter() - start)
    assert min(times) < 2e-3, f"HEDJitter took {min(times) * 1e3:.2f} ms at best for a 224x224 tile"


def test_hed_jitter_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        HEDJitter(sigma=1.5)
    with pytest.raises(ValueError, match="uint8"):
        _apply(HEDJitter(p=1.0), np.zeros((8, 8, 3), dtype=np.float32))


def test_train_augmentation_keeps_shape_dtype_and_is_reproducible() -> None:
    img = _he_tile()
    cfg = AugmentConfig(scale_p=1.0, hed_p=1.0, blur_p=1.0, jpeg_p=1.0)
    a = build_train_augmentation(cfg, seed=3)
    b = build_train_augmentation(cfg, seed=3)
    outs_a = [_apply(a, img) for _ in range(4)]
    outs_b = [_apply(b, img) for _ in range(4)]
    for x, y in zip(outs_a, outs_b):
        assert x.shape == img.shape and x.dtype == np.uint8
        assert np.array_equal(x, y)
    assert not np.array_equal(outs_a[0], img) and not np.array_equal(outs_a[0], outs_a[1])
    c = build_train_augmentation(cfg, seed=4)
    assert not np.array_equal(_apply(c, img), outs_a[0])
    # pipeline is serialisable (logged with the run) and contains the stain jitter
    names = [t["__class_fullname__"] for t in A.to_dict(a)["transform"]["transforms"]]
    assert "pipeline.training.augment.HEDJitter" in names


def test_seeded_transforms_draw_independently() -> None:
    """With A.Compose(seed=...) both flips would always fire together; ours must not."""
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    cfg = AugmentConfig(rot90_p=0, scale_p=0, hed_p=0, brightness_contrast_p=0, hsv_p=0, blur_p=0, jpeg_p=0)
    aug = build_train_augmentation(cfg, seed=0)
    seen = set()
    for _ in range(60):
        out = _apply(aug, img)
        seen.add(
            (
                np.array_equal(out, img[:, ::-1]),
                np.array_equal(out, img[::-1]),
                np.array_equal(out, img[::-1, ::-1]),
                np.array_equal(out, img),
            )
        )
    assert len(seen) == 4, seen  # identity, h-flip, v-flip, both
    seed_transforms(aug, 0)
    first = [_apply(aug, img) for _ in range(5)]
    seed_transforms(aug, 0)
    assert all(np.array_equal(x, _apply(aug, img)) for x in first)


def test_augment_config_validation_and_disabled() -> None:
    assert AugmentConfig().hed_sigma == 0.05
    with pytest.raises(ConfigError, match="unknown key 'hed_sigmaa'"):
        validate(AugmentConfig, {"hed_sigmaa": 0.1}, "train.yaml: augment")
    with pytest.raises(ConfigError, match="flip_p"):
        validate(AugmentConfig, {"flip_p": 1.5}, "train.yaml: augment")
    with pytest.raises(ConfigError, match="jpeg_quality_min"):
        validate(AugmentConfig, {"jpeg_quality_min": 90, "jpeg_quality_max": 70}, "train.yaml: augment")
    img = _he_tile(32)
    assert np.array_equal(_apply(build_train_augmentation(AugmentConfig(enabled=False)), img), img)
    assert np.array_equal(_apply(build_eval_transform(), img), img)
