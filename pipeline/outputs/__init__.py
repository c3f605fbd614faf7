"""Output layer: everything written for people and other tools, from predictions already computed.

* :mod:`~pipeline.outputs.geojson` — QuPath GeoJSON: tiles with scores (locked ``tile`` objects)
  and tissue contours (editable annotations).
* :mod:`~pipeline.outputs.heatmap` — tile-score heatmaps over the thumbnail, fixed colour scale.
* :mod:`~pipeline.outputs.report` — one self-contained HTML report per slide.
* :mod:`~pipeline.outputs.summary` — ``summary.csv`` and ``index.html`` for a batch.

No model code is imported here (no torch): rendering works from stored predictions.
"""

from __future__ import annotations

from pipeline.outputs.geojson import (
    tiles_feature_collection,
    tissue_feature_collection,
    write_tiles_geojson,
    write_tissue_geojson,
)
from pipeline.outputs.heatmap import (
    ATTENTION_LEGEND,
    HEATMAP_FORMATS,
    PROBABILITY_LEGEND,
    encode_heatmap,
    encode_jpeg,
    encode_png,
    normalise_attention,
    render_heatmap,
    write_png,
)
from pipeline.outputs.report import render_report, write_report
from pipeline.outputs.summary import format_orders, write_index_html, write_summary_csv

__all__ = [
    "ATTENTION_LEGEND",
    "HEATMAP_FORMATS",
    "PROBABILITY_LEGEND",
    "encode_heatmap",
    "encode_jpeg",
    "encode_png",
    "format_orders",
    "normalise_attention",
    "render_heatmap",
    "render_report",
    "tiles_feature_collection",
    "tissue_feature_collection",
    "write_index_html",
    "write_png",
    "write_report",
    "write_summary_csv",
    "write_tiles_geojson",
    "write_tissue_geojson",
]
