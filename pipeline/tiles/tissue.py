"""Tissue detection on a low-resolution thumbnail, tuned for skin biopsies.

Saturation/Otsu masks (the usual choice) drop pale tissue, and in skin the pale tissue is
exactly what matters: basket-weave orthokeratin, pale (pallor) epidermis and thin detached
strips of stratum corneum. This detector therefore works in **optical density relative to
the slide's own background**, with a texture term for faint lamellar keratin, and removes
what is not tissue by colour and size:

* background: OD close to the estimated glass colour (estimated per slide, tolerant of tint);
* margin ink and pen (green, blue, black): their OD is red-heavy (OD_R > OD_G), unlike any
  H&E mixture where eosin/haematoxylin make OD_G >= OD_R, or neutral and very dark (black);
* dust: components smaller than ``min_component_um2``.

Sklearn-style: :class:`TissueDetector` holds parameters, ``detect(thumbnail, mpp)`` returns a
:class:`TissueMask` (boolean mask at the thumbnail resolution + its µm/px + flags).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import Field

from pipeline.core.config import StrictModel

log = logging.getLogger(__name__)


class TissueConfig(StrictModel):
    """Parameters of the skin-aware tissue detector (physical units where they have one)."""

    thumbnail_mpp: float = Field(2.0, gt=0, description="Resolution of the detection thumbnail, µm/px.")
    od_threshold: float = Field(
        0.045,
        gt=0,
        description="Min. summed optical density (R+G+B) above background for tissue; low enough for pale keratin.",
    )
    texture_threshold: float = Field(
        3.0,
        ge=0,
        description="Min. local grey-level std (0-255 scale) that marks faint textured tissue (lamellar keratin).",
    )
    ink_red_excess: float = Field(
        0.04, ge=0, description="OD_R - OD_G above which a pixel is ink/pen (H&E has OD_G >= OD_R)."
    )
    black_od: float = Field(
        1.6, gt=0, description="Summed OD above which a neutral pixel is black ink/pen, not tissue."
    )
    black_max_chroma: float = Field(0.18, ge=0, description="Max. OD chroma (max-min over channels) of black ink.")
    min_component_um2: float = Field(
        4000.0, ge=0, description="Connected components smaller than this (µm²) are dust/debris and dropped."
    )
    fill_holes_um2: float = Field(
        2000.0, ge=0, description="Holes smaller than this (µm²) inside tissue are filled (cracks, vacuoles)."
    )
    close_um: float = Field(8.0, ge=0, description="Morphological closing radius, µm (joins basket-weave keratin).")
    dark_background_max: float = Field(
        120.0,
        description="Background brightness (0-255) below which the slide is dark-field/fluorescence (no tissue mask).",
    )


@dataclass
class TissueMask:
    """Tissue mask at thumbnail resolution.

    Attributes:
        mask: bool (H, W); True = tissue.
        mpp: µm/px of the mask (and of the thumbnail it came from).
        origin: level-0 (x, y) of the mask's top-left pixel (slide bounds offset).
        background_rgb: estimated glass colour (3,) uint8.
        flags: quality observations, e.g. ``"dark_background"``.
    """

    mask: np.ndarray
    mpp: float
    origin: tuple[int, int] = (0, 0)
    background_rgb: tuple[int, int, int] = (255, 255, 255)
    flags: list[str] = field(default_factory=list)
    ink_fraction: float = 0.0

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the thumbnail area that is tissue (0-1)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2

    def contours_level0(self, slide_mpp: float, min_points: int = 3) -> list[np.ndarray]:
        """Outer tissue contours as float arrays (K, 2) of level-0 (x, y) pixels."""
        contours, _ = cv2.findContours(self.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        scale = self.mpp / slide_mpp
        out = []
        for c in contours:
            if len(c) < min_points:
                continue
            pts = c.reshape(-1, 2).astype(np.float64) * scale
            pts += np.asarray(self.origin, dtype=np.float64)
            out.append(pts)
        return out


def optical_density(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """OD per channel relative to ``background``: -log10(I / I_bg), float32 (H, W, 3), >= 0."""
    od = rgb.astype(np.float32)  # one float32 (H, W, 3) buffer, updated in place: the same values as
    od += 1.0  # -log10((rgb + 1) / (bg + 1)) with temporaries, a third of the memory
    bg = background.astype(np.float32) + 1.0
    np.divide(od, bg, out=od)
    np.log10(od, out=od)
    np.negative(od, out=od)
    return np.maximum(od, 0.0, out=od)


def _od_lut(background: np.ndarray) -> np.ndarray:
    """(256, 1, 3) float32 table: :func:`optical_density` of every uint8 level, per channel."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3)
    return optical_density(levels, background)


