"""Deep Zoom tiles of a slide from the project's reader (:mod:`pipeline.reading.slide`).

Deep Zoom levels halve the image from level ``max_level`` (full resolution, level-0 pixels) down
to 1 px. A tile of ``tile_size`` px (plus ``overlap`` px on inner edges) of DZ level ``l`` covers
``2 ** (max_level - l)`` level-0 px per tile pixel; it is read from the coarsest pyramid level no
coarser than that and resized (area interpolation). Slides are opened read-only and a
:class:`~pipeline.reading.slide.Slide` is not thread-safe: each generator reads under its own lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import SlideError
from pipeline.reading.slide import Slide, open_slide

log = logging.getLogger(__name__)

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 85


@dataclass(frozen=True)
class DeepZoomInfo:
    """What a viewer needs: level-0 size (px), resolution (µm/px), bounds origin, the DZ grid."""

    width: int
    height: int
    mpp: float
    offset: tuple[int, int]
    tile_size: int
    overlap: int
    max_level: int


class DeepZoom:
    """Deep Zoom tiles (JPEG) of one slide; :meth:`tile` is safe to call from several threads."""

    def __init__(self, path: Path, mpp: float | None = None, cache_tiles: int = 512) -> None:
        self.slide: Slide = open_slide(path, mpp=mpp)
        w, h = self.slide.dimensions
        bx, by, _, _ = self.slide.bounds
        self.info = DeepZoomInfo(
            w, h, self.slide.mpp, (int(bx), int(by)), TILE_SIZE, OVERLAP, max(0, math.ceil(math.log2(max(w, h))))
        )
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._cache_tiles = cache_tiles

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of DZ level ``level`` in its own pixels."""
        f = 2.0 ** (self.info.max_level - level)
        return max(1, math.ceil(self.info.width / f)), max(1, math.ceil(self.info.height / f))

    def tile(self, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of tile (``col``, ``row``) of DZ level ``level``.

        Raises:
            SlideError: the tile is outside the grid (the message names it) or unreadable.
        """
        key = (level, col, row)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if not 0 <= level <= self.info.max_level:
            raise SlideError(f"deep zoom level {level} outside 0-{self.info.max_level}")
        lw, lh = self.level_size(level)
        ts, ov = self.info.tile_size, self.info.overlap
        if not (0 <= col * ts < lw and 0 <= row * ts < lh):
            raise SlideError(f"deep zoom tile {col}_{row} outside level {level} ({lw}x{lh} px)")
        x0, y0 = col * ts - (ov if col else 0), row * ts - (ov if row else 0)
        x1, y1 = min(lw, (col + 1) * ts + ov), min(lh, (row + 1) * ts + ov)
        rgb = self._read(level, x0, y0, x1 - x0, y1 - y0)
        ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
            raise SlideError(f"deep zoom tile {level}/{col}_{row}: JPEG encoding failed")
        data = buf.tobytes()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_tiles:
                self._cache.popitem(last=False)
        return data

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB (h, w, 3) of DZ level ``level`` at its pixel (x, y), from the best pyramid level."""
        f = 2.0 ** (self.info.max_level - level)  # level-0 px per DZ px
        downs = self.slide.reader.level_downsamples
        lvl = max((i for i, d in enumerate(downs) if d <= f * 1.001), key=lambda i: downs[i], default=0)
        ds = downs[lvl]
        # the level-0 area of the tile, clipped to the image; read at pyramid level lvl
        l0x, l0y = int(round(x * f)), int(round(y * f))
        l0w = min(self.info.width - l0x, int(math.ceil(w * f)))
        l0h = min(self.info.height - l0y, int(math.ceil(h * f)))
        rw, rh = max(1, int(round(l0w / ds))), max(1, int(round(l0h / ds)))
        with self._lock:
            raw = self.slide.reader.read(l0x, l0y, lvl, rw, rh)
        if raw.shape[:2] == (h, w):
            return np.ascontiguousarray(raw)
        interp = cv2.INTER_AREA if rw > w else cv2.INTER_LINEAR
        return cv2.resize(raw, (w, h), interpolation=interp)

    def close(self) -> None:
        with self._lock:
            self.slide.close()
