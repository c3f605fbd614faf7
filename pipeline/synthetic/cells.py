"""Cell and structure placement in section-local µm (keratinocytes, nuclei, vessels, glands, fat).

Everything is decided here, once per section, from the layout random generator; the renderer
only draws what these tables say. Positions are produced in section-local ``(u, d)`` µm and
converted to slide µm by :meth:`CellTable.to_slide`.

Nucleus styles (:data:`STYLE`): ``none`` (no nucleus: ghost or anucleate cell), ``vesicular``
(open chromatin, rim, nucleolus), ``solid`` (dense), ``pyknotic`` (small, very dark),
``karyorrhexis`` (3-5 dark fragments), ``neutrophil`` (2-4 lobes in pale pink cytoplasm),
``rbc`` (red disc, no nucleus).

A cell with ``owner = 1`` owns the cytoplasm around it (a Voronoi cell at render time) with
amounts ``cyto_e``/``cyto_h``; its border band (``mem_w`` µm) has eosin ``mem_e``; ``gap`` µm
of intercellular oedema (spongiosis) clears the border; ``vac`` vacuoles of relative size
``vsz`` clear the cytoplasm; ``halo`` µm of clear space surrounds the nucleus (perinuclear
retraction, a lymphocyte's halo), a little off-centre so that it often shows as a crescent.
Pattern cells take their look from the pattern's intensity at their ``u`` (profile rows ``PI``,
``NI``, ``KI``): subtle pallor is slightly paler, barely vacuolated cytoplasm with nuclei kept;
subtle necrolysis is mildly hypereosinophilic with shrunken but mostly present nuclei.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.synthetic.catalog import DiagnosisSpec
from pipeline.synthetic.geometry import Frame
from pipeline.synthetic.noise import smooth_noise_1d
from pipeline.synthetic.profiles import BIG, DU, Profiles, R

STYLE = {"none": 0, "vesicular": 1, "solid": 2, "pyknotic": 3, "karyorrhexis": 4, "neutrophil": 5, "rbc": 6}

FIELDS = (
    "x",
    "y",
    "rx",
    "ry",
    "angle",
    "dark",
    "style",
    "owner",
    "cyto_e",
    "cyto_h",
    "mem_e",
    "mem_w",
    "gap",
    "vac",
    "halo",
    "vsz",
    "rnd",
)
#: Structure kinds: vessel (wall ring + lumen), gland tubule (cuboidal epithelium), vesicle (clear space).
STRUCT_KIND = {"vessel": 0, "gland": 1, "vesicle": 2}
STRUCT_FIELDS = ("x", "y", "rx", "ry", "angle", "wall", "kind")


@dataclass
class CellTable:
    """Columns of equal length; ``x``/``y`` are section-local (u, d) until :meth:`to_slide`."""

    cols: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in FIELDS})

    def add(self, u: np.ndarray, d: np.ndarray, **kw: np.ndarray | float) -> None:
        n = len(u)
        if n == 0:
            return
        defaults = {
            "rx": 3.5,
            "ry": 3.5,
            "angle": 0.0,
            "dark": 0.7,
            "style": STYLE["solid"],
            "owner": 0,
            "cyto_e": 0.0,
            "cyto_h": 0.0,
            "mem_e": 0.0,
            "mem_w": 0.0,
            "gap": 0.0,
            "vac": 0,
            "halo": 0.0,
            "vsz": 1.0,
            "rnd": 0,
        }
        self.cols["x"].append(np.asarray(u, np.float64))
        self.cols["y"].append(np.asarray(d, np.float64))
        for k, v in defaults.items():
            val = kw.get(k, v)
            self.cols[k].append(np.broadcast_to(np.asarray(val, np.float64), (n,)).copy())

    def to_slide(self, frame: Frame) -> dict[str, np.ndarray]:
        """Concatenate and convert to slide µm; angles become slide degrees. Returns column arrays."""
        out = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self.cols.items()}
        u, d = out["x"], out["y"]
        x, y = frame.to_slide(u, d)
        out["angle"] = np.degrees(frame.direction(u)) + out["angle"]
        out["x"], out["y"] = x, y
        return _typed(out)


def _typed(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ints = {"style", "owner", "vac", "rnd"}
    return {k: (v.astype(np.int64) if k in ints else v.astype(np.float64)) for k, v in cols.items()}


@dataclass
class StructTable:
    cols: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in STRUCT_FIELDS})

    def add(self, u, d, rx, ry, angle, wall, kind: str) -> None:
        n = len(np.atleast_1d(u))
        if n == 0:
            return
        for k, v in zip(STRUCT_FIELDS, (u, d, rx, ry, angle, wall, STRUCT_KIND[kind])):
            self.cols[k].append(np.broadcast_to(np.asarray(v, np.float64), (n,)).copy())

    def to_slide(self, frame: Frame) -> dict[str, np.ndarray]:
        out = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self.cols.items()}
        x, y = frame.to_slide(out["x"], out["y"])
        out["angle"] = np.degrees(frame.direction(out["x"])) + out["angle"]
        out["x"], out["y"] = x, y
        out["kind"] = out["kind"].astype(np.int64)
        return out


class _Lookup:
    """Profile values at arbitrary u (nearest grid sample)."""

    def __init__(self, prof: Profiles) -> None:
        self.prof = prof

    def __call__(self, name: str, u: np.ndarray) -> np.ndarray:
        i = np.clip(np.rint(np.asarray(u) / DU).astype(np.int64), 0, self.prof.n - 1)
        return self.prof.table[R[name]][i].astype(np.float64)


def _hex_grid(rng: np.random.Generator, length: float, d0: float, d1: float, sx: float, sy: float, jitter: float):
    """Jittered hexagonal grid over u ∈ [0, length], v ∈ [d0, d1] (µm). Returns (u, v)."""
    rows = np.arange(d0 + sy / 2, d1, sy)
    cols = np.arange(0, length + sx, sx)
    uu, vv = np.meshgrid(cols, rows)
    uu = uu + (np.arange(rows.size)[:, None] % 2) * sx / 2 + rng.uniform(0, sx)
    uu = uu.ravel() + rng.normal(0, jitter, uu.size)
    vv = vv.ravel() + rng.normal(0, jitter * 0.8, vv.size)
    keep = (uu > 1.0) & (uu < length - 1.0)
    return uu[keep], vv[keep]


def _in_band(look: _Lookup, top: str, bot: str, u: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (d >= look(top, u)) & (d < look(bot, u))


def _dist_to_dermis(prof: Profiles) -> tuple[np.ndarray, float]:
    """Distance (µm) from each point above the dermo-epidermal junction to the dermis, 1 µm raster.

    Returns (raster float32 of shape (depth_px, length_px), d of row 0).
    """
    t = prof.table
    dej = (t[R["S"]] + t[R["EL"]])[:: int(round(1 / DU))]
    d0 = float(np.min(t[R["S"]] - t[R["TC"]])) - 4.0
    d1 = float(np.max(t[R["S"]] + t[R["EL"]])) + 4.0
    rows = d0 + np.arange(int(d1 - d0) + 1)
    above = (rows[:, None] < dej[None, :]).astype(np.uint8)
    dist = cv2.distanceTransform(above, cv2.DIST_L2, 5)
    return dist, d0


def build_cells(
    rng: np.random.Generator, prof: Profiles, spec: DiagnosisSpec, inflammation: float, dilation: float
) -> tuple[CellTable, StructTable]:
    """All cells and structures of one section, in section-local µm."""
    cells, structs = CellTable(), StructTable()
    look = _Lookup(prof)
    _epidermis(rng, prof, spec, look, cells, structs)
    _corneum(rng, prof, spec, look, cells)
    _dermis(rng, prof, spec, look, cells, structs, inflammation, dilation)
    return cells, structs


# ----------------------------------------------------------------------------- epidermis


def _epidermis(rng, prof: Profiles, spec: DiagnosisSpec, look: _Lookup, cells: CellTable, structs: StructTable) -> None:
    t = prof.table
    L = prof.length
    dist, dist_d0 = _dist_to_dermis(prof)

    def to_dermis(u, d):
        iu = np.clip(np.rint(u).astype(np.int64), 0, dist.shape[1] - 1)
        idd = np.clip(np.rint(d - dist_d0).astype(np.int64), 0, dist.shape[0] - 1)
        return dist[idd, iu]

    def in_patterns(u, d):
        return _in_band(look, "LT", "LB", u, d) | _in_band(look, "NT", "NB", u, d)

    max_el = float(np.max(t[R["EL"]]))
    s_min, s_max = float(np.min(t[R["S"]])), float(np.max(t[R["S"]]))

    # basal layer: a palisade along the dermo-epidermal junction
    u_grid = prof.u
    dej = t[R["S"]] + t[R["EL"]]
    seg = np.hypot(np.diff(u_grid), np.diff(dej))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    spacing = rng.uniform(6.6, 7.8)
    pos = np.arange(rng.uniform(0, spacing), arc[-1], spacing)
    pos = pos + rng.normal(0, 0.9, pos.size)
    pos = np.clip(pos, 0, arc[-1])
    bu = np.interp(pos, arc, u_grid)
    bd = np.interp(pos, arc, dej)
    tu = np.gradient(dej)  # d(dej)/d(index)
    slope = np.interp(pos, arc, tu) / DU
    norm = np.hypot(1.0, slope)
    # inward normal (towards the surface): (slope, -1)/norm
    off = rng.uniform(3.8, 5.0, bu.size)
    bu2 = bu + off * slope / norm
    bd2 = bd - off / norm
    ok = (bu2 > 1) & (bu2 < L - 1) & ~in_patterns(bu2, bd2)
    normal_angle = np.degrees(np.arctan2(-1.0, slope))  # local angle of the inward normal
    k = int(ok.sum())
    cells.add(
        bu2[ok],
        bd2[ok],
        rx=rng.uniform(4.2, 5.4, k),
        ry=rng.uniform(2.6, 3.3, k),
        angle=normal_angle[ok] + rng.normal(0, 8, k),
        dark=rng.uniform(1.4, 1.75, k),
        style=STYLE["solid"],
        owner=1,
        cyto_e=rng.uniform(0.6, 0.72, k),
        cyto_h=rng.uniform(0.42, 0.55, k),
        mem_e=0.55,
        mem_w=0.25,
        gap=_gap(look, bu2[ok], bd2[ok], rng, basal=True),
        rnd=rng.integers(0, 2**31, k),
    )

    # spinous layer: polygonal cells, oval vesicular nuclei of varying size, flatter towards the
    # surface; in some slides perinuclear retraction halos (a fixation artefact, not pallor)
    halo_p = rng.uniform(0.0, 0.45) if rng.random() < 0.7 else 0.0
    sx, sy = rng.uniform(11.5, 13.5), rng.uniform(9.5, 11.0)
    su, sd = _hex_grid(rng, L, 0.0, max_el, sx, sy, 2.4)
    sd_abs = sd + look("S", su)
    el = look("EL", su)
    ok = (sd > look("TG", su) + 3.0) & (sd < el - 2.0) & (to_dermis(su, sd_abs) > 8.5) & ~in_patterns(su, sd_abs)
    su, sd, sd_abs = su[ok], sd[ok], sd_abs[ok]
    k = su.size
    rel = np.clip(sd / np.maximum(look("E0", su), 1.0), 0, 1)  # 0 at top
    flat = 0.65 + 0.35 * np.clip(rel / 0.35, 0, 1)
    r0 = rng.uniform(2.8, 4.2, k)
    cyto_e = rng.uniform(0.72, 0.9, k)
    cells.add(
        su,
        sd_abs,
        rx=r0 * rng.uniform(1.0, 1.4, k),
        ry=r0 * flat * rng.uniform(0.7, 1.0, k),
        angle=rng.normal(0, 14, k),
        dark=rng.uniform(1.05, 1.45, k),
        style=np.where(rng.random(k) < 0.65, STYLE["vesicular"], STYLE["solid"]),
        owner=1,
        cyto_e=cyto_e,
        cyto_h=rng.uniform(0.33, 0.46, k),
        mem_e=cyto_e * rng.uniform(0.82, 0.94, k),
        mem_w=0.25,
        gap=_gap(look, su, sd_abs, rng),
        halo=np.where(rng.random(k) < halo_p, rng.uniform(0.5, 1.7, k), 0.0),
        rnd=rng.integers(0, 2**31, k),
    )

    # granular layer: flattened cells (keratohyalin is drawn per pixel)
    tg_max = float(np.max(t[R["TG"]]))
    if tg_max > 2:
        gu, gd = _hex_grid(rng, L, 0.0, tg_max, rng.uniform(14, 17), 5.0, 1.0)
        ok = (gd < look("TG", gu) - 1.0) & (gd > 0.8)
        gu, gd = gu[ok], gd[ok]
        gd_abs = gd + look("S", gu)
        ok = ~in_patterns(gu, gd_abs)
        gu, gd_abs = gu[ok], gd_abs[ok]
        k = gu.size
        cells.add(
            gu,
            gd_abs,
            rx=rng.uniform(3.8, 5.0, k),
            ry=rng.uniform(1.5, 2.1, k),
            angle=rng.normal(0, 6, k),
            dark=rng.uniform(1.15, 1.5, k),
            style=STYLE["solid"],
            owner=1,
            cyto_e=rng.uniform(0.62, 0.74, k),
            cyto_h=rng.uniform(0.45, 0.55, k),
            mem_e=0.5,
            mem_w=0.25,
            rnd=rng.integers(0, 2**31, k),
        )

    # pallor: swollen pale keratinocytes, vacuolated, crisp pink membranes; subtle pallor
    # (low intensity): barely larger, slightly paler cells, few small vacuoles, nuclei kept
    for pattern, i0, i1 in prof.patches:
        if pattern != "pallor":
            continue
        level = float(np.mean(t[R["PI"], i0 : i1 + 1]))
        sp = (12.0 + 5.5 * level) * rng.uniform(0.95, 1.08)
        pu, pd = _hex_grid(rng, (i1 - i0) * DU + 2 * sp, s_min - 2, s_max + max_el, sp, sp * 0.85, 2.0)
        pu = pu + (i0 * DU - sp)
        ok = _in_band(look, "LT", "LB", pu, pd)
        pu, pd = pu[ok], pd[ok]
        k = pu.size
        lv = look("PI", pu)
        kind = rng.random(k)
        p_pyk = 0.04 + 0.26 * lv
        style = np.where(
            kind < p_pyk,
            STYLE["pyknotic"],
            np.where(kind < p_pyk + 0.01 + 0.09 * lv, STYLE["none"], STYLE["vesicular"]),
        )
        r = np.where(style == STYLE["pyknotic"], rng.uniform(1.7, 2.4, k), rng.uniform(3.0, 3.9, k))
        cells.add(
            pu,
            pd,
            rx=r * rng.uniform(1.0, 1.2, k),
            ry=r * rng.uniform(0.8, 1.0, k),
            angle=rng.uniform(0, 180, k),
            dark=np.where(style == STYLE["pyknotic"], rng.uniform(1.8, 2.2, k), rng.uniform(0.9, 1.25, k)),
            style=style,
            owner=1,
            cyto_e=_lerp(0.64, rng.uniform(0.22, 0.36, k), lv),
            cyto_h=_lerp(0.27, rng.uniform(0.06, 0.11, k), lv),
            mem_e=_lerp(0.58, rng.uniform(0.55, 0.75, k), lv),
            mem_w=0.25 + 0.2 * lv,
            vac=np.floor(rng.random(k) * (1.6 + 3.6 * lv)).astype(np.int64),
            vsz=0.45 + 0.55 * lv,
            rnd=rng.integers(0, 2**31, k),
        )

    # necrolysis: hypereosinophilic necrotic keratinocytes, pyknotic/fragmented or absent nuclei;
    # subtle necrolysis: mildly eosinophilic, many shrunken but still present nuclei
    if prof.pattern_present("necrolysis"):
        sp = rng.uniform(10.0, 12.0)
        nu, nd = _hex_grid(rng, L, s_min - 2, s_max + max_el, sp, sp * 0.8, 1.8)
        ok = (nd >= look("NT", nu) + look("CL", nu) + 2.0) & (nd < look("NB", nu))
        nu, nd = nu[ok], nd[ok]
        k = nu.size
        lv = look("NI", nu)
        kind = rng.random(k)
        p_ret = 0.7 * (1.0 - lv)
        p_pyk = p_ret + 0.25 + 0.2 * lv
        p_kr = p_pyk + 0.04 + 0.21 * lv
        style = np.where(
            kind < p_ret,
            STYLE["vesicular"],
            np.where(kind < p_pyk, STYLE["pyknotic"], np.where(kind < p_kr, STYLE["karyorrhexis"], STYLE["none"])),
        )
        # kept nuclei shrink and darken as the intensity rises
        kept = style == STYLE["vesicular"]
        r_kept = rng.uniform(2.8, 3.8, k) * (1.0 - 0.25 * lv)
        cells.add(
            nu,
            nd,
            rx=np.where(kept, r_kept * rng.uniform(1.0, 1.3, k), rng.uniform(1.6, 2.5, k)),
            ry=np.where(kept, r_kept * rng.uniform(0.75, 1.0, k), rng.uniform(1.3, 2.2, k)),
            angle=rng.uniform(0, 180, k),
            dark=np.where(kept, rng.uniform(1.1, 1.45, k) + 0.4 * lv, rng.uniform(2.0, 2.4, k)),
            style=style,
            owner=1,
            cyto_e=_lerp(0.86, rng.uniform(1.0, 1.3, k), lv),
            cyto_h=_lerp(0.33, rng.uniform(0.08, 0.15, k), lv),
            mem_e=_lerp(0.76, rng.uniform(0.85, 1.1, k), lv),
            mem_w=0.25,
            halo=np.where((style == STYLE["pyknotic"]) & (rng.random(k) < 0.25), rng.uniform(0.3, 0.9, k), 0.0),
            rnd=rng.integers(0, 2**31, k),
        )

    # spongiosis: vesicles and lymphocyte exocytosis in the lower/mid epidermis
    sp_row = t[R["SP"]]
    if np.any(sp_row > 0.3):
        n_ves = rng.poisson(L / 1000.0 * 3.0 * float(np.mean(sp_row)))
        cand = np.flatnonzero(sp_row > 0.5)
        if cand.size and n_ves:
            iu = rng.choice(cand, n_ves)
            vu = iu * DU
            vd = look("S", vu) + look("EL", vu) * rng.uniform(0.45, 0.75, n_ves)
            vr = rng.uniform(7, 16, n_ves)
            structs.add(vu, vd, vr, vr * rng.uniform(0.7, 1.0, n_ves), rng.uniform(0, 180, n_ves), 0.0, "vesicle")
    n_exo = rng.poisson(L / 1000.0 * rng.uniform(*spec.exocytosis_per_mm)) if spec.exocytosis_per_mm[1] > 0 else 0
    if n_exo:
        weight = np.maximum(sp_row, 0.05) if np.any(sp_row > 0) else np.ones_like(sp_row)
        iu = rng.choice(prof.n, n_exo, p=weight / weight.sum())
        eu = iu * DU
        neutro = spec.name == "psoriasiform"
        rel = rng.uniform(0.05, 0.45, n_exo) if neutro else rng.uniform(0.3, 0.9, n_exo)
        ed = look("S", eu) + np.minimum(look("EL", eu), look("E0", eu) * 1.3) * rel
        ok = ~in_patterns(eu, ed)
        k = int(ok.sum())
        if neutro:
            cells.add(
                eu[ok],
                ed[ok],
                rx=2.0,
                ry=2.0,
                dark=rng.uniform(1.9, 2.3, k),
                style=STYLE["neutrophil"],
                halo=rng.uniform(2.5, 4.0, k),
                rnd=rng.integers(0, 2**31, k),
            )
        else:
            cells.add(
                eu[ok],
                ed[ok],
                rx=rng.uniform(2.7, 3.3, k),
                ry=rng.uniform(2.5, 3.1, k),
                angle=rng.uniform(0, 180, k),
                dark=rng.uniform(1.9, 2.3, k),
                style=STYLE["solid"],
                halo=rng.uniform(3.8, 5.0, k),
                rnd=rng.integers(0, 2**31, k),
            )


def _lerp(a: float | np.ndarray, b: float | np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a`` at ``w = 0``, ``b`` at ``w = 1``."""
    return a + (b - a) * w


