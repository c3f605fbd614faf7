"""Render any rectangle of a synthetic slide at a given MPP from its µm layout.

:class:`SlideRenderer` turns a :class:`~.layout.SlideLayout` into RGB pixels block by block.
A block depends only on the layout and on its own position (textures are periodic and
sampled by coordinates, cells come from the layout), so blocks can be rendered in any order
and strips join without seams. Each block is rendered with a margin (:attr:`pad` px) for
blurs and cropped.

Per block: section-local coordinates ``(u, d)`` per pixel → layer masks from the profiles →
H/E stain amounts from textures and the cells' Voronoi cytoplasm → structures (vessels,
glands) → nuclei and red cells → folds, ink, pen, dust → Beer-Lambert RGB → optical blur,
blur patches, sensor noise. Memory is a few dozen float32 arrays of the block size.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipeline.synthetic import artefacts as art
from pipeline.synthetic.cells import STRUCT_KIND, STYLE
from pipeline.synthetic.layout import Section, SlideLayout
from pipeline.synthetic.noise import sample_map, sample_xy
from pipeline.synthetic.profiles import DU, R
from pipeline.synthetic.stain import od_to_rgb
from pipeline.synthetic.textures import texture_bank

F32 = np.float32
#: Spatial bin of the cell index, µm.
_BIN = 128.0
#: Extra margin (µm) around a block within which Voronoi seeds are considered.
_VOR_MARGIN = 48.0


def _clip01(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0.0, 1.0, out=a)


def _pad_box(points: np.ndarray, pad: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) µm box of (N, 2) points grown by ``pad`` µm (plus blur room)."""
    lo = points.min(0) - pad - 20.0
    hi = points.max(0) + pad + 20.0
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return not (a[2] < b[0] or a[0] > b[2] or a[3] < b[1] or a[1] > b[3])


