"""Section frames: the map between a tissue fragment's own coordinates and the slide, in µm.

Each fragment is drawn in *section-local* coordinates ``(u, d)``: ``u`` runs along the skin
surface (0 .. length µm) and ``d`` is the depth below the top of the living epidermis (µm,
positive into the dermis, negative in the stratum corneum). A :class:`Frame` places it on the
slide (``x`` right, ``y`` down, µm from the slide's top-left corner), rotated by ``theta`` and
optionally bent so that the surface is a circular arc of radius ``radius`` (a domed shave or a
curled section). The map is exact both ways, so rendering (slide → local, per pixel) and
annotation/cell placement (local → slide) agree to float precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Frame:
    """Rigid (+ optional arc) placement of a section on the slide.

    Attributes:
        ox, oy: slide position (µm) of the surface mid-point ``(u=length/2, d=0)``.
        theta: direction of increasing ``u`` on the slide, radians (0 = to the right, depth down).
        length: section length along the surface, µm.
        radius: radius of the surface arc in µm (centre on the dermal side), or ``None`` for a
            straight section. Must exceed the deepest tissue point.
    """

    ox: float
    oy: float
    theta: float
    length: float
    radius: float | None = None

    @property
    def _t(self) -> tuple[float, float]:
        return math.cos(self.theta), math.sin(self.theta)

    @property
    def _n(self) -> tuple[float, float]:
        return -math.sin(self.theta), math.cos(self.theta)

    def to_slide(self, u: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Section-local (u, d) µm → slide (x, y) µm. Arrays of any matching shape (float64)."""
        u = np.asarray(u, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        tx, ty = self._t
        nx, ny = self._n
        if self.radius is None:
            a = u - self.length / 2.0
            return self.ox + a * tx + d * nx, self.oy + a * ty + d * ny
        r0 = self.radius
        cx, cy = self.ox + r0 * nx, self.oy + r0 * ny
        phi = (u - self.length / 2.0) / r0
        r = r0 - d
        s, c = np.sin(phi), np.cos(phi)
        return cx + r * (s * tx - c * nx), cy + r * (s * ty - c * ny)

    def to_local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slide (x, y) µm → section-local (u, d) µm. float32 arrays in, float32 arrays out."""
        tx, ty = self._t
        nx, ny = self._n
        if self.radius is None:
            vx = x - np.float32(self.ox)
            vy = y - np.float32(self.oy)
            u = vx * np.float32(tx) + vy * np.float32(ty) + np.float32(self.length / 2.0)
            d = vx * np.float32(nx) + vy * np.float32(ny)
            return u, d
        r0 = self.radius
        vx = x - np.float32(self.ox + r0 * nx)
        vy = y - np.float32(self.oy + r0 * ny)
        a = vx * np.float32(tx) + vy * np.float32(ty)
        b = vx * np.float32(nx) + vy * np.float32(ny)
        # cartToPolar(x=-b, y=a): magnitude r, angle atan2(a, -b) in [0, 2pi)
        mag, ang = cv2.cartToPolar(
            np.ascontiguousarray(-b, dtype=np.float32), np.ascontiguousarray(a, dtype=np.float32)
        )
        ang = np.where(ang > np.float32(math.pi), ang - np.float32(2 * math.pi), ang)
        u = ang * np.float32(r0) + np.float32(self.length / 2.0)
        d = np.float32(r0) - mag
        return u.astype(np.float32, copy=False), d.astype(np.float32, copy=False)

    def direction(self, u: np.ndarray) -> np.ndarray:
        """Slide angle (radians) of the surface direction (increasing ``u``) at ``u`` µm."""
        u = np.asarray(u, dtype=np.float64)
        if self.radius is None:
            return np.full(u.shape, self.theta)
        return self.theta + (u - self.length / 2.0) / self.radius


def polygon_area(points: np.ndarray) -> float:
    """Signed shoelace area of a closed ring given as (N, 2) points (any unit²)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def simplify_ring(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed ring (N, 2), same unit as ``tolerance``."""
    if len(points) < 8:
        return points
    approx = cv2.approxPolyDP(points.astype(np.float32).reshape(-1, 1, 2), float(tolerance), True)
    out = approx.reshape(-1, 2).astype(np.float64)
    return out if len(out) >= 4 else points
