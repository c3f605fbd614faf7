"""Tests of pipeline/patch/stain_norm.py (Reinhard stain normalisation) and its place in the bundle contract."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from models.bundle import InputSpec, StainNormalisationSpec
from pipeline.core.errors import PipelineError
from pipeline.patch.features import extract_features
from pipeline.patch.stain_norm import (
    ReinhardNormaliser,
    normaliser_for,
    optical_density_sum,
    pooled_lab_stats,
    tile_lab_stats,
)
from pipeline.reading.slide import open_slide
from pipeline.tiles.measurements import STAINED_OD_MIN
from pipeline.tiles.tiling import TilingConfig, tile_slide

GLASS = (247, 246, 248)
TARGET_MEAN = (62.0, 24.0, -14.0)
TARGET_STD = (12.0, 9.0, 6.0)


def _tiles(n: int = 6, size: int = 96, seed: int = 0, tint: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """H&E-like tiles: glass (top quarter), stroma, nuclei; ``tint`` is added to the tissue (another lab's stain)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        tile = np.empty((size, size, 3), np.float64)
        tile[:] = GLASS
        tissue = np.array([215, 130, 180]) + np.array(tint) + rng.normal(0, 8, 3)
        tile[size // 4 :] = tissue
        for _ in range(20):
            y, x = rng.integers(size // 4, size - 6, 2)
            tile[y : y + 5, x : x + 5] = np.array([95, 60, 150]) + np.array(tint)
        tile[size // 4 :] += rng.normal(0, 7, (size - size // 4, size, 3))
        tile[: size // 4] += rng.normal(0, 1.0, (size // 4, size, 3))
        out[i] = np.clip(tile, 0, 255).astype(np.uint8)
    return out


def _tissue(tiles: np.ndarray) -> np.ndarray:
    return optical_density_sum(tiles, GLASS) >= STAINED_OD_MIN


def _glass(tiles: np.ndarray) -> np.ndarray:
    return optical_density_sum(tiles, GLASS) <= 0.5 * STAINED_OD_MIN


def _stats_on(tiles: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled LAB mean/std of ``tiles`` on the pixels ``mask`` (others painted white = glass)."""
    painted = np.where(mask[..., None], tiles, 255).astype(np.uint8)
    return pooled_lab_stats(*tile_lab_stats(painted, (255, 255, 255)))


@pytest.mark.parametrize("scope", ["slide", "tile"])
def test_reinhard_reaches_the_target_on_tissue_and_leaves_glass_alone(scope: str) -> None:
    tiles = _tiles(tint=(-40, -10, 25))  # darker, bluer than the target
    norm = ReinhardNormaliser(TARGET_MEAN, TARGET_STD, scope=scope, background_rgb=GLASS)  # type: ignore[arg-type]
    if scope == "slide":
        norm.fit(tiles)
    out = norm(tiles)
    assert out.dtype == np.uint8 and out.shape == tiles.shape
    tissue, glass = _tissue(tiles), _glass(tiles)
    assert glass[:, :20].mean() > 0.99 and tissue[:, 30:].mean() > 0.99
    mean, std = _stats_on(out, tissue)
    np.testing.assert_allclose(mean, TARGET_MEAN, atol=1.0)
    np.testing.assert_allclose(std, TARGET_STD, rtol=0.12)
    assert np.array_equal(out[glass], tiles[glass])  # glass bit-identical
    before = _stats_on(tiles, tissue)[0]
    assert np.abs(before - TARGET_MEAN).max() > 5  # it really moved
    one = norm(tiles[0])  # a single (H, W, 3) tile
    assert one.shape == tiles[0].shape and (scope == "tile" or np.array_equal(one, out[0]))


def test_reinhard_is_the_identity_when_the_input_already_matches() -> None:
    tiles = _tiles()
    means, stds, counts = tile_lab_stats(tiles, GLASS)
    mean, std = pooled_lab_stats(means, stds, counts)
    same = ReinhardNormaliser(mean, std, scope="slide", background_rgb=GLASS).fit(tiles)
    assert np.array_equal(same(tiles), tiles)
    # per tile: each tile already at the target
    per_tile = ReinhardNormaliser(means[0], stds[0], scope="tile", background_rgb=GLASS)
    assert np.array_equal(per_tile(tiles[:1]), tiles[:1])
    # a map very close to the identity changes tissue by at most the 8-bit LAB round trip
    near = ReinhardNormaliser(mean + [0.5, 0, 0], std, scope="slide", background_rgb=GLASS).fit(tiles)
    diff = np.abs(near(tiles).astype(int) - tiles.astype(int))
    assert diff.max() <= 4 and diff.mean() < 1.5


def test_tile_scope_leaves_tiles_without_enough_tissue_and_slide_scope_needs_fit() -> None:
    blank = np.full((2, 64, 64, 3), 246, np.uint8)
    blank[1, :2, :2] = (120, 60, 140)  # a few tissue pixels: under the minimum
    norm = ReinhardNormaliser(TARGET_MEAN, TARGET_STD, scope="tile", background_rgb=GLASS)
    assert np.array_equal(norm(blank), blank)
    with pytest.raises(PipelineError, match="fit"):
        ReinhardNormaliser(TARGET_MEAN, TARGET_STD, scope="slide")(blank)
    fitted = ReinhardNormaliser(TARGET_MEAN, TARGET_STD, scope="slide", background_rgb=GLASS).fit(blank[:1])
    assert np.array_equal(fitted(blank[:1]), blank[:1])  # no tissue: identity
    with pytest.raises(ValueError):
        ReinhardNormaliser(TARGET_MEAN, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="uint8"):
        norm(blank.astype(np.float32))


def test_reinhard_is_fast_on_a_batch() -> None:
    tiles = np.concatenate([_tiles(8, 224, seed=s) for s in range(4)])  # 32 tiles of 224 px
    norm = ReinhardNormaliser(TARGET_MEAN, TARGET_STD, scope="slide", background_rgb=GLASS).fit(tiles)
    best = np.inf
    for _ in range(3):
        t = time.perf_counter()
        norm(tiles)
        best = min(best, time.perf_counter() - t)
    # ~1.2 ms per tile on the idle 2-core CPU; generous for a shared machine
    assert best / len(tiles) < 10e-3, f"{best / len(tiles) * 1e3:.2f} ms per tile"


def test_spec_in_the_input_contract() -> None:
    spec = StainNormalisationSpec(target_lab_mean=TARGET_MEAN, target_lab_std=TARGET_STD)
    assert spec.scope == "slide" and spec.method == "reinhard"
    off = InputSpec()
    assert off.stain_normalisation is None
    assert "stain_normalisation" not in off.model_dump(mode="json")  # bundle.json unchanged when off
    on = InputSpec(stain_normalisation=spec)
    data = json.loads(json.dumps(on.model_dump(mode="json")))
    assert data["stain_normalisation"]["target_lab_mean"] == list(TARGET_MEAN)
    assert InputSpec.model_validate(data) == on
    assert InputSpec.model_validate({**data, "stain_normalisation": None}) == off
    with pytest.raises(ValueError):
        StainNormalisationSpec(target_lab_mean=TARGET_MEAN, target_lab_std=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError):
        StainNormalisationSpec(target_lab_mean=TARGET_MEAN, target_lab_std=TARGET_STD, method="macenko")
    norm = ReinhardNormaliser.from_spec(spec.model_copy(update={"scope": "tile"}), background_rgb=GLASS)
    assert norm.scope == "tile" and tuple(norm.target_mean) == TARGET_MEAN


class _RecordingRunner:
    """A stand-in patch model: records the tiles it is given, returns their mean red as the 'probability'."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.seen.append(tiles.copy())
        red = tiles[..., 0].mean(axis=(1, 2)).astype(np.float32) / 255.0
        return red[:, None], np.zeros((len(tiles), 2), np.float32)


def test_extract_features_normalises_tiles_before_the_model_only(tiny_slide: Path) -> None:
    with open_slide(tiny_slide) as slide:
        grid, mask, _, _ = tile_slide(slide, TilingConfig(tile_px=128))
    assert len(grid) >= 2
    args = (tiny_slide, None, grid.coords, grid.plan, grid.tile_px, grid.tile_size_l0)
    assert normaliser_for(None, *args[:5]) is None
    spec = StainNormalisationSpec(target_lab_mean=(45.0, 35.0, -25.0), target_lab_std=TARGET_STD)
    norm = normaliser_for(spec, *args[:5], background_rgb=mask.background_rgb)
    assert norm is not None
    plain_runner, norm_runner = _RecordingRunner(), _RecordingRunner()
    plain = extract_features(*args, plain_runner, ["x"], batch_size=4, background_rgb=mask.background_rgb)
    normed = extract_features(
        *args, norm_runner, ["x"], batch_size=4, background_rgb=mask.background_rgb, normalise=norm
    )
    raw, mapped = np.concatenate(plain_runner.seen), np.concatenate(norm_runner.seen)
    assert np.array_equal(mapped, norm(raw))  # the model saw the normalised tiles
    assert not np.array_equal(mapped, raw)
    assert plain.stain == normed.stain  # quality statistics from the tiles as read
    np.testing.assert_array_equal(plain.sharpness, normed.sharpness)
    assert "normalise_seconds" in normed.meta and "normalise_seconds" not in plain.meta