def _gap(look: _Lookup, u: np.ndarray, d: np.ndarray, rng, basal: bool = False) -> np.ndarray:
    """Intercellular gap half-width (µm): spongiosis, strongest in the lower and mid epidermis."""
    sp = look("SP", u)
    base = 0.0
    if not np.any(sp > 0):
        return np.full(u.shape, base)
    rel = (d - look("S", u)) / np.maximum(look("EL", u), 1.0)
    depth_w = np.clip((rel - 0.18) / 0.25, 0.0, 1.0)
    if basal:
        depth_w = np.full(u.shape, 0.8)
    return base + sp * depth_w * rng.uniform(0.9, 2.0, u.size)


# ----------------------------------------------------------------------------- corneum


def _corneum(rng, prof: Profiles, spec: DiagnosisSpec, look: _Lookup, cells: CellTable) -> None:
    t = prof.table
    pt, pb = t[R["PT"]].astype(np.float64), t[R["PB"]].astype(np.float64)
    thick = np.where(pb > pt, pb - pt, 0.0)
    if not np.any(thick > 0):
        return
    # retained nuclei: flat, dark spindles parallel to the surface; their density follows the
    # patch intensity, from a few scattered ones (focal, clustered) to confluent sheets
    cluster = smooth_noise_1d(rng, prof.n, DU, 20.0)
    for pattern, i0, i1 in prof.patches:
        if pattern != "parakeratosis":
            continue
        th = thick[i0 : i1 + 1]
        if th.sum() <= 0:
            continue
        level = float(np.mean(t[R["KI"], i0 : i1 + 1]))
        density = (1.0 / 1800.0) * (1800.0 / 45.0) ** (level**1.2)
        n = rng.poisson(th.sum() * DU * density)
        # at least one nucleus per ~45 µm, so every part of the annotated patch shows some
        n_seg = max(1, int(math.ceil((i1 - i0) * DU / 45.0)))
        seg = np.minimum((np.arange(n_seg) + rng.random(n_seg)) * (i1 - i0 + 1) / n_seg, i1 - i0).astype(np.int64)
        w = th * np.exp((1.2 - 0.8 * level) * cluster[i0 : i1 + 1])
        rest = rng.choice(i1 - i0 + 1, max(n - n_seg, 0), p=w / w.sum())
        ip = i0 + np.concatenate([seg, rest])
        m_n = ip.size
        u = ip * DU + rng.uniform(-DU / 2, DU / 2, m_n)
        d = pt[ip] + 1.0 + rng.random(m_n) * np.maximum(thick[ip] - 2.0, 0.1)
        cells.add(
            u,
            d,
            rx=rng.uniform(2.2, 4.2, m_n),
            ry=rng.uniform(0.55, 1.05, m_n),
            angle=rng.normal(0, 6, m_n),
            dark=rng.uniform(1.7, 2.3, m_n),
            style=STYLE["solid"],
            rnd=rng.integers(0, 2**31, m_n),
        )
    # neutrophil collections (Munro microabscesses) inside parakeratosis
    rate = rng.uniform(*spec.neutrophil_clusters_per_mm)
    n_cl = rng.poisson(prof.length / 1000.0 * rate) if rate > 0 else 0
    for _ in range(n_cl):
        iu = int(rng.choice(prof.n, p=thick / thick.sum()))
        if thick[iu] < 10:
            continue
        cu = iu * DU
        cd = pt[iu] + thick[iu] * rng.uniform(0.35, 0.7)
        m = int(rng.integers(6, 26))
        ru, rd = rng.uniform(8, 28), min(rng.uniform(3, 8), thick[iu] * 0.4)
        ang = rng.uniform(0, 2 * math.pi, m)
        rad = np.sqrt(rng.random(m))
        u = cu + ru * rad * np.cos(ang)
        d = cd + rd * rad * np.sin(ang)
        ok = (d > look("PT", u) + 1.5) & (d < look("PB", u) - 1.5)
        k = int(ok.sum())
        cells.add(
            u[ok],
            d[ok],
            rx=2.0,
            ry=2.0,
            dark=rng.uniform(1.9, 2.3, k),
            style=STYLE["neutrophil"],
            rnd=rng.integers(0, 2**31, k),
        )


