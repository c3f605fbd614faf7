"""Pixel operations that paint the three NME patterns onto real H&E pixels (:mod:`.painted`).

Everything works in **stain concentrations of the slide's own stains**: optical density
``OD = -log10((I + 1) / 256)`` (as ``pipeline.training.augment.rgb_to_hed``), projected onto a
haematoxylin vector measured from the crop's darkest epidermal nuclei, an eosin vector measured
from its dermis (or corneum) and their cross product (:class:`StainModel`). Painted nuclei and
eosin are therefore the slide's own colours, and the original pixel texture is kept wherever
a pattern only rescales the stains.

The painters take a box of concentrations (``conc``, float32 (h, w, 3): H, E, residual), the
pattern's ``zone`` (bool: exactly the pixels of its polygon) and an ``inten`` field (0-1: how
strongly each pixel of the zone is painted, tapering at the ends of a segment), and return the
painted concentrations. :func:`composite` then blends them into the original with a feather of
at most :data:`FEATHER_PX` pixels around the zone, so that nothing further away changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Ruifrok & Johnston H, E, DAB optical densities (rows): the stain basis (as pipeline.training.augment).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
#: log10 optical density of every uint8 grey level: -log10((v + 1) / 256); exact inverse in :func:`od_to_rgb`.
OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)
#: Largest distance (px) outside a zone that the feathered blend may touch.
FEATHER_PX = 2


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """float32 optical density (..., 3) of uint8 RGB (..., 3)."""
    return OD_LUT[rgb]


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """uint8 RGB of optical densities: the exact inverse of :func:`rgb_to_od` up to rounding."""
    out = np.power(np.float32(10.0), -od.astype(np.float32))
    out *= 256.0
    out -= 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below ``lo``, 1 above ``hi``, cubic in between (float32)."""
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    return t * t * (3.0 - 2.0 * t)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, about unit-std smooth noise (float32 ``shape``) with features of ~``scale_px`` px."""
    h, w = shape
    s = max(float(scale_px), 1.0)
    gh, gw = int(math.ceil(h / s)) + 4, int(math.ceil(w / s)) + 4
    low = rng.standard_normal((gh, gw)).astype(np.float32)
    sub: np.ndarray
    if s <= 1.0:
        sub = low[2 : 2 + h, 2 : 2 + w]
    else:
        big = cv2.resize(low, (int(round(gw * s)), int(round(gh * s))), interpolation=cv2.INTER_CUBIC)
        o = int(round(2 * s))
        sub = big[o : o + h, o : o + w]
    out = np.ascontiguousarray(sub, dtype=np.float32)
    sd = float(out.std()) if out.size > 1 else 1.0
    return (out - float(out.mean())) / (sd if sd > 1e-6 else 1.0)


def gauss(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (reflecting border); a no-op for tiny sigmas."""
    if sigma_px < 0.2:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma_px), borderType=cv2.BORDER_REFLECT)


