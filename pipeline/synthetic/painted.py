"""NME patterns painted onto real normal skin, with ground-truth polygons of exactly the painted pixels.

No annotated NME slide exists, so this module takes crops of real skin whose epidermis and
stratum corneum are annotated (a slide set such as ``data/real_skin``: ``labels.csv`` with
``slide_id, path, mpp`` and ``annotations/<slide_id>.geojson`` with ``epidermis`` (living
layers), ``stratum_corneum`` and ``adnexa``) and paints pallor, necrolysis and parakeratosis into
their upper epidermis in the slide's own stain (:mod:`.paint_ops`).

Output layout (the same as :mod:`.dataset`)::

    slides/<slide_id>.tiff            pyramidal JPEG-tiled TIFF at ``mpp``, resolution tags set
    annotations/<slide_id>.geojson    QuPath FeatureCollection, level-0 px: epidermis (corneum surface to
                                      the dermo-epidermal junction, as the synthetic set), pallor,
                                      necrolysis, parakeratosis
    labels.csv                        LABEL_COLUMNS (patient_id = slide_id)
    manifest.json                     {"generator": "painted", "version", "n", "seed", "mpp", ...}

Per slide: a crop of 1.2-2.0 mm (smaller where the source is smaller) centred on annotated
epidermis, the diagnosis from :data:`DEFAULT_PAINT_MIX`, and for patterned slides one to three
segments per pattern along the epidermal surface. Geometry is worked out on a ~2 µm grid: the
relative depth in the living epidermis from the corneum/glass side (``r`` = 0 at the top, 1 at
the dermo-epidermal junction), and geodesic distances along the surface band (segments follow
the surface round bends and never jump across a cavity). Necrolysis is a band at the top of the
living epidermis inside a pallor segment; pallor lies below it (or at the top where there is no
necrolysis), so the polygons do not overlap; parakeratosis is the corneum of its segment, with a
compact new layer laid on the glass where the corneum is thin or missing (that layer is added to
the ``epidermis`` polygon as well). Pixels more than :data:`~.paint_ops.FEATHER_PX` px outside a
pattern polygon are bit-identical to the source crop before JPEG.

Every file is written atomically; the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.io import atomic_path, atomic_write_json, atomic_write_text
from pipeline.reading.slide import Slide, open_slide
from pipeline.synthetic.catalog import CLASS_COLORS, DIAGNOSIS_SPECS, PATTERNS, SITES
from pipeline.synthetic.dataset import LABEL_COLUMNS, check_mpp, prepare_out
from pipeline.synthetic.paint_ops import (
    StainModel,
    composite,
    disk,
    gauss,
    measure_stain,
    od_to_rgb,
    paint_necrolysis,
    paint_pallor,
    paint_parakeratosis,
    rgb_to_od,
    smooth_noise,
    smoothstep,
)
from pipeline.synthetic.tiff_writer import write_pyramid
from pipeline.tiles.annotations import read_annotations

log = logging.getLogger(__name__)

PAINTED_VERSION = "1.0"
#: Share of each painted diagnosis when a set is drawn without ``mix``.
DEFAULT_PAINT_MIX: dict[str, float] = {
    "nme": 0.35,
    "nme_subtle": 0.15,
    "normal": 0.30,
    "pallor_only": 0.10,
    "parakeratosis_only": 0.10,
}
#: Crop width range, µm (the height is 0.7-1.0 of it); clipped to the source slide.
CROP_WIDTH_UM: tuple[float, float] = (1200.0, 2000.0)
#: Geometry grid, µm per px (segments, relative depth, orientation).
GEOMETRY_UM = 2.0
#: A pattern covering less than this (µm²) is dropped, not painted.
MIN_PATTERN_UM2 = 300.0
#: Polygon components smaller than this (µm²) are removed from a zone before painting.
MIN_PIECE_UM2 = 40.0
_SOURCE_CLASSES = ("epidermis", "stratum_corneum", "adnexa")
_ATTEMPTS = 6
#: Distance (µm) over which a pattern fades in from unpainted tissue of the same kind, inside its polygon.
_FADE_UM = {"pallor": 4.0, "necrolysis": 5.0, "parakeratosis": 5.0}


@dataclass(frozen=True)
class PaintSpec:
    """What a painted diagnosis contains.

    ``severity``: slide-level range (per segment jittered by ±15 %); ``coverage``: fraction of
    the crop's epidermal surface per pattern (for necrolysis: of each pallor segment it sits in);
    ``segments``: number of segments per pattern.
    """

    patterns: tuple[str, ...]
    severity: tuple[float, float]
    coverage: dict[str, tuple[float, float]]
    segments: tuple[int, int]
    nme_pattern: bool
    sites: dict[str, float]


_NME_SITES = dict(DIAGNOSIS_SPECS["nme"].sites)
PAINT_SPECS: dict[str, PaintSpec] = {
    "nme": PaintSpec(
        PATTERNS,
        (0.45, 1.0),
        {"pallor": (0.25, 0.7), "necrolysis": (0.4, 0.85), "parakeratosis": (0.25, 0.7)},
        (1, 3),
        True,
        _NME_SITES,
    ),
    "nme_subtle": PaintSpec(
        PATTERNS,
        (0.15, 0.35),
        {"pallor": (0.15, 0.45), "necrolysis": (0.35, 0.7), "parakeratosis": (0.15, 0.45)},
        (1, 2),
        True,
        _NME_SITES,
    ),
    "normal": PaintSpec((), (0.0, 0.0), {}, (0, 0), False, dict.fromkeys(SITES, 1.0)),
    "pallor_only": PaintSpec(("pallor",), (0.15, 1.0), {"pallor": (0.2, 0.6)}, (1, 3), False, _NME_SITES),
    "parakeratosis_only": PaintSpec(
        ("parakeratosis",),
        (0.15, 1.0),
        {"parakeratosis": (0.35, 0.85)},
        (1, 2),
        False,
        dict(DIAGNOSIS_SPECS["psoriasiform"].sites),
    ),
}
PAINT_DIAGNOSES: tuple[str, ...] = tuple(PAINT_SPECS)


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A real slide to paint on: file, resolution override, annotation file."""

    slide_id: str
    path: Path
    mpp: float | None
    annotations: Path
    rel_path: str = ""  # as written in the table


