"""Tests of pipeline/augment.py: HED stain jitter and the training augmentation pipeline."""

from __future__ import annotations

import time

import albumentations as A
import numpy as np
import pytest

import pipeline  # noqa: F401  (NO_ALBUMENTATIONS_UPDATE before albumentations)
from pipeline.core.config import validate
from pipeline.core.errors import ConfigError
from pipeline.patch.stain_norm import optical_density_sum, tile_lab_stats
from pipeline.tiles.measurements import STAINED_OD_MIN, tile_sharpness
from pipeline.training.augment import (
    AugmentConfig,
    ChannelGain,
    HEDJitter,
    LABJitter,
    build_eval_transform,
    build_train_augmentation,
    channel_gain,
    hed_to_rgb,
    lab_jitter,
    rgb_to_hed,
    seed_transforms,
)

#: the colour/scanner transforms of issue 18, switched off
NEW_OFF = {"lab_p": 0.0, "gain_p": 0.0, "gamma_p": 0.0, "resolution_p": 0.0}
#: every transform off
ALL_OFF = {
    "flip_p": 0.0,
    "rot90_p": 0.0,
    "scale_p": 0.0,
    "hed_p": 0.0,
    "brightness_contrast_p": 0.0,
    "hsv_p": 0.0,
    "blur_p": 0.0,
    "jpeg_p": 0.0,
    **NEW_OFF,
}


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
    cfg = AugmentConfig(rot90_p=0, scale_p=0, hed_p=0, brightness_contrast_p=0, hsv_p=0, blur_p=0, jpeg_p=0, **NEW_OFF)
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


# --------------------------------------------------------------------------------------------
# colour and scanner transforms of issue 18 (LAB jitter, white balance, gamma, resolution, blur)
# --------------------------------------------------------------------------------------------
def _only(**on: float) -> AugmentConfig:
    """Every transform off except ``on`` (probabilities and strengths)."""
    return AugmentConfig(**{**ALL_OFF, **on})


