"""Optional stain normalisation of tiles before the patch model: Reinhard colour transfer in CIELAB.

Reinhard et al. (2001) map an image's colour statistics onto a target's: per channel of a
perceptual colour space, ``x' = (x - mean_src) / std_src * std_tgt + mean_tgt``. Here the space
is OpenCV's CIELAB, the statistics are those of *tissue* pixels only (optical density above
the glass level), and glass is left alone, so a slide with much empty glass and one full of
tissue are mapped alike and the background stays the scanner's white.

* :func:`tile_lab_stats`: CIELAB mean/std of each tile's tissue pixels (L 0-100, a and b signed,
  the CIE units every number in this module and in the bundle contract uses).
* :func:`pooled_lab_stats`: pool per-tile statistics into slide statistics.
* :class:`ReinhardNormaliser`: the transform; ``scope="tile"`` uses each tile's own statistics,
  ``scope="slide"`` one set for the whole slide (:meth:`ReinhardNormaliser.fit`).
* :func:`normaliser_for`: the normaliser a bundle's
  :class:`~models.bundle.StainNormalisationSpec` asks for, fitted on a sample of the slide's tiles
  (``None`` when the contract asks for none) - the ``normalise`` argument of
  :func:`pipeline.patch.features.extract_features`.

Implementation: OpenCV kernels on the uint8 batch seen as one tall image: RGB -> 8-bit LAB,
a per-channel affine map (``cv2.transform``, saturating), LAB -> RGB, and a blend with the input
weighted by tissue (``cv2.blendLinear``). The only tables are 1-D, 256 entries (optical density
of each grey level, as in :class:`pipeline.tiles.measurements.StainAccumulator`, and the blend
weight); there is no colour lookup table. 8-bit LAB quantises L to 0.39 and a, b to 1 unit, below
what the model can see after JPEG. A tile whose map is the identity is returned unchanged
(bit-exact). Cost on the 2-core CPU: about 0.9-1.3 ms per 224 px tile with ``scope="slide"``,
1.3-1.8 ms with ``scope="tile"`` (docs/stain.md).

Pixel classes: optical density ``OD = sum_c -log10((I_c + 1) / (bg_c + 1))`` relative to the
slide's glass colour ``bg``. Pixels with ``OD >= od_min`` (:data:`STAINED_OD_MIN`, the stain
statistics' threshold) are tissue: they make the statistics and are fully mapped. Pixels with
``OD <= od_min / 2`` are glass and are not touched; in between, the output is blended linearly
from the input to the mapped colour, so the tissue edge gets no seam.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
from numpy.typing import ArrayLike

from pipeline.core.errors import PipelineError
from pipeline.patch.reader import read_tiles_at
from pipeline.reading.slide import ReadPlan
from pipeline.tiles.measurements import STAINED_OD_MIN

if TYPE_CHECKING:
    from models.bundle import StainNormalisationSpec

#: CIE units from OpenCV's 8-bit LAB: L = L8 * 100 / 255, a = a8 - 128, b = b8 - 128.
_SCALE_CIE = np.array([100.0 / 255.0, 1.0, 1.0])
_OFFSET_CIE = np.array([0.0, -128.0, -128.0])
#: The std ratio target/source is clipped to [1 / MAX_STD_SCALE, MAX_STD_SCALE]: a nearly
#: uniform tile (one colour) must not have its noise amplified into a colour pattern.
MAX_STD_SCALE = 2.5
#: In ``scope="tile"``, a tile with fewer tissue pixels than this fraction is left unchanged
#: (too few pixels for stable statistics).
MIN_TISSUE_FRACTION = 0.05

Stats = tuple[np.ndarray, np.ndarray]


def _as_batch(tiles: np.ndarray) -> np.ndarray:
    t = np.asarray(tiles)
    if t.ndim == 3:
        t = t[None]
    if t.dtype != np.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB tiles (B, H, W, 3) or (H, W, 3), got {t.dtype} {np.asarray(tiles).shape}")
    return np.ascontiguousarray(t)


#: Optical density is coded in uint8 steps of ``od_min / _OD_STEPS`` (saturating at 255 steps),
#: so that the tissue test and the blend weight are uint8 kernels; the coding error of the sum
#: (3 half steps, ~0.002 OD) is far below the threshold.
_OD_STEPS = 100


def _od_code_table(background_rgb: Sequence[int], od_min: float) -> np.ndarray:
    """(256, 1, 3) uint8: per-channel optical density of every grey level relative to the glass, in OD steps."""
    bg = np.asarray(background_rgb, np.float64).reshape(1, 1, 3)
    levels = np.arange(256, dtype=np.float64).reshape(256, 1, 1)
    od = np.maximum(-np.log10((levels + 1.0) / (bg + 1.0)), 0.0)
    return np.clip(np.rint(od * (_OD_STEPS / od_min)), 0, 255).astype(np.uint8)


#: Blend weight of each coded OD sum: 0 up to od_min / 2, rising linearly to 1 at od_min.
_WEIGHT_TABLE = np.clip((np.arange(256, dtype=np.float32) - _OD_STEPS / 2) / (_OD_STEPS / 2), 0.0, 1.0)


def _od_code(t: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Coded summed optical density of a uint8 batch (B, H, W, 3) as a uint8 image (B * H, W)."""
    b, h, w, _ = t.shape
    return cv2.transform(cv2.LUT(t.reshape(b * h, w, 3), table), np.ones((1, 3), np.float32))