# ----------------------------------------------------------------------------- dermis


def _dermis(
    rng,
    prof: Profiles,
    spec: DiagnosisSpec,
    look: _Lookup,
    cells: CellTable,
    structs: StructTable,
    inflammation: float,
    dilation: float,
) -> None:
    t = prof.table
    L = prof.length
    s = t[R["S"]].astype(np.float64)
    dej = s + t[R["EL"]]
    bot = t[R["BOT"]].astype(np.float64)
    fat = t[R["FAT"]].astype(np.float64)
    d_lo, d_hi = float(dej.min()), float(bot.max())

    def in_dermis(u, d, pad=3.0):
        return (d > look("S", u) + look("EL", u) + pad) & (d < look("BOT", u) - pad) & (d < look("FAT", u) - pad)

    # fibroblasts: spindle nuclei, denser in the papillary dermis
    area = L * (d_hi - d_lo)
    n = rng.poisson(area / 1000.0)
    u = rng.uniform(2, L - 2, n)
    d = rng.uniform(d_lo, d_hi, n)
    ok = in_dermis(u, d)
    pap = d < look("PAP", u)
    keep = ok & (pap | (rng.random(n) < 0.35))
    u, d, pap = u[keep], d[keep], pap[keep]
    k = u.size
    cells.add(
        u,
        d,
        rx=rng.uniform(2.8, 6.0, k),
        ry=rng.uniform(0.55, 1.0, k),
        angle=np.where(pap, rng.normal(0, 50, k), rng.normal(0, 22, k)),
        dark=rng.uniform(1.6, 2.1, k),
        style=STYLE["solid"],
        rnd=rng.integers(0, 2**31, k),
    )

    # papillary capillaries: one per dermal papilla (between rete ridges)
    rc = np.sort(prof.rete_centres)
    mids = (rc[1:] + rc[:-1]) / 2
    mids = mids[(mids > 20) & (mids < L - 20)]
    for c in mids:
        if rng.random() < 0.25:
            continue
        e0 = look("E0", np.array([c]))[0]
        top = look("S", np.array([c]))[0] + e0 + 6
        rete_env = float(np.max(t[R["EL"]][max(0, int((c - 60) / DU)) : int((c + 60) / DU)])) - e0
        length = max(rete_env * rng.uniform(0.3, 0.8), 10.0)
        r = rng.uniform(3.0, 5.0) * dilation
        _vessel(
            rng,
            structs,
            cells,
            c + rng.normal(0, 4),
            top + length / 2 + r,
            r,
            max(length / 2, r) * (1.0 if dilation < 1.5 else 1.3),
            90.0,
            1.2,
        )

    # superficial plexus at the papillary/reticular border, with perivascular lymphocytes
    pos = rng.uniform(30, 200)
    while pos < L - 30:
        d0 = look("PAP", np.array([pos]))[0] + rng.normal(0, 12)
        if in_dermis(np.array([pos]), np.array([d0]), pad=30)[0]:
            r = rng.uniform(5, 14)
            ry = r
            rx = r * rng.uniform(1.2, 3.0)
            _vessel(rng, structs, cells, pos, d0, rx, ry, rng.normal(0, 10), rng.uniform(1.5, 3.5))
            n_l = rng.poisson(inflammation * (rx + ry) * 1.6)
            if n_l:
                ang = rng.uniform(0, 2 * math.pi, n_l)
                rad = 1.0 + rng.exponential(0.5, n_l)
                lu = pos + (rx + 4) * rad * np.cos(ang)
                ld = d0 + (ry + 4) * rad * np.sin(ang)
                ok = in_dermis(lu, ld)
                kk = int(ok.sum())
                cells.add(
                    lu[ok],
                    ld[ok],
                    rx=rng.uniform(2.7, 3.4, kk),
                    ry=rng.uniform(2.5, 3.2, kk),
                    angle=rng.uniform(0, 180, kk),
                    dark=rng.uniform(1.9, 2.3, kk),
                    style=STYLE["solid"],
                    rnd=rng.integers(0, 2**31, kk),
                )
        pos += rng.uniform(110, 320)

    # deep vessels
    n_deep = rng.poisson(area / 1.6e5)
    for _ in range(n_deep):
        u0, d0 = rng.uniform(40, L - 40), rng.uniform(d_lo, d_hi)
        if not in_dermis(np.array([u0]), np.array([d0]), pad=60)[0] or d0 < look("PAP", np.array([u0]))[0] + 40:
            continue
        r = rng.uniform(8, 30)
        _vessel(rng, structs, cells, u0, d0, r * rng.uniform(1.0, 2.2), r, rng.uniform(0, 180), rng.uniform(2.0, 6.0))

    # eccrine coils in the deep dermis
    if d_hi - d_lo > 900:
        n_coils = rng.poisson(L / 1000.0 * 0.7)
        for _ in range(n_coils):
            cu = rng.uniform(150, L - 150)
            dd = look("BOT", np.array([cu]))[0]
            ff = look("FAT", np.array([cu]))[0]
            cd = min(dd, ff) - rng.uniform(60, 200)
            if not in_dermis(np.array([cu]), np.array([cd]), pad=80)[0]:
                continue
            _eccrine(rng, structs, cells, cu, cd)

    # subcutaneous fat: large clear adipocytes (Voronoi owners without cytoplasm)
    if np.any(fat < BIG / 2):
        sp = rng.uniform(55, 80)
        fu, fd = _hex_grid(rng, L, float(np.min(fat)), float(np.max(bot)), sp, sp * 0.87, sp * 0.18)
        ok = (fd > look("FAT", fu)) & (fd < look("BOT", fu))
        fu, fd = fu[ok], fd[ok]
        k = fu.size
        cells.add(
            fu,
            fd,
            rx=rng.uniform(3.5, 5.0, k),
            ry=rng.uniform(1.0, 1.5, k),
            angle=rng.uniform(0, 180, k),
            dark=np.where(rng.random(k) < 0.2, 1.5, 0.0),
            style=np.where(rng.random(k) < 0.2, STYLE["solid"], STYLE["none"]),
            owner=1,
            cyto_e=0.0,
            cyto_h=0.0,
            mem_e=rng.uniform(0.7, 0.9, k),
            mem_w=0.6,
            rnd=rng.integers(0, 2**31, k),
        )


