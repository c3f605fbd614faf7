"""Reviews on disk: the review app's store (``review.geojson`` + ``review.json`` per slide).

The file format, the :class:`Review` model and its atomic writes live in
:mod:`pipeline.outputs.reviews` (the output layer, so that training can read reviews too); this
module keeps the review app's names for them.
"""

from __future__ import annotations

from pipeline.outputs.reviews import (
    BANDS,
    EXCLUDE,
    FORMAT,
    MAX_HISTORY,
    REVIEW_CLASSES,
    REVIEW_GEOJSON,
    REVIEW_JSON,
    Region,
    Review,
    SlideVerdict,
    SlideVerdictName,
    TileMark,
    TileVerdict,
    load_review,
    negative,
    now,
    parse_review_geojson,
    review_feature_collection,
    save_review,
)

__all__ = [
    "BANDS",
    "EXCLUDE",
    "FORMAT",
    "MAX_HISTORY",
    "REVIEW_CLASSES",
    "REVIEW_GEOJSON",
    "REVIEW_JSON",
    "Region",
    "Review",
    "SlideVerdict",
    "SlideVerdictName",
    "TileMark",
    "TileVerdict",
    "load_review",
    "negative",
    "now",
    "parse_review_geojson",
    "review_feature_collection",
    "save_review",
]
