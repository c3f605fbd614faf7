"""A section's layered architecture as 1-D profiles along the surface (section-local µm).

A :class:`Profiles` holds, for every ``u`` on a grid of step :data:`DU` µm, the depths (``d``,
µm below the top of the living epidermis) of the layer boundaries and of the pattern regions.
Rendering looks a pixel's ``u`` up in these arrays; annotations trace the same arrays, so a
pattern is drawn exactly where it is annotated.

Rows of :attr:`Profiles.table` (float32, shape ``(N_ROWS, n)``):

=========  =================================================================================
``S``      top of the living epidermis (granular surface), absolute d
``TC``     stratum corneum thickness (corneum spans ``S - TC .. S``)
``TG``     granular layer thickness (0 where lost)
``EL``     living epidermis thickness incl. rete ridges (dermo-epidermal junction at ``S + EL``)
``E0``     suprapapillary thickness (reference for "upper epidermis")
``PAP``    bottom of the papillary dermis, absolute d
``BOT``    bottom of the tissue, absolute d
``FAT``    top of subcutaneous fat, absolute d (``BIG`` if none)
``PT/PB``  parakeratosis region top/bottom, absolute d (``BIG``/``-BIG`` outside patches)
``NT/NB``  necrolysis region
``LT/LB``  pallor region
``CL``     height of the subcorneal cleft inside necrolysis (µm, 0 = none)
``SP``     spongiosis intensity 0-1
``FOLD``   folded tissue for ``d >= FOLD`` (``BIG`` = no fold, ``-BIG`` = whole column)
``CK``     corneum compaction 0-1: 0 = open basket-weave lamellae with clear gaps, 1 = compact
           (compact orthokeratosis, acral skin, and the keratin of parakeratosis patches)
``PI``     pallor intensity 0-1 inside pallor patches (0 elsewhere), see
           :attr:`~.catalog.PatternPlan.intensity`
``NI``     necrolysis intensity 0-1 inside necrolysis patches
``KI``     parakeratosis intensity 0-1 (density of retained nuclei) inside parakeratosis patches
=========  =================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.synthetic.catalog import DiagnosisSpec, PatternPlan
from pipeline.synthetic.noise import smooth_noise_1d

#: Grid step along the surface, µm.
DU = 0.5
#: "Absent" depth value.
BIG = 1.0e9

ROWS = (
    "S",
    "TC",
    "TG",
    "EL",
    "E0",
    "PAP",
    "BOT",
    "FAT",
    "PT",
    "PB",
    "NT",
    "NB",
    "LT",
    "LB",
    "CL",
    "SP",
    "FOLD",
    "CK",
    "PI",
    "NI",
    "KI",
)
R = {name: i for i, name in enumerate(ROWS)}
#: Pattern name → (top row, bottom row).
PATTERN_ROWS = {"parakeratosis": ("PT", "PB"), "necrolysis": ("NT", "NB"), "pallor": ("LT", "LB")}
#: Pattern name → its intensity row.
INTENSITY_ROWS = {"parakeratosis": "KI", "necrolysis": "NI", "pallor": "PI"}
#: Patches keep this far (µm) from the section's cut ends.
END_MARGIN = 120.0
#: Shortest pattern patch, µm.
MIN_PATCH = 70.0


@dataclass
class Profiles:
    """Layer and pattern profiles of one section (see module docstring).

    ``corneum_style`` is ``basket`` (mostly open basket-weave) or ``compact`` (acral skin);
    ``keratin`` the (eosin, haematoxylin) amounts of a keratin lamella in this section (pink
    to lilac); ``lamella`` the mean spacing of basket-weave lamellae, µm; ``bundle`` the relative
    thickness of the reticular collagen bundles.
    """

    length: float
    table: np.ndarray
    rete_centres: np.ndarray
    corneum_style: str
    patches: list[tuple[str, int, int]] = field(default_factory=list)
    jag_d0: float = 0.0
    jag_left: np.ndarray = field(default_factory=lambda: np.zeros(1, np.float32))
    jag_right: np.ndarray = field(default_factory=lambda: np.zeros(1, np.float32))
    keratin: tuple[float, float] = (0.62, 0.32)
    lamella: float = 4.0
    bundle: float = 1.0

    @property
    def n(self) -> int:
        return self.table.shape[1]

    @property
    def u(self) -> np.ndarray:
        """The u grid, µm, shape (n,)."""
        return np.arange(self.n, dtype=np.float64) * DU

    def row(self, name: str) -> np.ndarray:
        return self.table[R[name]]

    def index(self, u: float) -> int:
        return int(np.clip(round(u / DU), 0, self.n - 1))

    def jag(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cut-edge insets (left, right) in µm at depths ``d``."""
        i = np.clip(np.rint(np.asarray(d) - self.jag_d0).astype(np.int64), 0, self.jag_left.size - 1)
        return self.jag_left[i], self.jag_right[i]

    def pattern_present(self, pattern: str) -> bool:
        return any(p == pattern for p, _, _ in self.patches)


