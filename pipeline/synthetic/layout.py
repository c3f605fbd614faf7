"""The physical layout of one synthetic slide, decided up front in µm (no pixels).

:func:`build_layout` places 1-3 sections (fragments of one biopsy, or serial levels of it) on
the glass, draws each section's architecture and pattern patches (:mod:`.profiles`), its cells
and structures (:mod:`.cells`) and the slide's artefacts and stain. Only the layout random
generator is used, and nothing depends on the rendering MPP, so the same seed gives the same
physical slide at 0.25 and at 0.5 µm/px.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.synthetic import artefacts as art
from pipeline.synthetic.catalog import DIAGNOSIS_SPECS, DiagnosisSpec
from pipeline.synthetic.cells import build_cells
from pipeline.synthetic.geometry import Frame
from pipeline.synthetic.profiles import BIG, DU, PATTERN_ROWS, Profiles, R, build_profiles
from pipeline.synthetic.stain import Stain, sample_stain

log = logging.getLogger(__name__)

#: Clear glass kept around every section, µm.
GLASS_MARGIN = 120.0
#: Occupancy grid step for placing sections, µm.
_GRID = 20.0


@dataclass
class Section:
    """One tissue section on the slide.

    Attributes:
        frame: section-local ↔ slide µm map.
        prof: layer and pattern profiles (section-local).
        cells, structs: column arrays in slide µm (see :mod:`.cells`).
        ink: inked margins.
        bbox: (x0, y0, x1, y1) slide µm enclosing tissue, ink and cells.
        outline: (N, 2) slide µm tissue outline (closed ring, not repeated).
    """

    frame: Frame
    prof: Profiles
    cells: dict[str, np.ndarray]
    structs: dict[str, np.ndarray]
    ink: list[art.InkEdge]
    bbox: tuple[float, float, float, float]
    outline: np.ndarray


@dataclass
class SlideLayout:
    """Everything needed to render and annotate a slide, in µm."""

    slide_id: str
    diagnosis: str
    site: str
    width_um: float
    height_um: float
    sections: list[Section]
    stain: Stain
    pens: list[art.PenMark] = field(default_factory=list)
    dust: list[art.Dust] = field(default_factory=list)
    blurs: list[art.BlurPatch] = field(default_factory=list)
    texture_offset: tuple[float, float] = (0.0, 0.0)
    uuid_seed: int = 0

    def patterns_present(self) -> dict[str, bool]:
        return {p: any(s.prof.pattern_present(p) for s in self.sections) for p in PATTERN_ROWS}


def local_outline(prof: Profiles, step_um: float = 8.0) -> np.ndarray:
    """Tissue outline in section-local (u, d) µm: corneum surface, right cut, deep edge, left cut."""
    t = prof.table
    k = max(1, int(step_um / DU))
    idx = np.unique(np.concatenate([np.arange(0, prof.n, k), [prof.n - 1]]))
    u = idx * DU
    top = (t[R["S"]] - t[R["TC"]])[idx]
    bot = t[R["BOT"]][idx]
    d_r = np.linspace(top[-1], bot[-1], 40)
    d_l = np.linspace(bot[0], top[0], 40)
    jl, _ = prof.jag(d_l)
    _, jr = prof.jag(d_r)
    ring = np.concatenate(
        [
            np.stack([u, top], 1),
            np.stack([prof.length - jr, d_r], 1),
            np.stack([u[::-1], bot[::-1]], 1),
            np.stack([jl, d_l], 1),
        ]
    )
    return ring


def _section_kind(rng: np.random.Generator) -> str:
    return str(rng.choice(["punch", "shave", "wedge"], p=[0.55, 0.25, 0.20]))


def _dims(rng: np.random.Generator, kind: str) -> tuple[float, float]:
    if kind == "punch":
        return rng.uniform(2000, 6000), rng.uniform(1200, 3200)
    if kind == "shave":
        return rng.uniform(2500, 6000), rng.uniform(450, 1000)
    return rng.uniform(3000, 6000), rng.uniform(1200, 2500)


def _place(
    rng: np.random.Generator,
    ring_local: np.ndarray,
    prof: Profiles,
    occupancy: np.ndarray,
    width: float,
    height: float,
    radius: float | None,
    tries: int = 60,
) -> tuple[Frame, np.ndarray] | None:
    """Find a rotation/translation that keeps the section on the glass and off other sections."""
    for _ in range(tries):
        theta = rng.uniform(0, 2 * math.pi)
        f0 = Frame(0.0, 0.0, theta, prof.length, radius)
        x, y = f0.to_slide(ring_local[:, 0], ring_local[:, 1])
        lo_x, hi_x = GLASS_MARGIN - x.min(), width - GLASS_MARGIN - x.max()
        lo_y, hi_y = GLASS_MARGIN - y.min(), height - GLASS_MARGIN - y.max()
        if lo_x > hi_x or lo_y > hi_y:
            continue
        tx, ty = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        ring = np.stack([x + tx, y + ty], 1)
        mask = np.zeros_like(occupancy)
        cv2.fillPoly(mask, [np.rint(ring / _GRID).astype(np.int32)], 1)
        grow = int(math.ceil(2 * GLASS_MARGIN / _GRID))
        mask = cv2.dilate(mask, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
        if np.any(mask & occupancy):
            continue
        cv2.fillPoly(occupancy, [np.rint(ring / _GRID).astype(np.int32)], 1)
        return Frame(float(tx), float(ty), float(theta), prof.length, radius), ring
    return None


def _pattern_boxes(sections: list[Section], pad: float = 40.0) -> list[tuple[float, float, float, float]]:
    """Slide-µm bounding boxes of every pattern patch (for keeping hiding artefacts away)."""
    boxes = []
    for sec in sections:
        t = sec.prof.table
        for pattern, i0, i1 in sec.prof.patches:
            top, bot = PATTERN_ROWS[pattern]
            u = np.arange(i0, i1 + 1) * DU
            ds = np.concatenate([t[R[top], i0 : i1 + 1], t[R[bot], i0 : i1 + 1]])
            x, y = sec.frame.to_slide(np.concatenate([u, u]), ds)
            boxes.append((x.min() - pad, y.min() - pad, x.max() + pad, y.max() + pad))
    return boxes


def build_layout(
    slide_id: str,
    diagnosis: str,
    site: str,
    layout_seed: int,
    stain_batch: dict,
    width_um: float,
    height_um: float,
) -> SlideLayout:
    """Decide the whole slide in µm.

    Args:
        slide_id: identifier (also seeds nothing; the seed does).
        diagnosis: a key of :data:`~.catalog.DIAGNOSIS_SPECS`.
        site: biopsy site (affects the corneum).
        layout_seed: integer seed of this slide's layout.
        stain_batch: the patient's staining batch (:func:`~.stain.sample_batch_stain`).
        width_um, height_um: glass area scanned, µm.
    """
    spec: DiagnosisSpec = DIAGNOSIS_SPECS[diagnosis]
    rng = np.random.default_rng(np.random.SeedSequence([layout_seed, 0x5EC7]))
    kind = _section_kind(rng)
    n_sections = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    levels = n_sections > 1 and rng.random() < 0.6
    inflammation = float(rng.uniform(*spec.inflammation))
    dilation = float(rng.uniform(*spec.papillary_vessel_dilation))
    occupancy = np.zeros((int(math.ceil(height_um / _GRID)) + 1, int(math.ceil(width_um / _GRID)) + 1), np.uint8)

    length, depth = _dims(rng, kind)
    # keep the first section well inside the glass, leave room for the others
    length = min(length, 0.85 * max(width_um, height_um) - 2 * GLASS_MARGIN)
    depth = min(depth, 0.7 * min(width_um, height_um))
    area_cap = 0.42 * width_um * height_um / n_sections
    if length * depth > area_cap:
        f = math.sqrt(area_cap / (length * depth))
        length, depth = length * f, depth * f
    sections: list[Section] = []
    base_seed = int(rng.integers(0, 2**31))
    for k in range(n_sections):
        sec_len, sec_depth = length, depth
        prof_seed = base_seed if (levels or k == 0) else int(rng.integers(0, 2**31))
        if k > 0 and not levels:
            sec_len, sec_depth = length * rng.uniform(0.4, 0.8), depth * rng.uniform(0.6, 1.0)
        placed = None
        for shrink in range(12):
            sl, sd = max(sec_len * 0.85**shrink, 500.0), max(sec_depth * 0.85**shrink, 250.0)
            prof = build_profiles(np.random.default_rng([prof_seed, shrink]), spec, sl, sd, kind, site)
            radius = None
            if kind == "shave" or rng.random() < 0.3:
                deepest = float(np.max(prof.table[R["BOT"]]))
                radius = max(rng.uniform(2500, 9000), deepest + 600.0)
                radius = radius if radius < 3.0 * sl else None
            ring_local = local_outline(prof)
            placed = _place(rng, ring_local, prof, occupancy, width_um, height_um, radius)
            if placed is not None:
                break
        if placed is None:
            if k == 0:
                raise ConfigError(
                    f"{slide_id}: no room for a tissue section on {width_um:.0f}x{height_um:.0f} µm of glass; use a larger --size"
                )
            continue
        frame, ring = placed
        cell_rng = np.random.default_rng([prof_seed, 0xCE11, k])
        art.sample_fold(np.random.default_rng([prof_seed, 0xF01D, k]), prof)
        cells_local, structs_local = build_cells(cell_rng, prof, spec, inflammation, dilation)
        cells = cells_local.to_slide(frame)
        structs = structs_local.to_slide(frame)
        ink = art.sample_ink(rng)
        pad = 60.0
        x0, y0 = ring.min(0) - pad
        x1, y1 = ring.max(0) + pad
        sections.append(Section(frame, prof, cells, structs, ink, (float(x0), float(y0), float(x1), float(y1)), ring))

    tissue_boxes = [s.bbox for s in sections]
    pboxes = _pattern_boxes(sections)
    art_rng = np.random.default_rng(np.random.SeedSequence([layout_seed, 0xA27E]))
    pens = art.sample_pen(art_rng, tissue_boxes, pboxes, width_um, height_um)
    dust = art.sample_dust(art_rng, pboxes, width_um, height_um)
    blurs = art.sample_blur(art_rng, tissue_boxes)
    stain = sample_stain(np.random.default_rng(np.random.SeedSequence([layout_seed, 0x57A1])), stain_batch)
    log.debug(
        "%s: %s, %d section(s) (%s), patterns %s",
        slide_id,
        diagnosis,
        len(sections),
        kind,
        [p for s in sections for p, _, _ in s.prof.patches],
    )
    return SlideLayout(
        slide_id=slide_id,
        diagnosis=diagnosis,
        site=site,
        width_um=width_um,
        height_um=height_um,
        sections=sections,
        stain=stain,
        pens=pens,
        dust=dust,
        blurs=blurs,
        texture_offset=(float(rng.uniform(0, 1e4)), float(rng.uniform(0, 1e4))),
        uuid_seed=int(rng.integers(0, 2**63)),
    )


__all__ = ["Section", "SlideLayout", "build_layout", "local_outline", "BIG"]