def optical_density_sum(
    tiles: np.ndarray, background_rgb: Sequence[int] = (255, 255, 255), od_min: float = STAINED_OD_MIN
) -> np.ndarray:
    """Summed optical density (R + G + B) relative to ``background_rgb``, float32 ``(B, H, W)``.

    In steps of ``od_min / 100`` and saturating at 2.55 ``od_min``: what the tissue test needs.
    """
    t = _as_batch(tiles)
    code = _od_code(t, _od_code_table(background_rgb, od_min))
    return (code.astype(np.float32) * (od_min / _OD_STEPS)).reshape(t.shape[:3])


def _lab8(t: np.ndarray) -> np.ndarray:
    """8-bit OpenCV LAB of a uint8 batch (B, H, W, 3) as an image (B * H, W, 3)."""
    b, h, w, _ = t.shape
    return cv2.cvtColor(t.reshape(b * h, w, 3), cv2.COLOR_RGB2LAB)


def _stats(lab: np.ndarray, code: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-tile CIE mean/std/count of tissue pixels from the 8-bit LAB and coded OD images of ``b`` tiles."""
    h = lab.shape[0] // b
    tissue = cv2.compare(code, _OD_STEPS, cv2.CMP_GE)  # type: ignore[call-overload]  # scalar src2 (stubs: arrays)
    means = np.full((b, 3), np.nan)
    stds = np.full((b, 3), np.nan)
    counts = np.zeros(b, np.int64)
    for i in range(b):
        rows = slice(i * h, (i + 1) * h)
        k = cv2.countNonZero(tissue[rows])
        counts[i] = k
        if k:
            m, s = cv2.meanStdDev(lab[rows], mask=tissue[rows])
            means[i] = m.reshape(3) * _SCALE_CIE + _OFFSET_CIE
            stds[i] = s.reshape(3) * _SCALE_CIE
    return means, stds, counts


def tile_lab_stats(
    tiles: np.ndarray, background_rgb: Sequence[int] = (255, 255, 255), od_min: float = STAINED_OD_MIN
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CIELAB statistics of the tissue pixels (``OD >= od_min``) of each tile.

    Returns:
        ``(mean (B, 3), std (B, 3), n (B,))``: float64 mean and population std of L (0-100),
        a, b over each tile's tissue pixels, and their number (mean and std are NaN where 0).
    """
    t = _as_batch(tiles)
    return _stats(_lab8(t), _od_code(t, _od_code_table(background_rgb, od_min)), t.shape[0])


def pooled_lab_stats(means: np.ndarray, stds: np.ndarray, counts: np.ndarray) -> Stats:
    """Mean and std of the union of pixel sets given per set (e.g. per tile): ``(mean (3,), std (3,))``."""
    c = np.asarray(counts, np.float64)
    ok = c > 0
    if not ok.any():
        raise ValueError("no tissue pixels to pool")
    m, s, c = np.asarray(means)[ok], np.asarray(stds)[ok], c[ok, None]
    mean = (m * c).sum(0) / c.sum()
    var = ((s**2 + (m - mean) ** 2) * c).sum(0) / c.sum()
    return mean, np.sqrt(var)


class ReinhardNormaliser:
    """Reinhard colour transfer of tissue pixels to target CIELAB statistics; glass left alone.

    Args:
        target_mean: CIELAB mean (L 0-100, a, b) of tissue pixels to map to.
        target_std: CIELAB std to map to (each > 0).
        scope: ``"tile"``: each tile's own tissue statistics are mapped to the target (tiles
            with under :data:`MIN_TISSUE_FRACTION` tissue are left unchanged); ``"slide"``: one
            map for every tile, from the slide statistics given as ``source_*`` or by :meth:`fit`.
        background_rgb: the slide's glass colour (what optical density is measured against).
        od_min: summed optical density from which a pixel is tissue.
        source_mean, source_std: slide statistics (``scope="slide"``), if already known.

    Calling it on uint8 RGB ``(B, H, W, 3)`` (or one ``(H, W, 3)`` tile) returns a new uint8
    array of the same shape.
    """

    def __init__(
        self,
        target_mean: ArrayLike,
        target_std: ArrayLike,
        scope: Literal["tile", "slide"] = "slide",
        background_rgb: Sequence[int] = (255, 255, 255),
        od_min: float = STAINED_OD_MIN,
        source_mean: ArrayLike | None = None,
        source_std: ArrayLike | None = None,
    ) -> None:
        self.target_mean = np.asarray(target_mean, np.float64).reshape(3)
        self.target_std = np.asarray(target_std, np.float64).reshape(3)
        if not (np.isfinite(self.target_mean).all() and (self.target_std > 0).all()):
            raise ValueError(f"invalid target LAB statistics {self.target_mean.tolist()}, {self.target_std.tolist()}")
        if scope not in ("tile", "slide"):
            raise ValueError(f"scope must be 'tile' or 'slide', got {scope!r}")
        self.scope = scope
        self.background_rgb = tuple(int(v) for v in background_rgb)
        self.od_min = float(od_min)
        self.source: Stats | None = None
        if source_mean is not None and source_std is not None:
            self.source = (
                np.asarray(source_mean, np.float64).reshape(3),
                np.asarray(source_std, np.float64).reshape(3),
            )
        self._table = _od_code_table(self.background_rgb, self.od_min)

    @classmethod
    def from_spec(
        cls, spec: StainNormalisationSpec, background_rgb: Sequence[int] = (255, 255, 255)
    ) -> ReinhardNormaliser:
        """The normaliser a bundle contract's :class:`~models.bundle.StainNormalisationSpec` describes."""
        if spec.method != "reinhard":
            raise PipelineError(f"stain normalisation method {spec.method!r} is not implemented")
        return cls(spec.target_lab_mean, spec.target_lab_std, scope=spec.scope, background_rgb=background_rgb)

    def fit(self, tiles: np.ndarray) -> ReinhardNormaliser:
        """Set the slide statistics (``scope="slide"``) from the tissue pixels of ``tiles``; returns self.

        Without tissue pixels the map stays the identity.
        """
        means, stds, counts = tile_lab_stats(tiles, self.background_rgb, self.od_min)
        self.source = pooled_lab_stats(means, stds, counts) if counts.sum() else (self.target_mean, self.target_std)
        return self

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        t = _as_batch(tiles)
        b, h, w, _ = t.shape
        code = _od_code(t, self._table)
        lab = _lab8(t)
        if self.scope == "slide":
            if self.source is None:
                raise PipelineError("slide-scope stain normalisation needs the slide statistics: call fit() first")
            mats: list[np.ndarray | None] = [_affine8(*self.source, self.target_mean, self.target_std)] * b
        else:
            means, stds, counts = _stats(lab, code, b)
            enough = counts >= MIN_TISSUE_FRACTION * h * w
            mats = [
                _affine8(means[i], stds[i], self.target_mean, self.target_std) if enough[i] else None for i in range(b)
            ]
        out = _apply_maps(t, lab, code, mats, one_map=self.scope == "slide")
        return out[0] if np.asarray(tiles).ndim == 3 else out


def _affine8(mean: np.ndarray, std: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray) -> np.ndarray | None:
    """(3, 4) float32 affine map in 8-bit LAB units taking (mean, std) to the target (CIE units), or None for the identity."""
    scale = np.clip(target_std / np.maximum(std, 1e-6), 1.0 / MAX_STD_SCALE, MAX_STD_SCALE)
    # x' = (x - m) * k + t in CIE units x = s * x8 + o, i.e. x8' = k * x8 + (t - o - k * (m - o)) / s
    shift8 = (target_mean - _OFFSET_CIE - scale * (mean - _OFFSET_CIE)) / _SCALE_CIE
    if np.abs(scale - 1.0).max() < 1e-3 and np.abs(shift8).max() < 0.25:
        return None
    m = np.zeros((3, 4), np.float32)
    m[[0, 1, 2], [0, 1, 2]] = scale
    m[:, 3] = shift8
    return m


def _apply_maps(
    t: np.ndarray, lab: np.ndarray, code: np.ndarray, mats: list[np.ndarray | None], one_map: bool
) -> np.ndarray:
    """Tiles ``t`` (B, H, W, 3) with tile i's tissue mapped by ``mats[i]`` in 8-bit LAB (None: unchanged).

    ``lab`` and ``code``: the batch's 8-bit LAB and coded optical-density images; ``one_map``:
    every entry of ``mats`` is the same map (applied to the whole batch at once).
    """
    b, h, w, _ = t.shape
    out = t.copy()
    todo = [i for i in range(b) if mats[i] is not None]
    groups = [(0, b)] if one_map and todo else [(i, i + 1) for i in todo]
    for i0, i1 in groups:
        m = mats[i0]
        assert m is not None
        rows = slice(i0 * h, i1 * h)
        mapped = cv2.cvtColor(cv2.transform(lab[rows], m), cv2.COLOR_LAB2RGB)
        weight = cv2.LUT(code[rows], _WEIGHT_TABLE)  # float32: 0 on glass, 1 on tissue
        src = t[i0:i1].reshape((i1 - i0) * h, w, 3)
        out[i0:i1] = cv2.blendLinear(mapped, src, weight, 1.0 - weight).reshape(i1 - i0, h, w, 3)
    return out


def shift_lab_stats(
    tiles: np.ndarray,
    shift: ArrayLike,
    scale: ArrayLike,
    background_rgb: Sequence[int] = (255, 255, 255),
    od_min: float = STAINED_OD_MIN,
) -> np.ndarray:
    """Move each tile's tissue CIELAB statistics: ``mean' = mean + shift``, ``std' = std * scale`` (glass kept).

    The same per-channel map as :class:`ReinhardNormaliser` with each tile's own statistics as the
    source (stain augmentation, :class:`pipeline.training.augment.LABJitter`); tiles without
    tissue are returned unchanged. uint8 RGB ``(B, H, W, 3)`` or ``(H, W, 3)`` in and out.
    """
    t = _as_batch(tiles)
    b = t.shape[0]
    code = _od_code(t, _od_code_table(background_rgb, od_min))
    lab = _lab8(t)
    means, stds, counts = _stats(lab, code, b)
    d = np.asarray(shift, np.float64).reshape(3)
    k = np.asarray(scale, np.float64).reshape(3)
    mats = [_affine8(means[i], stds[i], means[i] + d, stds[i] * k) if counts[i] else None for i in range(b)]
    out = _apply_maps(t, lab, code, mats, one_map=False)
    return out[0] if np.asarray(tiles).ndim == 3 else out


def normaliser_for(
    spec: StainNormalisationSpec | None,
    path: Path,
    mpp: float | None,
    coords: np.ndarray,
    plan: ReadPlan,
    tile_px: int,
    background_rgb: Sequence[int] = (255, 255, 255),
    sample_tiles: int = 32,
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The stain normaliser a bundle contract asks for, ready for a slide (None: the contract asks for none).

    With ``scope="slide"`` the slide statistics come from up to ``sample_tiles`` tiles spread evenly
    over the tile grid ``coords`` (read with ``plan``), about 1 ms per tile.
    """
    if spec is None:
        return None
    norm = ReinhardNormaliser.from_spec(spec, background_rgb=background_rgb)
    if norm.scope == "slide":
        coords = np.asarray(coords)
        if len(coords):
            pick = np.unique(np.linspace(0, len(coords) - 1, min(sample_tiles, len(coords))).round().astype(int))
            norm.fit(np.stack(read_tiles_at(path, mpp, coords[pick], plan, tile_px)))
        else:
            norm.source = (norm.target_mean, norm.target_std)
    return norm