def read_sources(sources_root: str | Path) -> list[Source]:
    """The slides of a real-skin slide set (``labels.csv`` + ``annotations/<slide_id>.geojson``)."""
    root = Path(sources_root)
    table = root / "labels.csv"
    if not table.is_file():
        raise ConfigError(f"{table}: painted-data sources need a labels.csv (slide_id, path, mpp) in {root}")
    out = []
    with open(table, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            sid = (row.get("slide_id") or "").strip()
            rel = (row.get("path") or "").strip()
            if not sid:
                continue
            ann = root / "annotations" / f"{sid}.geojson"
            if not ann.is_file():
                log.warning("%s: no annotations (%s); not used for painting", sid, ann)
                continue
            path = (root / rel).resolve() if rel else root / "slides" / f"{sid}.tiff"
            if not path.exists():
                raise ConfigError(f"{table}: slide {sid}: file not found: {path}")
            mpp_txt = (row.get("mpp") or "").strip()
            try:
                mpp = float(mpp_txt) if mpp_txt else None
            except ValueError:
                raise ConfigError(f"{table}: slide {sid}: mpp {mpp_txt!r} is not a number") from None
            out.append(Source(sid, path, mpp, ann, rel))
    if not out:
        raise ConfigError(f"{table}: no slide with annotations to paint on")
    return out


@dataclass
class OpenSource:
    """An opened source slide with its annotation polygons (level-0 px) and candidate crop centres."""

    source: Source
    slide: Slide
    polygons: dict[str, list[tuple[np.ndarray, list[np.ndarray]]]]
    centres: np.ndarray  # (K, 2) level-0 px: points in the epidermis

    @classmethod
    def open(cls, source: Source) -> OpenSource:
        slide = open_slide(source.path, mpp=source.mpp)
        anns = read_annotations(source.annotations, _SOURCE_CLASSES)
        polys: dict[str, list[tuple[np.ndarray, list[np.ndarray]]]] = {k: [] for k in _SOURCE_CLASSES}
        for a in anns:
            polys[a.class_name].append((a.exterior, a.holes))
        if not polys["epidermis"]:
            raise ConfigError(f"{source.annotations}: no epidermis polygon to paint on")
        # candidate centres: epidermis pixels on an 8 µm grid
        step = 8.0 / slide.mpp
        w0, h0 = slide.dimensions
        gw, gh = int(math.ceil(w0 / step)), int(math.ceil(h0 / step))
        m = rasterise(polys["epidermis"], (gh, gw), (0.0, 0.0), step)
        ys, xs = np.nonzero(m)
        centres = np.stack([(xs + 0.5) * step, (ys + 0.5) * step], 1)
        return cls(source, slide, polys, centres)

    def close(self) -> None:
        self.slide.close()


def rasterise(
    polys: Sequence[tuple[np.ndarray, list[np.ndarray]]],
    shape: tuple[int, int],
    origin: tuple[float, float],
    scale: float,
) -> np.ndarray:
    """bool mask (h, w) of polygons given in level-0 px; crop pixel = (level-0 - origin) / scale."""
    out = np.zeros(shape, np.uint8)
    ox, oy = origin
    shift = 4
    k = float(1 << shift)

    def ring(r: np.ndarray) -> np.ndarray:
        xy = np.empty_like(r)
        xy[:, 0] = (r[:, 0] - ox) / scale - 0.5
        xy[:, 1] = (r[:, 1] - oy) / scale - 0.5
        return np.round(xy * k).astype(np.int32).reshape(-1, 1, 2)

    h, w = shape
    for ext, holes in polys:
        lo = (ext.min(0) - (ox, oy)) / scale
        hi = (ext.max(0) - (ox, oy)) / scale
        if hi[0] < -1 or hi[1] < -1 or lo[0] > w + 1 or lo[1] > h + 1:
            continue
        tmp = np.zeros(shape, np.uint8)
        cv2.fillPoly(tmp, [ring(ext)], 1, lineType=cv2.LINE_8, shift=shift)
        if holes:
            cv2.fillPoly(tmp, [ring(hh) for hh in holes], 0, lineType=cv2.LINE_8, shift=shift)
        out |= tmp
    return out.astype(bool)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PaintPlan:
    """One painted slide: identity, diagnosis, site, source and seed."""

    index: int
    slide_id: str
    diagnosis: str
    site: str
    source: int
    seed: int


def _allocate(n: int, weights: Mapping[str, float]) -> list[str]:
    names = list(weights)
    w = np.array([float(weights[k]) for k in names], dtype=np.float64)
    share = w / w.sum() * n
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    return [name for name, c in zip(names, counts) for _ in range(c)]


def check_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    """Validated diagnosis weights (default :data:`DEFAULT_PAINT_MIX`)."""
    if mix is None:
        return dict(DEFAULT_PAINT_MIX)
    out = {}
    for k, v in mix.items():
        if k not in PAINT_SPECS:
            raise ConfigError(f"unknown painted diagnosis {k!r}; choose from " + ", ".join(PAINT_DIAGNOSES))
        fv = float(v)
        if not math.isfinite(fv) or fv < 0:
            raise ConfigError(f"painted mix weight of {k} must be >= 0, got {v!r}")
        if fv > 0:
            out[k] = fv
    if not out:
        raise ConfigError("painted mix has no positive weight")
    return out


def plan_painted(n: int, seed: int, n_sources: int, mix: Mapping[str, float] | None = None) -> list[PaintPlan]:
    """Identity, diagnosis, site, source and seed of every painted slide (cheap, deterministic)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    weights = check_mix(mix)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9A17]))
    dx = _allocate(int(n), weights)
    rng.shuffle(dx)
    src = [int(s) for s in _allocate(int(n), {str(i): 1.0 for i in range(n_sources)})]
    rng.shuffle(src)
    plans = []
    for i in range(int(n)):
        sites = PAINT_SPECS[dx[i]].sites
        keys = [s for s in SITES if s in sites]
        p = np.array([sites[s] for s in keys], np.float64)
        site = str(rng.choice(keys, p=p / p.sum()))
        slide_seed = int(np.random.SeedSequence([int(seed), i, 0x5EED]).generate_state(1, np.uint64)[0] >> 1)
        plans.append(PaintPlan(i, f"PNT{seed}-{i + 1:04d}", dx[i], site, src[i], slide_seed))
    return plans


# ----------------------------------------------------------------------------- crop + geometry


@dataclass
class Crop:
    """A crop of a source slide at the painting resolution, with its annotation masks."""

    rgb: np.ndarray
    px_um: float  # µm per crop pixel
    origin: tuple[float, float]  # level-0 px of the source
    scale: float  # source level-0 px per crop px
    epidermis: np.ndarray
    corneum: np.ndarray
    adnexa: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def load_crop(src: OpenSource, centre: tuple[float, float], size_um: tuple[float, float], mpp: float) -> Crop:
    """Read a crop of ``size_um`` around ``centre`` (level-0 px) at ``mpp`` or the source's own finer limit."""
    slide = src.slide
    plan = slide.plan(max(mpp, slide.mpp))
    px_um = plan.effective_mpp
    scale = px_um / slide.mpp
    w0, h0 = slide.dimensions
    w = max(64, min(int(round(size_um[0] / px_um)), int(w0 / scale)))
    h = max(64, min(int(round(size_um[1] / px_um)), int(h0 / scale)))
    x0 = float(np.clip(centre[0] - w * scale / 2, 0, max(w0 - w * scale, 0)))
    y0 = float(np.clip(centre[1] - h * scale / 2, 0, max(h0 - h * scale, 0)))
    x0, y0 = float(int(x0)), float(int(y0))
    rgb = np.ascontiguousarray(slide.read_region((int(x0), int(y0)), (w, h), plan))
    masks = {k: rasterise(src.polygons[k], (h, w), (x0, y0), scale) for k in _SOURCE_CLASSES}
    epi = masks["epidermis"]
    corneum = masks["stratum_corneum"] & ~epi
    if corneum.any():
        # slivers between the two outlines (they were traced separately) belong to the corneum
        k = disk(2.5 / px_um)
        union = cv2.morphologyEx((epi | corneum).astype(np.uint8), cv2.MORPH_CLOSE, k).astype(bool)
        near_c = cv2.dilate(corneum.astype(np.uint8), k).astype(bool)
        corneum |= union & near_c & ~epi & ~masks["adnexa"]
    return Crop(rgb, px_um, (x0, y0), scale, epi, corneum, masks["adnexa"])


def _down(img: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Area-average ``f``-fold downsample (float32) of a bool mask or uint8 image, edge-padded to ``shape`` * f."""
    h, w = shape
    a = img.astype(np.uint8) * np.uint8(255) if img.dtype == bool else np.ascontiguousarray(img)
    a = cv2.copyMakeBorder(a, 0, h * f - a.shape[0], 0, w * f - a.shape[1], cv2.BORDER_REPLICATE)
    out = cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    return out / 255.0 if img.dtype == bool else out


def _dt(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (px) of every pixel to the nearest ``mask`` pixel (large where there is none)."""
    if not mask.any():
        return np.full(mask.shape, 1e6, np.float32)
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)


@dataclass
class Geometry:
    """Fields on the coarse grid (``f`` crop px per cell, ``g`` µm per cell)."""

    f: int
    g: float
    shape: tuple[int, int]
    epidermis: np.ndarray
    corneum: np.ndarray
    glass: np.ndarray
    dermis: np.ndarray  # tissue below the epidermis (not glass, corneum or keratin flakes near them)
    r: np.ndarray  # relative depth in the living epidermis: 0 top, 1 junction
    d_top: np.ndarray  # µm to the corneum / glass side
    angle: np.ndarray  # radians of the local surface direction
    surface: np.ndarray  # cells of the living epidermis touching corneum or glass
    node: np.ndarray  # band cell -> graph node (-1 outside the band)
    graph: object  # scipy sparse matrix of the band

    def geodesic(self, seed_cell: int, limit_um: float) -> np.ndarray:
        """µm along the band from ``seed_cell`` (flat coarse index) to every cell (inf outside / beyond)."""
        start = int(self.node.ravel()[seed_cell])
        d = dijkstra(self.graph, directed=False, indices=start, limit=limit_um)
        out = np.full(self.node.size, np.inf, np.float32)
        flat = self.node.ravel()
        inside = flat >= 0
        out[inside] = d[flat[inside]]
        return out.reshape(self.shape)

    def up(self, field_c: np.ndarray, box: tuple[int, int, int, int], interp: int = cv2.INTER_LINEAR) -> np.ndarray:
        """``field_c`` upsampled to crop px over ``box`` = (y0, y1, x0, x1) (crop px)."""
        y0, y1, x0, x1 = box
        f = self.f
        cy0, cx0 = max(y0 // f - 1, 0), max(x0 // f - 1, 0)
        cy1, cx1 = min(-(-y1 // f) + 1, self.shape[0]), min(-(-x1 // f) + 1, self.shape[1])
        sub = np.ascontiguousarray(field_c[cy0:cy1, cx0:cx1], dtype=np.float32)
        big = cv2.resize(sub, ((cx1 - cx0) * f, (cy1 - cy0) * f), interpolation=interp)
        return big[y0 - cy0 * f : y1 - cy0 * f, x0 - cx0 * f : x1 - cx0 * f]


def build_geometry(crop: Crop) -> Geometry:
    h, w = crop.shape
    f = max(1, int(round(GEOMETRY_UM / crop.px_um)))
    g = crop.px_um * f
    hc, wc = -(-h // f), -(-w // f)
    e = _down(crop.epidermis, f, (hc, wc)) > 0.5
    c = (_down(crop.corneum, f, (hc, wc)) > 0.5) & ~e
    a = _down(crop.adnexa, f, (hc, wc)) > 0.2
    rgb_c = _down(crop.rgb, f, (hc, wc))
    od = rgb_to_od(np.clip(rgb_c + 0.5, 0, 255).astype(np.uint8)).sum(-1)
    od = gauss(od, 1.0)
    od_glass = float(np.percentile(od, 0.5))
    glass = (od < od_glass + 0.12) & ~e & ~c & ~a
    glass = cv2.morphologyEx(glass.astype(np.uint8), cv2.MORPH_OPEN, disk(1)).astype(bool)
    n_lab, lab, stats, _ = cv2.connectedComponentsWithStats(glass.astype(np.uint8), connectivity=8)
    big = stats[:, cv2.CC_STAT_AREA] * g * g >= 3000.0  # the glass around the section, not cracks in it
    big[0] = False
    glass = big[lab]
    top = c | glass
    d_top = _dt(top) * g
    # the tissue below the epidermis; not the slivers between the epidermis and corneum polygons, nor the
    # loose keratin between the annotated corneum and the glass
    dermis = ~(e | top) & (d_top > 8.0)
    d_bot = _dt(dermis) * g
    r = d_top / np.maximum(d_top + d_bot, 1e-3)
    d_epi = gauss(_dt(e) * g, 1.5)
    gy = cv2.Sobel(d_epi, cv2.CV_32F, 0, 1, ksize=3)
    gx = cv2.Sobel(d_epi, cv2.CV_32F, 1, 0, ksize=3)
    angle = (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)
    a_dil = cv2.dilate(a.astype(np.uint8), disk(max(1, round(4.0 / g)))).astype(bool)
    d_ec = _dt(e | c) * g
    band = ((e & (r < 0.8)) | c | (~dermis & ~e & (d_ec < 26.0))) & ~a_dil
    near_top = cv2.dilate(top.astype(np.uint8), disk(2)).astype(bool)
    surface = e & near_top & ~a_dil & band
    m = max(1, int(round(15.0 / g)))
    surface[:m] = surface[-m:] = False
    surface[:, :m] = surface[:, -m:] = False
    node = np.full((hc, wc), -1, np.int64)
    n_nodes = int(band.sum())
    node[band] = np.arange(n_nodes)
    rows, cols, wts = [], [], []
    for dy, dx, wt in ((0, 1, 1.0), (1, 0, 1.0), (1, 1, math.sqrt(2)), (1, -1, math.sqrt(2))):
        a0 = node[0 : hc - dy, max(0, -dx) : wc - max(0, dx)]
        a1 = node[dy:hc, max(0, dx) : wc - max(0, -dx)]
        ok = (a0 >= 0) & (a1 >= 0)
        rows.append(a0[ok])
        cols.append(a1[ok])
        wts.append(np.full(int(ok.sum()), wt * g))
    graph = coo_matrix(
        (np.concatenate(wts), (np.concatenate(rows), np.concatenate(cols))), shape=(n_nodes, n_nodes)
    ).tocsr()
    return Geometry(
        f, g, (hc, wc), e, c, glass, dermis, r.astype(np.float32), d_top.astype(np.float32), angle, surface, node, graph
    )


# ----------------------------------------------------------------------------- segments


@dataclass
class Segment:
    """A stretch of the surface band: ``margin`` µm inside its ends (>0 inside), coarse grid."""

    margin: np.ndarray
    ramp: float
    severity: float
    seed_cell: int
    reach: float

    def box(self, geom: Geometry, shape: tuple[int, int], pad_um: float = 12.0) -> tuple[int, int, int, int] | None:
        ys, xs = np.nonzero(self.margin > -pad_um)
        if ys.size == 0:
            return None
        p = int(math.ceil(pad_um / geom.g)) + 1
        f = geom.f
        y0, y1 = max((int(ys.min()) - p) * f, 0), min((int(ys.max()) + p + 1) * f, shape[0])
        x0, x1 = max((int(xs.min()) - p) * f, 0), min((int(xs.max()) + p + 1) * f, shape[1])
        return y0, y1, x0, x1


def pick_segments(
    geom: Geometry,
    rng: np.random.Generator,
    coverage: float,
    count: int,
    severity: float,
    within: Sequence[Segment] = (),
    near: Sequence[Segment] = (),
) -> list[Segment]:
    """``count`` segments covering about ``coverage`` of the surface cells (inside ``within`` if given)."""
    surf = np.flatnonzero(geom.surface.ravel())
    if surf.size < 5:
        return []
    target = coverage * surf.size
    if within:
        # nested (necrolysis in pallor): a share of each host segment
        segs = []
        for host in within:
            inside = surf[host.margin.ravel()[surf] > host.ramp * 0.5]
            if inside.size == 0:
                continue
            seed = int(rng.choice(inside))
            dist = geom.geodesic(seed, host.reach * 2 + 50.0)
            host_n = int((host.margin.ravel()[surf] > 0).sum())
            want = max(int(coverage * host_n), 3)
            ds = np.sort(dist.ravel()[surf][np.isfinite(dist.ravel()[surf])])
            reach = float(ds[min(want, ds.size) - 1]) if ds.size else 20.0
            reach = max(reach, 20.0)
            margin = np.minimum(reach - dist, host.margin)
            sev = float(np.clip(severity * rng.uniform(0.85, 1.15), 0.12, 1.0))
            segs.append(Segment(margin.astype(np.float32), float(np.clip(0.3 * reach, 10.0, 30.0)), sev, seed, reach))
        return segs
    shares = rng.dirichlet(np.full(count, 3.0)) * target
    taken: list[Segment] = []
    for share in shares:
        free = np.ones(surf.size, bool)
        for s in taken:
            free &= s.margin.ravel()[surf] < -25.0
        if near and rng.random() < 0.6:
            close = np.zeros(surf.size, bool)
            for s in near:
                close |= s.margin.ravel()[surf] > 0
            if (free & close).any():
                free &= close
        cand = surf[free]
        if cand.size == 0:
            break
        seed = int(rng.choice(cand))
        want = max(int(share), int(40.0 / geom.g))
        dist = geom.geodesic(seed, 2.5 * want * geom.g + 60.0)
        ds = np.sort(dist.ravel()[surf][np.isfinite(dist.ravel()[surf])])
        if ds.size == 0:
            continue
        reach = max(float(ds[min(want, ds.size) - 1]), 25.0)
        sev = float(np.clip(severity * rng.uniform(0.85, 1.15), 0.12, 1.0))
        margin = (reach - dist).astype(np.float32)
        taken.append(Segment(margin, float(np.clip(0.3 * reach, 12.0, 40.0)), sev, seed, reach))
    return taken


# ----------------------------------------------------------------------------- painting one crop


@dataclass
class PaintedCrop:
    """A painted crop at the painting resolution (``px_um``), before JPEG."""

    before: np.ndarray
    after: np.ndarray
    px_um: float
    zones: dict[str, np.ndarray]  # pattern -> bool mask (exactly the polygons' pixels)
    epidermis: np.ndarray  # bool: living epidermis + corneum + created corneum
    severity: dict[str, float]
    source: str
    origin: tuple[float, float]  # level-0 px of the source slide
    scale: float  # source level-0 px per painting px
    diagnosis: str
    timings: dict[str, float] = field(default_factory=dict)


def _clean(mask: np.ndarray, px_um: float) -> np.ndarray:
    n_lab, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n_lab <= 1:
        return mask
    keep = stats[:, cv2.CC_STAT_AREA] * px_um * px_um >= MIN_PIECE_UM2
    keep[0] = False
    return keep[lab]


def _inten(rng: np.random.Generator, taper: np.ndarray, px_um: float) -> np.ndarray:
    wob = 1.0 + 0.18 * smooth_noise(rng, taper.shape, 25.0 / px_um)
    return np.clip(np.power(taper, 0.6) * wob, 0.0, 1.0).astype(np.float32)


@dataclass
class _Zone:
    pattern: str
    box: tuple[int, int, int, int]
    mask: np.ndarray  # bool within box
    inten: np.ndarray
    severity: float
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def _band_zone(
    crop: Crop,
    geom: Geometry,
    seg: Segment,
    rng: np.random.Generator,
    depth: float,
    cap_um: float,
    exclude: np.ndarray | None,
    min_um: float = 0.0,
) -> _Zone | None:
    box = seg.box(geom, crop.shape)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    px = crop.px_um
    margin = geom.up(np.where(np.isfinite(seg.margin), seg.margin, -1e3), box)
    margin = margin + 5.0 * smooth_noise(rng, margin.shape, 12.0 / px)
    taper = np.clip(margin / seg.ramp, 0.0, 1.0)
    r = geom.up(geom.r, box)
    d_top = geom.up(geom.d_top, box)
    wob = 1.0 + 0.15 * smooth_noise(rng, margin.shape, 35.0 / px) + 0.1 * smooth_noise(rng, margin.shape, 5.0 / px)
    frac = depth * wob * (0.2 + 0.8 * np.sqrt(taper))
    e = crop.epidermis[y0:y1, x0:x1] & ~crop.adnexa[y0:y1, x0:x1]
    # a fraction of the local thickness, but at least ``min_um`` (thin epidermis) and at most ``cap_um``
    zone = e & (margin > 0) & ((r < frac) | (d_top < min_um * wob * np.sqrt(taper))) & (d_top < cap_um * wob)
    zone &= r < 0.85
    if exclude is not None:
        zone &= ~exclude[y0:y1, x0:x1]
    zone = _clean(zone, px)
    if not zone.any():
        return None
    return _Zone("", box, zone, _inten(rng, taper, px), seg.severity, {"taper": taper})


def _para_zone(crop: Crop, geom: Geometry, seg: Segment, rng: np.random.Generator) -> _Zone | None:
    box = seg.box(geom, crop.shape, pad_um=30.0)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    px = crop.px_um
    s = seg.severity
    margin = geom.up(np.where(np.isfinite(seg.margin), seg.margin, -1e3), box)
    margin = margin + 5.0 * smooth_noise(rng, margin.shape, 12.0 / px)
    taper = np.clip(margin / seg.ramp, 0.0, 1.0)
    e = crop.epidermis[y0:y1, x0:x1]
    c = crop.corneum[y0:y1, x0:x1]
    a = cv2.dilate(crop.adnexa[y0:y1, x0:x1].astype(np.uint8), disk(4.0 / px)).astype(bool)
    # outside the epidermis and corneum and not the dermis: glass or loose keratin (the new layer's place)
    outside = (geom.up(geom.dermis.astype(np.float32), box) < 0.5) & ~e & ~c
    d_e = _dt(e) * px
    d_c = _dt(c) * px
    wob = 1.0 + 0.25 * smooth_noise(rng, margin.shape, 15.0 / px) + 0.15 * smooth_noise(rng, margin.shape, 3.0 / px)
    t_add = rng.uniform(4.0, 14.0) * (0.4 + 0.6 * s) * wob * np.sqrt(taper)
    t_bare = rng.uniform(7.0, 14.0) * (0.6 + 0.4 * s) * wob * np.sqrt(taper)
    # the compact parakeratotic layer: the corneum up to t_para from the living epidermis (all of a thin
    # corneum; the inner part of a thick basket-weave one), thickened onto the glass where it is thin or absent
    t_para = (rng.uniform(12.0, 22.0) + 20.0 * s) * (1.0 + 0.2 * smooth_noise(rng, margin.shape, 20.0 / px))
    grow = np.where(d_c <= d_e + 1.0, d_c < t_add, d_e < t_bare)
    new = outside & grow & (margin > 0) & ~a & (d_e < t_para + 4.0)
    new = cv2.morphologyEx(new.astype(np.uint8), cv2.MORPH_CLOSE, disk(1.0 / px)).astype(bool) & ~e & ~c & ~a
    zone = ((c & (margin > 0) & (d_e < t_para)) | new) & ~a
    zone = _clean(zone, px)
    new &= zone
    if not zone.any():
        return None
    return _Zone("", box, zone, _inten(rng, taper, px), s, {"new": new, "depth": d_e, "taper": taper})


def _measure(crop: Crop, rng: np.random.Generator) -> StainModel:
    od = rgb_to_od(crop.rgb).sum(-1)
    glass = gauss(od, 1.0 / crop.px_um) < float(np.percentile(od, 0.5)) + 0.1
    tissue = ~(crop.epidermis | crop.corneum | crop.adnexa | glass)
    return measure_stain(crop.rgb, crop.epidermis, crop.corneum, glass & ~crop.epidermis & ~crop.corneum, tissue, rng)


def paint_crop(
    crop: Crop, diagnosis: str, rng: np.random.Generator, geom: Geometry | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """Paint ``diagnosis`` onto ``crop``: (painted RGB, zones, epidermis incl. new corneum, severities)."""
    spec = PAINT_SPECS[diagnosis]
    h, w = crop.shape
    zones_full = {p: np.zeros((h, w), bool) for p in PATTERNS}
    epi = crop.epidermis | crop.corneum
    if not spec.patterns:
        return crop.rgb.copy(), zones_full, epi, {}
    stain = _measure(crop, rng)
    geom = geom or build_geometry(crop)
    px = crop.px_um
    sev = float(rng.uniform(*spec.severity))
    severity: dict[str, float] = {}
    zones: list[_Zone] = []

    # segments
    pal_segs: list[Segment] = []
    if "pallor" in spec.patterns:
        k = int(rng.integers(spec.segments[0], spec.segments[1] + 1))
        pal_segs = pick_segments(geom, rng, rng.uniform(*spec.coverage["pallor"]), k, sev)
    nec_segs: list[Segment] = []
    if "necrolysis" in spec.patterns:
        hosts = pal_segs if pal_segs else []
        if hosts:
            chosen = [s for s in hosts if rng.random() < 0.75] or [hosts[int(rng.integers(len(hosts)))]]
            nec_segs = pick_segments(geom, rng, rng.uniform(*spec.coverage["necrolysis"]), 1, sev, within=chosen)
        else:
            nec_segs = pick_segments(geom, rng, rng.uniform(0.1, 0.3), 1, sev)
    para_segs: list[Segment] = []
    if "parakeratosis" in spec.patterns:
        k = int(rng.integers(spec.segments[0], spec.segments[1] + 1))
        para_segs = pick_segments(geom, rng, rng.uniform(*spec.coverage["parakeratosis"]), k, sev, near=pal_segs)

    # zones: necrolysis first (top band), then pallor below it, then the corneum
    nec_depth = rng.uniform(0.28, 0.45)
    for seg in nec_segs:
        z = _band_zone(crop, geom, seg, rng, nec_depth, rng.uniform(25.0, 40.0), None, rng.uniform(8.0, 14.0))
        if z is not None:
            z.pattern = "necrolysis"
            y0, y1, x0, x1 = z.box
            zones_full["necrolysis"][y0:y1, x0:x1] |= z.mask
            zones.append(z)
    pal_depth = rng.uniform(0.55, 0.75) if nec_segs else rng.uniform(0.38, 0.55)
    for seg in pal_segs:
        z = _band_zone(
            crop, geom, seg, rng, pal_depth, rng.uniform(45.0, 75.0), zones_full["necrolysis"], rng.uniform(18.0, 28.0)
        )
        if z is not None:
            z.pattern = "pallor"
            y0, y1, x0, x1 = z.box
            z.mask &= ~zones_full["pallor"][y0:y1, x0:x1]
            zones_full["pallor"][y0:y1, x0:x1] |= z.mask
            zones.append(z)
    for seg in para_segs:
        z = _para_zone(crop, geom, seg, rng)
        if z is not None:
            z.pattern = "parakeratosis"
            y0, y1, x0, x1 = z.box
            z.mask &= ~zones_full["parakeratosis"][y0:y1, x0:x1]
            z.extra["new"] &= z.mask
            zones_full["parakeratosis"][y0:y1, x0:x1] |= z.mask
            zones.append(z)

    # drop patterns too small to count (never painted, never annotated)
    for p in PATTERNS:
        if zones_full[p].sum() * px * px < MIN_PATTERN_UM2:
            zones_full[p][:] = False
            zones = [z for z in zones if z.pattern != p]

    out = crop.rgb.copy()
    order = {"parakeratosis": 0, "necrolysis": 1, "pallor": 2}
    for z in sorted(zones, key=lambda z: order[z.pattern]):
        _paint_zone(out, crop, geom, z, stain, rng, zones_full)
        severity[z.pattern] = max(severity.get(z.pattern, 0.0), z.severity)
        if z.pattern == "parakeratosis":
            y0, y1, x0, x1 = z.box
            epi[y0:y1, x0:x1] |= z.extra["new"]
    return out, zones_full, epi, severity


def _paint_zone(
    out: np.ndarray,
    crop: Crop,
    geom: Geometry,
    z: _Zone,
    stain: StainModel,
    rng: np.random.Generator,
    zones_full: dict[str, np.ndarray],
) -> None:
    y0, y1, x0, x1 = z.box
    px = crop.px_um
    rgb = out[y0:y1, x0:x1]
    conc0 = stain.to_conc(rgb_to_od(rgb))
    # fade in from the unpainted tissue of the same kind (lateral ends, lower edge): no hard edge
    if z.pattern == "parakeratosis":
        same = crop.corneum[y0:y1, x0:x1] & ~zones_full["parakeratosis"][y0:y1, x0:x1]
    elif z.pattern == "necrolysis":  # also fades into the pallor below it
        same = crop.epidermis[y0:y1, x0:x1] & ~zones_full["necrolysis"][y0:y1, x0:x1]
    else:
        same = crop.epidermis[y0:y1, x0:x1] & ~(
            zones_full["pallor"][y0:y1, x0:x1] | zones_full["necrolysis"][y0:y1, x0:x1]
        )
    ragged = 0.4 * _FADE_UM[z.pattern] * smooth_noise(rng, same.shape, 3.0 / px)
    fade = smoothstep(_dt(same) * px + ragged, 0.0, _FADE_UM[z.pattern])
    inten = z.inten * z.mask * fade
    if z.pattern == "pallor":
        painted = paint_pallor(conc0, z.mask, inten, z.severity, stain, px, rng)
    elif z.pattern == "necrolysis":
        viable = crop.epidermis[y0:y1, x0:x1] & ~zones_full["necrolysis"][y0:y1, x0:x1]
        painted = paint_necrolysis(conc0, z.mask, inten, z.severity, stain, px, rng, viable, z.extra["taper"] > 0.7)
    else:
        f = geom.f
        yy = np.clip(np.arange(y0, y1) // f, 0, geom.shape[0] - 1)
        xx = np.clip(np.arange(x0, x1) // f, 0, geom.shape[1] - 1)
        ang = geom.angle[np.ix_(yy, xx)]
        painted = paint_parakeratosis(
            conc0, z.mask, inten, z.severity, stain, px, rng, z.extra["new"], z.extra["depth"], ang
        )
    blended, wgt = composite(conc0, painted, z.mask)
    new_rgb = od_to_rgb(stain.to_od(blended))
    touch = wgt > 0
    rgb[touch] = new_rgb[touch]


# ----------------------------------------------------------------------------- one slide


def _crop_size(rng: np.random.Generator, crop_um: tuple[float, float] | None) -> tuple[float, float]:
    if crop_um is not None:
        return float(crop_um[0]), float(crop_um[1])
    wd = rng.uniform(*CROP_WIDTH_UM)
    return wd, wd * rng.uniform(0.7, 1.0)


def paint_slide(
    plan: PaintPlan, src: OpenSource, mpp: float, crop_um: tuple[float, float] | None = None
) -> PaintedCrop:
    """Choose the crop of ``plan`` and paint it (retrying other positions if a pattern does not fit)."""
    rng = np.random.default_rng(plan.seed)
    spec = PAINT_SPECS[plan.diagnosis]
    best: PaintedCrop | None = None
    for _attempt in range(_ATTEMPTS):
        t0 = time.perf_counter()
        size = _crop_size(rng, crop_um)
        c = src.centres[int(rng.integers(len(src.centres)))]
        jitter = rng.uniform(-0.15, 0.15, 2) * np.array(size) / src.slide.mpp
        crop = load_crop(src, (float(c[0] + jitter[0]), float(c[1] + jitter[1])), size, mpp)
        t1 = time.perf_counter()
        after, zones, epi, sev = paint_crop(crop, plan.diagnosis, rng)
        t2 = time.perf_counter()
        painted = PaintedCrop(
            crop.rgb,
            after,
            crop.px_um,
            zones,
            epi,
            sev,
            src.source.slide_id,
            crop.origin,
            crop.scale,
            plan.diagnosis,
            {"read": t1 - t0, "paint": t2 - t1},
        )
        got = {p for p in PATTERNS if zones[p].any()}
        if got >= set(spec.patterns) and epi.sum() * crop.px_um**2 > 5000.0:
            return painted
        if best is None or len(got) > len({p for p in PATTERNS if best.zones[p].any()}):
            best = painted
    assert best is not None
    log.warning("%s: could not paint every pattern of %s on %s", plan.slide_id, plan.diagnosis, src.source.slide_id)
    return best


# ----------------------------------------------------------------------------- annotations


def mask_polygons(mask: np.ndarray, scale: float, min_area_px: float = 4.0) -> list[list[list[list[float]]]]:
    """GeoJSON polygon coordinates (rings of [x, y], exterior then holes) of a bool mask.

    Pixel (i, j) covers [j, j+1) x [i, i+1); output = crop px * ``scale``.
    """
    m = np.ascontiguousarray(mask.astype(np.uint8))
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    hier = np.asarray(hierarchy).reshape(-1, 4)
    out = []

    def ring(cnt: np.ndarray) -> list[list[float]] | None:
        c = cv2.approxPolyDP(cnt, 0.6, True).reshape(-1, 2).astype(np.float64)
        if len(c) < 3:
            return None
        pts = np.round((c + 0.5) * scale, 2).tolist()
        pts.append(pts[0])
        return pts

    for i, cnt in enumerate(contours):
        if hier[i][3] != -1 or cv2.contourArea(cnt) < min_area_px:
            continue
        ext = ring(cnt)
        if ext is None:
            continue
        rings = [ext]
        child = hier[i][2]
        while child != -1:
            if cv2.contourArea(contours[child]) >= min_area_px:
                hr = ring(contours[child])
                if hr is not None:
                    rings.append(hr)
            child = hier[child][0]
        out.append(rings)
    return out


def feature_collection(painted: PaintedCrop, scale: float, uuid_seed: int) -> dict:
    """QuPath FeatureCollection of the epidermis and the painted patterns, level-0 px of the output."""
    rng = np.random.default_rng(uuid_seed)
    feats = []
    min_px = MIN_PIECE_UM2 / 4 / painted.px_um**2
    for name, mask in [("epidermis", painted.epidermis)] + [(p, painted.zones[p]) for p in PATTERNS]:
        for rings in mask_polygons(mask, scale, min_px if name == "epidermis" else 4.0):
            feats.append(
                {
                    "type": "Feature",
                    "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": list(CLASS_COLORS[name])},
                    },
                }
            )
    return {"type": "FeatureCollection", "features": feats}


# ----------------------------------------------------------------------------- dataset


def output_image(painted: PaintedCrop, mpp: float) -> tuple[np.ndarray, float]:
    """(RGB at ``mpp``, output px per painting px): resized only where the source is coarser than ``mpp``."""
    factor = painted.px_um / mpp
    if abs(factor - 1.0) < 0.02:
        return painted.after, 1.0
    h, w = painted.after.shape[:2]
    nw, nh = int(round(w * factor)), int(round(h * factor))
    img = cv2.resize(painted.after, (nw, nh), interpolation=cv2.INTER_CUBIC if factor > 1 else cv2.INTER_AREA)
    return img, nw / w


def _block_reader(img: np.ndarray) -> Callable[[int, int, int, int], np.ndarray]:
    def render(x: int, y: int, w: int, h: int) -> np.ndarray:
        return img[y : y + h, x : x + w]

    return render


def generate_painted_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    sources_root: str | Path,
    mpp: float = 0.5,
    overwrite: bool = False,
    mix: Mapping[str, float] | None = None,
    crop_um: tuple[float, float] | None = None,
) -> list[dict[str, object]]:
    """Write ``n`` slides with NME patterns painted onto real skin, their annotations and ``labels.csv``.

    Args:
        out_dir: output folder (created; must be empty unless ``overwrite``).
        n: number of slides (>= 1); seed: >= 0 (same arguments, same bytes).
        sources_root: real-skin slide set (``labels.csv`` with slide_id/path/mpp + ``annotations/``).
        mpp: output level-0 resolution, µm/px.
        overwrite: replace an earlier painted set in ``out_dir``.
        mix: diagnosis weights (default :data:`DEFAULT_PAINT_MIX`).
        crop_um: fixed crop (width, height) in µm instead of the default 1.2-2.0 mm.

    Returns:
        The ``labels.csv`` rows (dicts), in order.

    Raises:
        ConfigError: invalid arguments, unusable sources, or a non-empty ``out_dir`` without ``overwrite``.
    """
    mpp = check_mpp(mpp)
    sources = read_sources(sources_root)
    plans = plan_painted(n, seed, len(sources), mix)
    out = Path(out_dir)
    prepare_out(out, overwrite, what="painted")
    opened: dict[int, OpenSource] = {}
    rows: list[dict[str, object]] = []
    made: list[dict[str, object]] = []
    try:
        for plan in plans:
            t0 = time.perf_counter()
            if plan.source not in opened:
                opened[plan.source] = OpenSource.open(sources[plan.source])
            src = opened[plan.source]
            painted = paint_slide(plan, src, mpp, crop_um)
            img, factor = output_image(painted, mpp)
            qrng = np.random.default_rng(np.random.SeedSequence([plan.seed, 0x7A6]))
            quality = int(qrng.integers(75, 93))
            desc = (
                f"Real H&E skin ({src.source.slide_id}) with NME patterns painted by pipeline.synthetic.painted "
                f"{PAINTED_VERSION}; slide {plan.slide_id}; {plan.diagnosis}; not a patient diagnosis"
            )
            bg = tuple(int(v) for v in np.median(img[:8, :8].reshape(-1, 3), axis=0))
            with atomic_path(out / "slides" / f"{plan.slide_id}.tiff") as tmp:
                write_pyramid(
                    tmp,
                    _block_reader(img),
                    img.shape[1],
                    img.shape[0],
                    mpp,
                    quality,
                    desc,
                    background=(bg[0], bg[1], bg[2]),
                )
            fc = feature_collection(painted, factor, plan.seed ^ 0x6E0)
            atomic_write_json(out / "annotations" / f"{plan.slide_id}.geojson", fc, indent=None)
            flags = {p: int(painted.zones[p].any()) for p in PATTERNS}
            spec = PAINT_SPECS[plan.diagnosis]
            row: dict[str, object] = {
                "slide_id": plan.slide_id,
                "patient_id": plan.slide_id,
                "diagnosis": plan.diagnosis,
                "nme_pattern": int(spec.nme_pattern and all(flags.values())),
                **flags,
                "site": plan.site,
            }
            rows.append(row)
            made.append(
                {
                    "slide_id": plan.slide_id,
                    "diagnosis": plan.diagnosis,
                    "source": src.source.slide_id,
                    "origin": [painted.origin[0], painted.origin[1]],
                    "source_px_per_px": round(painted.scale / factor, 6),
                    "severity": {k: round(v, 3) for k, v in sorted(painted.severity.items())},
                }
            )
            log.info(
                "%s: %s on %s (%dx%d px), %.1f s",
                plan.slide_id,
                plan.diagnosis,
                src.source.slide_id,
                img.shape[1],
                img.shape[0],
                time.perf_counter() - t0,
            )
    finally:
        for s in opened.values():
            s.close()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", buf.getvalue())
    atomic_write_json(
        out / "manifest.json",
        {
            "generator": "painted",
            "version": PAINTED_VERSION,
            "n": len(plans),
            "seed": int(seed),
            "mpp": mpp,
            "mix": check_mix(mix),
            "crop_um": list(crop_um) if crop_um is not None else None,
            "sources": [{"slide_id": s.slide_id, "path": s.rel_path, "mpp": s.mpp} for s in sources],
            "slides": made,
            "synthetic": True,
        },
    )
    return rows


# ----------------------------------------------------------------------------- preview


def _outline(img: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, color, 1, lineType=cv2.LINE_AA)


def preview_panels(
    sources_root: str | Path,
    source_id: str,
    examples: Sequence[tuple[str, int]],
    window_um: tuple[float, float] = (200.0, 150.0),
    mpp: float = 0.5,
) -> np.ndarray:
    """Rows of (before | after | after with outlines) windows of painted crops of one source at ~``mpp``."""
    sources = read_sources(sources_root)
    idx = [s.slide_id for s in sources].index(source_id)
    src = OpenSource.open(sources[idx])
    rows = []
    try:
        for dx, seed in examples:
            plan = PaintPlan(0, f"preview-{dx}-{seed}", dx, "trunk", idx, seed)
            pc = paint_slide(plan, src, mpp)
            px = pc.px_um
            wh, ww = int(window_um[1] / px), int(window_um[0] / px)
            h, w = pc.after.shape[:2]
            # centre on the pattern most specific to the diagnosis
            key = {"parakeratosis_only": "parakeratosis", "pallor_only": "pallor"}.get(dx, "necrolysis")
            m = pc.zones[key] if pc.zones[key].any() else pc.epidermis
            ys, xs = np.nonzero(m)
            j = len(ys) // 2
            order = np.lexsort((xs, ys))
            cy, cx = int(ys[order[j]]), int(xs[order[j]])
            y0 = int(np.clip(cy - wh // 2, 0, max(h - wh, 0)))
            x0 = int(np.clip(cx - ww // 2, 0, max(w - ww, 0)))
            sl = (slice(y0, y0 + wh), slice(x0, x0 + ww))
            before = pc.before[sl].copy()
            after = pc.after[sl].copy()
            lined = after.copy()
            for p in PATTERNS:
                _outline(lined, pc.zones[p][sl], CLASS_COLORS[p])
            sev = ", ".join(f"{k} {v:.2f}" for k, v in sorted(pc.severity.items())) or "none"
            label = np.full((22, before.shape[1] * 3 + 8, 3), 255, np.uint8)
            cv2.putText(
                label,
                f"{dx} (seed {seed}); severity {sev}",
                (4, 16),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.45,
                (0, 0, 0),
                1,
                cv2.LINE_AA,
            )
            gap = np.full((before.shape[0], 4, 3), 255, np.uint8)
            rows.append(np.vstack([label, np.hstack([before, gap, after, gap, lined])]))
    finally:
        src.close()
    wmax = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, wmax - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.vstack(rows)


#: Examples drawn in the docs previews: (diagnosis, seed).
PREVIEW_EXAMPLES: tuple[tuple[str, int], ...] = (
    ("nme", 11),
    ("nme", 12),
    ("nme_subtle", 13),
    ("pallor_only", 14),
    ("parakeratosis_only", 15),
)


def write_preview(
    path: str | Path,
    sources_root: str | Path,
    source_id: str,
    examples: Sequence[tuple[str, int]] = PREVIEW_EXAMPLES,
    window_um: tuple[float, float] = (168.0, 120.0),
    max_bytes: int = 1_400_000,
) -> Path:
    """PNG of :func:`preview_panels` (palette-quantised if the full-colour file is over ``max_bytes``)."""
    from PIL import Image

    img = Image.fromarray(preview_panels(sources_root, source_id, examples, window_um))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > max_bytes:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, format="PNG", optimize=True
        )
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.synthetic.painted", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (required unless --preview)")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=3003)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--sources", type=Path, default=Path("data/real_skin"))
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument(
        "--preview", nargs=2, metavar=("SOURCE_ID", "PNG"), help="write before/after examples of one source instead"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.preview:
        print(write_preview(args.preview[1], args.sources, args.preview[0]))
        return 0
    if args.out is None:
        ap.error("--out is required")
    try:
        rows = generate_painted_dataset(args.out, args.n, args.seed, args.sources, args.mpp, args.overwrite)
    except PipelineError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps({"slides": len(rows), "out": str(args.out)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
