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

Memory: the thumbnail is worked on in strips of rows with a halo as wide as the filters reach
(bit-identical to working on the whole image), and small components and holes are found by
labelling strips and joining the labels that touch across them; beyond the thumbnail (bounded by
:meth:`pipeline.reading.slide.Slide.thumbnail`'s ``max_side``) and its one-byte-per-pixel mask,
detection needs a few tens of MB for any slide size.

Sklearn-style: :class:`TissueDetector` holds parameters, ``detect(thumbnail, mpp)`` returns a
:class:`TissueMask` (boolean mask at the thumbnail resolution + its µm/px + flags).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
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
        m = self.mask
        m8 = m.view(np.uint8) if m.dtype == bool and m.flags.c_contiguous else m.astype(np.uint8)  # no copy
        contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
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


#: Thumbnail pixels the detector works on at a time (a strip of rows plus its halo): its
#: temporaries (~40 bytes per pixel) stay near 40 MB however large the thumbnail.
STRIP_PIXELS = 1 << 20
#: Mask pixels labelled at a time when small components and holes are found (int32 labels).
LABEL_STRIP_PIXELS = 1 << 21


def _row_strips(h: int, w: int, pixels: int, rows: int | None = None) -> list[tuple[int, int]]:
    """(y0, y1) row ranges covering ``h`` rows, each about ``pixels`` pixels of a ``w`` wide image (or ``rows`` rows)."""
    step = max(1, int(rows)) if rows else max(16, pixels // max(w, 1))
    return [(y, min(h, y + step)) for y in range(0, h, step)]


def estimate_background(rgb: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Glass colour: per-channel median of the brightest 10 % of pixels (uint8 (3,)).

    Brightness is R + G + B (the mean's order); "brightest 10 %" are the pixels at or above its
    90th percentile (linear interpolation between order statistics, as ``np.percentile``).
    Computed from histograms (exact integer levels; a median halfway between two levels is
    rounded down), gathered strip by strip (``rows`` rows at a time; default about
    :data:`STRIP_PIXELS` pixels), so the memory does not grow with the image. Robust to tinted
    backgrounds; on a slide fully covered by tissue it returns the palest tissue, which only
    makes the detector more conservative.
    """
    h, w = rgb.shape[:2]
    strips = _row_strips(h, w, STRIP_PIXELS, rows)

    def planes_and_total(y0: int, y1: int) -> tuple[list[np.ndarray], np.ndarray]:
        planes = list(cv2.split(np.ascontiguousarray(rgb[y0:y1])))
        total = cv2.add(cv2.add(planes[0], planes[1], dtype=cv2.CV_16U), planes[2], dtype=cv2.CV_16U)
        return planes, total

    counts = np.zeros(766, np.int64)
    for y0, y1 in strips:
        counts += np.bincount(planes_and_total(y0, y1)[1].reshape(-1), minlength=766)
    n = h * w
    cum = np.cumsum(counts)
    pos = 0.9 * (n - 1)
    lo = int(math.floor(pos))
    s_lo = int(np.searchsorted(cum, lo + 1, side="left"))  # order statistic ``lo`` (0-based)
    s_hi = int(np.searchsorted(cum, min(lo + 2, n), side="left"))
    cut = s_lo if (pos == lo or s_lo == s_hi) else s_hi  # interpolated cut lies above s_lo: only s_hi and up pass
    hist = np.zeros((3, 256), np.int64)
    for y0, y1 in strips:
        planes, total = planes_and_total(y0, y1)
        # OpenCV takes a scalar src2; its stubs list arrays only
        bright = cv2.compare(total, cut, cv2.CMP_GE)  # type: ignore[call-overload]
        for c, plane in enumerate(planes):
            hist[c] += cv2.calcHist([plane], [0], bright, [256], [0, 256]).reshape(-1).astype(np.int64)
    out = np.empty(3, np.uint8)
    for c in range(3):
        ccum = np.cumsum(hist[c])
        m = int(ccum[-1])
        a = int(np.searchsorted(ccum, (m - 1) // 2 + 1, side="left"))
        b = int(np.searchsorted(ccum, m // 2 + 1, side="left"))
        out[c] = (a + b) // 2
    return out


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


class _Components:
    """Connected components of a (H, W) bool image, labelled strip by strip (bounded memory).

    Each strip of rows is labelled by OpenCV on its own; labels that touch across a strip
    boundary (4- or 8-connected) are joined (graph components), giving every component its
    whole area and whether it touches the image border. :meth:`select` marks components by a
    rule on those; :meth:`strips` labels the strips again and yields their selected pixels. Memory:
    one strip's int32 labels plus a few numbers per component, never labels of the whole image.
    """

    def __init__(self, mask: np.ndarray, invert: bool, connectivity: int, rows: int | None = None) -> None:
        self.mask, self.invert, self.connectivity = mask, invert, connectivity
        h, w = mask.shape
        self.ranges = _row_strips(h, w, LABEL_STRIP_PIXELS, rows)
        self.bases: list[int] = []  # global id of each strip's label 0 (its labels 1..n-1 follow)
        areas: list[np.ndarray] = [np.zeros(1, np.int64)]  # global id 0: nothing
        border: list[np.ndarray] = [np.zeros(1, bool)]
        links: list[np.ndarray] = []
        base = 0
        prev: np.ndarray | None = None  # global ids of the previous strip's last row (0: not in a component)
        for y0, y1 in self.ranges:
            n, lab = self._label(y0, y1)
            self.bases.append(base)
            areas.append(np.bincount(lab.reshape(-1), minlength=n)[1:].astype(np.int64))
            edge = np.zeros(n, bool)
            edge[lab[:, 0]] = True
            edge[lab[:, -1]] = True
            if y0 == 0:
                edge[lab[0]] = True
            if y1 == h:
                edge[lab[-1]] = True
            border.append(edge[1:])
            first = np.where(lab[0] > 0, lab[0].astype(np.int64) + base, 0)
            if prev is not None:
                pairs = [(prev, first)]
                if connectivity == 8:
                    pairs += [(prev[:-1], first[1:]), (prev[1:], first[:-1])]
                for a, b in pairs:
                    both = (a > 0) & (b > 0)
                    if both.any():
                        links.append(np.stack([a[both], b[both]]))
            prev = np.where(lab[-1] > 0, lab[-1].astype(np.int64) + base, 0)
            base += n - 1
        self.n_ids = base + 1
        self.area = np.concatenate(areas)
        self.border = np.concatenate(border)
        if links:  # components that continue across strips: one id per joined component
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            ab = np.unique(np.concatenate(links, axis=1), axis=1)
            graph = coo_matrix((np.ones(ab.shape[1], np.int8), (ab[0], ab[1])), shape=(self.n_ids, self.n_ids))
            _, self.root = connected_components(graph, directed=False)
            self.area = np.bincount(self.root, weights=self.area).astype(np.int64)[self.root]
            self.border = (np.bincount(self.root, weights=self.border) > 0)[self.root]
        self.selected = np.zeros(self.n_ids, bool)

    def _label(self, y0: int, y1: int) -> tuple[int, np.ndarray]:
        strip = ~self.mask[y0:y1] if self.invert else np.ascontiguousarray(self.mask[y0:y1])
        n, lab = cv2.connectedComponents(strip.view(np.uint8), connectivity=self.connectivity, ltype=cv2.CV_32S)
        return n, lab

    def select(self, chosen: np.ndarray) -> bool:
        """Mark the components where ``chosen`` (bool, per global id; id 0 is ignored) holds; whether any is."""
        self.selected = np.asarray(chosen, bool).copy()
        self.selected[0] = False
        return bool(self.selected.any())

    def strips(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(y0, y1, bool (y1 - y0, W): pixels of selected components) for every strip, top to bottom."""
        for (y0, y1), base in zip(self.ranges, self.bases):
            n, lab = self._label(y0, y1)
            table = np.zeros(n, bool)
            table[1:] = self.selected[base + 1 : base + n]
            yield y0, y1, table[lab]


def _remove_small(mask: np.ndarray, min_px: int, rows: int | None = None, inplace: bool = False) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_px`` pixels.

    Components are labelled strip by strip (:class:`_Components`; ``rows`` rows at a time,
    default about :data:`LABEL_STRIP_PIXELS` pixels); when no component is that small the mask
    comes back as is. ``inplace``: change a bool ``mask`` itself instead of a copy.
    """
    if min_px <= 1:
        return mask
    mask = np.asarray(mask, bool)
    comps = _Components(mask, invert=False, connectivity=8, rows=rows)
    if not comps.select(comps.area < min_px):
        return mask
    out = mask if inplace else mask.copy()
    for y0, y1, small in comps.strips():
        out[y0:y1] &= ~small
    return out


def _fill_small_holes(mask: np.ndarray, max_px: int, rows: int | None = None, inplace: bool = False) -> np.ndarray:
    """``mask`` with its 4-connected holes of at most ``max_px`` pixels filled (holes touching the
    image border are not holes). Labelled strip by strip, as in :func:`_remove_small`."""
    if max_px <= 0:
        return mask
    mask = np.asarray(mask, bool)
    comps = _Components(mask, invert=True, connectivity=4, rows=rows)
    if not comps.select((comps.area <= max_px) & ~comps.border):
        return mask
    out = mask if inplace else mask.copy()
    for y0, y1, small in comps.strips():
        out[y0:y1] |= small
    return out


class TissueDetector:
    """Skin-aware tissue detector; see the module docstring for the method.

    The thumbnail is worked on in strips of rows (about :data:`STRIP_PIXELS` pixels each, or
    ``rows`` rows) with a halo as wide as the filters reach, so every strip's pixels are those of
    the whole image worked on at once, and the memory beyond the thumbnail and its mask (one byte
    per pixel) stays bounded for any thumbnail size.
    """

    def __init__(self, config: TissueConfig | None = None, rows: int | None = None) -> None:
        self.config = config or TissueConfig()
        self.rows = rows

    @staticmethod
    def _ink(od_r: np.ndarray, od_g: np.ndarray, od_sum: np.ndarray, cfg: TissueConfig) -> np.ndarray:
        """Green/blue ink: red-heavy optical density, which no H&E mixture has (OD planes, (H, W))."""
        return ((od_r - od_g) > cfg.ink_red_excess + 0.15 * od_g) & (od_sum > 0.12)

    def _window(
        self, rgb: np.ndarray, background: np.ndarray, k: int, close: np.ndarray | None, ink_disk: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tissue after closing and ink removal, ink zone, ink) of a window of the thumbnail, bool (h, w).

        Exact for the window's rows farther from its cut edges than the filters reach
        (:meth:`detect` keeps only those).
        """
        cfg = self.config
        smooth = cv2.medianBlur(rgb, 3)
        od_r, od_g, od_b, od_sum = _od_planes(smooth, background)
        chroma = cv2.subtract(cv2.max(cv2.max(od_r, od_g), od_b), cv2.min(cv2.min(od_r, od_g), od_b))  # max - min

        black = (od_sum > cfg.black_od) & (chroma < cfg.black_max_chroma * od_sum)
        del chroma, od_b
        # Ink on the smoothed and the raw image: median smoothing hides thin ink speckles.
        # (one set of float32 OD planes alive at a time)
        not_tissue = black | self._ink(od_r, od_g, od_sum, cfg)
        del od_r, od_g
        raw_r, raw_g, raw_b, raw_sum = _od_planes(rgb, background)
        del raw_b
        not_tissue |= self._ink(raw_r, raw_g, raw_sum, cfg)
        del raw_r, raw_g, raw_sum

        gray = cv2.cvtColor(smooth, cv2.COLOR_RGB2GRAY).astype(np.float32)
        mean = cv2.blur(gray, (k, k))
        var = np.maximum(cv2.blur(gray * gray, (k, k)) - mean * mean, 0)
        textured = (np.sqrt(var) > cfg.texture_threshold) & (od_sum > cfg.od_threshold * 0.5)

        tissue = ((od_sum > cfg.od_threshold) | textured) & ~not_tissue
        if close is not None:
            tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, close).astype(bool)
        # Closing may bridge over ink: remove ink (dilated a little) again.
        ink_zone = cv2.dilate(not_tissue.astype(np.uint8), ink_disk).astype(bool)
        tissue &= ~ink_zone
        return tissue, ink_zone, not_tissue

    def detect(self, thumbnail: np.ndarray, mpp: float, origin: tuple[int, int] = (0, 0)) -> TissueMask:
        """Return the tissue mask of an RGB uint8 thumbnail (H, W, 3) taken at ``mpp`` µm/px."""
        cfg = self.config
        if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
            raise ValueError(f"thumbnail must be (H, W, 3) RGB, got {thumbnail.shape}")
        h, w = thumbnail.shape[:2]
        background = estimate_background(thumbnail, self.rows)
        background_rgb = (int(background[0]), int(background[1]), int(background[2]))
        flags: list[str] = []
        if float(background.mean()) < cfg.dark_background_max:
            log.info("dark background %s: dark-field/fluorescence image, no brightfield tissue", background.tolist())
            return TissueMask(np.zeros((h, w), bool), mpp, origin, background_rgb, ["dark_background"])

        k = max(3, int(round(6.0 / mpp)) | 1)  # ~6 µm texture window
        close = _disk(cfg.close_um / mpp) if cfg.close_um > 0 else None
        ink_disk = _disk(2.0 / mpp)
        # rows a strip's result depends on beyond its own: median 1, texture window, closing (dilate + erode), ink zone
        halo = max(1 + k // 2 + (0 if close is None else close.shape[0] - 1), 1 + ink_disk.shape[0] // 2)
        tissue = np.empty((h, w), bool)
        ink_zones: list[tuple[int, int, np.ndarray]] = []  # (y, x, ink zone) of the boxes around ink
        n_ink = 0
        for y0, y1 in _row_strips(h, w, STRIP_PIXELS, self.rows):
            a, b = max(0, y0 - halo), min(h, y1 + halo)
            t, zone, ink = self._window(thumbnail[a:b], background, k, close, ink_disk)
            tissue[y0:y1] = t[y0 - a : y1 - a]
            zone = np.ascontiguousarray(zone[y0 - a : y1 - a])
            x, y, bw, bh = cv2.boundingRect(zone.view(np.uint8))
            if bw and bh:
                ink_zones.append((y0 + y, x, zone[y : y + bh, x : x + bw].copy()))
            n_ink += int(np.count_nonzero(ink[y0 - a : y1 - a]))
            del t, zone, ink
        px_area = mpp * mpp
        tissue = _remove_small(tissue, int(cfg.min_component_um2 / px_area), inplace=True)
        tissue = _fill_small_holes(tissue, int(cfg.fill_holes_um2 / px_area), inplace=True)
        for y, x, zone in ink_zones:  # ink speckled into frayed tissue edges stays out after hole filling
            tissue[y : y + zone.shape[0], x : x + zone.shape[1]] &= ~zone
        ink_fraction = n_ink / (h * w) if h * w else float("nan")
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