def _bbox(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Row/column slices of the bounding box of a boolean mask, or None if it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


class _View:
    """A bounding-box view of a section's per-pixel geometry (see ``SlideRenderer._geometry``)."""

    def __init__(self, g: dict, box: tuple[slice, slice], gx: int, gy: int) -> None:
        self.g = g
        self.box = box
        self.sec = g["sec"]
        self.u = g["u"][box]
        self.d = g["d"][box]
        self.rho = g["rho"][box]
        self.iu = g["iu"][box]
        self.dist = tuple(a[box] for a in g["dist"])
        self.shape = self.u.shape
        self.gx = gx + box[1].start
        self.gy = gy + box[0].start


class _CellIndex:
    """Cells of all sections, binned on a µm grid for rectangle queries."""

    def __init__(self, sections: list[Section]) -> None:
        cols: dict[str, np.ndarray] = {}
        keys = sections[0].cells.keys() if sections else []
        for k in keys:
            cols[k] = np.concatenate([s.cells[k] for s in sections])
        self.n = len(cols.get("x", []))
        if self.n == 0:
            self.cols = {}
            return
        bx = np.floor(cols["x"] / _BIN).astype(np.int64)
        by = np.floor(cols["y"] / _BIN).astype(np.int64)
        self.bx0, self.by0 = int(bx.min()), int(by.min())
        self.nbx = int(bx.max()) - self.bx0 + 1
        key = (by - self.by0) * self.nbx + (bx - self.bx0)
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.cols = {k: v[order] for k, v in cols.items()}
        self.nby = int(by.max()) - self.by0 + 1

    def query(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of cells with centres inside the µm rectangle (approximately: whole bins)."""
        if self.n == 0:
            return np.zeros(0, np.int64)
        bx0 = max(int(math.floor(x0 / _BIN)) - self.bx0, 0)
        bx1 = min(int(math.floor(x1 / _BIN)) - self.bx0, self.nbx - 1)
        by0 = max(int(math.floor(y0 / _BIN)) - self.by0, 0)
        by1 = min(int(math.floor(y1 / _BIN)) - self.by0, self.nby - 1)
        if bx1 < bx0 or by1 < by0:
            return np.zeros(0, np.int64)
        parts = []
        for by in range(by0, by1 + 1):
            lo = np.searchsorted(self.key, by * self.nbx + bx0, "left")
            hi = np.searchsorted(self.key, by * self.nbx + bx1, "right")
            if hi > lo:
                parts.append(np.arange(lo, hi))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class SlideRenderer:
    """Renders level-0 pixels of one slide at ``mpp`` µm/px.

    Attributes:
        width, height: level-0 size in pixels (``round(width_um / mpp)``).
        pad: render margin in pixels on every side of a block.
    """

    def __init__(self, layout: SlideLayout, mpp: float) -> None:
        self.layout = layout
        self.mpp = float(mpp)
        self.width = int(round(layout.width_um / mpp))
        self.height = int(round(layout.height_um / mpp))
        self.tex = texture_bank(self.mpp)
        self.pad = int(math.ceil(12.0 / mpp))
        self.stain = layout.stain
        self.cells = _CellIndex(layout.sections)
        self.structs = self._gather_structs(layout.sections)
        self.tex_off_um = layout.texture_offset
        self.tex_off_px = (int(layout.texture_offset[0] / mpp), int(layout.texture_offset[1] / mpp))
        bg = 255.0 * np.exp(-np.asarray(self.stain.glass_od, dtype=np.float64))
        self.background = bg.astype(F32)
        self._pen_boxes = [(pen, _pad_box(np.asarray(pen.points), pen.width)) for pen in layout.pens]
        self._dust_boxes = [(dd, _pad_box(np.asarray(dd.points), dd.size + 2.0)) for dd in layout.dust]
        self._glass_cache: dict[tuple[int, int, int, int], np.ndarray] = {}

    def _glass(self, ox: int, oy: int, p: int, w: int, h: int) -> np.ndarray:
        """An empty-glass block; it only depends on the position modulo the noise period (cached)."""
        key = (ox % 256, oy % 256, w, h)
        out = self._glass_cache.get(key)
        if out is None:
            rgb = np.empty((h + 2 * p, w + 2 * p, 3), F32)
            rgb[:] = self.background
            out = self._finish(rgb, ox, oy, p, w, h, blur=False)
            out.setflags(write=False)
            if len(self._glass_cache) < 16:
                self._glass_cache[key] = out
        return out

    @staticmethod
    def _gather_structs(sections: list[Section]) -> dict[str, np.ndarray]:
        keys = sections[0].structs.keys() if sections else []
        return {k: np.concatenate([s.structs[k] for s in sections]) for k in keys}

    # ------------------------------------------------------------------------------ public

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 rectangle at pixel (x0, y0)."""
        p = self.pad
        ox, oy, W, H = x0 - p, y0 - p, w + 2 * p, h + 2 * p
        mpp = self.mpp
        um = (ox * mpp, oy * mpp, (ox + W) * mpp, (oy + H) * mpp)
        hit = [
            s
            for s in self.layout.sections
            if not (s.bbox[2] < um[0] or s.bbox[0] > um[2] or s.bbox[3] < um[1] or s.bbox[1] > um[3])
        ]
        amounts = None
        extra = None
        geo = [g for g in (self._geometry(s, ox, oy, W, H) for s in hit) if g is not None]
        if geo:
            amounts = np.zeros((H, W, 3), F32)
            need_vor = any(g["need_vor"] for g in geo)
            vor = self._voronoi(ox, oy, W, H) if need_vor else None
            for g in geo:
                extra = self._section(g, vor, amounts, extra, ox, oy)
            if geo:
                self._structures(amounts, ox, oy, W, H)
                self._nuclei(amounts, ox, oy, W, H)
                for g in geo:
                    if g["fold"] is not None:
                        sy, sx = g["slices"]
                        amounts[sy, sx] *= g["fold"][..., None]
        pens = [a for a, box in self._pen_boxes if _overlaps(box, um)]
        dust = [a for a, box in self._dust_boxes if _overlaps(box, um)]
        if pens:
            extra = extra if extra is not None else np.zeros((H, W, 3), F32)
            art.draw_pen(extra, pens, mpp, ox, oy)
        if dust:
            extra = extra if extra is not None else np.zeros((H, W, 3), F32)
            art.draw_dust(extra, dust, mpp, ox, oy)
        if amounts is None:
            if extra is None:
                return self._glass(ox, oy, p, w, h)
            amounts = np.zeros((H, W, 3), F32)
        rgb = od_to_rgb(amounts, self.stain, extra)
        return self._finish(rgb, ox, oy, p, w, h, blur=True)

    # ------------------------------------------------------------------------------ steps

    def _xy(self, name: str, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Window (h, w) of a slide-pixel texture at (x0, y0); a view when possible."""
        period = {"sensor": 256, "blotch": self.tex.big}.get(name, self.tex.small)
        return sample_xy(getattr(self.tex, name), x0, y0, w, h, period)

    def _finish(self, rgb: np.ndarray, ox: int, oy: int, p: int, w: int, h: int, blur: bool) -> np.ndarray:
        H, W = rgb.shape[:2]
        if blur:
            sigma = self.stain.blur_um / self.mpp
            if sigma >= 0.25:
                rgb = cv2.GaussianBlur(rgb, (0, 0), sigma)
            alpha, bsig = art.blur_alpha(self.layout.blurs, self.mpp, ox, oy, H, W)
            if alpha is not None:
                blurred = cv2.GaussianBlur(rgb, (0, 0), bsig)
                rgb += (blurred - rgb) * alpha[..., None]
        noise = self._xy("sensor", ox, oy, W, H)
        rgb += noise * F32(self.stain.noise_std)
        out = np.clip(rgb[p : p + h, p : p + w], 0, 255)
        return (out + 0.5).astype(np.uint8)

    def _geometry(self, sec: Section, ox: int, oy: int, W: int, H: int) -> dict | None:
        """Per-pixel section-local coordinates and layer masks over the section's part of the block."""
        mpp = self.mpp
        bx0, by0, bx1, by1 = sec.bbox
        sx0 = max(int(math.floor(bx0 / mpp)) - ox, 0)
        sy0 = max(int(math.floor(by0 / mpp)) - oy, 0)
        sx1 = min(int(math.ceil(bx1 / mpp)) - ox, W)
        sy1 = min(int(math.ceil(by1 / mpp)) - oy, H)
        if sx1 <= sx0 or sy1 <= sy0:
            return None
        xs = ((np.arange(sx0, sx1, dtype=np.float64) + ox + 0.5) * mpp).astype(F32)
        ys = ((np.arange(sy0, sy1, dtype=np.float64) + oy + 0.5) * mpp).astype(F32)
        X = np.broadcast_to(xs[None, :], (sy1 - sy0, sx1 - sx0))
        Y = np.broadcast_to(ys[:, None], (sy1 - sy0, sx1 - sx0))
        u, d = sec.frame.to_local(X, Y)
        prof = sec.prof
        t = prof.table
        iu = np.clip(np.rint(u * F32(1.0 / DU)), 0, prof.n - 1).astype(np.int32)
        S = t[R["S"]][iu]
        rho = d - S
        TC = t[R["TC"]][iu]
        EL = t[R["EL"]][iu]
        BOT = t[R["BOT"]][iu]
        jl, jr = prof.jag(d)
        L = F32(prof.length)
        dist_l = u - jl
        dist_r = (L - jr) - u
        dist_b = BOT - d
        inside = (rho >= -TC) & (dist_b > 0) & (dist_l >= 0) & (dist_r >= 0)
        if not inside.any() and not sec.ink:
            return None
        corneum = inside & (rho < 0)
        living = inside & (rho >= 0) & (rho < EL)
        dermis = inside & (rho >= EL)
        FAT = t[R["FAT"]][iu]
        fat = dermis & (d >= FAT)
        fold_row = t[R["FOLD"]][iu]
        fold = None
        if np.any(inside & (d >= fold_row)):
            fold = np.ones(u.shape, F32)
            folded = inside & (d >= fold_row)
            fold[folded] = 1.85
            crease = folded & (np.abs(d - fold_row) < 2.0)
            fold[crease] = 2.4
        return {
            "sec": sec,
            "slices": (slice(sy0, sy1), slice(sx0, sx1)),
            "origin": (sx0, sy0),
            "u": u,
            "d": d,
            "iu": iu,
            "rho": rho,
            "S": S,
            "TC": TC,
            "EL": EL,
            "BOT": BOT,
            "inside": inside,
            "corneum": corneum,
            "living": living,
            "dermis": dermis,
            "fat": fat,
            "dist": (dist_l, dist_r, dist_b),
            "fold": fold,
            "need_vor": bool(living.any() or fat.any()),
        }

    def _voronoi(self, ox: int, oy: int, W: int, H: int) -> dict | None:
        """Nearest cytoplasm-owning cell per pixel and distance to the cell border.

        Returns ``{"owner": int32 (H, W) index into the owner arrays (-1 none), "bdist": float32
        (H, W) µm, plus per-owner attribute arrays}`` or None when no owner is near.
        """
        mpp = self.mpp
        m = int(math.ceil(_VOR_MARGIN / mpp))
        cx0, cy0 = ox - m, oy - m
        CW, CH = W + 2 * m, H + 2 * m
        idx = self.cells.query(cx0 * mpp, cy0 * mpp, (cx0 + CW) * mpp, (cy0 + CH) * mpp)
        c = self.cells.cols
        if idx.size == 0:
            return None
        idx = idx[c["owner"][idx] == 1]
        if idx.size == 0:
            return None
        px = np.floor(c["x"][idx] / mpp).astype(np.int64) - cx0
        py = np.floor(c["y"][idx] / mpp).astype(np.int64) - cy0
        ok = (px >= 0) & (px < CW) & (py >= 0) & (py < CH)
        idx, px, py = idx[ok], px[ok], py[ok]
        if idx.size == 0:
            return None
        seeds = np.full((CH, CW), 255, np.uint8)
        seeds[py, px] = 0
        who = np.full((CH, CW), -1, np.int32)
        who[py, px] = np.arange(idx.size, dtype=np.int32)
        _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
        flat = np.flatnonzero(seeds.ravel() == 0)
        lut = np.concatenate([[-1], who.ravel()[flat]]).astype(np.int32)
        owner = lut[labels]
        border = np.zeros((CH, CW), np.uint8)
        border[:, :-1] |= (owner[:, :-1] != owner[:, 1:]).astype(np.uint8)
        border[:-1, :] |= (owner[:-1, :] != owner[1:, :]).astype(np.uint8)
        bdist = cv2.distanceTransform(1 - border, cv2.DIST_L2, 3)
        owner = owner[m : m + H, m : m + W]
        bdist = bdist[m : m + H, m : m + W] * F32(mpp)
        attrs = {k: c[k][idx].astype(F32) for k in ("cyto_e", "cyto_h", "mem_e", "mem_w", "gap")}
        return {"owner": owner, "bdist": bdist, **attrs}

    def _section(self, g: dict, vor: dict | None, amounts: np.ndarray, extra: np.ndarray | None, ox: int, oy: int):
        """Stain amounts of one section into ``amounts``; ink into ``extra`` (returned).

        Each layer is computed only over the bounding box of its own pixels.
        """
        sy, sx = g["slices"]
        sx0, sy0 = g["origin"]
        hh, ww = g["u"].shape
        Hs = np.zeros((hh, ww), F32)
        Es = np.zeros((hh, ww), F32)
        layers = (("dermis", self._dermis), ("living", self._living), ("corneum", self._corneum))
        for name, fn in layers:
            mask = g[name]
            box = _bbox(mask)
            if box is None:
                continue
            v = _View(g, box, ox + sx0 + self.tex_off_px[0], oy + sy0 + self.tex_off_px[1])
            if name == "living" and vor is None:
                continue
            e, h = fn(v, vor, (sy, sx))
            m = mask[box]
            np.copyto(Es[box], e, where=m)
            np.copyto(Hs[box], h, where=m)
        amounts[sy, sx, 0] += Hs
        amounts[sy, sx, 1] += Es
        if g["sec"].ink:
            extra = self._ink(g, amounts, extra, ox + sx0 + self.tex_off_px[0], oy + sy0 + self.tex_off_px[1])
        return extra

    def _tu(self, v: _View) -> np.ndarray:
        sec_off = 1000.0 * self.layout.sections.index(v.sec)
        return (v.u + F32(self.tex_off_um[0] + sec_off)) * F32(1.0 / self.mpp)

    def _dermis(self, v: _View, vor: dict | None, block: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Papillary and reticular collagen, ragged cut edges, fat. Returns (E, H) over the view."""
        mpp, tex = self.mpp, self.tex
        t = v.sec.prof.table
        hh, ww = v.shape
        fine = self._xy("fine", v.gx, v.gy, ww, hh)
        blot = self._xy("blotch", v.gx, v.gy, ww, hh)
        tu = self._tu(v)
        # bundles wave: the depth coordinate is warped by the slow blotch field (bundle direction
        # changes over ~100 µm) and by a fine crimp along the bundles
        coarse = self._xy("coarse", v.gx + 13, v.gy + 2, ww, hh)
        crimp = np.sin(tu * F32(2.0 * math.pi * mpp / 16.0) + blot * F32(3.0) + coarse * F32(0.7))
        crimp *= _clip01(blot + F32(0.7)) * F32(0.8 / mpp)
        td = (v.d + F32(self.tex_off_um[1])) * F32(1.0 / mpp) + blot * F32(14.0 / mpp) + crimp
        # bundle thickness differs between sections (fine papillary-like to thick, sclerotic)
        tdb = td * F32(1.0 / v.sec.prof.bundle)
        PAP = t[R["PAP"]][v.iu]
        wr = _clip01((v.d - PAP) * F32(1.0 / 30.0) + F32(0.5))
        e_der = np.zeros(v.shape, F32)
        if wr.max() > 0:
            # reticular: long eosinophilic bundles (between the zero crossings of an elongated
            # field) separated by thin clefts that gape open in places; fibrils along each bundle
            coll = sample_map(tex.collagen, tu, tdb)
            fib = sample_map(tex.collagen_b, tu, td)
            gape = _clip01((blot + F32(0.6)) * F32(1.3)) * F32(0.25) + F32(0.12)
            cleft = _clip01(F32(1.6) - np.abs(coll) * (F32(1.0) / gape))
            e_der = (F32(0.92) + F32(0.1) * coll + F32(0.14) * fib + F32(0.04) * fine) * (F32(1.0) - F32(0.96) * cleft)
        if wr.min() < 1:
            # papillary: finer, looser, paler fibrils
            pt = sample_map(tex.papillary, tu, td)
            fibril = cv2.exp(-(pt * pt) * F32(1.0 / 0.35))
            e_pap = (F32(0.22) + F32(0.5) * fibril + F32(0.05) * fine) * _clip01(F32(0.8) + F32(0.3) * coarse)
            e_der = e_pap + (e_der - e_pap) * wr
        dist_l, dist_r, dist_b = v.dist
        edge = np.minimum(np.minimum(dist_l, dist_r), dist_b)
        if edge.min() < 20:
            e_der *= _clip01((edge + F32(8.0) * coarse) * F32(1.0 / 14.0) + F32(0.15))
        e_der *= F32(1.0) + F32(0.08) * blot
        h_der = e_der * (F32(0.3) - F32(0.14) * wr)
        fat = v.g["fat"][v.box]
        if vor is not None and fat.any():
            own = vor["owner"][block][v.box]
            bd = vor["bdist"][block][v.box]
            o = np.maximum(own, 0)
            e_fat = np.where((own >= 0) & (bd < vor["mem_w"][o]), vor["mem_e"][o], F32(0.01)).astype(F32)
            e_der = np.where(fat, e_fat, e_der)
            h_der = np.where(fat, e_fat * F32(0.12), h_der)
        return e_der, h_der

    def _living(self, v: _View, vor: dict | None, block: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Keratinocyte cytoplasm from the Voronoi cells, membranes, spongiosis, keratohyalin, clefts."""
        assert vor is not None  # _section skips the living layer without a Voronoi map
        t = v.sec.prof.table
        hh, ww = v.shape
        fine = self._xy("fine", v.gx, v.gy, ww, hh)
        own = vor["owner"][block][v.box]
        bd = vor["bdist"][block][v.box]
        o = np.maximum(own, 0)
        # cytoplasm: faintly fibrillar (tonofilaments), a little uneven within and between cells
        mid = self._xy("coarse", v.gx + 21, v.gy + 8, ww, hh)
        tex_l = F32(0.92) + F32(0.06) * fine + F32(0.07) * mid
        e_l = vor["cyto_e"][o] * tex_l
        h_l = vor["cyto_h"][o] * tex_l
        mem = bd < vor["mem_w"][o]
        e_l = np.where(mem, vor["mem_e"][o], e_l)
        h_l = np.where(mem, h_l * F32(0.85), h_l)
        gap = vor["gap"][o]
        if gap.max() > 0:
            spong = bd < gap
            if spong.any():
                bridge = self._xy("fine2", v.gx, v.gy, ww, hh) > F32(0.9)
                keep = np.where(bridge, F32(0.5), F32(0.05))
                e_l = np.where(spong, e_l * keep, e_l)
                h_l = np.where(spong, h_l * keep, h_l)
        TG = t[R["TG"]][v.iu]
        gran = v.rho < TG
        if gran.any():
            # keratohyalin: coarse dark purple granules
            grain = self._xy("kgrain", v.gx, v.gy, ww, hh)
            kh = _clip01((grain - F32(1.05)) * F32(1.0 / 0.5)) * F32(1.6)
            h_l = np.where(gran, h_l + kh, h_l)
        cl = t[R["CL"]][v.iu]
        if cl.max() > 0:
            rag = cl * (F32(0.75) + F32(0.35) * self._xy("coarse", v.gx + 7, v.gy + 3, ww, hh))
            cleft = (cl > 0) & (v.rho < rag) & (v.d >= t[R["NT"]][v.iu])
            e_l = np.where(cleft, e_l * F32(0.04), e_l)
            h_l = np.where(cleft, h_l * F32(0.04), h_l)
        e_l *= F32(1.0) + F32(0.06) * self._xy("blotch", v.gx, v.gy, ww, hh)
        return e_l, h_l

    def _corneum(self, v: _View, vor: dict | None, block: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Orthokeratin from open basket-weave to compact (profile row ``CK``); compact
        parakeratotic keratin in parakeratosis patches (its nuclei are cells).

        Basket-weave: thin lamellae every ``prof.lamella`` µm, parallel to the surface but
        warped by two smooth fields (so they wave, bunch, part and now and then fold over one
        another), with clear gaps between them; the lowest few µm are always denser. Compact:
        a dense sheet with faint lamination and a few thin splits.
        """
        mpp, tex = self.mpp, self.tex
        prof = v.sec.prof
        t = prof.table
        hh, ww = v.shape
        fine = self._xy("fine", v.gx, v.gy, ww, hh)
        blot = self._xy("blotch", v.gx, v.gy, ww, hh)
        coarse = self._xy("coarse", v.gx + 3, v.gy + 17, ww, hh)
        tr = (v.rho + F32(self.tex_off_um[1])) * F32(1.0 / mpp)
        tu = self._tu(v)
        f1 = sample_map(tex.lamellae, tu, tr)
        f2 = sample_map(tex.lamellae, tu * F32(0.9) + tr * F32(0.3) + F32(333.0), tr * F32(1.1))
        k = F32(2.0 * math.pi / prof.lamella)
        base = v.rho + blot * F32(4.0) + coarse * F32(0.5)
        # lamella thickness varies from lamella to lamella and along each
        inv_w = F32(1.0) / (F32(0.25) + F32(0.35) * _clip01(f2 * F32(0.4) + F32(0.5)))
        # two warped sets of lamellae; the second one shows where the basket weave crosses
        ph = (base + F32(3.5) * f1) * k
        lines = cv2.exp((np.cos(ph) - F32(1.0)) * inv_w)
        # each lamella its own strength (some faint or missing: irregular gaps)
        lines *= F32(0.55) + F32(0.45) * np.sin(np.floor(ph * F32(1.0 / (2.0 * math.pi)) + F32(0.5)) * F32(2.4) + f2)
        mix = _clip01(blot * F32(1.2) + F32(0.2))
        if mix.max() > 0:
            l2 = cv2.exp((np.cos((base + F32(3.5) * f2 + F32(0.5 * prof.lamella)) * k) - F32(1.0)) * inv_w)
            lines = np.maximum(lines, l2 * mix)
        # lamellae thin out and break along their length
        lines *= _clip01(F32(0.85) + F32(0.5) * f2 + F32(0.2) * coarse)
        # compaction: the section's profile, denser in the lowest ~4 µm above the granular layer
        TC = v.g["TC"][v.box]
        ck = t[R["CK"]][v.iu]
        low = _clip01((v.rho + F32(4.0)) * F32(0.3))
        comp = _clip01(ck + low * F32(0.7) + F32(0.1) * coarse)
        dense = comp * comp
        ke, kh = prof.keratin
        body = F32(0.92) + F32(0.1) * fine + F32(0.12) * f1
        open_ = (F32(1.0) - dense) * F32(1.8)
        e_c = F32(ke) * (lines * open_ + (body + F32(0.15) * lines) * dense) + F32(0.02)
        h_c = F32(kh) * (lines * open_ + (body + F32(0.15) * lines) * F32(0.8) * dense) + F32(0.01)
        pt, pb = t[R["PT"]][v.iu], t[R["PB"]][v.iu]
        para = (v.d >= pt) & (v.d < pb)
        if para.any():
            # parakeratotic keratin: compact and more eosinophilic, faintly laminated
            e_p = F32(ke + 0.1) * (F32(0.85) + F32(0.08) * fine + F32(0.12) * lines)
            h_p = F32(kh * 0.6 + 0.05) * (F32(0.9) + F32(0.1) * fine + F32(0.1) * lines)
            e_c = np.where(para, e_p, e_c)
            h_c = np.where(para, h_p, h_c)
        # the outermost corneum flakes off irregularly
        top_rag = _clip01((v.rho + TC + F32(1.5) * self._xy("coarse", v.gx + 11, v.gy + 5, ww, hh)) * F32(0.5))
        return e_c * top_rag, h_c * top_rag

    def _ink(self, g: dict, amounts: np.ndarray, extra: np.ndarray | None, gx: int, gy: int) -> np.ndarray | None:
        """Margin ink along the inked cut edges (only computed near those edges)."""
        sec: Section = g["sec"]
        prof = sec.prof
        sy, sx = g["slices"]
        dist_l, dist_r, dist_b = g["dist"]
        u, d = g["u"], g["d"]
        for ink in sec.ink:
            dist = {"left": dist_l, "right": dist_r, "bottom": dist_b}[ink.edge]
            near = (dist > -ink.width_out) & (dist < ink.width_in)
            box = _bbox(near)
            if box is None:
                continue
            dd = dist[box]
            if ink.edge == "bottom":
                along = u[box] * F32(1.0 / prof.length)
                band = near[box] & (along >= ink.start) & (along <= ink.end)
            else:
                top = g["S"][box] - g["TC"][box]
                along = (d[box] - top) / np.maximum(g["BOT"][box] - top, F32(1.0))
                band = near[box] & (along >= ink.start) & (along <= min(ink.end, 1.02))
            if not band.any():
                continue
            hh, ww = dd.shape
            coarse = self._xy("coarse", gx + box[1].start + 5, gy + box[0].start + 9, ww, hh)
            w = np.where(dd >= 0, dd * F32(1.0 / ink.width_in), -dd * F32(1.0 / ink.width_out))
            amt = _clip01((coarse + F32(0.4)) * F32(1.6)) * _clip01(F32(1.0) - w) * F32(ink.amount)
            amt = np.where(band, amt, F32(0.0))
            if extra is None:
                extra = np.zeros(amounts.shape, F32)
            sub = extra[sy, sx][box]
            sub += amt[..., None] * np.asarray(art.INK_OD[ink.color], F32)
        return extra

    def _structures(self, amounts: np.ndarray, ox: int, oy: int, W: int, H: int) -> None:
        """Vessels (wall + lumen), eccrine tubules and spongiotic vesicles."""
        st = self.structs
        if not st or st["x"].size == 0:
            return
        mpp = self.mpp
        reach = (st["rx"] + st["wall"] + 4) / mpp
        px = st["x"] / mpp - 0.5 - ox
        py = st["y"] / mpp - 0.5 - oy
        sel = np.flatnonzero((px + reach > 0) & (px - reach < W) & (py + reach > 0) & (py - reach < H))
        if sel.size == 0:
            return
        wall = np.zeros((H, W), np.uint8)
        lumen = np.zeros((H, W), np.uint8)
        gland = np.zeros((H, W), np.uint8)
        glum = np.zeros((H, W), np.uint8)
        clear = np.zeros((H, W), np.uint8)
        for i in sel.tolist():
            c = (int(round(px[i] * 16)), int(round(py[i] * 16)))
            ax = (int(st["rx"][i] / mpp * 16), int(st["ry"][i] / mpp * 16))
            ang = float(st["angle"][i])
            kind = int(st["kind"][i])
            if kind == STRUCT_KIND["vessel"]:
                wl = st["wall"][i] / mpp * 16
                cv2.ellipse(wall, c, (int(ax[0] + wl), int(ax[1] + wl)), ang, 0, 360, 255, -1, cv2.LINE_AA, 4)
                cv2.ellipse(lumen, c, ax, ang, 0, 360, 255, -1, cv2.LINE_AA, 4)
            elif kind == STRUCT_KIND["gland"]:
                cv2.ellipse(gland, c, ax, ang, 0, 360, 255, -1, cv2.LINE_AA, 4)
                cv2.ellipse(glum, c, (int(ax[0] * 0.22), int(ax[1] * 0.22)), ang, 0, 360, 255, -1, cv2.LINE_AA, 4)
            else:
                cv2.ellipse(clear, c, ax, ang, 0, 360, 255, -1, cv2.LINE_AA, 4)
        fine = self._xy("fine", ox, oy, W, H)
        if wall.any():
            a = wall.astype(F32) * F32(1 / 255)
            amounts[..., 1] += (F32(0.85) + F32(0.1) * fine - amounts[..., 1]) * a
            amounts[..., 0] += (F32(0.14) - amounts[..., 0]) * a
            a = lumen.astype(F32) * F32(1 / 255)
            amounts[..., 1] += (F32(0.18) + F32(0.04) * fine - amounts[..., 1]) * a
            amounts[..., 0] *= F32(1.0) - a
        if gland.any():
            a = gland.astype(F32) * F32(1 / 255)
            amounts[..., 1] += (F32(0.58) + F32(0.06) * fine - amounts[..., 1]) * a
            amounts[..., 0] += (F32(0.36) - amounts[..., 0]) * a
            a = glum.astype(F32) * F32(1 / 255)
            amounts[..., :2] *= (F32(1.0) - F32(0.95) * a)[..., None]
        if clear.any():
            a = clear.astype(F32) * F32(1 / 255)
            amounts[..., 1] += (F32(0.04) - amounts[..., 1]) * a
            amounts[..., 0] *= F32(1.0) - F32(0.97) * a

    def _nuclei(self, amounts: np.ndarray, ox: int, oy: int, W: int, H: int) -> None:
        """Draw nuclei, red cells, vacuoles and halos of every cell touching the block."""
        mpp = self.mpp
        reach = 12.0
        idx = self.cells.query(ox * mpp - reach, oy * mpp - reach, (ox + W) * mpp + reach, (oy + H) * mpp + reach)
        if idx.size == 0:
            return
        c = self.cells.cols
        px = c["x"][idx] / mpp - 0.5 - ox
        py = c["y"][idx] / mpp - 0.5 - oy
        r = (np.maximum(c["rx"][idx], c["ry"][idx]) + c["halo"][idx] + 6.0) / mpp
        ok = (px + r > 0) & (px - r < W) & (py + r > 0) & (py - r < H)
        idx, px, py = idx[ok], px[ok], py[ok]
        if idx.size == 0:
            return
        nuc = np.zeros((H, W), np.uint8)
        rbc = np.zeros((H, W), np.uint8)
        clear = np.zeros((H, W), np.uint8)
        pink = np.zeros((H, W), np.uint8)
        k16 = 16.0 / mpp
        rim = max(1, int(round(0.55 / mpp)))
        S = STYLE
        rows = zip(
            (px * 16).round().astype(np.int64).tolist(),
            (py * 16).round().astype(np.int64).tolist(),
            c["rx"][idx].tolist(),
            c["ry"][idx].tolist(),
            c["angle"][idx].tolist(),
            c["dark"][idx].tolist(),
            c["style"][idx].tolist(),
            c["vac"][idx].tolist(),
            c["halo"][idx].tolist(),
            c["vsz"][idx].tolist(),
            c["rnd"][idx].tolist(),
        )
        ell = cv2.ellipse
        AA = cv2.LINE_AA
        for cx, cy, rx, ry, ang, dark, style, vac, halo, vsz, rnd in rows:
            ctr = (cx, cy)
            if halo > 0:
                # off-centre, so that retraction halos often show as crescents
                th = ((rnd >> 9) & 63) / 64.0 * 6.2832
                hx = cx + int(0.9 * halo * math.cos(th) * k16)
                hy = cy + int(0.9 * halo * math.sin(th) * k16)
                ell(clear, (hx, hy), (int((rx + halo) * k16), int((ry + halo) * k16)), ang, 0, 360, 215, -1, AA, 4)
            if vac:
                for j in range(vac):
                    bits = (rnd >> (5 * j)) & 1023
                    th = (bits & 31) / 32.0 * 6.2832
                    rr = 2.0 + ((bits >> 5) & 31) / 31.0 * 4.5 * vsz
                    rv = (1.3 + ((rnd >> (j + 20)) & 7) / 7.0 * 2.2) * vsz
                    vx = cx + int(rr * math.cos(th) * k16)
                    vy = cy + int(rr * math.sin(th) * k16)
                    cv2.circle(clear, (vx, vy), int(rv * k16), 235, -1, AA, 4)
            if style == 0:
                continue
            v = min(255, int(dark * 100))
            axes = (max(1, int(rx * k16)), max(1, int(ry * k16)))
            if style == S["vesicular"]:
                # open chromatin, a darker nuclear membrane, often a nucleolus
                ell(nuc, ctr, axes, ang, 0, 360, int(v * 0.76), -1, AA, 4)
                ell(nuc, ctr, axes, ang, 0, 360, min(255, int(v * 1.08)), rim, AA, 4)
                if rnd & 0x30000:
                    ox_ = int(((rnd & 15) - 7.5) / 7.5 * rx * 0.35 * k16)
                    oy_ = int((((rnd >> 4) & 15) - 7.5) / 7.5 * ry * 0.35 * k16)
                    cv2.circle(nuc, (cx + ox_, cy + oy_), max(1, int(0.6 * k16)), min(255, int(v * 1.45)), -1, AA, 4)
            elif style == S["solid"] or style == S["pyknotic"]:
                if rx > 2.5 and ry > 1.6:
                    ell(nuc, ctr, axes, ang, 0, 360, int(v * 0.9), -1, AA, 4)
                    ell(nuc, ctr, axes, ang, 0, 360, min(255, int(v * 1.08)), rim, AA, 4)
                else:
                    ell(nuc, ctr, axes, ang, 0, 360, v, -1, AA, 4)
            elif style == S["karyorrhexis"]:
                n_f = 3 + (rnd & 3)
                for j in range(n_f):
                    th = ((rnd >> (2 + 3 * j)) & 7) / 8.0 * 6.2832
                    rr = 1.2 + ((rnd >> (12 + 2 * j)) & 3) * 0.7
                    fx = cx + int(rr * math.cos(th) * k16)
                    fy = cy + int(rr * math.sin(th) * k16)
                    cv2.circle(nuc, (fx, fy), int((0.55 + ((rnd >> (20 + j)) & 1) * 0.4) * k16), v, -1, AA, 4)
            elif style == S["neutrophil"]:
                cv2.circle(pink, ctr, int(4.6 * k16), 55, -1, AA, 4)
                n_l = 3 + (rnd & 1)
                a0 = (rnd >> 1 & 31) / 32.0 * 6.2832
                for j in range(n_l):
                    th = a0 + j * 6.2832 / n_l * 0.8
                    fx = cx + int(1.6 * math.cos(th) * k16)
                    fy = cy + int(1.6 * math.sin(th) * k16)
                    cv2.circle(nuc, (fx, fy), int(1.25 * k16), v, -1, AA, 4)
            elif style == S["rbc"]:
                ell(rbc, ctr, axes, ang, 0, 360, v, -1, AA, 4)
                ell(rbc, ctr, (max(1, axes[0] // 2), max(1, axes[1] // 2)), ang, 0, 360, int(v * 0.8), -1, AA, 4)
        fine2 = self._xy("fine2", ox + self.tex_off_px[0], oy + self.tex_off_px[1], W, H)
        if clear.any():
            keep = F32(1.0) - clear.astype(F32) * F32(1 / 255)
            amounts[..., 0] *= keep
            amounts[..., 1] *= keep
        if pink.any():
            amounts[..., 1] = np.maximum(amounts[..., 1], pink.astype(F32) * F32(0.01))
        if nuc.any():
            # granular, speckled chromatin
            grain = self._xy("grain", ox + self.tex_off_px[0] + 5, oy + self.tex_off_px[1] + 9, W, H)
            n = nuc.astype(F32) * F32(0.01) * (F32(0.82) + F32(0.1) * fine2 + F32(0.1) * grain)
            a = np.minimum(n, F32(1.0))
            amounts[..., 0] = np.maximum(amounts[..., 0], n)
            # nuclei keep a little eosin (purple-blue, not slate blue), also inside halos
            np.maximum(amounts[..., 1] * (F32(1.0) - F32(0.08) * a), n * F32(0.42), out=amounts[..., 1])
        if rbc.any():
            amounts[..., 2] += rbc.astype(F32) * F32(0.01)
