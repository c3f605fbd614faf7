"""Epidermis / stratum corneum / adnexa annotations for the real skin slides in ../shared.

Writes QuPath-compatible GeoJSON (level-0 pixels of each slide) to ``data/real_skin/annotations/``
and overlay previews to ``docs/real_annotations_*.png``.

How (per slide, at about 1 µm/px, never at full resolution):

1. Read the slide (or its region of interest) at a pyramid level, resized to ~1 µm/px ("work" image).
2. Per-pixel features: optical density per channel, haematoxylin / eosin by colour
   deconvolution (Ruifrok & Johnston vectors), each Gaussian-smoothed at 1-8 µm; local
   contrast; fraction of glass around the pixel (basket-weave keratin has glass between its
   lamellae); a median-filtered haematoxylin map (epithelial cytoplasm without the dermal
   nuclei); Hessian eigenvalues of haematoxylin (nuclei = blobs, keratin lamellae = lines).
   Only small scales: with wider ones the classifier learnt "near the surface = epidermis" and
   took the pale papillary dermis into the epidermis.
3. A small random forest per slide, trained on hand-placed rectangles and strokes (below, in
   level-0 pixels, chosen by looking at the slide) for glass / dermis / epidermis / corneum,
   classifies the tissue pixels; class probabilities are smoothed (σ = 2 µm) before argmax.
4. Epidermis = pixels classed epidermis whose 15 µm median haematoxylin is above a per-slide
   level (keeps the boundary on the basal layer), opened / closed, nuclei-sized holes filled,
   small components (dermal cell clusters) dropped. Corneum = keratin pixels within a band
   outside the epidermis (closing joins the lamellae and the glass between them) that face
   glass. Margin ink is removed by colour. Explicit per-slide edits (adnexa drawn or found in
   a drawn region, corneum exclusions) come last.
5. Contours -> polygons with holes, simplified (1 µm), scaled to level-0 pixels.

Run from the repository root::

    .venv/bin/python tools/annotate_real_skin.py            # both slides
    .venv/bin/python tools/annotate_real_skin.py --only cmu1

Deterministic (fixed random seeds; ids are UUIDs derived from the slide name and polygon index).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import openslide
from PIL import Image
from sklearn.ensemble import RandomForestClassifier

REPO = Path(__file__).resolve().parent.parent
SHARED_SLIDES = (REPO.parent / "shared" / "data" / "slides").resolve()

#: Class colours (epidermis as in pipeline.synthetic.catalog.CLASS_COLORS).
COLORS: dict[str, tuple[int, int, int]] = {
    "epidermis": (0, 160, 60),
    "stratum_corneum": (230, 120, 0),
    "adnexa": (160, 60, 200),
}

BG, DERMIS, EPI, CORNEUM = 0, 1, 2, 3
LABEL_NAMES = {BG: "glass", DERMIS: "dermis", EPI: "epidermis", CORNEUM: "corneum"}

Rect = tuple[float, float, float, float]  # level-0 x0, y0, x1, y1
Stroke = tuple[tuple[tuple[float, float], ...], float]  # level-0 points, width in level-0 px


@dataclass
class SlideSpec:
    """What to read and how to annotate one slide; all coordinates in level-0 pixels."""

    key: str
    rel_path: str  # relative to ../shared/data/slides
    out_name: str
    mpp: float  # µm per level-0 pixel (assumed where the file has none)
    mpp_note: str
    level: int  # pyramid level read
    work_mpp: float = 1.0  # analysis resolution, µm/px
    train_rects: dict[int, list[Rect]] = field(default_factory=dict)
    train_strokes: dict[int, list[Stroke]] = field(default_factory=dict)
    hm_threshold: float = 0.2  # median-filtered haematoxylin OD above which tissue can be epidermis
    corneum_band_um: float = 40.0  # corneum kept only this close to the epidermis
    corneum_close_um: float = 4.0
    epi_min_um2: float = 3000.0
    epi_hole_um2: float = 300.0
    corneum_min_um2: float = 300.0
    glass_min_um2: float = 2000.0  # glass this large counts as outside (or a cavity) for the corneum
    candidate_band_um: float | None = None  # classify only tissue this close to glass (None = all tissue)
    exclude_epi: list[list[tuple[float, float]]] = field(default_factory=list)
    exclude_corneum: list[list[tuple[float, float]]] = field(default_factory=list)
    adnexa: list[list[tuple[float, float]]] = field(default_factory=list)  # drawn polygons (level 0)
    adnexa_rois: list[list[tuple[float, float]]] = field(default_factory=list)  # follicle epithelium inside (by hm)
    adnexa_hm_threshold: float = 0.25
    preview: str = ""
    preview_mpp: float = 2.0  # overview resolution of the preview
    roi: Rect | None = None  # analyse only this part of the slide (level-0 x0, y0, x1, y1); None = all
    zooms: list[Rect] = field(default_factory=list)


def _r(x0: float, y0: float, x1: float, y1: float, f: float) -> Rect:
    return (x0 * f, y0 * f, x1 * f, y1 * f)


def _s(points: list[tuple[float, float]], width: float, f: float) -> Stroke:
    return (tuple((x * f, y * f) for x, y in points), width * f)


# --- CMU-1-Small-Region: 0.499 µm/px, one level; training shapes picked on a 2x-downsampled view
_C = 2.0
CMU1 = SlideSpec(
    key="cmu1",
    rel_path="CMU-1-Small-Region.svs",
    out_name="CMU-1-Small-Region",
    mpp=0.499,
    mpp_note="0.499 µm/px (from the file)",
    level=0,
    train_rects={
        BG: [_r(100, 100, 300, 300, _C), _r(950, 200, 1050, 400, _C)],
        DERMIS: [
            _r(470, 650, 530, 750, _C),
            _r(700, 1100, 780, 1200, _C),
            _r(720, 950, 800, 1050, _C),
            _r(480, 220, 530, 300, _C),
            _r(500, 1000, 540, 1100, _C),
            _r(850, 1278, 862, 1292, _C),
            _r(812, 1362, 828, 1380, _C),
        ],
        EPI: [
            _r(585, 680, 610, 740, _C),
            _r(555, 950, 600, 990, _C),
            _r(780, 1405, 800, 1440, _C),
            _r(330, 1350, 380, 1400, _C),
            _r(560, 420, 620, 480, _C),
            _r(835, 1330, 860, 1370, _C),
            _r(870, 1230, 890, 1260, _C),
            _r(720, 330, 745, 380, _C),
            _r(600, 320, 625, 345, _C),
            _r(705, 1440, 730, 1480, _C),
        ],
        CORNEUM: [
            _r(660, 640, 720, 720, _C),
            _r(730, 515, 790, 550, _C),
            _r(755, 730, 775, 760, _C),
            _r(845, 670, 885, 705, _C),
        ],
    },
    train_strokes={
        CORNEUM: [
            _s([(634, 650), (628, 675), (622, 700), (616, 725), (610, 750)], 4, _C),
            _s([(790, 753), (823, 730), (850, 713), (877, 698)], 3, _C),
        ],
        EPI: [_s([(740, 900), (752, 850), (777, 800), (825, 765), (850, 752)], 4, _C)],
        # stroma of a dermal papilla cut across, inside the lower-right epidermis
        DERMIS: [
            _s(
                [(824 + 18 * math.cos(t / 8 * math.pi), 1375 + 30 * math.sin(t / 8 * math.pi)) for t in range(17)],
                4,
                _C,
            )
        ],
    },
    # hair shaft with its inner sheath (cross-section inside the central epithelium)
    adnexa=[
        [
            (x * _C, y * _C)
            for x, y in (
                (640, 998),
                (662, 1010),
                (664, 1035),
                (650, 1065),
                (628, 1088),
                (605, 1092),
                (596, 1075),
                (602, 1045),
                (618, 1015),
            )
        ]
    ],
    # top of the piece (tangentially cut epithelium, loose dermis, ink): no keratin layer there, only
    # glass-facing cells that the classifier took for corneum
    exclude_corneum=[
        [
            (x * _C, y * _C)
            for x, y in ((540, 150), (830, 150), (830, 420), (760, 430), (700, 445), (600, 440), (540, 420))
        ]
    ],
    hm_threshold=0.4,
    corneum_band_um=60.0,
    epi_min_um2=1500.0,  # the epidermis is cut by the image border in places
    preview="real_annotations_cmu1.png",
    preview_mpp=1.25,
    zooms=[_r(480, 560, 880, 960, _C), _r(600, 1150, 1000, 1484, _C), _r(450, 150, 850, 550, _C)],
)

# --- morphea_section3: ~0.25 µm/px (no MPP in the file); level 2 is ~1 µm/px; shapes picked on level 2
_M = 4.0
MORPHEA = SlideSpec(
    key="morphea",
    rel_path="real_skin/morphea_section3.tif",
    out_name="morphea_section3",
    mpp=0.25,
    mpp_note="0.25 µm/px (estimated; the file records none)",
    level=2,
    train_rects={
        BG: [_r(3600, 1500, 3800, 1700, _M), _r(1000, 300, 1400, 600, _M)],
        DERMIS: [
            _r(2500, 1000, 2700, 1100, _M),
            _r(3300, 1750, 3380, 1900, _M),
            _r(4050, 3300, 4250, 3450, _M),
            _r(4335, 3340, 4365, 3440, _M),
            _r(2620, 960, 2700, 1000, _M),
        ],
        EPI: [
            _r(2520, 850, 2600, 900, _M),
            _r(3360, 1640, 3400, 1680, _M),
            _r(4290, 3130, 4325, 3240, _M),
            _r(2640, 890, 2700, 930, _M),
        ],
    },
    train_strokes={
        CORNEUM: [
            _s([(3425, 1630), (3445, 1680), (3458, 1710), (3475, 1740)], 4, _M),
            _s([(2630, 848), (2680, 858), (2720, 868), (2760, 882)], 4, _M),
            _s([(4349, 3110), (4358, 3150), (4366, 3190), (4371, 3225)], 3, _M),
        ],
        # granular / spinous / basal layers next to the corneum and to the papillary dermis
        EPI: [
            _s([(2620, 885), (2660, 888), (2700, 890)], 3, _M),
            _s([(2640, 930), (2670, 935), (2690, 938)], 3, _M),
            _s([(3400, 1660), (3420, 1700), (3440, 1740), (3455, 1780)], 4, _M),
            _s([(4335, 3110), (4335, 3150), (4338, 3190), (4340, 3225)], 4, _M),
        ],
        # papillary dermis just under the basal layer
        DERMIS: [
            _s([(2700, 942), (2740, 940)], 4, _M),
            _s([(2610, 948), (2635, 950)], 4, _M),
            _s([(2660, 965), (2700, 960)], 4, _M),
            _s([(3380, 1700), (3390, 1740), (3400, 1780)], 4, _M),
            _s([(4300, 3175), (4305, 3200), (4305, 3225)], 4, _M),
        ],
    },
    hm_threshold=0.18,
    # the two hair follicles (cut obliquely, hair / keratin in the lumen) in the mid dermis
    adnexa_rois=[
        [
            (x * _M, y * _M)
            for x, y in ((3095, 2590), (3440, 2580), (3480, 2830), (3490, 3125), (3085, 3125), (3085, 2800))
        ]
    ],
    corneum_band_um=40.0,
    candidate_band_um=150.0,
    # the epidermis-bearing (upper right) edge of the piece; the rest is deep dermis / subcutis without
    # epidermis (checked on the whole-slide thumbnail), left out to keep the run light
    roi=_r(2250, 650, 4696, 3950, _M),
    preview="real_annotations_morphea.png",
    preview_mpp=2.5,
    zooms=[_r(2450, 750, 2950, 1150, _M), _r(3300, 1450, 3700, 1850, _M), _r(4000, 3050, 4500, 3550, _M)],
)

SPECS = {s.key: s for s in (CMU1, MORPHEA)}

# Ruifrok & Johnston H&E(DAB) optical-density vectors
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAINS = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)
_UNMIX = np.linalg.inv(_STAINS).astype(np.float32)


@dataclass(frozen=True)
class Grid:
    """The work image's pixel grid: level-0 x = ox + fx * column, y = oy + fy * row (pixel corners)."""

    ox: float
    oy: float
    fx: float
    fy: float

    def to_work(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.ox) / self.fx, (y - self.oy) / self.fy