def disk(radius_px: float) -> np.ndarray:
    r = max(int(math.ceil(radius_px)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


# ----------------------------------------------------------------------------- stain model


def _apply(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``v @ m`` over the last axis of a float (..., 3) array (cv2.transform: vectorised, float32)."""
    a = np.ascontiguousarray(v, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] * a.shape[1] > 0:
        return cv2.transform(a, np.ascontiguousarray(m.T, dtype=np.float32))
    return (a.reshape(-1, 3) @ m.astype(np.float32)).reshape(a.shape)


@dataclass(frozen=True)
class StainModel:
    """The crop's reference colours as stain concentrations (Ruifrok-Johnston H, E, residual).

    The decomposition itself uses the textbook vectors (as ``pipeline.training.augment``), which
    stay well conditioned on any slide; the *colours* painted are measured from the crop.

    Attributes:
        nucleus: the darkest epidermal nuclei (median of the darkest 5 % of epidermis pixels).
        cytoplasm: epidermal cytoplasm (epidermis below its haematoxylin 70th percentile).
        corneum: the keratin of the stratum corneum (its denser half).
        eosin: dense dermal collagen, the slide's most eosinophilic material.
        glass: the glass.
        od_glass, od_corneum: summed OD of glass and keratin (tell basket-weave gaps from keratin).
        grain: per-component standard deviation of the pixel-scale texture of the cytoplasm.
    """

    basis: np.ndarray
    inverse: np.ndarray
    nucleus: np.ndarray
    cytoplasm: np.ndarray
    corneum: np.ndarray
    eosin: np.ndarray
    glass: np.ndarray
    od_glass: float
    od_corneum: float
    grain: np.ndarray

    def to_conc(self, od: np.ndarray) -> np.ndarray:
        return _apply(od, self.inverse)

    def to_od(self, conc: np.ndarray) -> np.ndarray:
        return _apply(conc, self.basis)

    def conc_of(self, od: np.ndarray) -> np.ndarray:
        return (np.asarray(od, np.float64) @ self.inverse.astype(np.float64)).astype(np.float32)


def _sample(mask: np.ndarray, rgb: np.ndarray, rng: np.random.Generator, k: int = 100_000) -> np.ndarray:
    """Optical densities (N, 3) of up to ``k`` random pixels of ``mask`` (in raster order)."""
    idx = np.flatnonzero(mask.ravel())
    if idx.size > k:
        idx = np.sort(rng.choice(idx, k, replace=False))
    return OD_LUT[rgb.reshape(-1, 3)[idx]].astype(np.float64)


def _grain(rgb: np.ndarray, epidermis: np.ndarray, rng: np.random.Generator, inverse: np.ndarray) -> np.ndarray:
    """Per-component std of the 2-px high-pass residual of the paler epidermis, in a few windows."""
    ys, xs = np.nonzero(epidermis[::8, ::8])
    if ys.size < 10:
        return np.full(3, 0.02)
    vals = []
    h, w = epidermis.shape
    for i in rng.choice(ys.size, min(6, ys.size), replace=False):
        y0, x0 = max(int(ys[i]) * 8 - 128, 0), max(int(xs[i]) * 8 - 128, 0)
        sl = (slice(y0, min(y0 + 256, h)), slice(x0, min(x0 + 256, w)))
        od = rgb_to_od(rgb[sl])
        hp = od - gauss(od, 2.0)
        tot = od.sum(-1)
        m = epidermis[sl]
        if m.sum() < 100:
            continue
        m &= tot < np.median(tot[m])
        vals.append(hp[m].astype(np.float64))
    if not vals:
        return np.full(3, 0.02)
    return (np.concatenate(vals) @ inverse).std(axis=0)


def measure_stain(
    rgb: np.ndarray,
    epidermis: np.ndarray,
    corneum: np.ndarray,
    glass: np.ndarray,
    dermis: np.ndarray,
    rng: np.random.Generator,
) -> StainModel:
    """Measure the crop's reference colours (masks: bool, same size as ``rgb``)."""
    basis = RGB_FROM_HED.astype(np.float64)
    inverse = np.linalg.inv(basis)
    every = _sample(np.ones(rgb.shape[:2], bool), rgb, rng, 50_000)
    every_tot = every.sum(1)
    e_od = _sample(epidermis, rgb, rng)
    if e_od.shape[0] < 200:  # no epidermis: the darkest tissue instead
        e_od = every[every_tot > np.percentile(every_tot, 60)]
    e_tot = e_od.sum(1)
    nuc = np.median(e_od[e_tot >= np.percentile(e_tot, 95)], axis=0)
    h_vals = (e_od @ inverse)[:, 0]
    cyto_sel = (h_vals < np.percentile(h_vals, 70)) & (e_tot > np.percentile(e_tot, 10))
    cytoplasm = np.median(e_od[cyto_sel], axis=0) if cyto_sel.sum() > 50 else np.median(e_od, axis=0)
    d_od = _sample(dermis, rgb, rng)
    d_od = d_od[d_od.sum(1) > 0.12]
    if d_od.shape[0] >= 500:
        dt = d_od.sum(1)
        dh = (d_od @ inverse)[:, 0]
        sel = (dt >= np.percentile(dt, 50)) & (dt <= np.percentile(dt, 90)) & (dh <= np.percentile(dh, 60))
        eosin = np.median(d_od[sel], axis=0) if sel.sum() > 50 else np.median(d_od, axis=0)
    else:
        eosin = RGB_FROM_HED[1] * 0.35
    g_od = _sample(glass, rgb, rng, 20_000)
    if g_od.shape[0] < 100:
        g_od = every[every_tot <= np.percentile(every_tot, 1)]
    glass_od = np.median(g_od, axis=0)
    c_od = _sample(corneum, rgb, rng)
    if c_od.shape[0] >= 100:
        sel = c_od.sum(1) >= float(np.sum(glass_od)) + 0.15
        corneum_od = np.median(c_od[sel], axis=0) if sel.sum() > 50 else np.median(c_od, axis=0)
    else:  # no corneum in the crop: a keratin-like pink, the collagen's hue at the cytoplasm's density
        corneum_od = eosin / max(float(eosin.sum()), 1e-6) * max(float(cytoplasm.sum()) * 0.9, 0.35)
    grain = _grain(rgb, epidermis, rng, inverse)

    def conc(v: np.ndarray) -> np.ndarray:
        return (np.asarray(v, np.float64) @ inverse).astype(np.float32)

    return StainModel(
        basis=basis.astype(np.float32),
        inverse=inverse.astype(np.float32),
        nucleus=conc(nuc),
        cytoplasm=conc(cytoplasm),
        corneum=conc(corneum_od),
        eosin=conc(eosin),
        glass=conc(glass_od),
        od_glass=float(np.sum(glass_od)),
        od_corneum=float(np.sum(corneum_od)),
        grain=np.asarray(grain, np.float32),
    )


# ----------------------------------------------------------------------------- helpers


def local_background(img: np.ndarray, px_um: float, radius_um: float = 6.0) -> np.ndarray:
    """Grey opening of ``img`` with a disk of ``radius_um`` (worked out at ~1 µm/px): the level
    around any structure smaller than the disk, e.g. the cytoplasm around a nucleus."""
    k = max(1, int(round(1.0 / px_um)))
    h, w = img.shape
    small = cv2.resize(img, (max(1, w // k), max(1, h // k)), interpolation=cv2.INTER_AREA) if k > 1 else img
    se = disk(radius_um / (k * px_um))
    bg = cv2.morphologyEx(small, cv2.MORPH_OPEN, se, borderType=cv2.BORDER_REFLECT)
    bg = gauss(bg, 1.0)
    return cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR) if k > 1 else bg


def nucleus_weight(conc: np.ndarray, stain: StainModel, px_um: float) -> np.ndarray:
    """0-1: how much each pixel belongs to a haematoxylin-dark nucleus.

    A nucleus is haematoxylin above its surroundings (white top-hat at ~6 µm) and above the
    cytoplasm's level, so the dark cytoplasm of the granular layer is not mistaken for nuclei.
    """
    hs = gauss(conc[..., 0], 0.6 / px_um)
    top = hs - local_background(hs, px_um)
    span = max(float(stain.nucleus[0] - stain.cytoplasm[0]), 0.05)
    w = smoothstep(top, 0.18 * span, 0.45 * span)
    return w * smoothstep(hs, float(stain.cytoplasm[0]) + 0.1 * span, float(stain.cytoplasm[0]) + 0.4 * span)


def fill_from_surroundings(conc: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """Normalised convolution: the local mean of ``conc`` over pixels weighted by ``weight``."""
    num = gauss(conc * weight[..., None], sigma_px)
    den = gauss(weight, sigma_px)[..., None]
    return num / np.maximum(den, 1e-3)


def borrowed_texture(conc: np.ndarray, weight: np.ndarray, px_um: float, rng: np.random.Generator) -> np.ndarray:
    """High-pass texture of nearby pixels (shifted by a few µm, where ``weight`` is high).

    Added to smooth fills so that a filled area has the slide's own grain (and JPEG texture),
    not a tell-tale smoothness.
    """
    hp = conc - gauss(conc, 1.2 / px_um)
    sh = int(round(rng.uniform(5.0, 9.0) / px_um))
    dy, dx = (sh, -sh) if rng.random() < 0.5 else (-sh, sh)
    tex = np.roll(hp * weight[..., None], (dy, dx), axis=(0, 1))
    w = np.roll(weight, (dy, dx), axis=(0, 1))
    return tex / np.maximum(np.sqrt(gauss(w * w, 1.5 / px_um)), 0.35)[..., None]


def grain_noise(shape: tuple[int, int], stain: StainModel, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Fine pixel noise with the slide's cytoplasm grain (float32 (h, w, 3) concentrations)."""
    n = gauss(rng.standard_normal((*shape, 3)).astype(np.float32), 0.6)
    return n * (stain.grain * 1.6 * scale)[None, None, :]


def composite(conc0: np.ndarray, painted: np.ndarray, zone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feathered blend of ``painted`` into ``conc0``: full inside ``zone``, fading over a px or two.

    Returns (blended concentrations, the float weight used: 0 exactly where nothing changes).
    """
    z = zone.astype(np.float32)
    near = cv2.dilate(zone.astype(np.uint8), disk(FEATHER_PX)).astype(bool)
    wgt = np.maximum(gauss(z, 0.8), z) * near
    return conc0 + wgt[..., None] * (painted - conc0), wgt


def render_ellipses(
    shape: tuple[int, int],
    centres: np.ndarray,
    half_len: np.ndarray,
    half_wid: np.ndarray,
    angles: np.ndarray,
    opacity: np.ndarray,
    rng: np.random.Generator,
    edge_px: float = 1.2,
    chromatin: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-edged ellipses with a little chromatin noise.

    Args:
        centres: (N, 2) x, y in px; half_len/half_wid: semi-axes in px; angles: radians of the
        long axis; opacity: peak alpha of each.

    Returns:
        (alpha, index): float32 alpha (max over the ellipses) and int32 index of the ellipse
        that set it (-1 where none).
    """
    h, w = shape
    alpha = np.zeros((h, w), np.float32)
    index = np.full((h, w), -1, np.int32)
    for i in range(len(centres)):
        cx, cy = float(centres[i, 0]), float(centres[i, 1])
        a, b = max(float(half_len[i]), 0.6), max(float(half_wid[i]), 0.5)
        r = int(math.ceil(a + 2))
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, w)
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        xx -= cx
        yy -= cy
        ca, sa = math.cos(float(angles[i])), math.sin(float(angles[i]))
        u = xx * ca + yy * sa
        v = -xx * sa + yy * ca
        # edge softness of about 0.6 px whatever the axis: distance to the ellipse in px, approximately
        q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        grad = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2) / np.maximum(q, 1e-3)
        d = (q - 1.0) / np.maximum(grad, 1e-3)
        prof = np.clip(0.5 - d / max(edge_px, 0.3), 0.0, 1.0)
        if chromatin > 0:
            prof *= 1.0 - chromatin * gauss(rng.random(prof.shape, dtype=np.float32), 0.6)
        val = prof * float(opacity[i])
        sub_a = alpha[y0:y1, x0:x1]
        better = val > sub_a
        sub_a[better] = val[better]
        index[y0:y1, x0:x1][better] = i
    return alpha, index


def _points_in(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` random (x, y) positions (float px) inside ``mask`` (uniform, with replacement)."""
    idx = np.flatnonzero(mask.ravel())
    if idx.size == 0 or k <= 0:
        return np.zeros((0, 2), np.float64)
    pick = rng.choice(idx, size=k, replace=True)
    ys, xs = np.divmod(pick, mask.shape[1])
    return np.stack([xs + rng.random(k), ys + rng.random(k)], 1)


# ----------------------------------------------------------------------------- pallor


def paint_pallor(
    conc: np.ndarray,
    zone: np.ndarray,
    inten: np.ndarray,
    severity: float,
    stain: StainModel,
    px_um: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pale, vacuolated keratinocytes with their nuclei kept.

    Cytoplasmic eosin falls by 25-70 % with severity (haematoxylin of the cytoplasm a little
    less), unevenly from cell to cell; small clear vacuoles (3-8 µm) appear in the cytoplasm;
    nuclei are kept (only slightly paler and blurred, as in swollen cells).
    """
    s = float(severity)
    out = conc.copy()
    wn = nucleus_weight(conc, stain, px_um)
    cyto = (1.0 - wn) * inten
    # uneven paleness: cell-sized blotches plus a finer reticulated component
    blot = 1.0 + 0.25 * smooth_noise(rng, zone.shape, 6.0 / px_um) + 0.12 * smooth_noise(rng, zone.shape, 1.5 / px_um)
    k = np.clip((0.2 + 0.45 * s) * blot, 0.0, 0.8) * cyto
    out[..., 1] *= 1.0 - k
    out[..., 0] *= 1.0 - 0.75 * k
    out[..., 2] *= 1.0 - 0.6 * k
    # pull the cytoplasm a little towards the glass colour too (the cells look "empty", not just thinner)
    clear = (0.04 + 0.12 * s) * cyto * np.clip(blot, 0.0, 1.5)
    out += clear[..., None] * (stain.glass[None, None, :] - out)
    # nuclei kept, a touch paler and softer (swollen cells)
    nsoft = gauss(out, 0.4 / px_um)
    nw = (wn * inten * (0.15 + 0.25 * s))[..., None]
    out = out * (1 - nw) + nw * (nsoft * 0.88)

    # vacuoles
    area_um2 = float(zone.sum()) * px_um * px_um
    n_vac = int(rng.poisson(area_um2 * (0.001 + 0.006 * s)))
    allowed = zone & (wn < 0.3)
    pts = _points_in(allowed, n_vac, rng)
    if len(pts):
        rad = rng.uniform(1.5, 3.5, len(pts)) / px_um
        ecc = rng.uniform(0.6, 1.0, len(pts))
        va, _ = render_ellipses(
            zone.shape,
            pts,
            rad,
            rad * ecc,
            rng.uniform(0, math.pi, len(pts)),
            rng.uniform(0.35, 0.8, len(pts)) * (0.5 + 0.5 * s),
            rng,
            edge_px=0.8 / px_um,
            chromatin=0.1,
        )
        va *= (1.0 - wn) * inten
        # a faint rim: the membrane of the vacuole
        rim = np.clip(gauss(va, 0.6 / px_um) - va, 0.0, None) * 1.5
        out += va[..., None] * (stain.glass[None, None, :] - out)
        out += (rim * 0.25)[..., None] * stain.cytoplasm[None, None, :]
    return out


# ----------------------------------------------------------------------------- necrolysis


def paint_necrolysis(
    conc: np.ndarray,
    zone: np.ndarray,
    inten: np.ndarray,
    severity: float,
    stain: StainModel,
    px_um: float,
    rng: np.random.Generator,
    viable: np.ndarray,
    cleft_ok: np.ndarray,
) -> np.ndarray:
    """Hypereosinophilic, homogenised upper epidermis with pyknotic or lost nuclei and clefts.

    Args:
        viable: bool mask of the living epidermis next to the zone (the clefts run along it).
        cleft_ok: bool mask where a cleft may run (away from the tapering ends of the segment).
    """
    s = float(severity)
    wn = nucleus_weight(conc, stain, px_um)
    cyto_w = np.clip(1.0 - wn, 0.0, 1.0)
    fill = fill_from_surroundings(conc, cyto_w**2, 2.5 / px_um)
    fill += borrowed_texture(conc, (cyto_w > 0.9).astype(np.float32) * zone, px_um, rng) * 0.9
    fill += grain_noise(zone.shape, stain, rng, 0.3)
    out = conc.copy()

    # nuclei: removed (karyolysis), shrunken and dark (pyknosis) or kept
    nuc = ((wn > 0.5) & zone).astype(np.uint8)
    n_lab, lab, stats, cents = cv2.connectedComponentsWithStats(nuc, connectivity=8)
    min_area = (1.5 / px_um) ** 2
    fate = np.zeros(n_lab, np.int8)  # 0 keep, 1 remove, 2 pyknotic
    u = np.asarray(rng.random((n_lab,)))
    p_gone = 0.1 + 0.8 * s
    p_pyk = 0.5 - 0.15 * s
    for i in range(1, n_lab):
        if stats[i, cv2.CC_STAT_AREA] < min_area:
            continue
        if u[i] < p_gone:
            fate[i] = 2 if rng.random() < p_pyk else 1
    gone = cv2.dilate((fate[lab] > 0).astype(np.uint8), disk(0.6 / px_um))
    # the halo around a nucleus is part of it too
    gone_w = np.clip(gauss(gone.astype(np.float32), 0.5 / px_um) * 1.4, 0, 1) * inten
    out = out * (1 - gone_w[..., None]) + fill * gone_w[..., None]
    pyk = np.flatnonzero(fate == 2)
    if pyk.size:
        c = cents[pyk] + rng.normal(0, 0.5 / px_um, (pyk.size, 2))
        eq_r = np.sqrt(stats[pyk, cv2.CC_STAT_AREA] / math.pi)
        rad = np.clip(eq_r * rng.uniform(0.4, 0.65, pyk.size), 1.1 / px_um, 2.4 / px_um)
        pa, _ = render_ellipses(
            zone.shape,
            c,
            rad,
            rad * rng.uniform(0.7, 1.0, pyk.size),
            rng.uniform(0, math.pi, pyk.size),
            rng.uniform(0.85, 1.0, pyk.size),
            rng,
            edge_px=0.4 / px_um,
            chromatin=0.1,
        )
        pa *= inten
        nuc_od = stain.to_od(stain.nucleus[None, None, :])[0, 0]
        tot = float(nuc_od.sum())
        dark = stain.nucleus * np.float32(np.clip(tot * rng.uniform(1.05, 1.3), 1.2, 2.2) / max(tot, 1e-3))
        out = out * (1 - pa[..., None]) + pa[..., None] * dark[None, None, :]
        wn = np.maximum(wn * (1 - gone_w), pa)

    # hypereosinophilia: the cytoplasm moves towards the slide's own collagen pink at (a little more than)
    # the cytoplasm's density, keeping its local texture; cell borders blur a little (homogenisation)
    cw = (np.clip(1.0 - wn, 0, 1) * inten)[..., None]
    homog = gauss(out, 0.8 / px_um)
    hmix = (0.05 + 0.15 * s) * cw
    out = out * (1 - hmix) + homog * hmix
    # the hue: the slide's collagen without most of the haematoxylin it picked up (pure eosin as the slide shows it)
    eos = stain.eosin * np.array([0.25, 1.0, 0.6], np.float32)
    eos[1] = max(float(eos[1]), 0.05)
    eos_od = stain.to_od(eos[None, None, :])[0, 0]
    cyt_od = stain.to_od(stain.cytoplasm[None, None, :])[0, 0]
    hue = eos_od / max(float(eos_od.sum()), 1e-6)
    mix = rng.uniform(0.5, 0.8)  # mostly eosin, some of the cytoplasm's own hue left
    hue = mix * hue + (1 - mix) * cyt_od / max(float(cyt_od.sum()), 1e-6)
    dens = float(cyt_od.sum()) * rng.uniform(0.9, 1.2)
    target = stain.conc_of(hue * dens)
    od_tot = out @ stain.basis.sum(1)
    ratio = np.clip(od_tot / np.maximum(gauss(od_tot, 2.5 / px_um), 1e-3), 0.5, 1.8)[..., None]
    ratio = 1.0 + 1.2 * (ratio - 1.0)  # keep (a little more than) the local texture: ghost cell outlines
    blot = 1.0 + 0.12 * smooth_noise(rng, zone.shape, 8.0 / px_um)
    a = np.clip((0.08 + 0.6 * s) * blot, 0.0, 0.9)[..., None] * cw
    out = out + a * (target[None, None, :] * ratio - out)

    # clefts along the boundary with the viable epidermis below
    if viable.any() and rng.random() < 0.35 + 0.6 * s:
        d = cv2.distanceTransform((~viable).astype(np.uint8), cv2.DIST_L2, 5) * px_um
        width = rng.uniform(1.0, 2.5) * (0.6 + 0.6 * s) * (1.0 + 0.5 * smooth_noise(rng, zone.shape, 6.0 / px_um))
        on = smooth_noise(rng, zone.shape, 30.0 / px_um) > (0.6 - 1.0 * s)
        cleft = zone & cleft_ok & on & (d < width) & (d > 0)
        # occasionally a second, shorter split inside the band
        cw2 = gauss(cleft.astype(np.float32), 0.45 / px_um) * inten
        gl = stain.glass + 0.15 * (stain.corneum - stain.glass)
        out = out * (1 - 0.9 * cw2[..., None]) + 0.9 * cw2[..., None] * gl[None, None, :]
        out += grain_noise(zone.shape, stain, rng, 0.3) * cw2[..., None]
    return out


# ----------------------------------------------------------------------------- parakeratosis


def paint_parakeratosis(
    conc: np.ndarray,
    zone: np.ndarray,
    inten: np.ndarray,
    severity: float,
    stain: StainModel,
    px_um: float,
    rng: np.random.Generator,
    new_layer: np.ndarray,
    depth_um: np.ndarray,
    surface_angle: np.ndarray,
) -> np.ndarray:
    """Compact corneum with retained, flattened nuclei.

    Args:
        new_layer: bool part of ``zone`` that was glass (corneum created or thickened there).
        depth_um: distance from the living epidermis, µm (lamellae run along its level lines).
        surface_angle: radians of the local surface direction (long axis of retained nuclei).
    """
    s = float(severity)
    out = conc.copy()
    h, w = zone.shape
    od_sum = conc @ stain.basis.sum(1)
    od_sum = gauss(od_sum, 0.4 / px_um)
    # gapness: 1 for glass between lamellae, 0 for keratin
    gap = 1.0 - smoothstep(od_sum, stain.od_glass + 0.04, stain.od_glass + 0.55 * (stain.od_corneum - stain.od_glass))
    # lamellar keratin texture: wavy, broken bands along the surface
    lam_um = rng.uniform(1.8, 3.0)
    phase = 2.5 * smooth_noise(rng, (h, w), 12.0 / px_um) + 0.8 * smooth_noise(rng, (h, w), 3.0 / px_um)
    lam = np.sin(2 * math.pi * depth_um / lam_um + phase)
    lam = 0.5 + 0.5 * np.tanh(2.0 * lam)
    density = 0.55 + 0.6 * lam + 0.1 * smooth_noise(rng, (h, w), 2.0 / px_um)
    keratin = stain.corneum[None, None, :] * density[..., None]
    keratin = keratin + grain_noise((h, w), stain, rng, 0.8)
    # compaction: patches of the basket-weave gaps fill with keratin (more of them with severity); the
    # new layer is solid keratin
    share = 0.25 + 0.7 * s
    patch = smooth_noise(rng, (h, w), 6.0 / px_um) + 0.35 * smooth_noise(rng, (h, w), 1.5 / px_um)
    thr = float(np.quantile(patch[zone], 1.0 - share)) if zone.any() else 0.0
    kfill = smoothstep(patch, thr - 0.25, thr + 0.25)
    a = np.where(new_layer, np.maximum(gap, 0.35), gap * kfill) * inten
    # the new layer's outer edge is a little ragged and soft
    a = np.where(new_layer, a * np.clip(0.85 + 0.3 * smooth_noise(rng, (h, w), 2.0 / px_um), 0.0, 1.0), a)
    out = out + a[..., None] * (keratin - out)
    # existing keratin: a little denser and more eosinophilic
    dense = (1.0 - gap) * inten * (~new_layer)
    out[..., 1] *= 1.0 + 0.2 * s * dense
    out[..., 0] *= 1.0 + 0.1 * s * dense

    # retained nuclei: flattened, dark, elongated along the surface
    area_um2 = float(zone.sum()) * px_um * px_um
    cover = 0.03 + 0.42 * s**1.3  # fraction of the zone's area covered by nuclei
    length = rng.uniform(6.0, 12.0, 1)[0]
    mean_area = math.pi / 4 * length * 2.2
    n_nuc = int(rng.poisson(max(area_um2 * cover / mean_area, 0.0)))
    # nuclei favour the stronger part of the zone (not the tapering ends)
    allowed = zone & (inten > rng.uniform(0.2, 0.5))
    pts = _points_in(allowed, n_nuc, rng)
    if len(pts):
        lens = rng.uniform(6.5, 12.0, len(pts)) / px_um / 2
        wids = rng.uniform(1.7, 3.0, len(pts)) / px_um / 2
        ix = np.clip(pts[:, 0].astype(int), 0, w - 1)
        iy = np.clip(pts[:, 1].astype(int), 0, h - 1)
        ang = surface_angle[iy, ix] + rng.normal(0, 0.18, len(pts))
        op = rng.uniform(0.75, 1.0, len(pts)) * np.clip(inten[iy, ix] * 1.2, 0.3, 1.0)
        na, idx = render_ellipses((h, w), pts, lens, wids, ang, op, rng, edge_px=0.5 / px_um, chromatin=0.3)
        # pyknotic, darker than the living nuclei: summed OD 1.3-2.6 whatever the slide's nuclei
        nuc_od = stain.to_od(stain.nucleus[None, None, :])[0, 0]
        tot = float(nuc_od.sum())
        dark = (np.clip(tot * rng.uniform(1.1, 1.5, len(pts)), 1.3, 2.6) / max(tot, 1e-3)).astype(np.float32)
        scale = np.where(idx >= 0, dark[np.maximum(idx, 0)], 1.0).astype(np.float32)
        nuc_c = stain.nucleus[None, None, :] * scale[..., None]
        # a thin pale halo (retraction) around them, stronger in dark keratin where they would not show otherwise
        dark_k = float(np.clip((stain.od_corneum - 0.8) / 1.0, 0.3, 1.0))
        halo = np.clip(gauss(na, 0.7 / px_um) - na, 0, None) * 1.2 * (0.3 + 0.7 * s) * dark_k
        out += np.clip(halo, 0.0, 0.8)[..., None] * (stain.glass[None, None, :] - out) * 0.6
        out = out * (1 - na[..., None]) + na[..., None] * nuc_c
    return out
