"""A batch output folder read back: its slides by id and their stored tile predictions.

Used by the review app (:mod:`pipeline.review`) and by training on reviews
(:mod:`pipeline.outputs.review_labels`); lives in the output layer so that training may import it.

A batch output folder (what ``infer.py`` writes) holds ``OUT/<slide_id>/result.json`` per slide
(:class:`~pipeline.result.SlideResult`), ``tiles.geojson`` (one locked QuPath ``tile`` per tile,
its probabilities as measurements) and ``tissue.geojson``. Nothing here runs a model: the layers
are drawn from those files.

Coordinates: ``tiles.geojson`` and ``tissue.geojson`` are in **level-0 pixels minus the slide's
bounds origin** (QuPath's frame; the origin is (0, 0) for all formats but bounds-cropped ones such
as MRXS). :class:`TileTable` keeps that frame; add the slide's bounds origin for full level-0
coordinates. Slide ids are looked up in the folder's listing; no client text becomes a path.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import DataError
from pipeline.reading.slide import SLIDE_SUFFIXES, slide_id_for
from pipeline.result import RESULT_FILE, ResultFormatError, SlideResult, read_result

log = logging.getLogger(__name__)

#: The tile layers shown, in order; each is a measurement of ``tiles.geojson``.
PATTERNS = ("pallor", "necrolysis", "parakeratosis")
LAYERS = (*PATTERNS, "attention")
#: Pattern threshold used when the model bundle's own thresholds cannot be read.
DEFAULT_THRESHOLD = 0.5


@dataclass
class TileTable:
    """Stored tile predictions of one slide.

    ``coords``: (N, 2) top-left (x, y) in the QuPath frame (level-0 px minus ``offset``);
    ``size``: tile side in level-0 px; ``values``: layer name -> (N,) float (NaN where missing).
    """

    coords: np.ndarray
    size: float
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def to_json(self) -> dict[str, Any]:
        """Column-wise JSON for the viewer (NaN as null)."""
        return {
            "size": self.size,
            "x": self.coords[:, 0].tolist(),
            "y": self.coords[:, 1].tolist(),
            "values": {k: [None if math.isnan(v) else v for v in col.tolist()] for k, col in self.values.items()},
        }


def read_tiles(path: Path) -> TileTable:
    """``tiles.geojson`` as a :class:`TileTable`; a missing file is an empty table.

    Raises:
        DataError: the file is not JSON or not a FeatureCollection of square tiles (one line).
    """
    if not path.is_file():
        return TileTable(np.zeros((0, 2)), 0.0, {k: np.zeros(0) for k in LAYERS})
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        feats = data["features"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable tile predictions ({type(exc).__name__})") from None
    xs: list[float] = []
    ys: list[float] = []
    size = 0.0
    cols: dict[str, list[float]] = {k: [] for k in LAYERS}
    for i, f in enumerate(feats):
        try:
            ring = np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64)
            meas = f.get("properties", {}).get("measurements", {})
        except (KeyError, TypeError, ValueError, IndexError):
            raise DataError(f"{path}: feature {i} is not a tile polygon") from None
        x0, y0 = ring[:, 0].min(), ring[:, 1].min()
        size = max(size, float(ring[:, 0].max() - x0))
        xs.append(float(x0))
        ys.append(float(y0))
        if isinstance(meas, list):  # QuPath < 0.4: [{"name", "value"}]
            meas = {m.get("name"): m.get("value") for m in meas if isinstance(m, dict)}
        for k in LAYERS:
            v = meas.get(k)
            cols[k].append(float(v) if isinstance(v, (int, float)) else math.nan)
    return TileTable(
        np.column_stack([xs, ys]) if xs else np.zeros((0, 2)), size, {k: np.asarray(v) for k, v in cols.items()}
    )


def read_tissue(path: Path) -> list[list[list[float]]]:
    """Outer rings of ``tissue.geojson`` (QuPath frame, level-0 px); [] when absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rings = []
        for f in data.get("features", []):
            geom = f.get("geometry") or {}
            polys = [geom["coordinates"]] if geom.get("type") == "Polygon" else geom.get("coordinates") or []
            rings += [p[0] for p in polys if p]
        return rings
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


def read_thresholds(bundle: Path | None) -> dict[str, float]:
    """Per-pattern tile thresholds from the bundle's ``bundle.json`` (``thresholds``), else 0.5 each."""
    out = dict.fromkeys(PATTERNS, DEFAULT_THRESHOLD)
    if bundle is None:
        return out
    try:
        data = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
        for k in PATTERNS:
            v = data.get("thresholds", {}).get(k)
            if isinstance(v, (int, float)) and 0 <= v <= 1:
                out[k] = float(v)
    except (OSError, ValueError, AttributeError):
        log.warning("%s: no readable bundle.json; pattern thresholds default to %.1f", bundle, DEFAULT_THRESHOLD)
    return out


@dataclass
class SlideEntry:
    """One slide of the output folder: its folder (under the output folder) and its result."""

    slide_id: str
    folder: Path
    result: SlideResult | None
    error: str | None = None


@dataclass
class OutputFolder:
    """A batch output folder: the slides listed once at start-up, by id.

    ``slides_root``: where to look for slides whose recorded ``slide_path`` no longer exists.
    """

    root: Path
    slides: dict[str, SlideEntry]
    thresholds: dict[str, float]
    model_label: str | None
    slides_root: Path | None = None
    _moved: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, slides_root: Path | None = None) -> OutputFolder:
        """List ``root``'s slides.

        Raises:
            DataError: ``root`` is not a folder or holds no ``<slide_id>/result.json`` (not a batch output).
        """
        root = Path(root).resolve()
        if not root.is_dir():
            raise DataError(f"{root}: no such folder (expected a batch output folder written by infer.py)")
        slides: dict[str, SlideEntry] = {}
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (d / RESULT_FILE).is_file():
                continue
            try:
                res: SlideResult | None = read_result(d)
                err = None
            except ResultFormatError as exc:
                res, err = None, str(exc)
            sid = res.slide_id if res is not None else d.name
            slides[d.name] = SlideEntry(sid, d, res, err)
        if not slides:
            raise DataError(f"{root}: not a batch output folder (no <slide_id>/{RESULT_FILE}); run infer.py first")
        run: dict[str, Any] = {}
        try:
            run = json.loads((root / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        bundle = (run.get("options") or {}).get("model")
        label = run.get("model_label") or next(
            (e.result.model.label for e in slides.values() if e.result and e.result.model), None
        )
        if slides_root is not None and not Path(slides_root).is_dir():
            raise DataError(f"{slides_root}: --slides-root is not a folder")
        return cls(root, slides, read_thresholds(Path(bundle) if bundle else None), label, slides_root)

    def get(self, slide_id: str) -> SlideEntry | None:
        """The slide of that id (a key of the listing), or None: the only way a URL names a slide."""
        return self.slides.get(slide_id)

    def slide_path(self, entry: SlideEntry) -> Path | None:
        """The slide file: as recorded in ``result.json``, else found by id under ``slides_root``."""
        recorded = entry.result.slide_path if entry.result else None
        if recorded and Path(recorded).exists():
            return Path(recorded)
        if self.slides_root is None:
            return None
        if not self._moved:
            for p in sorted(Path(self.slides_root).rglob("*")):
                if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file():
                    self._moved.setdefault(slide_id_for(p), p)
        return self._moved.get(entry.slide_id) or self._moved.get(entry.folder.name)