def _vessel(
    rng, structs: StructTable, cells: CellTable, u: float, d: float, rx: float, ry: float, angle: float, wall: float
) -> None:
    """A vessel (lumen ellipse + wall), endothelial nuclei on the lumen, red cells inside."""
    structs.add(u, d, rx, ry, angle, wall, "vessel")
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    n_end = max(2, int((rx + ry) * 0.35))
    th = rng.uniform(0, 2 * math.pi, n_end)
    eu = u + (rx + 0.3) * np.cos(th) * ca - (ry + 0.3) * np.sin(th) * sa
    ed = d + (rx + 0.3) * np.cos(th) * sa + (ry + 0.3) * np.sin(th) * ca
    tang = np.degrees(
        np.arctan2(-(rx * np.sin(th)) * sa + ry * np.cos(th) * ca, -(rx * np.sin(th)) * ca - ry * np.cos(th) * sa)
    )
    cells.add(
        eu,
        ed,
        rx=rng.uniform(3.0, 4.5, n_end),
        ry=rng.uniform(0.9, 1.3, n_end),
        angle=tang,
        dark=rng.uniform(1.4, 1.7, n_end),
        style=STYLE["solid"],
        rnd=rng.integers(0, 2**31, n_end),
    )
    fill = rng.uniform(0.35, 0.95)
    n_rbc = int(fill * rx * ry / (3.6**2))
    if n_rbc:
        th = rng.uniform(0, 2 * math.pi, n_rbc)
        rad = np.sqrt(rng.random(n_rbc)) * 0.85
        ru = u + rx * rad * np.cos(th) * ca - ry * rad * np.sin(th) * sa
        rd = d + rx * rad * np.cos(th) * sa + ry * rad * np.sin(th) * ca
        cells.add(
            ru,
            rd,
            rx=rng.uniform(3.2, 3.8, n_rbc),
            ry=rng.uniform(2.8, 3.6, n_rbc),
            angle=rng.uniform(0, 180, n_rbc),
            dark=rng.uniform(1.0, 1.4, n_rbc),
            style=STYLE["rbc"],
            rnd=rng.integers(0, 2**31, n_rbc),
        )


