"""Slide artefacts: margin ink, tissue folds, pen marks, dust, out-of-focus patches.

Placement (in slide or section-local µm, from the layout generator) and drawing (into a
block's OD image, at the rendering MPP) live together here. Artefacts that hide tissue
(pen, dust, folds) are kept off the pattern regions, so every annotated pattern is visible;
blur patches are mild (sigma ≤ 1.6 µm) and may cross patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.synthetic.profiles import BIG, Profiles, R

#: Ink and pen colours as RGB optical densities per unit amount.
INK_OD = {
    "green": (1.45, 0.45, 0.75),
    "blue": (1.35, 0.95, 0.35),
    "black": (1.4, 1.4, 1.3),
    "red": (0.25, 1.3, 1.1),
    "yellow": (0.15, 0.35, 1.3),
}
PEN_OD = {
    "blue": (0.95, 0.65, 0.18),
    "green": (0.85, 0.3, 0.6),
    "black": (0.9, 0.9, 0.85),
    "red": (0.15, 0.9, 0.75),
}


@dataclass(frozen=True)
class InkEdge:
    """Margin ink along one cut edge of a section (section-local).

    ``edge`` is ``left``/``right`` (cut ends) or ``bottom`` (deep margin); ``start``/``end`` are
    the covered fraction of that edge; widths in µm inside/outside the tissue edge.
    """

    edge: str
    color: str
    start: float
    end: float
    width_in: float
    width_out: float
    amount: float


@dataclass(frozen=True)
class PenMark:
    """A marker stroke on the glass: polyline in slide µm, stroke width µm, colour, opacity 0-1."""

    points: tuple[tuple[float, float], ...]
    width: float
    color: str
    amount: float


@dataclass(frozen=True)
class Dust:
    """A dust speck (ellipse) or fibre (polyline) in slide µm; ``amount`` is its OD scale."""

    points: tuple[tuple[float, float], ...]
    size: float
    amount: float
    fibre: bool


@dataclass(frozen=True)
class BlurPatch:
    """An out-of-focus ellipse in slide µm with Gaussian sigma ``sigma_um``."""

    x: float
    y: float
    rx: float
    ry: float
    angle: float
    sigma_um: float


def sample_ink(rng: np.random.Generator) -> list[InkEdge]:
    """Inked margins of a section: often two colours for the two sides, sometimes none."""
    if rng.random() < 0.3:
        return []
    colours = list(INK_OD)
    main = str(rng.choice(colours[:3], p=[0.45, 0.35, 0.2]))
    out = []
    for edge in ("left", "right", "bottom"):
        if rng.random() < 0.65:
            colour = main if rng.random() < 0.6 else str(rng.choice(colours))
            a = rng.uniform(0.0, 0.5)
            b = rng.uniform(a + 0.3, 1.0) if a < 0.7 else 1.0
            out.append(
                InkEdge(edge, colour, a, min(b, 1.0), rng.uniform(6, 30), rng.uniform(4, 25), rng.uniform(0.5, 1.1))
            )
    return out


def sample_fold(rng: np.random.Generator, prof: Profiles) -> None:
    """Maybe fold the deep edge or a cut end of the section (writes the ``FOLD`` profile row).

    Cut-end folds stay within the end margin where no pattern is placed; deep folds stay in
    the dermis. Either way no pattern region is covered.
    """
    if rng.random() > 0.3:
        return
    t = prof.table
    n = prof.n
    if rng.random() < 0.5:
        # deep-edge fold over part of the section length
        w = rng.uniform(40, 160)
        a = rng.uniform(0.0, 0.6)
        i0, i1 = int(a * n), int(min(1.0, a + rng.uniform(0.15, 0.4)) * n)
        start = t[R["BOT"], i0:i1] - w
        floor = t[R["S"], i0:i1] + t[R["EL"], i0:i1] + 40
        t[R["FOLD"], i0:i1] = np.maximum(start, floor)
    else:
        # cut-end fold: the whole column over the first/last 30-90 µm
        w = int(rng.uniform(30, 90) / 0.5)
        if rng.random() < 0.5:
            t[R["FOLD"], :w] = -BIG
        else:
            t[R["FOLD"], n - w :] = -BIG


def _avoids(boxes: list[tuple[float, float, float, float]], x0: float, y0: float, x1: float, y1: float) -> bool:
    return all(x1 < bx0 or x0 > bx1 or y1 < by0 or y0 > by1 for bx0, by0, bx1, by1 in boxes)


def sample_pen(rng: np.random.Generator, tissue_boxes, pattern_boxes, width: float, height: float) -> list[PenMark]:
    """Pen marks near the tissue (circling, ticks, dots), never over a pattern region."""
    out: list[PenMark] = []
    if rng.random() > 0.35:
        return out
    for _ in range(int(rng.integers(1, 3))):
        for _try in range(20):
            bx0, by0, bx1, by1 = tissue_boxes[int(rng.integers(len(tissue_boxes)))]
            cx = rng.uniform(bx0 - 400, bx1 + 400)
            cy = rng.uniform(by0 - 400, by1 + 400)
            kind = rng.choice(["arc", "tick", "dot"])
            if kind == "arc":
                r = rng.uniform(300, 900)
                a0 = rng.uniform(0, 2 * math.pi)
                th = np.linspace(a0, a0 + rng.uniform(0.6, 2.0), 40)
                pts = np.stack([cx + r * np.cos(th), cy + r * np.sin(th) * rng.uniform(0.7, 1.0)], 1)
            elif kind == "tick":
                ang = rng.uniform(0, math.pi)
                ln = rng.uniform(200, 700)
                pts = np.array([[cx, cy], [cx + ln * math.cos(ang), cy + ln * math.sin(ang)]])
            else:
                pts = np.array([[cx, cy], [cx + 1.0, cy + 1.0]])
            w = rng.uniform(60, 200) if kind != "dot" else rng.uniform(80, 200)
            x0, y0 = pts.min(0) - w
            x1, y1 = pts.max(0) + w
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                continue
            if not _avoids(pattern_boxes, x0, y0, x1, y1):
                continue
            out.append(
                PenMark(
                    tuple(map(tuple, pts.round(2).tolist())),
                    float(w),
                    str(rng.choice(list(PEN_OD))),
                    float(rng.uniform(0.35, 0.9)),
                )
            )
            break
    return out


def sample_dust(rng: np.random.Generator, pattern_boxes, width: float, height: float) -> list[Dust]:
    """Dust specks and a few fibres anywhere on the glass, off the pattern regions."""
    out: list[Dust] = []
    n = int(rng.poisson(rng.uniform(2, 18) * width * height / 1.2e7))
    for _ in range(n):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.15:
            ln = rng.uniform(60, 400)
            ang = rng.uniform(0, math.pi)
            t = np.linspace(0, 1, 12)[:, None]
            bend = rng.normal(0, 0.25)
            pts = np.hstack(
                [
                    x + ln * t * math.cos(ang) - bend * ln * t * (1 - t) * math.sin(ang),
                    y + ln * t * math.sin(ang) + bend * ln * t * (1 - t) * math.cos(ang),
                ]
            )
            size, fibre = rng.uniform(1.5, 4.0), True
        else:
            pts = np.array([[x, y]])
            size, fibre = rng.uniform(1.5, 9.0), False
        x0, y0 = pts.min(0) - size - 10
        x1, y1 = pts.max(0) + size + 10
        if _avoids(pattern_boxes, x0, y0, x1, y1):
            out.append(Dust(tuple(map(tuple, pts.round(2).tolist())), float(size), float(rng.uniform(0.3, 1.2)), fibre))
    return out


def sample_blur(rng: np.random.Generator, tissue_boxes) -> list[BlurPatch]:
    """Zero to two soft out-of-focus patches over the tissue."""
    out: list[BlurPatch] = []
    if rng.random() > 0.3:
        return out
    for _ in range(int(rng.integers(1, 3))):
        bx0, by0, bx1, by1 = tissue_boxes[int(rng.integers(len(tissue_boxes)))]
        out.append(
            BlurPatch(
                float(rng.uniform(bx0, bx1)),
                float(rng.uniform(by0, by1)),
                float(rng.uniform(150, 600)),
                float(rng.uniform(120, 450)),
                float(rng.uniform(0, 180)),
                float(rng.uniform(0.7, 1.6)),
            )
        )
    return out


# ----------------------------------------------------------------------------- drawing


def _to_px(points: np.ndarray, mpp: float, ox: int, oy: int) -> np.ndarray:
    """Slide µm → cv2 fixed-point (shift 4) pixel coordinates in a block whose origin is (ox, oy) px."""
    px = (points / mpp - 0.5 - np.array([ox, oy])) * 16.0
    return np.rint(px).astype(np.int32)


def draw_pen(extra: np.ndarray, pens: list[PenMark], mpp: float, ox: int, oy: int) -> None:
    """Add pen OD to ``extra`` (float32 (h, w, 3)) for the block at level-0 pixel origin (ox, oy)."""
    h, w = extra.shape[:2]
    for pen in pens:
        pts = np.asarray(pen.points)
        half = pen.width / 2 / mpp + 16
        lo = pts.min(0) / mpp - half - np.array([ox, oy])
        hi = pts.max(0) / mpp + half - np.array([ox, oy])
        if hi[0] < 0 or hi[1] < 0 or lo[0] > w or lo[1] > h:
            continue
        mask: np.ndarray = np.zeros((h, w), np.uint8)
        cv2.polylines(
            mask,
            [_to_px(pts, mpp, ox, oy)],
            False,
            255,
            thickness=max(1, int(round(pen.width / mpp))),
            lineType=cv2.LINE_AA,
            shift=4,
        )
        if not mask.any():
            continue
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, 3.0 / mpp))
        extra += (mask.astype(np.float32) * (pen.amount / 255.0))[..., None] * np.asarray(PEN_OD[pen.color], np.float32)


def draw_dust(extra: np.ndarray, dust: list[Dust], mpp: float, ox: int, oy: int) -> None:
    """Add dust OD (grey-brown, near neutral) to ``extra`` for the block at (ox, oy) px."""
    h, w = extra.shape[:2]
    mask = None
    for dd in dust:
        pts = np.asarray(dd.points)
        lo = pts.min(0) / mpp - dd.size / mpp - 4 - np.array([ox, oy])
        hi = pts.max(0) / mpp + dd.size / mpp + 4 - np.array([ox, oy])
        if hi[0] < 0 or hi[1] < 0 or lo[0] > w or lo[1] > h:
            continue
        if mask is None:
            mask = np.zeros((h, w), np.uint8)
        val = int(min(255, dd.amount * 200))
        if dd.fibre:
            cv2.polylines(
                mask,
                [_to_px(pts, mpp, ox, oy)],
                False,
                val,
                thickness=max(1, int(round(dd.size / mpp))),
                lineType=cv2.LINE_AA,
                shift=4,
            )
        else:
            c = _to_px(pts[:1], mpp, ox, oy)[0]
            r = int(dd.size / mpp * 16)
            cv2.ellipse(
                mask,
                (int(c[0]), int(c[1])),
                (r, int(r * 0.7)),
                float(dd.size * 37 % 180),
                0,
                360,
                val,
                -1,
                cv2.LINE_AA,
                4,
            )
    if mask is not None and mask.any():
        extra += (mask.astype(np.float32) / 200.0)[..., None] * np.array([0.75, 0.8, 0.85], np.float32)


def blur_alpha(blurs: list[BlurPatch], mpp: float, ox: int, oy: int, h: int, w: int) -> tuple[np.ndarray | None, float]:
    """Soft mask (float32 (h, w), 0-1) of the blur patches in a block, and the strongest sigma (px).

    The mask is analytic (smooth fall-off over the outer 30 % of each ellipse), so blocks
    rendered separately agree at their borders.
    """
    alpha = None
    sigma = 0.0
    for b in blurs:
        cx, cy = b.x / mpp - ox - 0.5, b.y / mpp - oy - 0.5
        rr = max(b.rx, b.ry) / mpp * 1.2
        if cx + rr < 0 or cy + rr < 0 or cx - rr > w or cy - rr > h:
            continue
        a = math.radians(b.angle)
        xs = (np.arange(w, dtype=np.float32) - cx)[None, :]
        ys = (np.arange(h, dtype=np.float32) - cy)[:, None]
        xr = (xs * math.cos(a) + ys * math.sin(a)) / (b.rx / mpp)
        yr = (-xs * math.sin(a) + ys * math.cos(a)) / (b.ry / mpp)
        q = np.sqrt(xr * xr + yr * yr)
        one = np.clip((1.15 - q) / 0.3, 0.0, 1.0).astype(np.float32)
        alpha = one if alpha is None else np.maximum(alpha, one)
        sigma = max(sigma, b.sigma_um / mpp)
    if alpha is None or not alpha.any():
        return None, 0.0
    return alpha, sigma
