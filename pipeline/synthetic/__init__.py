"""Synthetic H&E skin-biopsy slides with NME patterns and their mimics, for the demo and tests.

Public API::

    from pipeline.synthetic import generate_dataset, DIAGNOSES, PATTERNS
    rows = generate_dataset("synth", n=20, seed=0, mpp=0.5, classes=None, size_um=(4000, 3000))

Command line: ``python -m pipeline.synthetic --out DIR --n N --seed S [--mpp 0.5]
[--classes nme,normal] [--size 4000x3000] [--overwrite]``.

Modules: :mod:`.catalog` (classes and their morphology parameters), :mod:`.profiles`
(layered architecture and pattern regions along the surface), :mod:`.cells` (cells and
structures), :mod:`.layout` (sections on the glass, artefacts, stain: all in µm),
:mod:`.textures`/:mod:`.noise` (periodic texture fields), :mod:`.render` (pixels of any block),
:mod:`.stain` (Beer-Lambert colour), :mod:`.artefacts`, :mod:`.tiff_writer` (streaming
pyramid), :mod:`.annotations` (QuPath GeoJSON), :mod:`.dataset` (folder, labels) and
:mod:`.__main__` (CLI).
"""

from __future__ import annotations

from pipeline.synthetic.catalog import CLASS_COLORS, DIAGNOSES, DIAGNOSIS_SPECS, PATTERNS, SITES
from pipeline.synthetic.dataset import (
    DEFAULT_SIZE_UM,
    LABEL_COLUMNS,
    SlidePlan,
    generate_dataset,
    labels_row,
    layout_for,
    plan_dataset,
    write_slide,
)
from pipeline.synthetic.render import SlideRenderer

__all__ = [
    "CLASS_COLORS",
    "DEFAULT_SIZE_UM",
    "DIAGNOSES",
    "DIAGNOSIS_SPECS",
    "LABEL_COLUMNS",
    "PATTERNS",
    "SITES",
    "SlidePlan",
    "SlideRenderer",
    "generate_dataset",
    "labels_row",
    "layout_for",
    "plan_dataset",
    "write_slide",
]