def read_work(slide: openslide.OpenSlide, spec: SlideSpec) -> tuple[np.ndarray, Grid]:
    """RGB uint8 of the slide (or of ``spec.roi``) at ~work_mpp, and its pixel grid."""
    w0, h0 = slide.dimensions
    x0, y0, x1, y1 = spec.roi or (0, 0, w0, h0)
    x0, y0 = max(0, int(x0)), max(0, int(y0))
    x1, y1 = min(w0, int(x1)), min(h0, int(y1))
    ds = slide.level_downsamples[spec.level]
    lw, lh = int(round((x1 - x0) / ds)), int(round((y1 - y0) / ds))
    lw, lh = min(lw, slide.level_dimensions[spec.level][0]), min(lh, slide.level_dimensions[spec.level][1])
    img = np.asarray(slide.read_region((x0, y0), spec.level, (lw, lh)).convert("RGB"))
    f = spec.work_mpp / spec.mpp  # level-0 px per work px
    ww, wh = int(round((x1 - x0) / f)), int(round((y1 - y0) / f))
    if (ww, wh) != (lw, lh):
        img = cv2.resize(img, (ww, wh), interpolation=cv2.INTER_AREA)
    return img, Grid(x0, y0, (x1 - x0) / ww, (y1 - y0) / wh)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(rgb.astype(np.float32), 1.0, 255.0) / 255.0)


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Green/blue margin ink: green and blue above red (no H&E mixture does that)."""
    d = rgb.astype(np.int16)
    return ((d[..., 1] - d[..., 0]) > 15) & ((d[..., 2] - d[..., 0]) > 5)


def _g(a: np.ndarray, s: float) -> np.ndarray:
    """Gaussian blur, σ in px; wide ones on a shrunken copy (same result to a few %, much faster)."""
    k = 1
    while s / (2 * k) >= 2.5:
        k *= 2
    if k == 1:
        return cv2.GaussianBlur(a, (0, 0), s)
    h, w = a.shape[:2]
    small = cv2.resize(a, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), s / k)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def features(rgb: np.ndarray, bg_od: float) -> Iterator[np.ndarray]:
    """Per-pixel feature maps (float32, work resolution, 1 px ~ 1 µm), one at a time."""
    od = optical_density(rgb)
    he = od.reshape(-1, 3) @ _UNMIX
    h = np.clip(he[:, 0].reshape(od.shape[:2]), 0, 3).astype(np.float32)
    e = np.clip(he[:, 1].reshape(od.shape[:2]), 0, 3).astype(np.float32)
    ink = ink_mask(rgb)
    h[ink] = 0
    ods = od.sum(2)
    chans = (od[..., 0], od[..., 1], od[..., 2], h, e, ods)
    for c in chans:
        for s in (1, 3, 8):
            yield _g(c, s)
    for s in (3, 8):  # local contrast
        m = _g(ods, s)
        yield np.sqrt(np.maximum(_g(ods * ods, s) - m * m, 0))
    glass = (_g(ods, 1) < bg_od).astype(np.float32)
    for s in (3, 8):  # fraction of glass around
        yield _g(glass, s)
    yield median_haematoxylin(h)
    for s in (2, 4):  # Hessian of haematoxylin: nuclei are blobs, lamellae are lines
        hs = _g(h, s)
        hxx = cv2.Sobel(hs, cv2.CV_32F, 2, 0, ksize=3)
        hyy = cv2.Sobel(hs, cv2.CV_32F, 0, 2, ksize=3)
        hxy = cv2.Sobel(hs, cv2.CV_32F, 1, 1, ksize=3)
        tr = hxx + hyy
        disc = np.sqrt(np.maximum((hxx - hyy) ** 2 + 4 * hxy**2, 0))
        l1, l2 = (tr - disc) * 0.5 * s * s, (tr + disc) * 0.5 * s * s
        yield l1
        yield l2
        blob = np.maximum(-l2, 0)  # both eigenvalues negative: a dark round spot (a nucleus)
        yield _g(blob, 6)
    yield _g(h, 2) - _g(h, 6)
    yield _g(ink.astype(np.float32), 3)


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density by colour deconvolution, margin ink set to 0."""
    od = optical_density(rgb)
    h = np.clip((od.reshape(-1, 3) @ _UNMIX)[:, 0].reshape(od.shape[:2]), 0, 3).astype(np.float32)
    h[ink_mask(rgb)] = 0
    return h


