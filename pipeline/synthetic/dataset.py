"""Generate a synthetic dataset: slides, annotations and ``labels.csv`` in one output folder.

Layout of ``out_dir``::

    slides/<slide_id>.tiff            pyramidal JPEG-tiled TIFF, level-0 MPP in the resolution tags
    annotations/<slide_id>.geojson    QuPath FeatureCollection, level-0 pixels
    labels.csv                        slide_id, patient_id, diagnosis, nme_pattern, pallor, necrolysis, parakeratosis, site
    manifest.json                     generator version and arguments

Every file is written atomically (:mod:`pipeline.core.io`); the same arguments give the same bytes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_path, atomic_write_json, atomic_write_text
from pipeline.core.runtime import keep_freed_memory, release_free_memory
from pipeline.reading.slide import MPP_RANGE
from pipeline.synthetic.annotations import feature_collection
from pipeline.synthetic.catalog import DEFAULT_MIX, DIAGNOSES, DIAGNOSIS_SPECS, PATTERNS, SITES
from pipeline.synthetic.layout import SlideLayout, build_layout
from pipeline.synthetic.render import SlideRenderer
from pipeline.synthetic.stain import sample_batch_stain
from pipeline.synthetic.tiff_writer import write_pyramid

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
#: Default glass area per slide, µm (width, height): 8000 x 6000 px at 0.5 µm/px.
DEFAULT_SIZE_UM: tuple[float, float] = (4000.0, 3000.0)
#: Allowed slide side, µm.
SIZE_RANGE_UM: tuple[float, float] = (1000.0, 60000.0)
#: Largest level-0 image, px.
MAX_PIXELS = 2_500_000_000
LABEL_COLUMNS = ("slide_id", "patient_id", "diagnosis", "nme_pattern", "pallor", "necrolysis", "parakeratosis", "site")
_OUR_FILES = ("labels.csv", "manifest.json")


@dataclass(frozen=True)
class SlidePlan:
    """One slide to generate: identity, class, and the seeds of its layout and stain batch."""

    index: int
    slide_id: str
    patient_id: str
    diagnosis: str
    site: str
    layout_seed: int
    batch_seed: int
    mpp: float


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_mpp(value: object) -> float:
    """A rendering resolution in µm/px within :data:`pipeline.reading.slide.MPP_RANGE`."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"mpp must be a number in µm/px, got {value!r}") from None
    lo, hi = MPP_RANGE
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ConfigError(f"mpp must be between {lo} and {hi} µm/px, got {value!r}")
    return v


def check_classes(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    """Validate diagnosis names (unknown names are an error naming the allowed ones)."""
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [c for c in classes.replace(",", " ").split() if c]
    names = tuple(dict.fromkeys(str(c).strip() for c in classes if str(c).strip()))
    if not names:
        raise ConfigError("classes is empty; choose from " + ", ".join(DIAGNOSES))
    unknown = [c for c in names if c not in DIAGNOSIS_SPECS]
    if unknown:
        raise ConfigError(f"unknown class {unknown[0]!r}; choose from " + ", ".join(DIAGNOSES))
    return names


def check_size(size_um: Sequence[float] | None, mpp: float) -> tuple[float, float]:
    """(width, height) of the glass in µm, within :data:`SIZE_RANGE_UM` and :data:`MAX_PIXELS`."""
    if size_um is None:
        size_um = DEFAULT_SIZE_UM
    try:
        w, h = (float(size_um[0]), float(size_um[1]))
    except (TypeError, ValueError, IndexError):
        raise ConfigError(f"size must be (width, height) in µm, got {size_um!r}") from None
    lo, hi = SIZE_RANGE_UM
    for name, v in (("width", w), ("height", h)):
        if not math.isfinite(v) or not lo <= v <= hi:
            raise ConfigError(f"slide {name} must be between {lo:.0f} and {hi:.0f} µm, got {v:g}")
    if (w / mpp) * (h / mpp) > MAX_PIXELS:
        raise ConfigError(f"slide of {w:.0f}x{h:.0f} µm at {mpp} µm/px exceeds {MAX_PIXELS:,} px")
    return w, h


# ----------------------------------------------------------------------------- planning


def _allocate(n: int, weights: dict[str, float]) -> list[str]:
    """Largest-remainder allocation of ``n`` slides to classes in proportion to ``weights``."""
    names = list(weights)
    w = np.array([weights[k] for k in names], dtype=np.float64)
    share = w / w.sum() * n
    counts = np.floor(share).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:rest]] += 1
    return [name for name, c in zip(names, counts) for _ in range(c)]


