"""Streaming pyramidal TIFF writer: JPEG tiles, resolution tags in centimetres (OpenSlide generic-tiff).

Level 0 is rendered strip by strip (``strip`` px high, ``block`` px wide blocks) and handed to
tifffile as an iterator of tiles, so the full-resolution image never exists in memory. Each
strip is also halved into a level-1 buffer (a quarter of the level-0 pixels, uint8); levels 2+
are halved from the previous level. Level k is ``ceil(size / 2**k)`` pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

log = logging.getLogger(__name__)

#: Tile side of every level, px.
TILE = 512
#: Smallest top level: levels are added until the coarsest is at most this many px on its long side.
TOP_LEVEL_MAX = 1024
MIN_LEVELS = 3

RenderFn = Callable[[int, int, int, int], np.ndarray]


def level_count(width: int, height: int) -> int:
    """Number of pyramid levels for a level-0 image of ``width`` x ``height`` px (at least 3)."""
    n = 1
    w, h = width, height
    while max(w, h) > TOP_LEVEL_MAX:
        w, h = math.ceil(w / 2), math.ceil(h / 2)
        n += 1
    return max(n, MIN_LEVELS)


def _halve(img: np.ndarray) -> np.ndarray:
    """Area-average 2x downsample of (h, w, 3) uint8 to (ceil(h/2), ceil(w/2), 3)."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    return cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)


def write_pyramid(
    path: str | Path,
    render: RenderFn,
    width: int,
    height: int,
    mpp: float,
    quality: int,
    description: str,
    background: tuple[int, int, int] = (255, 255, 255),
    strip: int = 1024,
    block: int = 1024,
) -> list[tuple[int, int]]:
    """Render and write a pyramidal tiled TIFF.

    Args:
        path: output file (write to a temporary path and rename; see :mod:`pipeline.core.io`).
        render: ``render(x0, y0, w, h) -> uint8 (h, w, 3)`` for level-0 pixel rectangles.
        width, height: level-0 size, px.
        mpp: level-0 resolution, µm/px (written as XResolution/YResolution in px/cm).
        quality: JPEG quality 1-100.
        description: ImageDescription of level 0.
        background: RGB used to pad partial edge tiles.
        strip, block: render granularity in px (multiples of :data:`TILE`).

    Returns:
        (width, height) of every level written.
    """
    n_levels = level_count(width, height)
    l1 = np.empty((math.ceil(height / 2), math.ceil(width / 2), 3), np.uint8)
    wt = math.ceil(width / TILE) * TILE

    def tiles0() -> Iterator[np.ndarray]:
        for sy in range(0, height, strip):
            sh = min(strip, height - sy)
            hpad = math.ceil(sh / TILE) * TILE
            buf = np.empty((hpad, wt, 3), np.uint8)
            buf[:] = background
            for bx in range(0, width, block):
                bw = min(block, width - bx)
                buf[:sh, bx : bx + bw] = render(bx, sy, bw, sh)
            half = _halve(buf[:sh, :width])
            l1[sy // 2 : sy // 2 + half.shape[0]] = half
            for ty in range(0, hpad, TILE):
                for tx in range(0, wt, TILE):
                    yield buf[ty : ty + TILE, tx : tx + TILE]
            log.debug("strip %d/%d written", sy // strip + 1, math.ceil(height / strip))

    dims = [(width, height)]
    common: dict[str, Any] = {
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "compressionargs": {"level": int(quality)},
        "photometric": "rgb",
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    with tifffile.TiffWriter(str(path), bigtiff=width * height * 3 > 3_500_000_000) as tw:
        tw.write(
            tiles0(),
            shape=(height, width, 3),
            dtype=np.uint8,
            subfiletype=0,
            resolution=(1e4 / mpp, 1e4 / mpp),
            description=description,
            **common,
        )
        level = l1
        for k in range(1, n_levels):
            if k > 1:
                level = _halve(level)
            h, w = level.shape[:2]
            ds_x, ds_y = width / w, height / h
            tw.write(level, subfiletype=1, resolution=(1e4 / (mpp * ds_x), 1e4 / (mpp * ds_y)), **common)
            dims.append((w, h))
    return dims
