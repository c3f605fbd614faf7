"""Are a slide's annotation polygons where its tissue is? Catches GeoJSON in the wrong coordinate space.

The usual mistake is exporting annotations from a downsampled image (coordinates too small by the
downsample factor) or from another resolution than level 0 (too large): the polygons then lie on
glass, on the wrong part of the section or outside the slide, and training silently learns from
wrong tiles. :func:`placement_problem` measures where the annotated area falls (inside the slide's
level-0 rectangle, inside the slightly dilated tissue mask) and, when most of it is misplaced,
tries the usual scale factors to name the likely cause.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.tiles.annotations import Annotation
from pipeline.tiles.tissue import TissueMask

log = logging.getLogger(__name__)

#: Below this fraction of the annotated area inside the slide / the tissue, a slide is rejected.
MIN_INSIDE = 0.5
#: Scale factors tried when the annotations are misplaced (a power-of-two downsample is the usual cause).
CANDIDATE_SCALES = (2.0, 4.0, 8.0, 16.0, 32.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32)
#: Tissue is dilated by this many µm before measuring (annotations drawn along its border).
TISSUE_MARGIN_UM = 100.0
#: Longest side of the measuring canvas, pixels.
CANVAS_PX = 1024


@dataclass(frozen=True)
class Placement:
    """Fractions of the annotated area inside the slide rectangle and inside (dilated) tissue."""

    in_slide: float
    in_tissue: float


def measure(
    exteriors: list[np.ndarray], slide_wh: tuple[int, int], tissue: TissueMask, slide_mpp: float, scale: float = 1.0
) -> Placement | None:
    """Where the union of ``exteriors`` (level-0 px, multiplied by ``scale``) falls; None if it has no area."""
    w0, h0 = slide_wh
    polys = [np.asarray(e, np.float64) * scale for e in exteriors]
    pts = np.concatenate(polys)
    x_lo, y_lo = min(0.0, float(pts[:, 0].min())), min(0.0, float(pts[:, 1].min()))
    x_hi, y_hi = max(float(w0), float(pts[:, 0].max())), max(float(h0), float(pts[:, 1].max()))
    mask_per_l0 = slide_mpp / tissue.mpp  # tissue-mask px per level-0 px
    s = min(mask_per_l0, CANVAS_PX / max(x_hi - x_lo, y_hi - y_lo, 1.0))
    cw, ch = int(np.ceil((x_hi - x_lo) * s)) + 1, int(np.ceil((y_hi - y_lo) * s)) + 1
    union = np.zeros((ch, cw), np.uint8)
    shift = 4
    rings = [np.round((p - [x_lo, y_lo]) * s * (1 << shift)).astype(np.int32) for p in polys]
    cv2.fillPoly(union, rings, 1, lineType=cv2.LINE_8, shift=shift)
    area = int(union.sum())
    if area == 0:
        return None
    sx0, sy0 = int(round(-x_lo * s)), int(round(-y_lo * s))
    sw, sh = max(1, int(round(w0 * s))), max(1, int(round(h0 * s)))
    slide_rect = np.zeros_like(union)
    slide_rect[sy0 : sy0 + sh, sx0 : sx0 + sw] = 1
    tissue_canvas: np.ndarray = np.zeros_like(union)
    ox, oy = tissue.origin
    tw, th = (
        max(1, int(round(tissue.mask.shape[1] / mask_per_l0 * s))),
        max(1, int(round(tissue.mask.shape[0] / mask_per_l0 * s))),
    )
    tx0, ty0 = int(round((ox - x_lo) * s)), int(round((oy - y_lo) * s))
    resized = cv2.resize(tissue.mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
    tissue_canvas[ty0 : ty0 + th, tx0 : tx0 + tw] = resized[: max(0, ch - ty0), : max(0, cw - tx0)]
    r = TISSUE_MARGIN_UM / slide_mpp * s  # margin in canvas px
    if r >= 1:  # dilate by distance (cost independent of the margin)
        dist = cv2.distanceTransform((tissue_canvas == 0).astype(np.uint8), cv2.DIST_L2, 3)
        tissue_canvas = (dist <= r).astype(np.uint8)
    tissue_canvas &= slide_rect
    return Placement(
        in_slide=float((union & slide_rect).sum()) / area, in_tissue=float((union & tissue_canvas).sum()) / area
    )


def _ok(p: Placement) -> bool:
    return p.in_slide >= MIN_INSIDE and p.in_tissue >= MIN_INSIDE


def _scale_hint(scale: float) -> str:
    if scale > 1:
        return f"coordinates look {scale:g}x too small: exported from a downsampled image? (QuPath: export from the full-resolution slide)"
    return (
        f"coordinates look {1 / scale:g}x too large: exported from an image at another resolution than the "
        "slide's level 0, or the wrong slide?"
    )


def placement_problem(
    annotations: list[Annotation], slide_wh: tuple[int, int], tissue: TissueMask, slide_mpp: float
) -> str | None:
    """One line saying what is wrong with where ``annotations`` lie on the slide, or None if they fit.

    Rejected when less than half of the annotated area is inside the slide's level-0 rectangle,
    or inside the tissue (dilated by ``TISSUE_MARGIN_UM``). The message gives the measured
    fractions and, when a scale factor from ``CANDIDATE_SCALES`` puts the polygons on the tissue,
    names it as the likely cause.
    """
    exteriors = [a.exterior for a in annotations if len(a.exterior) >= 3]
    if not exteriors or not tissue.mask.any():
        return None
    here = measure(exteriors, slide_wh, tissue, slide_mpp)
    if here is None or _ok(here):
        return None
    w0, h0 = slide_wh
    if here.in_slide < MIN_INSIDE:
        what = f"{100 * (1 - here.in_slide):.0f}% of the annotated area lies outside the slide ({w0}x{h0} level-0 px)"
    else:
        what = f"{100 * (1 - here.in_tissue):.0f}% of the annotated area lies outside the tissue"
    best: tuple[float, float] | None = None
    for c in CANDIDATE_SCALES:
        p = measure(exteriors, slide_wh, tissue, slide_mpp, scale=c)
        if p is not None and p.in_slide >= 0.95 and p.in_tissue >= 0.8 and (best is None or p.in_tissue > best[1]):
            best = (c, p.in_tissue)
    if best is not None:
        return f"{what}; {_scale_hint(best[0])}"
    return f"{what}; annotations of another slide, or not in level-0 pixel coordinates?"