def plan_dataset(
    n: int, seed: int, mpp: float | Sequence[float] = 0.5, classes: Sequence[str] | None = None
) -> list[SlidePlan]:
    """Decide identity, class, patient, site and seeds of every slide (cheap, deterministic)."""
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    names = check_classes(classes)
    mpps = [check_mpp(m) for m in (mpp if isinstance(mpp, (list, tuple)) else [mpp])]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
    weights = {k: DEFAULT_MIX[k] for k in DIAGNOSES} if names is None else dict.fromkeys(names, 1.0)
    diagnoses = _allocate(n, weights)
    rng.shuffle(diagnoses)

    # patients: a diagnosis's slides are grouped into patients of 1-3 biopsies
    patient_of = [0] * n
    next_patient = 0
    groups: dict[int, list[int]] = {}
    for dx in DIAGNOSES:
        idx = [i for i, d in enumerate(diagnoses) if d == dx]
        pos = 0
        while pos < len(idx):
            size = int(rng.choice([1, 2, 3], p=[0.7, 0.25, 0.05]))
            groups[next_patient] = idx[pos : pos + size]
            pos += size
            next_patient += 1
    first = sorted(groups, key=lambda p: min(groups[p]))
    renumber = {p: k for k, p in enumerate(first)}
    for p, members in groups.items():
        for i in members:
            patient_of[i] = renumber[p]

    def draw_site(dx: str) -> str:
        sites = DIAGNOSIS_SPECS[dx].sites
        keys = [s for s in SITES if s in sites]
        p = np.array([sites[s] for s in keys], dtype=np.float64)
        return str(rng.choice(keys, p=p / p.sum()))

    patient_site: dict[int, str] = {}
    plans = []
    for i in range(n):
        dx = diagnoses[i]
        pid = patient_of[i]
        if pid not in patient_site or rng.random() > 0.6:
            site = draw_site(dx)
            patient_site.setdefault(pid, site)
        else:
            site = patient_site[pid]
        layout_seed = int(np.random.SeedSequence([seed, i, 0x51DE]).generate_state(1, np.uint64)[0] >> 1)
        batch_seed = int(np.random.SeedSequence([seed, pid, 0xBA7C]).generate_state(1, np.uint64)[0] >> 1)
        plans.append(
            SlidePlan(
                index=i,
                slide_id=f"SYN{seed}-{i + 1:04d}",
                patient_id=f"PAT{seed}-{pid + 1:04d}",
                diagnosis=dx,
                site=site,
                layout_seed=layout_seed,
                batch_seed=batch_seed,
                mpp=mpps[int(rng.integers(len(mpps)))] if len(mpps) > 1 else mpps[0],
            )
        )
    return plans


# ----------------------------------------------------------------------------- one slide


def layout_for(plan: SlidePlan, size_um: tuple[float, float]) -> SlideLayout:
    """The µm layout of a planned slide (independent of its MPP)."""
    batch = sample_batch_stain(np.random.default_rng(plan.batch_seed))
    return build_layout(plan.slide_id, plan.diagnosis, plan.site, plan.layout_seed, batch, size_um[0], size_um[1])


def labels_row(plan: SlidePlan, layout: SlideLayout) -> dict[str, object]:
    """The ``labels.csv`` row: pattern flags are what was drawn (and annotated)."""
    present = layout.patterns_present()
    flags = {p: int(present[p]) for p in PATTERNS}
    full = DIAGNOSIS_SPECS[plan.diagnosis].nme_pattern and all(flags.values())
    return {
        "slide_id": plan.slide_id,
        "patient_id": plan.patient_id,
        "diagnosis": plan.diagnosis,
        "nme_pattern": int(full),
        **flags,
        "site": plan.site,
    }