def _bump(u: np.ndarray, u0: float, u1: float, ramp: float) -> np.ndarray:
    """1 inside [u0, u1], smooth cosine ramps of ``ramp`` µm outside, 0 beyond."""
    x = np.minimum(u - (u0 - ramp), (u1 + ramp) - u) / ramp
    x = np.clip(x, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * x)


def _intervals(
    rng: np.random.Generator, length: float, plan: PatternPlan, margin: float = END_MARGIN
) -> list[tuple[float, float]]:
    """Non-overlapping patches (u0, u1) in µm covering ``plan.coverage`` of the section."""
    avail = length - 2 * margin
    if avail < MIN_PATCH:
        return []
    total = float(rng.uniform(*plan.coverage)) * avail
    total = max(total, MIN_PATCH)
    k = int(rng.integers(plan.patches[0], plan.patches[1] + 1))
    k = max(1, min(k, int(total // MIN_PATCH)))
    lengths = np.maximum(rng.dirichlet(np.full(k, 2.0)) * total, MIN_PATCH)
    if lengths.sum() > avail:
        lengths *= avail / lengths.sum() * 0.98
    gaps = rng.dirichlet(np.ones(k + 1)) * (avail - lengths.sum())
    out, pos = [], margin
    for i in range(k):
        pos += gaps[i]
        out.append((pos, pos + lengths[i]))
        pos += lengths[i]
    return out


def _sub_intervals(
    rng: np.random.Generator, parents: list[tuple[float, float]], prob: float
) -> list[tuple[float, float]]:
    """Patches nested inside ``parents`` (necrolysis inside pallor): 30-80 % of each, centred randomly."""
    out: list[tuple[float, float]] = []
    for a, b in parents:
        if rng.random() > prob and out:
            continue
        span = b - a
        ln = max(MIN_PATCH, span * rng.uniform(0.3, 0.8))
        if ln > span:
            ln = span
        start = a + rng.uniform(0, span - ln)
        out.append((start, start + ln))
    return out


def _taper(u: np.ndarray, u0: float, u1: float) -> np.ndarray:
    x = np.clip((u - u0) / max(u1 - u0, 1e-6), 0.0, 1.0)
    return np.sin(np.pi * x) ** 0.35


def _rete(rng: np.random.Generator, u: np.ndarray, spec: DiagnosisSpec) -> tuple[np.ndarray, np.ndarray]:
    """Rete-ridge depth below the suprapapillary plate (µm) along ``u``, and the ridge centres."""
    spacing = rng.uniform(*spec.rete_spacing)
    depth = rng.uniform(*spec.rete_depth)
    width = rng.uniform(*spec.rete_width)
    irr = 1.0 - rng.uniform(*spec.rete_regularity)
    out = np.zeros_like(u)
    centres = []
    pos = -rng.uniform(0, spacing)
    length = u[-1]
    while pos < length + spacing:
        c = pos
        dep = depth * max(0.15, 1.0 + irr * rng.uniform(-0.7, 0.4))
        wid = width * max(0.5, 1.0 + irr * rng.uniform(-0.35, 0.35)) / 2.0
        lo, hi = np.searchsorted(u, [c - wid, c + wid])
        if hi > lo:
            # a finger: straight sides and a rounded tip (radius = half width), tapering a little
            x = (u[lo:hi] - c) / wid
            r = min(wid, dep)
            tip = dep - r + r * np.sqrt(np.clip(1.0 - x * x, 0.0, 1.0))
            taper = 1.0 - 0.25 * np.abs(x) ** 3 * rng.uniform(0.0, 1.0)
            out[lo:hi] = np.maximum(out[lo:hi], tip * taper)
        centres.append(c)
        pos += spacing * max(0.45, 1.0 + irr * rng.uniform(-0.45, 0.45))
    # dome-shaped dermal papillae between the ridges
    cs = np.asarray(centres)
    if cs.size > 1:
        k_idx = np.clip(np.searchsorted(cs, u) - 1, 0, cs.size - 2)
        c0, c1 = cs[k_idx], cs[k_idx + 1]
        frac = np.clip((u - c0) / np.maximum(c1 - c0, 1e-6), 0.0, 1.0)
        dome = 0.3 * depth * (1.0 - np.sin(np.pi * frac)) ** 2
        out = np.maximum(out, dome)
    # round the corners where ridges meet the suprapapillary plate
    k = int(24 / DU)
    kern = np.exp(-0.5 * (np.arange(-k, k + 1) * DU / 7.0) ** 2)
    out = np.convolve(np.pad(out, k, mode="edge"), kern / kern.sum(), mode="same")[k:-k]
    return out, np.asarray(centres)


def _running_max(x: np.ndarray, window: int) -> np.ndarray:
    """Maximum over a centred window of ``window`` samples (simple, O(n log w) via doubling)."""
    out = x.copy()
    span = 1
    while span < window:
        shifted = np.concatenate([out[span:], np.full(span, out[-1])])
        back = np.concatenate([np.full(span, out[0]), out[:-span]])
        out = np.maximum(out, np.maximum(shifted, back))
        span *= 2
    return out


def build_profiles(
    rng: np.random.Generator,
    spec: DiagnosisSpec,
    length: float,
    depth: float,
    kind: str,
    site: str,
) -> Profiles:
    """Draw one section's architecture and its pattern patches.

    Args:
        rng: layout random generator (never the rendering one).
        spec: the slide's diagnosis.
        length: section length along the surface, µm.
        depth: nominal tissue depth below the surface, µm.
        kind: ``punch``, ``shave`` or ``wedge`` (shape of the deep edge).
        site: biopsy site (acral skin gets a thick compact corneum).
    """
    n = int(round(length / DU)) + 1
    u = np.arange(n) * DU
    table = np.zeros((len(ROWS), n), dtype=np.float64)

    def noise(scale: float) -> np.ndarray:
        return smooth_noise_1d(rng, n, DU, scale)

    # --- epidermis -------------------------------------------------------------------------
    surf = rng.uniform(2, 8) * noise(120) + rng.uniform(0, 18) * noise(700)
    acral = site == "acral"
    if acral:
        corneum = rng.uniform(90, 220) * (1 + 0.12 * noise(200))
        style = "compact"
        compact = np.clip(rng.uniform(0.8, 1.0) + 0.1 * noise(80), 0.0, 1.0)
    else:
        corneum = rng.uniform(12, 34) * (1 + 0.25 * noise(90))
        style = "basket"
        # mostly open basket-weave; in some sections stretches of compact orthokeratosis
        # (no nuclei: the hard negative of parakeratosis)
        compact = np.clip(rng.uniform(0.0, 0.3) + 0.12 * noise(60), 0.0, 1.0)
        if rng.random() < 0.45:
            field_ = noise(160)
            thr = np.quantile(field_, 1.0 - rng.uniform(0.1, 0.6))
            compact = np.maximum(compact, np.clip((field_ - thr) / 0.35, 0.0, 1.0) * rng.uniform(0.7, 1.0))
    corneum = np.maximum(corneum, 6.0)
    ke = float(rng.uniform(0.6, 0.95))
    keratin = (ke, ke * float(rng.uniform(0.55, 1.1)))
    lamella = float(rng.uniform(2.8, 5.0))
    bundle = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    supra = rng.uniform(*spec.suprapapillary) * (1 + 0.10 * noise(250))
    rete, centres = _rete(rng, u, spec)
    living = supra + rete
    granular = rng.uniform(*spec.granular) * (1 + 0.3 * noise(60))
    granular = np.clip(granular, 0.0, None)
    if spec.granular_loss > 0:
        field_ = noise(90)
        thr = np.quantile(field_, spec.granular_loss)
        granular = granular * np.clip((field_ - thr) / 0.3, 0.0, 1.0)

    # --- dermis ----------------------------------------------------------------------------
    env = _running_max(rete, int(2 * 150 / DU))
    env = np.convolve(env, np.ones(101) / 101, mode="same")
    pap = surf + supra + env + rng.uniform(60, 120) * (1 + 0.2 * noise(200))
    shape_x = np.abs(2 * u / length - 1)
    if kind == "shave":
        bottom = surf + np.maximum(depth * np.clip(1 - shape_x**2, 0, 1) ** 0.6, 0.0)
    elif kind == "wedge":
        bottom = surf + depth * np.clip(1 - shape_x**1.6, 0, 1) ** 0.8
    else:
        bottom = surf + depth * (1 - 0.08 * shape_x**6) * (1 + 0.04 * noise(300))
    bottom = bottom + rng.uniform(4, 14) * noise(18)
    bottom = np.maximum(bottom, surf + living + rng.uniform(60, 120))
    pap = np.minimum(pap, bottom - 10)
    fat = np.full(n, BIG)
    if kind == "punch" and depth > 1700 and rng.random() < 0.75:
        fat = surf + depth * rng.uniform(0.62, 0.85) + 35 * noise(150)

    table[R["S"]] = surf
    table[R["TC"]] = corneum
    table[R["TG"]] = granular
    table[R["EL"]] = living
    table[R["E0"]] = supra
    table[R["PAP"]] = pap
    table[R["BOT"]] = bottom
    table[R["FAT"]] = fat
    for top, bot in PATTERN_ROWS.values():
        table[R[top]] = BIG
        table[R[bot]] = -BIG
    table[R["FOLD"]] = BIG
    table[R["CK"]] = compact

    prof = Profiles(
        length=length,
        table=table,
        rete_centres=centres,
        corneum_style=style,
        keratin=keratin,
        lamella=lamella,
        bundle=bundle,
    )
    _add_patterns(rng, prof, spec, noise)
    _add_spongiosis(rng, prof, spec, noise)
    _add_jagged_edges(rng, prof)
    prof.table = prof.table.astype(np.float32)
    return prof


def _add_patterns(rng: np.random.Generator, prof: Profiles, spec: DiagnosisSpec, noise) -> None:
    t = prof.table
    u = prof.u
    s, e0 = t[R["S"]], t[R["E0"]]
    L = prof.length
    present = {p: plan for p, plan in spec.patterns.items() if rng.random() < plan.probability}

    para = _intervals(rng, L, present["parakeratosis"]) if "parakeratosis" in present else []
    pallor = _intervals(rng, L, present["pallor"]) if "pallor" in present else []
    if "necrolysis" in present:
        nec = _sub_intervals(rng, pallor, 0.75) if pallor else _intervals(rng, L, present["necrolysis"])
    else:
        nec = []

    lost = np.zeros(prof.n)
    # parakeratosis: whole corneum height, corneum thickened (more so when florid) and compact
    para_level = _levels(rng, present.get("parakeratosis"), len(para))
    for (a, b), level in zip(para, para_level):
        extra = rng.uniform(8, 40) if spec.name != "spongiotic" else rng.uniform(4, 18)
        t[R["TC"]] += extra * (0.35 + 0.65 * level) * _bump(u, a, b, 60.0)
        t[R["CK"]] = np.maximum(t[R["CK"]], _bump(u, a, b, 25.0))
    wob_k = noise(60)
    for (a, b), level in zip(para, para_level):
        i0, i1 = prof.index(a), prof.index(b)
        t[R["PT"], i0 : i1 + 1] = s[i0 : i1 + 1] - t[R["TC"], i0 : i1 + 1]
        t[R["PB"], i0 : i1 + 1] = s[i0 : i1 + 1]
        t[R["KI"], i0 : i1 + 1] = _level_row(level, wob_k[i0 : i1 + 1])
        prof.patches.append(("parakeratosis", i0, i1))
        lost = np.maximum(lost, _bump(u, a, b, 12.0) * min(1.0, 0.5 + level))

    # necrolysis: top of the living epidermis down to a fraction of the suprapapillary plate
    if nec:
        frac = rng.uniform(*present["necrolysis"].depth)
        wob = 1 + 0.12 * noise(40)
        cleft_field = noise(35)
        wob_n = noise(50)
        for (a, b), level in zip(nec, _levels(rng, present["necrolysis"], len(nec))):
            i0, i1 = prof.index(a), prof.index(b)
            sl = slice(i0, i1 + 1)
            depth = np.maximum(frac * e0[sl] * _taper(u[sl], a, b) * wob[sl], 0.0)
            depth[1:-1] = np.maximum(depth[1:-1], 6.0)
            t[R["NT"], sl] = s[sl]
            t[R["NB"], sl] = s[sl] + depth
            t[R["NI"], sl] = _level_row(level, wob_n[sl])
            if rng.random() < 0.3 + 0.5 * level:
                h = np.clip(cleft_field[sl] + 0.3, 0.0, None) * rng.uniform(4.0, 9.0) * (0.4 + 0.6 * level)
                t[R["CL"], sl] = np.minimum(h, 0.45 * depth)
            prof.patches.append(("necrolysis", i0, i1))
            lost = np.maximum(lost, _bump(u, a, b, 10.0))

    # pallor: below any necrolysis, down to a larger fraction of the suprapapillary plate
    if pallor:
        frac = rng.uniform(*present["pallor"].depth)
        wob = 1 + 0.12 * noise(50)
        wob_p = noise(50)
        for (a, b), level in zip(pallor, _levels(rng, present["pallor"], len(pallor))):
            i0, i1 = prof.index(a), prof.index(b)
            sl = slice(i0, i1 + 1)
            nec_b = t[R["NB"], sl]
            has_nec = nec_b > -BIG / 2
            top = np.where(has_nec, nec_b, s[sl])
            depth = frac * e0[sl] * _taper(u[sl], a, b) * wob[sl]
            bot = s[sl] + depth
            interior = np.zeros(bot.size, bool)
            interior[1:-1] = True
            bot = np.where(has_nec | interior, np.maximum(bot, top + 8.0), bot)
            bot = np.minimum(bot, s[sl] + 0.88 * e0[sl])
            bot = np.maximum(bot, top + np.where(interior | has_nec, 4.0, 0.0))
            t[R["LT"], sl] = top
            t[R["LB"], sl] = bot
            t[R["PI"], sl] = _level_row(level, wob_p[sl])
            prof.patches.append(("pallor", i0, i1))
            lost = np.maximum(lost, _bump(u, a, b, 10.0))

    t[R["TG"]] *= 1.0 - lost
    t[R["TG"]][t[R["TG"]] < 1.5] = 0.0


def _levels(rng: np.random.Generator, plan: PatternPlan | None, k: int) -> list[float]:
    """Intensity (0-1) of each of ``k`` patches: one draw per section from ``plan.intensity``,
    jittered per patch (a lesion's foci are alike but not equal)."""
    if plan is None or k == 0:
        return []
    lo, hi = plan.intensity
    base = rng.uniform(lo, hi)
    return [float(np.clip(base * np.exp(rng.normal(0.0, 0.2)), lo, hi)) for _ in range(k)]


def _level_row(level: float, wobble: np.ndarray) -> np.ndarray:
    """A patch's intensity along ``u``: its level, varying by about ±15 % within the patch."""
    return np.clip(level * (1.0 + 0.15 * wobble), 0.03, 1.0)


def _add_spongiosis(rng: np.random.Generator, prof: Profiles, spec: DiagnosisSpec, noise) -> None:
    if spec.spongiosis[1] <= 0:
        return
    level = rng.uniform(*spec.spongiosis)
    cov = rng.uniform(*spec.spongiosis_coverage)
    field_ = noise(180)
    thr = np.quantile(field_, 1.0 - cov)
    prof.table[R["SP"]] = level * np.clip((field_ - thr) / 0.4, 0.0, 1.0)


def _add_jagged_edges(rng: np.random.Generator, prof: Profiles) -> None:
    """Cut-edge insets for the left/right ends; zero through the epidermis, ragged in the dermis."""
    t = prof.table
    d_top = float(np.min(t[R["S"]] - t[R["TC"]])) - 50.0
    d_bot = float(np.max(t[R["BOT"]])) + 50.0
    m = int(d_bot - d_top) + 1
    d = d_top + np.arange(m)
    epi_bottom = float(np.max(t[R["S"]] + t[R["EL"]])) + 25.0
    ramp = np.clip((d - epi_bottom) / 60.0, 0.0, 1.0)
    out = []
    for _ in range(2):
        amp = rng.uniform(8, 45)
        jag = amp * np.abs(smooth_noise_1d(rng, m, 1.0, 25.0)) + 0.5 * amp * np.abs(smooth_noise_1d(rng, m, 1.0, 6.0))
        out.append((jag * ramp).astype(np.float32))
    prof.jag_d0 = d_top
    prof.jag_left, prof.jag_right = out