def _eccrine(rng, structs: StructTable, cells: CellTable, cu: float, cd: float) -> None:
    """A coil of eccrine tubules: round/oval profiles lined by cuboidal cells."""
    m = int(rng.integers(5, 13))
    placed: list[tuple[float, float, float]] = []
    for _ in range(m * 4):
        if len(placed) >= m:
            break
        r = rng.uniform(11, 17)
        u = cu + rng.normal(0, 35)
        d = cd + rng.normal(0, 25)
        if any(math.hypot(u - pu, d - pd) < r + pr + 3 for pu, pd, pr in placed):
            continue
        placed.append((u, d, r))
        ry = r * rng.uniform(0.75, 1.0)
        ang = rng.uniform(0, 180)
        structs.add(u, d, r, ry, ang, 0.0, "gland")
        n_c = int(2 * math.pi * r / 6.5)
        th = np.linspace(0, 2 * math.pi, n_c, endpoint=False) + rng.uniform(0, 1)
        a = math.radians(ang)
        rr = 0.58
        eu = u + r * rr * np.cos(th) * math.cos(a) - ry * rr * np.sin(th) * math.sin(a)
        ed = d + r * rr * np.cos(th) * math.sin(a) + ry * rr * np.sin(th) * math.cos(a)
        cells.add(
            eu,
            ed,
            rx=rng.uniform(2.4, 3.0, n_c),
            ry=rng.uniform(2.2, 2.8, n_c),
            angle=rng.uniform(0, 180, n_c),
            dark=rng.uniform(1.4, 1.65, n_c),
            style=STYLE["solid"],
            rnd=rng.integers(0, 2**31, n_c),
        )
