"""The embedded demo: a handful of synthetic slides made on first use."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_SEED = 20261121
DEMO_CLASSES = ["nme", "psoriasiform", "spongiotic", "normal", "nme", "nme_late"]


def ensure_demo_slides(folder: Path) -> Path:
    """``folder/slides`` with the demo slides (generated once, deterministic); returns the slides folder."""
    slides = folder / "slides"
    if (folder / "labels.csv").is_file() and any(slides.glob("*.tiff")):
        return slides
    from pipeline.synthetic import DIAGNOSES, generate_dataset

    classes = [c for c in dict.fromkeys(DEMO_CLASSES) if c in DIAGNOSES]
    log.info("making %d demo slides in %s (first run only)", len(DEMO_CLASSES), folder)
    generate_dataset(folder, n=len(DEMO_CLASSES), seed=DEMO_SEED, mpp=0.5, classes=classes, overwrite=True)
    return slides