def write_slide(layout: SlideLayout, mpp: float, tiff_path: Path, geojson_path: Path) -> list[tuple[int, int]]:
    """Render ``layout`` at ``mpp`` into ``tiff_path`` and its annotations into ``geojson_path`` (atomic)."""
    renderer = SlideRenderer(layout, mpp)
    r, g, b = (int(round(v)) for v in renderer.background)
    bg = (r, g, b)
    desc = (
        f"Synthetic H&E skin section generated by pipeline.synthetic {GENERATOR_VERSION}; "
        f"slide {layout.slide_id}; not a patient sample"
    )
    keep_freed_memory()  # the renderer's many short-lived arrays of a few MB: reused, not re-faulted
    with atomic_path(tiff_path) as tmp:
        dims = write_pyramid(
            tmp, renderer.render, renderer.width, renderer.height, mpp, layout.stain.jpeg_quality, desc, background=bg
        )
    release_free_memory()
    atomic_write_json(geojson_path, feature_collection(layout, mpp), indent=None)
    return dims


# ----------------------------------------------------------------------------- dataset


def prepare_out(out_dir: Path, overwrite: bool, what: str = "synthetic") -> None:
    """Make ``out_dir`` ready for a dataset: refuse a non-empty folder unless ``overwrite``, then
    remove only what a dataset generator writes (slides, annotations, labels.csv, manifest.json)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{out_dir}: folder exists and is not empty; pass --overwrite (overwrite=True) to replace its {what} data"
            )
        # remove only what this generator writes; leave anything else alone
        for sub, pattern in (("slides", "*.tiff"), ("annotations", "*.geojson")):
            for f in (out_dir / sub).glob(pattern) if (out_dir / sub).is_dir() else []:
                f.unlink()
        for name in _OUR_FILES:
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    mpp: float | Sequence[float] = 0.5,
    classes: Sequence[str] | None = None,
    size_um: tuple[float, float] | None = None,
    overwrite: bool = False,
    progress: Callable[[dict[str, object], float], None] | None = None,
) -> list[dict[str, object]]:
    """Write ``n`` synthetic slides with annotations and ``labels.csv`` into ``out_dir``.

    Args:
        out_dir: output folder (created; must be empty unless ``overwrite``).
        n: number of slides (>= 1).
        seed: dataset seed (>= 0); the same arguments give the same bytes.
        mpp: level-0 resolution in µm/px, or a list to draw each slide's scanner MPP from.
        classes: diagnoses to draw (default: the product mix of :data:`DEFAULT_MIX`).
        size_um: glass area (width, height) per slide in µm (default :data:`DEFAULT_SIZE_UM`).
        overwrite: replace an earlier synthetic dataset in ``out_dir``.
        progress: called with (labels row, seconds) after each slide.

    Returns:
        One ``labels.csv`` row (dict) per slide, in order.

    Raises:
        ConfigError: invalid arguments or a non-empty ``out_dir`` without ``overwrite``.
    """
    plans = plan_dataset(n, seed, mpp, classes)
    size = check_size(size_um, min(p.mpp for p in plans))
    out = Path(out_dir)
    prepare_out(out, overwrite)
    rows = []
    for plan in plans:
        t0 = time.perf_counter()
        layout = layout_for(plan, size)
        write_slide(
            layout, plan.mpp, out / "slides" / f"{plan.slide_id}.tiff", out / "annotations" / f"{plan.slide_id}.geojson"
        )
        row = labels_row(plan, layout)
        rows.append(row)
        dt = time.perf_counter() - t0
        log.info("%s: %s (%s), %.1f s", plan.slide_id, plan.diagnosis, plan.site, dt)
        if progress is not None:
            progress(row, dt)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LABEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "labels.csv", buf.getvalue())
    atomic_write_json(
        out / "manifest.json",
        {
            "generator": "pipeline.synthetic",
            "version": GENERATOR_VERSION,
            "n": len(plans),
            "seed": int(seed),
            "mpp": sorted({p.mpp for p in plans}),
            "classes": list(check_classes(classes) or DIAGNOSES),
            "size_um": list(size),
            "synthetic": True,
        },
    )
    return rows
