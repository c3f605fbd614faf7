"""QuPath-compatible GeoJSON annotations traced from the layout profiles (level-0 pixels).

Each section gives one ``epidermis`` polygon (corneum surface down to the dermo-epidermal
junction, across the section's length) and one polygon per pattern patch. Polygons are traced
from the same profile arrays the renderer uses, mapped to slide µm and divided by the MPP, so
the coordinates at 0.25 µm/px are exactly twice those at 0.5 µm/px (up to 0.01 px rounding).
Feature ids are UUIDs drawn from the slide's seed.
"""

from __future__ import annotations

import uuid

import cv2
import numpy as np

from pipeline.synthetic.catalog import CLASS_COLORS
from pipeline.synthetic.layout import Section, SlideLayout
from pipeline.synthetic.profiles import DU, PATTERN_ROWS, R

#: Douglas-Peucker tolerance for the traced chains, µm.
SIMPLIFY_UM = 0.15


def _chain(sec: Section, i0: int, i1: int, depth: np.ndarray) -> np.ndarray:
    """Slide-µm points (N, 2) of the curve d = depth over grid indices i0..i1, simplified."""
    u = np.arange(i0, i1 + 1) * DU
    x, y = sec.frame.to_slide(u, depth.astype(np.float64))
    pts = np.stack([x, y], 1)
    if len(pts) > 3:
        pts = cv2.approxPolyDP(pts.astype(np.float32).reshape(-1, 1, 2), SIMPLIFY_UM, False).reshape(-1, 2)
    return pts.astype(np.float64)


def _ring(sec: Section, i0: int, i1: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Closed ring (slide µm): top chain left→right then bottom chain right→left, no repeats."""
    a = _chain(sec, i0, i1, top)
    b = _chain(sec, i0, i1, bottom)[::-1]
    ring = np.concatenate([a, b])
    # drop consecutive duplicates (pinched patch ends)
    keep = np.ones(len(ring), bool)
    keep[1:] = np.any(np.abs(np.diff(ring, axis=0)) > 1e-6, axis=1)
    ring = ring[keep]
    if np.allclose(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


def section_polygons(sec: Section) -> list[tuple[str, np.ndarray]]:
    """(class name, ring in slide µm) of the epidermis and every pattern patch of a section."""
    t = sec.prof.table
    n = sec.prof.n
    out = [("epidermis", _ring(sec, 0, n - 1, t[R["S"]] - t[R["TC"]], t[R["S"]] + t[R["EL"]]))]
    order = {"pallor": 0, "necrolysis": 1, "parakeratosis": 2}
    for pattern, i0, i1 in sorted(sec.prof.patches, key=lambda p: (order[p[0]], p[1])):
        top, bot = PATTERN_ROWS[pattern]
        out.append((pattern, _ring(sec, i0, i1, t[R[top], i0 : i1 + 1], t[R[bot], i0 : i1 + 1])))
    return out


def feature_collection(layout: SlideLayout, mpp: float) -> dict:
    """The slide's annotations as a GeoJSON FeatureCollection in level-0 pixels at ``mpp``."""
    rng = np.random.default_rng(layout.uuid_seed)
    features = []
    for sec in layout.sections:
        for name, ring in section_polygons(sec):
            if len(ring) < 3:
                continue
            px = np.round(ring / mpp, 2)
            coords = px.tolist()
            coords.append(coords[0])
            features.append(
                {
                    "type": "Feature",
                    "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "geometry": {"type": "Polygon", "coordinates": [coords]},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": list(CLASS_COLORS[name])},
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}