def _od_planes(rgb: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(OD red, OD green, OD blue, OD sum) float32 (H, W) planes of :func:`optical_density`.

    Looked up per channel from a 256-entry table made by :func:`optical_density` itself (the
    same float32 values; with the table lookups the tissue detector runs 2-2.5x faster). The sum is (R + G) + B in
    float32, the same values as ``od.sum(axis=2)``; planes instead of an interleaved image keep
    fewer full-size temporaries alive (peak memory per thumbnail pixel).
    """
    lut = _od_lut(background)
    r, g, b = (cv2.LUT(plane, np.ascontiguousarray(lut[:, :, c])) for c, plane in enumerate(cv2.split(rgb)))
    return r, g, b, cv2.add(cv2.add(r, g), b)


def estimate_background(rgb: np.ndarray) -> np.ndarray:
    """Glass colour: per-channel median of the brightest 10 % of pixels (uint8 (3,)).

    Brightness is R + G + B (the mean's order); "brightest 10 %" are the pixels at or above its
    90th percentile (linear interpolation between order statistics, as ``np.percentile``).
    Computed from histograms (exact integer levels; a median halfway between two levels is
    rounded down). Robust to tinted backgrounds; on a slide fully covered by tissue it returns
    the palest tissue, which only makes the detector more conservative.
    """
    planes = cv2.split(np.ascontiguousarray(rgb))
    total = cv2.add(cv2.add(planes[0], planes[1], dtype=cv2.CV_16U), planes[2], dtype=cv2.CV_16U).reshape(-1)
    n = total.size
    cum = np.cumsum(np.bincount(total, minlength=766))
    pos = 0.9 * (n - 1)
    lo = int(math.floor(pos))
    s_lo = int(np.searchsorted(cum, lo + 1, side="left"))  # order statistic ``lo`` (0-based)
    s_hi = int(np.searchsorted(cum, min(lo + 2, n), side="left"))
    cut = s_lo if (pos == lo or s_lo == s_hi) else s_hi  # interpolated cut lies above s_lo: only s_hi and up pass
    # OpenCV takes a scalar src2; its stubs list arrays only
    bright = cv2.compare(total.reshape(planes[0].shape), cut, cv2.CMP_GE)  # type: ignore[call-overload]
    out = np.empty(3, np.uint8)
    for c, plane in enumerate(planes):
        hist = cv2.calcHist([plane], [0], bright, [256], [0, 256]).reshape(-1).astype(np.int64)
        ccum = np.cumsum(hist)
        m = int(ccum[-1])
        a = int(np.searchsorted(ccum, (m - 1) // 2 + 1, side="left"))
        b = int(np.searchsorted(ccum, m // 2 + 1, side="left"))
        out[c] = (a + b) // 2
    return out


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_px`` pixels.

    Component areas are counted from the labels (OpenCV's labelling without statistics is ~6x
    cheaper than with them, and only the areas are needed); when no component is that small the
    mask comes back as is.
    """
    if min_px <= 1:
        return mask
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = np.bincount(labels.ravel(), minlength=n) >= min_px
    keep[0] = False  # the background
    if keep[1:].all():
        return mask
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """``mask`` with its 4-connected holes of at most ``max_px`` pixels filled (holes touching the
    image border are not holes). Areas and border contact come from the labels, as in
    :func:`_remove_small`."""
    if max_px <= 0:
        return mask
    n, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    small = np.bincount(labels.ravel(), minlength=n) <= max_px
    small[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False  # touch the border
    small[0] = False  # label 0 is the tissue itself
    if not small.any():
        return mask
    return mask | small[labels]


class TissueDetector:
    """Skin-aware tissue detector; see the module docstring for the method."""

    def __init__(self, config: TissueConfig | None = None) -> None:
        self.config = config or TissueConfig()

    @staticmethod
    def _ink(od_r: np.ndarray, od_g: np.ndarray, od_sum: np.ndarray, cfg: TissueConfig) -> np.ndarray:
        """Green/blue ink: red-heavy optical density, which no H&E mixture has (OD planes, (H, W))."""
        return ((od_r - od_g) > cfg.ink_red_excess + 0.15 * od_g) & (od_sum > 0.12)

    def detect(self, thumbnail: np.ndarray, mpp: float, origin: tuple[int, int] = (0, 0)) -> TissueMask:
        """Return the tissue mask of an RGB uint8 thumbnail (H, W, 3) taken at ``mpp`` µm/px."""
        cfg = self.config
        if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
            raise ValueError(f"thumbnail must be (H, W, 3) RGB, got {thumbnail.shape}")
        h, w = thumbnail.shape[:2]
        background = estimate_background(thumbnail)
        background_rgb = (int(background[0]), int(background[1]), int(background[2]))
        flags: list[str] = []
        if float(background.mean()) < cfg.dark_background_max:
            log.info("dark background %s: dark-field/fluorescence image, no brightfield tissue", background.tolist())
            return TissueMask(np.zeros((h, w), bool), mpp, origin, background_rgb, ["dark_background"])

        smooth = cv2.medianBlur(thumbnail, 3)
        od_r, od_g, od_b, od_sum = _od_planes(smooth, background)
        chroma = cv2.subtract(cv2.max(cv2.max(od_r, od_g), od_b), cv2.min(cv2.min(od_r, od_g), od_b))  # max - min

        black = (od_sum > cfg.black_od) & (chroma < cfg.black_max_chroma * od_sum)
        del chroma, od_b
        # Ink on the smoothed and the raw image: median smoothing hides thin ink speckles.
        # (one set of float32 OD planes alive at a time: the peak memory is per thumbnail pixel)
        not_tissue = black | self._ink(od_r, od_g, od_sum, cfg)
        del od_r, od_g
        raw_r, raw_g, raw_b, raw_sum = _od_planes(thumbnail, background)
        del raw_b
        not_tissue |= self._ink(raw_r, raw_g, raw_sum, cfg)
        del raw_r, raw_g, raw_sum

        gray = cv2.cvtColor(smooth, cv2.COLOR_RGB2GRAY).astype(np.float32)
        k = max(3, int(round(6.0 / mpp)) | 1)  # ~6 µm window
        mean = cv2.blur(gray, (k, k))
        var = np.maximum(cv2.blur(gray * gray, (k, k)) - mean * mean, 0)
        textured = (np.sqrt(var) > cfg.texture_threshold) & (od_sum > cfg.od_threshold * 0.5)

        tissue = ((od_sum > cfg.od_threshold) | textured) & ~not_tissue
        if cfg.close_um > 0:
            tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, _disk(cfg.close_um / mpp)).astype(bool)
        # Closing may bridge over ink: remove ink (dilated a little) again.
        ink_zone = cv2.dilate(not_tissue.astype(np.uint8), _disk(2.0 / mpp)).astype(bool)
        tissue &= ~ink_zone
        px_area = mpp * mpp
        tissue = _remove_small(tissue, int(cfg.min_component_um2 / px_area))
        tissue = _fill_small_holes(tissue, int(cfg.fill_holes_um2 / px_area))
        tissue &= ~ink_zone  # ink speckled into frayed tissue edges stays out after hole filling
        ink_fraction = float(not_tissue.mean())
        if ink_fraction > 0.001:
            flags.append("ink_or_pen_removed")
        return TissueMask(tissue, mpp, origin, background_rgb, flags, ink_fraction)


def detect_tissue(slide, config: TissueConfig | None = None) -> tuple[TissueMask, np.ndarray]:
    """Thumbnail of ``slide`` at ``config.thumbnail_mpp`` and its tissue mask.

    Returns (mask, thumbnail RGB uint8 (H, W, 3)); the thumbnail covers ``slide.bounds``.
    """
    cfg = config or TissueConfig()
    thumb, mpp = slide.thumbnail(cfg.thumbnail_mpp)
    bx, by, _, _ = slide.bounds
    return TissueDetector(cfg).detect(thumb, mpp, origin=(bx, by)), thumb
