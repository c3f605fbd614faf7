"""What the review app serves: a batch output folder and its stored tile predictions.

The reading lives in :mod:`pipeline.outputs.batch_folder` (the output layer, so that training can
read reviewed folders too); this module keeps the review app's names for it.
"""

from __future__ import annotations

from pipeline.outputs.batch_folder import (
    DEFAULT_THRESHOLD,
    LAYERS,
    PATTERNS,
    OutputFolder,
    SlideEntry,
    TileTable,
    read_thresholds,
    read_tiles,
    read_tissue,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "LAYERS",
    "PATTERNS",
    "OutputFolder",
    "SlideEntry",
    "TileTable",
    "read_thresholds",
    "read_tiles",
    "read_tissue",
]
