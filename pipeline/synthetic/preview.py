"""Preview figures of the generator: synthetic crops beside a real slide, and a pattern gallery.

``python -m pipeline.synthetic.preview --real ../shared/data/slides/CMU-1-Small-Region.svs --out docs``
writes ``docs/synthetic_vs_real.png`` (synthetic and real crops at the same MPP) and
``docs/synthetic_patterns.png`` (each NME pattern and each mimic, with and without the
annotation outlines). Crops are rendered straight from the layout (no TIFF round trip).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.synthetic.annotations import section_polygons
from pipeline.synthetic.catalog import CLASS_COLORS
from pipeline.synthetic.dataset import layout_for, plan_dataset
from pipeline.synthetic.layout import SlideLayout
from pipeline.synthetic.profiles import DU, PATTERN_ROWS, R
from pipeline.synthetic.render import SlideRenderer

log = logging.getLogger(__name__)

#: Real CMU-1-Small-Region crops (level-0 x, y, caption): epidermis with granular layer and
#: basket-weave orthokeratin, dermis, margin ink.
REAL_CROPS = (
    (1050, 1330, "real: epidermis, granular layer, orthokeratin"),
    (600, 2440, "real: epidermis and dermis"),
    (1480, 1650, "real: dermis with margin ink"),
)
SIZE_UM = (4000.0, 3000.0)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 22), (255, 255, 255), -1)
    cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def find_layout(
    seed: int, diagnosis: str, want: str | None = None, tries: int = 40, basket: bool = True
) -> SlideLayout:
    """First layout of ``diagnosis`` (seed, seed+1, ...) that draws ``want`` (a pattern) if given."""
    for k in range(tries):
        plan = plan_dataset(1, seed + k, 0.5, [diagnosis])[0]
        lay = layout_for(plan, SIZE_UM)
        if want is not None and not lay.patterns_present().get(want, False):
            continue
        if basket and any(s.prof.corneum_style != "basket" for s in lay.sections):
            continue
        return lay
    raise PipelineError(f"no {diagnosis} layout with {want} in {tries} seeds from {seed}")


def crop_centre(lay: SlideLayout, what: str, depth_frac: float = 0.35) -> tuple[float, float]:
    """Slide µm of a good crop centre: the middle of a pattern patch, or mid-epidermis."""
    sec = lay.sections[0]
    t = sec.prof.table
    if what in PATTERN_ROWS:
        for pattern, i0, i1 in sec.prof.patches:
            if pattern == what:
                i = (i0 + i1) // 2
                break
        else:
            raise PipelineError(f"{lay.slide_id}: no {what} patch")
    elif what == "spongiosis":
        i = int(np.argmax(t[R["SP"]]))
    else:
        i = sec.prof.n // 2
    d = t[R["S"], i] + depth_frac * t[R["E0"], i]
    x, y = sec.frame.to_slide(np.array([i * DU]), np.array([d]))
    return float(x[0]), float(y[0])


def render_crop(
    lay: SlideLayout, mpp: float, centre_um: tuple[float, float], size: int, outlines: bool = False
) -> np.ndarray:
    """RGB (size, size, 3) crop at ``mpp`` centred on ``centre_um``, optionally with annotation outlines."""
    r = SlideRenderer(lay, mpp)
    x0 = int(round(centre_um[0] / mpp - size / 2))
    y0 = int(round(centre_um[1] / mpp - size / 2))
    img = r.render(x0, y0, size, size)
    if outlines:
        img = img.copy()
        for sec in lay.sections:
            for name, ring in section_polygons(sec):
                pts = np.rint((ring / mpp - [x0, y0]) * 16).astype(np.int32)
                cv2.polylines(img, [pts], True, CLASS_COLORS[name], 2, cv2.LINE_AA, 4)
    return img


def real_crop(path: Path, x: int, y: int, size: int) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((x, y), 0, (size, size)).convert("RGB"))


def synthetic_vs_real(real: Path, out: Path, size: int = 512) -> Path:
    """Top row: synthetic crops at 0.5 µm/px; bottom row: the real slide (0.499 µm/px)."""
    normal = find_layout(11, "normal")
    nme = find_layout(21, "nme", "pallor")
    syn = [
        _label(render_crop(normal, 0.5, crop_centre(normal, "epidermis", 0.2), size), "synthetic: normal epidermis"),
        _label(
            render_crop(normal, 0.5, crop_centre(normal, "epidermis", 1.6), size), "synthetic: epidermis and dermis"
        ),
        _label(
            render_crop(nme, 0.5, crop_centre(nme, "pallor", 0.3), size),
            "synthetic: NME (pallor, necrolysis, parakeratosis)",
        ),
    ]
    rl = [_label(real_crop(real, x, y, size), cap) for x, y, cap in REAL_CROPS]
    gap = np.full((size, 8, 3), 255, np.uint8)
    row1 = np.hstack([syn[0], gap, syn[1], gap, syn[2]])
    row2 = np.hstack([rl[0], gap, rl[1], gap, rl[2]])
    fig = np.vstack([row1, np.full((8, row1.shape[1], 3), 255, np.uint8), row2])
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(fig, cv2.COLOR_RGB2BGR))
    return out


def pattern_gallery(out: Path, size: int = 448) -> Path:
    """One row per pattern / mimic: plain crop and the same crop with annotation outlines."""
    rows = [
        ("pallor (NME)", find_layout(21, "nme", "pallor"), "pallor", 0.3),
        ("necrolysis (NME)", find_layout(31, "nme", "necrolysis"), "necrolysis", 0.2),
        ("parakeratosis (NME)", find_layout(41, "nme", "parakeratosis"), "parakeratosis", 0.0),
        (
            "mimic: psoriasiform (parakeratosis, no pallor)",
            find_layout(51, "psoriasiform", "parakeratosis"),
            "parakeratosis",
            0.3,
        ),
        ("mimic: spongiotic (lower/mid oedema, not pallor)", find_layout(61, "spongiotic"), "spongiosis", 0.9),
        ("normal", find_layout(71, "normal"), "epidermis", 0.3),
    ]
    tiles = []
    for caption, lay, what, depth in rows:
        c = crop_centre(lay, what, depth)
        a = _label(render_crop(lay, 0.5, c, size), caption)
        b = _label(
            render_crop(lay, 0.5, c, size, outlines=True),
            "annotations: epidermis / pallor / necrolysis / parakeratosis",
        )
        tiles.append(np.hstack([a, np.full((size, 6, 3), 255, np.uint8), b]))
    half = (len(tiles) + 1) // 2
    col1 = np.vstack([np.vstack([t, np.full((6, t.shape[1], 3), 255, np.uint8)]) for t in tiles[:half]])
    col2 = np.vstack([np.vstack([t, np.full((6, t.shape[1], 3), 255, np.uint8)]) for t in tiles[half:]])
    fig = np.hstack([col1, np.full((col1.shape[0], 12, 3), 255, np.uint8), col2])
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(fig, cv2.COLOR_RGB2BGR))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.synthetic.preview", description=__doc__.splitlines()[0])
    p.add_argument("--real", type=Path, required=True, help="a real H&E slide at ~0.5 µm/px (CMU-1-Small-Region.svs)")
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    try:
        print(synthetic_vs_real(args.real, args.out / "synthetic_vs_real.png"))
        print(pattern_gallery(args.out / "synthetic_patterns.png"))
    except PipelineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