def median_haematoxylin(h: np.ndarray) -> np.ndarray:
    """Haematoxylin median-filtered over 15 µm (then σ = 2 µm): epithelial cytoplasm stays, lone
    dermal nuclei go. Its level separates epidermis from (papillary) dermis sharply."""
    scale = 255.0 / max(float(np.percentile(h, 99.5)), 1e-3)
    hm = cv2.medianBlur(np.clip(h * scale, 0, 255).astype(np.uint8), 15).astype(np.float32) / scale
    return _g(hm, 2)


def _poly_mask(shape: tuple[int, int], polys: list[list[tuple[float, float]]], grid: Grid) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for p in polys:
        pts = np.array([grid.to_work(x, y) for x, y in p], np.float64)
        cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, shift=4)
    return m.astype(bool)


def training_labels(spec: SlideSpec, shape: tuple[int, int], grid: Grid, glass: np.ndarray) -> np.ndarray:
    """int8 label image (-1 = unlabelled); labelled pixels on glass become glass."""
    lab = np.full(shape, -1, np.int8)
    for cls, rects in spec.train_rects.items():
        for x0, y0, x1, y1 in rects:
            (a, b), (c, d) = grid.to_work(x0, y0), grid.to_work(x1, y1)
            lab[max(0, int(b)) : max(0, math.ceil(d)), max(0, int(a)) : max(0, math.ceil(c))] = cls
    for cls, strokes in spec.train_strokes.items():
        for pts, width in strokes:
            p = np.array([grid.to_work(x, y) for x, y in pts], np.int32)
            tmp = np.zeros(shape, np.uint8)
            cv2.polylines(tmp, [p], False, 1, max(1, int(round(width / grid.fx))))
            lab[tmp.astype(bool)] = cls
    lab[(lab >= 0) & glass] = BG
    return lab


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    n, cc, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[cc]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    inv = ~mask
    n, cc, stats, _ = cv2.connectedComponentsWithStats(inv.astype(np.uint8), connectivity=4)
    small = np.zeros(n, bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] < max_px
    return mask | small[cc]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every hole (glass not connected to the image border)."""
    inv = (~mask).astype(np.uint8)
    n, cc = cv2.connectedComponents(inv, connectivity=4)
    border = np.unique(np.concatenate([cc[0], cc[-1], cc[:, 0], cc[:, -1]]))
    outside = np.isin(cc, border[border > 0])
    return ~outside


def _disk(r_px: float) -> np.ndarray:
    k = max(1, int(round(r_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))


@dataclass
class Result:
    spec: SlideSpec
    rgb: np.ndarray
    grid: Grid
    masks: dict[str, np.ndarray]
    features: list[dict]
    seconds: float
    slide_dims: tuple[int, int]


def segment(spec: SlideSpec, slides_dir: Path) -> Result:
    t0 = time.time()
    slide = openslide.OpenSlide(str(slides_dir / spec.rel_path))
    rgb, grid = read_work(slide, spec)
    dims = slide.dimensions
    slide.close()
    shape = rgb.shape[:2]
    um = spec.work_mpp  # µm per work px (~1)

    od = optical_density(rgb)
    ods = od.sum(2)
    bg_level = float(np.median(ods[ods < np.percentile(ods, 30)]))  # glass OD of this slide
    bg_od = bg_level + 0.12
    glass = _g(ods, 1) < bg_od
    tissue = ~glass
    tissue = _remove_small(cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)).astype(bool), 50 / um**2)
    ink = ink_mask(rgb)
    tissue_any = tissue & ~ink

    # pixels to classify
    cand = cv2.dilate(tissue.astype(np.uint8), _disk(3 / um)).astype(bool)
    if spec.candidate_band_um is not None:
        solid = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, _disk(15 / um))
        solid = _fill_holes(solid.astype(bool))  # outside = the glass around the piece
        dist = cv2.distanceTransform(solid.astype(np.uint8), cv2.DIST_L2, 5) * um
        cand &= dist < spec.candidate_band_um

    lab = training_labels(spec, shape, grid, glass)
    rng = np.random.default_rng(0)
    tidx, ys = [], []
    for cls in sorted(set(lab[lab >= 0].tolist())):
        idx = np.flatnonzero(lab.ravel() == cls)
        idx = rng.choice(idx, size=min(len(idx), 4000), replace=False)
        tidx.append(idx)
        ys.append(np.full(len(idx), cls))
    train_idx, y_train = np.concatenate(tidx), np.concatenate(ys)
    cidx = np.flatnonzero(cand.ravel())
    cols_t, cols_a = [], []
    for m in features(rgb, bg_od):  # one map at a time: only the pixels needed are kept
        cols_t.append(m.ravel()[train_idx])
        cols_a.append(m.ravel()[cidx])
    x_train, x_all = np.stack(cols_t, 1), np.stack(cols_a, 1)
    del cols_t, cols_a
    rf = RandomForestClassifier(
        n_estimators=60, max_depth=14, min_samples_leaf=3, n_jobs=2, random_state=0, class_weight="balanced"
    )
    rf.fit(x_train, y_train)
    proba = np.zeros((len(rf.classes_), shape[0] * shape[1]), np.float32)
    proba[list(rf.classes_).index(BG)] = 1.0
    proba[:, cidx] = 0.0
    for a in range(0, len(cidx), 500_000):
        proba[:, cidx[a : a + 500_000]] = rf.predict_proba(x_all[a : a + 500_000]).T
    del x_all
    proba = np.stack([_g(p.reshape(shape), 2 / um) for p in proba])
    cls_map = np.asarray(rf.classes_)[np.argmax(proba, 0)]

    # --- epidermis (living layers): classified so, and haematoxylin-rich (median over 15 µm)
    hm = median_haematoxylin(haematoxylin(rgb))
    epi = (cls_map == EPI) & ~ink & (hm > spec.hm_threshold)
    epi = cv2.morphologyEx(epi.astype(np.uint8), cv2.MORPH_OPEN, _disk(2 / um))
    epi = cv2.morphologyEx(epi, cv2.MORPH_CLOSE, _disk(3 / um)).astype(bool)
    epi = _fill_small_holes(epi, spec.epi_hole_um2 / um**2)
    epi = _remove_small(epi, spec.epi_min_um2 / um**2)
    if spec.exclude_epi:
        epi &= ~_poly_mask(shape, spec.exclude_epi, grid)
    adnexa = np.zeros(shape, bool)
    if spec.adnexa_rois:  # follicles deep in the dermis: haematoxylin-rich epithelium + its lumen
        fol = (hm > spec.adnexa_hm_threshold) & _poly_mask(shape, spec.adnexa_rois, grid) & ~ink
        fol8 = cv2.morphologyEx(fol.astype(np.uint8), cv2.MORPH_OPEN, _disk(3 / um))
        fol = cv2.morphologyEx(fol8, cv2.MORPH_CLOSE, _disk(5 / um)).astype(bool)
        adnexa |= _remove_small(_fill_small_holes(fol, 5000 / um**2), 5000 / um**2)
        epi &= ~adnexa
    if spec.adnexa:
        drawn = cv2.dilate(_poly_mask(shape, spec.adnexa, grid).astype(np.uint8), _disk(3 / um)).astype(bool)
        adnexa |= drawn & tissue
        epi &= ~adnexa
    near_adnexa = cv2.dilate(adnexa.astype(np.uint8), _disk(5 / um)).astype(bool)
    epi = _remove_small(epi, spec.epi_min_um2 / um**2)

    # --- stratum corneum: keratin next to the epidermis (glass between lamellae included)
    ker = (cls_map == CORNEUM) & ~ink
    ker = cv2.morphologyEx(ker.astype(np.uint8), cv2.MORPH_CLOSE, _disk(spec.corneum_close_um / um)).astype(bool)
    d_epi = cv2.distanceTransform((~epi).astype(np.uint8), cv2.DIST_L2, 5) * um
    ker &= (d_epi <= spec.corneum_band_um) & ~epi & ~near_adnexa
    ker = _fill_small_holes(ker, 100 / um**2)
    ker &= ~epi
    if spec.exclude_corneum:
        ker &= ~_poly_mask(shape, spec.exclude_corneum, grid)
    ker = _remove_small(ker, spec.corneum_min_um2 / um**2)
    # the corneum faces the glass (outside the skin, or a keratin-filled cavity): drop keratin-like
    # specks inside the dermis, which face at most a small cleft
    big_glass = _remove_small(glass & ~tissue_any, spec.glass_min_um2 / um**2)
    near_glass = cv2.dilate(big_glass.astype(np.uint8), _disk(4 / um)).astype(bool)
    n, cc = cv2.connectedComponents(ker.astype(np.uint8), connectivity=8)
    touching = np.unique(cc[near_glass & ker])
    ker = np.isin(cc, touching[touching > 0])

    masks = {"epidermis": epi, "stratum_corneum": ker}
    if adnexa.any():
        masks["adnexa"] = _remove_small(adnexa, spec.epi_min_um2 / um**2)
    feats: list[dict] = []
    for name, m in masks.items():
        feats.extend(mask_features(spec, name, m, grid, len(feats)))
    return Result(spec, rgb, grid, masks, feats, time.time() - t0, dims)


def mask_features(spec: SlideSpec, name: str, mask: np.ndarray, grid: Grid, start: int) -> list[dict]:
    """One GeoJSON Feature per outer contour (with its holes), level-0 pixels."""
    cs, hier = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    out: list[dict] = []
    if len(cs) == 0:
        return out
    hier = hier[0]
    tol = 1.0 / spec.work_mpp  # 1 µm

    def ring(c: np.ndarray) -> list[list[float]] | None:
        c = cv2.approxPolyDP(c, tol, True).reshape(-1, 2).astype(np.float64)
        if len(c) < 3:
            return None
        pts = np.stack([grid.ox + (c[:, 0] + 0.5) * grid.fx, grid.oy + (c[:, 1] + 0.5) * grid.fy], 1)
        lst = np.round(pts, 1).tolist()
        lst.append(lst[0])
        return lst

    for i, c in enumerate(cs):
        if hier[i][3] != -1:
            continue
        ext = ring(c)
        if ext is None:
            continue
        rings = [ext]
        j = hier[i][2]
        while j != -1:
            hr = ring(cs[j])
            if hr is not None and cv2.contourArea(cs[j]) >= 4:
                rings.append(hr)
            j = hier[j][0]
        k = start + len(out)
        fid = uuid.UUID(bytes=hashlib.sha256(f"{spec.out_name}/{name}/{k}".encode()).digest()[:16], version=4)
        out.append(
            {
                "type": "Feature",
                "id": str(fid),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": list(COLORS[name])},
                },
            }
        )
    return out


def polygon_area_l0(features: list[dict], name: str) -> float:
    """Sum of polygon areas (exterior minus holes) of a class, level-0 px²."""
    tot = 0.0
    for f in features:
        if f["properties"]["classification"]["name"] != name:
            continue
        for k, r in enumerate(f["geometry"]["coordinates"]):
            a = np.asarray(r)
            s = 0.5 * abs(float(np.dot(a[:-1, 0], a[1:, 1]) - np.dot(a[1:, 0], a[:-1, 1])))
            tot += s if k == 0 else -s
    return tot


def _outline(img: np.ndarray, masks: dict[str, np.ndarray], thick: int) -> np.ndarray:
    out = img.copy()
    for name, m in masks.items():
        m8 = m.astype(np.uint8)
        if m8.shape != img.shape[:2]:
            m8 = np.asarray(cv2.resize(m8, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST), np.uint8)
        cs, _ = cv2.findContours(m8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, cs, -1, COLORS[name], thick, lineType=cv2.LINE_8)
    return out


def render(res: Result, path: Path, margin_um: float = 150.0) -> None:
    """Overview (annotated area, ``overview_mpp``) + zoomed crops (work resolution) with outlines.

    Saved as a palette PNG whose palette holds the outline colours exactly (thin lines survive).
    """
    rgb, um, overview_mpp = res.rgb, res.spec.work_mpp, res.spec.preview_mpp
    union = np.zeros(rgb.shape[:2], bool)
    for m in res.masks.values():
        union |= m
    ys, xs = np.nonzero(union)
    mg = int(margin_um / um)
    x0, x1 = max(0, xs.min() - mg), min(rgb.shape[1], xs.max() + mg)
    y0, y1 = max(0, ys.min() - mg), min(rgb.shape[0], ys.max() + mg)
    s = um / overview_mpp
    base = cv2.resize(rgb[y0:y1, x0:x1], (int((x1 - x0) * s), int((y1 - y0) * s)), interpolation=cv2.INTER_AREA)
    ov = _outline(base, {k: v[y0:y1, x0:x1] for k, v in res.masks.items()}, 2)
    crops, bases = [], []
    for i, (a0, b0, a1, b1) in enumerate(res.spec.zooms):
        (fa, fb), (fc, fd) = res.grid.to_work(a0, b0), res.grid.to_work(a1, b1)
        a, b, c, d = int(fa), int(fb), int(fc), int(fd)
        crop = _outline(rgb[b:d, a:c], {k: v[b:d, a:c] for k, v in res.masks.items()}, 2)
        bases.append(rgb[b:d, a:c])
        cv2.rectangle(crop, (0, 0), (crop.shape[1] - 1, crop.shape[0] - 1), (0, 0, 0), 1)
        cv2.putText(crop, str(i + 1), (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
        crops.append(crop)
        r0 = (int((a - x0) * s), int((b - y0) * s))
        r1 = (int((c - x0) * s), int((d - y0) * s))
        cv2.rectangle(ov, r0, r1, (0, 0, 0), 1)
        cv2.putText(ov, str(i + 1), (r0[0] + 3, r0[1] + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    col_w = max(cr.shape[1] for cr in crops)
    col_h = sum(cr.shape[0] for cr in crops) + 6 * (len(crops) - 1)
    h = max(ov.shape[0], col_h)
    top = 44
    canvas = np.full((h + top, ov.shape[1] + col_w + 10, 3), 255, np.uint8)
    canvas[top : top + ov.shape[0], : ov.shape[1]] = ov
    y = top
    for cr in crops:
        canvas[y : y + cr.shape[0], ov.shape[1] + 10 : ov.shape[1] + 10 + cr.shape[1]] = cr
        y += cr.shape[0] + 6
    legend = (
        f"{res.spec.out_name}: epidermis (green), stratum_corneum (orange), adnexa (purple)",
        f"left: {overview_mpp:g} um/px; right: crops 1-{len(crops)} at {um:g} um/px",
    )
    for i, line in enumerate(legend):
        cv2.putText(canvas, line, (4, 17 + 19 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    # palette: 240 colours of the tissue + the outline colours, black and white, exactly
    sample = np.concatenate([base.reshape(-1, 3)] + [b.reshape(-1, 3) for b in bases])[::3]
    pal_img = Image.fromarray(sample.reshape(1, -1, 3)).quantize(colors=240, method=Image.Quantize.MEDIANCUT)
    pal = list(pal_img.getpalette() or [])[: 240 * 3]
    pal += [v for c in (*COLORS.values(), (0, 0, 0), (255, 255, 255)) for v in c]
    pal += [0] * (768 - len(pal))
    p_img = Image.new("P", (1, 1))
    p_img.putpalette(pal)
    Image.fromarray(canvas).quantize(palette=p_img, dither=Image.Dither.NONE).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=Path, default=SHARED_SLIDES, help="../shared/data/slides")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "real_skin" / "annotations")
    ap.add_argument("--docs", type=Path, default=REPO / "docs")
    ap.add_argument("--only", choices=sorted(SPECS), action="append")
    ap.add_argument("--no-preview", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.only or list(SPECS):
        spec = SPECS[key]
        res = segment(spec, args.slides)
        fc = {"type": "FeatureCollection", "features": res.features}
        (args.out / f"{spec.out_name}.geojson").write_text(json.dumps(fc, separators=(",", ":")) + "\n")
        line = [f"{spec.out_name}: {res.seconds:.1f} s"]
        for name in res.masks:
            n = sum(f["properties"]["classification"]["name"] == name for f in res.features)
            a = polygon_area_l0(res.features, name) * spec.mpp**2 / 1e6
            line.append(f"{name} {a:.4f} mm² ({n} polygons)")
        print("; ".join(line))
        if not args.no_preview:
            render(res, args.docs / spec.preview)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
