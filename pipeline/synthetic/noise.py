"""Deterministic noise: smooth 1-D profiles (layout, in µm) and periodic 2-D textures (rendering).

1-D profiles are sampled on a µm grid, so they do not depend on the rendering MPP: the physical
layout is the same at 0.25 and 0.5 µm/px. 2-D textures are made at the rendering MPP (one
texel = one level-0 pixel) with their feature sizes given in µm, and are periodic so that any
pixel can be sampled independently of the others (strip-wise rendering without seams).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np


def smooth_noise_1d(rng: np.random.Generator, n: int, step_um: float, scale_um: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of ``n`` samples spaced ``step_um`` µm apart.

    ``scale_um`` is the Gaussian correlation length in µm. Returns float64, shape (n,).
    """
    sigma = max(scale_um / step_um, 0.5)
    pad = int(4 * sigma) + 2
    white = rng.standard_normal(n + 2 * pad)
    m = white.size
    freqs = np.fft.rfftfreq(m)
    spec = np.fft.rfft(white) * np.exp(-2.0 * (math.pi * freqs * sigma) ** 2)
    out = np.fft.irfft(spec, m)[pad : pad + n]
    std = out.std()
    return (out - out.mean()) / (std if std > 1e-12 else 1.0)


def texture_size(mpp: float, period_um: float = 512.0) -> int:
    """Side in pixels of a periodic texture covering about ``period_um`` µm (a power of two)."""
    return int(2 ** max(7, min(12, round(math.log2(period_um / mpp)))))


@functools.lru_cache(maxsize=64)
def periodic_texture(
    seed: int, size: int, mpp: float, sigma_u_um: float, sigma_d_um: float, angle_deg: float = 0.0
) -> np.ndarray:
    """Periodic Gaussian-filtered noise, zero mean, unit std, float32 of shape (size, size).

    The filter is anisotropic: ``sigma_u_um`` along the texture x axis (the section's
    surface direction when sampled in (u, d)) and ``sigma_d_um`` along y, rotated by
    ``angle_deg``. Feature sizes are in µm; one texel is ``mpp`` µm. Cached per process.
    """
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((size, size)).astype(np.float32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    a = math.radians(angle_deg)
    fu = fx * math.cos(a) + fy * math.sin(a)
    fd = -fx * math.sin(a) + fy * math.cos(a)
    su, sd = sigma_u_um / mpp, sigma_d_um / mpp
    filt = np.exp(-2.0 * math.pi**2 * ((fu * su) ** 2 + (fd * sd) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(size, size)).astype(np.float32)
    out -= out.mean()
    out /= max(float(out.std()), 1e-12)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=8)
def sensor_noise(seed: int, size: int = 512) -> np.ndarray:
    """Per-pixel white noise, float32 of shape (size, size, 3), unit std, periodic by tiling."""
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((size, size, 3)).astype(np.float32)
    out.setflags(write=False)
    return out


def periodic_extend(tex: np.ndarray, margin: int) -> np.ndarray:
    """Tile a periodic (N, N[, C]) texture to (N + margin, N + margin[, C]) so windows are slices."""
    n = tex.shape[0]
    reps = (int(np.ceil((n + margin) / n)),) * 2 + (1,) * (tex.ndim - 2)
    out = np.tile(tex, reps)[: n + margin, : n + margin]
    out = np.ascontiguousarray(out)
    out.setflags(write=False)
    return out


def sample_xy(tex: np.ndarray, x0: int, y0: int, width: int, height: int, period: int | None = None) -> np.ndarray:
    """A (height, width[, C]) window of a periodic texture at pixel offset (x0, y0), wrapping.

    ``tex`` may be a :func:`periodic_extend`-ed texture of period ``period``; the window is then
    a read-only view (no copy) whenever it fits.
    """
    n = period or tex.shape[0]
    xs, ys = x0 % n, y0 % n
    if ys + height <= tex.shape[0] and xs + width <= tex.shape[1]:
        return tex[ys : ys + height, xs : xs + width]
    rows = np.arange(ys, ys + height) % n
    cols = np.arange(xs, xs + width) % n
    return np.take(np.take(tex[:n, :n], rows, axis=0), cols, axis=1)


def sample_map(tex: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a periodic (N, N) texture at float pixel coordinates (any range).

    ``map_x``/``map_y`` are float32 arrays of the output shape, in texture pixels. They are
    shifted by a whole number of periods (one scalar per map) so that OpenCV's fixed-point
    remap stays in range; BORDER_WRAP does the rest.
    """
    n = tex.shape[0]
    fx = np.float32(n * np.floor(float(map_x.min()) / n))
    fy = np.float32(n * np.floor(float(map_y.min()) / n))
    mx = map_x - fx if fx else map_x
    my = map_y - fy if fy else map_y
    return cv2.remap(tex, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
