"""Tissue texture bank: the periodic noise fields the renderer samples, made once per MPP.

Feature sizes are physical (µm); each texture has one texel per level-0 pixel at the
rendering MPP. Textures sampled in section-local (u, d) coordinates follow the skin surface
(keratin lamellae, collagen bundles); the others are sampled in slide pixel coordinates.
The bank is the same for every slide (fixed seeds); slides differ by where they sample it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.synthetic.noise import periodic_extend, periodic_texture, sensor_noise, texture_size

#: Largest window (px) cut from an xy-sampled texture without copying.
WINDOW = 1600


@dataclass(frozen=True)
class TextureBank:
    """Periodic float32 textures (zero mean, unit std) at one MPP.

    Textures sampled in slide pixels (fine, fine2, grain, coarse, blotch, sensor) are
    stored periodically extended by :data:`WINDOW` px; ``small``/``big`` are their periods.

    Attributes (shape (N, N) each before extension):
        lamellae: smooth field that warps the keratin lamellae (sampled in (u, d)).
        collagen: reticular collagen bundles, long along the surface (sampled in (u, d)).
        collagen_b: fine fibrils along the bundles (sampled in (u, d)).
        papillary: finer, looser fibrils of the papillary dermis (sampled in (u, d)).
        fine: ~0.5 µm granularity (cytoplasm, chromatin).
        fine2: ~0.3 µm granularity (intercellular bridges, chromatin).
        grain: fine granule field (chromatin).
        kgrain: keratohyalin granules (~1 µm).
        coarse: ~3 µm blobs (ink clumps, edge fraying).
        blotch: ~30 µm stain unevenness and warping.
        sensor: (N, N, 3) white noise for the camera.
    """

    mpp: float
    small: int
    big: int
    lamellae: np.ndarray
    collagen: np.ndarray
    collagen_b: np.ndarray
    papillary: np.ndarray
    fine: np.ndarray
    fine2: np.ndarray
    grain: np.ndarray
    kgrain: np.ndarray
    coarse: np.ndarray
    blotch: np.ndarray
    sensor: np.ndarray


@functools.lru_cache(maxsize=4)
def texture_bank(mpp: float) -> TextureBank:
    """The (cached) texture bank for rendering at ``mpp`` µm/px."""
    big = texture_size(mpp, 512.0)
    small = texture_size(mpp, 128.0)
    ext = periodic_extend
    return TextureBank(
        mpp=mpp,
        small=small,
        big=big,
        lamellae=periodic_texture(101, big, mpp, 10.0, 4.5),
        collagen=periodic_texture(102, big, mpp, 22.0, 1.9),
        collagen_b=periodic_texture(110, big, mpp, 6.0, 0.35),
        papillary=periodic_texture(103, big, mpp, 3.0, 1.1, 25.0),
        fine=ext(periodic_texture(104, small, mpp, 0.45, 0.45), WINDOW),
        fine2=ext(periodic_texture(105, small, mpp, 0.3, 0.3), WINDOW),
        grain=ext(periodic_texture(106, small, mpp, 0.35, 0.3), WINDOW),
        kgrain=ext(periodic_texture(111, small, mpp, 0.55, 0.45), WINDOW),
        coarse=ext(periodic_texture(107, small, mpp, 2.5, 2.5), WINDOW),
        blotch=ext(periodic_texture(108, big, mpp, 30.0, 30.0), WINDOW),
        sensor=ext(sensor_noise(109, 256), WINDOW),
    )