def _scan_tile(size: int = 224) -> np.ndarray:
    """:func:`_he_tile` with a scanner's near-white glass (top quarter) instead of grey glass."""
    img = _he_tile(size)
    rng = np.random.default_rng(5)
    img[: size // 4] = np.clip(rng.normal(248, 2, (size // 4, size, 3)), 0, 255).astype(np.uint8)
    return img


def _glass(img: np.ndarray) -> np.ndarray:
    """Glass as the LAB jitter sees it (summed OD against white at most half the tissue threshold), per channel."""
    return (optical_density_sum(img)[0] <= 0.5 * STAINED_OD_MIN)[..., None].repeat(3, axis=2)


def test_lab_jitter_moves_the_tissue_statistics_and_keeps_the_glass() -> None:
    img = _scan_tile()
    (m0,), (s0,), _ = tile_lab_stats(img)
    glass = _glass(img)
    tissue = ~glass[..., 0]
    for shift in ([10.0, 0, 0], [0, 6.0, 0], [0, 0, -5.0], [-10.0, 0, 0]):  # one channel at a time (sRGB gamut)
        out = lab_jitter(img, np.array(shift), np.ones(3))
        assert out.dtype == np.uint8 and out.shape == img.shape
        m1 = tile_lab_stats(np.where(tissue[..., None], out, 255).astype(np.uint8))[0][0]
        np.testing.assert_allclose(m1 - m0, shift, atol=1.0)  # lighter/darker, redder, bluer
        assert glass[: 224 // 4].mean() > 0.99 and np.array_equal(out[glass], img[glass])  # glass untouched
    flat = lab_jitter(img, np.zeros(3), np.array([0.5, 0.5, 0.5]))
    s1 = tile_lab_stats(np.where(tissue[..., None], flat, 255).astype(np.uint8))[1][0]
    assert (s1 < 0.7 * s0).all()  # less contrast in every channel
    assert np.array_equal(lab_jitter(img, np.zeros(3), np.ones(3)), img)  # the identity map is exact
    blank = np.full((32, 32, 3), 245, np.uint8)
    assert np.array_equal(lab_jitter(blank, np.array([20.0, 0, 0]), np.ones(3)), blank)  # no tissue: unchanged


def test_channel_gain_tints_the_whole_tile_including_glass() -> None:
    img = _scan_tile()
    out = channel_gain(img, np.array([0.8, 1.0, 1.2]))
    assert out.dtype == np.uint8 and out.shape == img.shape
    diff = out.astype(int) - img.astype(int)
    glass = _glass(img)[..., 0]
    assert diff[..., 0].mean() < -20 and abs(diff[..., 1]).max() <= 1 and diff[..., 2][~glass].mean() > 10
    assert diff[..., 0][glass].mean() < -30  # glass tinted too (camera white balance)
    assert out[..., 2].max() == 255  # saturates instead of wrapping
    batch = channel_gain(np.stack([img, img]), np.array([0.8, 1.0, 1.2]))
    assert np.array_equal(batch[1], out)


def test_gamma_makes_staining_paler_or_denser() -> None:
    img = _he_tile()
    od = rgb_to_hed(img)[..., :2].sum(-1)
    pale = _apply(build_train_augmentation(_only(gamma_p=1.0, gamma_min=0.5, gamma_max=0.5), seed=0), img)
    dense = _apply(build_train_augmentation(_only(gamma_p=1.0, gamma_min=1.0, gamma_max=1.6), seed=0), img)
    tissue = od > 0.2
    assert rgb_to_hed(pale)[..., :2].sum(-1)[tissue].mean() == pytest.approx(0.5 * od[tissue].mean(), rel=0.1)
    assert pale.mean() > img.mean() + 10 and dense.mean() < img.mean()


def test_lower_resolution_capture_and_blur_soften_the_tile() -> None:
    img = _he_tile()
    sharp = tile_sharpness(img)
    low = _apply(build_train_augmentation(_only(resolution_p=1.0, resolution_min=0.5), seed=0), img)
    blur = _apply(build_train_augmentation(_only(blur_p=1.0), seed=0), img)
    for out in (low, blur):
        assert out.shape == img.shape and out.dtype == np.uint8
        assert tile_sharpness(out) < 0.8 * sharp
        assert abs(out.mean() - img.mean()) < 2  # colour kept
    assert AugmentConfig().blur_sigma_max == 1.5


@pytest.mark.parametrize("name", ["lab", "gain", "gamma", "resolution"])
def test_new_transform_is_the_identity_at_probability_zero(name: str) -> None:
    img = _he_tile()
    strong = {"lab_l_shift": 30.0, "gain": 0.5, "gamma_min": 0.3, "resolution_min": 0.3}
    aug = build_train_augmentation(AugmentConfig(**{**ALL_OFF, **strong}), seed=1)
    assert all(np.array_equal(_apply(aug, img), img) for _ in range(5))
    on = build_train_augmentation(AugmentConfig(**{**ALL_OFF, **strong, f"{name}_p": 1.0}), seed=1)
    assert not np.array_equal(_apply(on, img), img)
    # the transform classes themselves
    for t in (LABJitter(p=0.0), ChannelGain(p=0.0)):
        assert np.array_equal(_apply(t, img), img)


def test_new_transforms_are_seeded_and_independent() -> None:
    img = _he_tile()
    cfg = _only(lab_p=1.0, gain_p=1.0, gamma_p=1.0, resolution_p=1.0)
    a, b = build_train_augmentation(cfg, seed=11), build_train_augmentation(cfg, seed=11)
    outs = [_apply(a, img) for _ in range(4)]
    assert all(np.array_equal(x, _apply(b, img)) for x in outs)
    assert not np.array_equal(outs[0], outs[1])
    assert not np.array_equal(_apply(build_train_augmentation(cfg, seed=12), img), outs[0])
    seed_transforms(a, 5)
    first = [_apply(a, img) for _ in range(3)]
    seed_transforms(a, 5)
    assert all(np.array_equal(x, _apply(a, img)) for x in first)
    # each transform has its own stream: LABJitter's draws differ from ChannelGain's
    lab_t = next(t for t in a.transforms if isinstance(t, LABJitter))
    gain_t = next(t for t in a.transforms if isinstance(t, ChannelGain))
    seed_transforms(a, 5)
    assert not np.allclose(lab_t.get_params()["scale"], gain_t.get_params()["gains"])


def test_default_augmentation_contains_the_new_transforms_and_keeps_uint8() -> None:
    img = _he_tile()
    aug = build_train_augmentation(AugmentConfig(), seed=2)
    names = [t["__class_fullname__"] for t in A.to_dict(aug)["transform"]["transforms"]]
    for n in ("LABJitter", "ChannelGain", "RandomGamma", "Downscale", "GaussianBlur", "ImageCompression"):
        assert any(x.endswith(n) for x in names), (n, names)
    for _ in range(10):
        out = _apply(aug, img)
        assert out.shape == img.shape and out.dtype == np.uint8
    with pytest.raises(ConfigError, match="gamma_min"):
        validate(AugmentConfig, {"gamma_min": 1.5, "gamma_max": 1.2}, "train.yaml: augment")
    with pytest.raises(ValueError, match="uint8"):
        lab_jitter(img.astype(np.float32), np.zeros(3), np.ones(3))
