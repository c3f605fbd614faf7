"""Reviews on disk: ``OUT/<slide_id>/review.geojson`` (QuPath annotations) and ``review.json`` (verdict, history).

The store of the review app (:mod:`pipeline.review`, which re-exports it as ``pipeline.review.store``)
and the source of training labels (:mod:`pipeline.outputs.review_labels`).

``review.geojson`` is a QuPath ``FeatureCollection`` of editable annotations in the same frame as
``tiles.geojson`` (level-0 pixels minus the slide's bounds origin, which is (0, 0) for most
formats). Classification names are the pattern names for positives (``pallor``, ``necrolysis``,
``parakeratosis``), explicit negatives ``not_<pattern>`` (a tile the model called and the reviewer
rejected: a false positive) and ``exclude`` (an area to leave out of training). Two kinds of feature:

* a **tile mark**: one tile square, confirmed (class = pattern) or rejected (class = ``not_<pattern>``);
  ``properties.metadata`` holds ``review_kind: tile``, ``tile_x``, ``tile_y``, ``tile_size`` (level-0 px)
  and the tile's probability is a measurement;
* a **region**: any polygon or multipolygon with holes, drawn in the viewer or in QuPath (a missed
  pattern, a negative area, an exclusion).

Reviewer and time are in ``properties.reviewer`` / ``properties.reviewed_at`` and repeated in
``properties.metadata`` (string map) because QuPath keeps object metadata through an edit and drops
other keys. Reading accepts what QuPath writes back: a ``FeatureCollection``, a bare ``Feature`` or a
list, ``Polygon`` or ``MultiPolygon`` with holes, ``measurements`` as a map or as QuPath's older list
of ``{"name", "value"}``; features of other classes are kept as regions (and written back).

``review.json``: ``{"format": "nme-review/1", "slide_id", "verdict": {verdict: agree|disagree, band,
note, reviewer, at} | null, "updated_at", "history": [{at, reviewer, action, ...}]}``.
Both files are written atomically (temporary file, fsync, rename); a corrupt file is a
:class:`~pipeline.core.errors.DataError` naming it and is never overwritten.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.outputs.batch_folder import PATTERNS
from pipeline.outputs.geojson import class_colour, feature_id
from pipeline.tiles.annotations import Annotation, _class_name, _features, _ring

log = logging.getLogger(__name__)

REVIEW_GEOJSON = "review.geojson"
REVIEW_JSON = "review.json"
FORMAT = "nme-review/1"
EXCLUDE = "exclude"
TileVerdict = Literal["confirm", "false_positive"]
SlideVerdictName = Literal["agree", "disagree"]
BANDS = ("LOW", "INDETERMINATE", "HIGH")
MAX_HISTORY = 10_000


def negative(pattern: str) -> str:
    """The explicit negative class of a pattern: ``not_<pattern>``."""
    return f"not_{pattern}"


#: Every class name the review writes; others read from QuPath are kept but carry no label.
REVIEW_CLASSES = (*PATTERNS, *(negative(p) for p in PATTERNS), EXCLUDE)


def now() -> str:
    """ISO 8601 UTC time, seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class TileMark:
    """A reviewer's verdict on one tile for one pattern; (x, y, size) in level-0 px (QuPath frame)."""

    pattern: str
    x: float
    y: float
    size: float
    verdict: TileVerdict
    reviewer: str
    at: str
    probability: float | None = None

    @property
    def class_name(self) -> str:
        return self.pattern if self.verdict == "confirm" else negative(self.pattern)


@dataclass
class Region:
    """A drawn area of a class: polygons (exterior + holes) in level-0 px (QuPath frame)."""

    class_name: str
    polygons: list[Annotation]
    reviewer: str
    at: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class SlideVerdict:
    """The slide-level call: agree or disagree with the model's band (``band``: the reviewer's band)."""

    verdict: SlideVerdictName
    band: str | None
    note: str
    reviewer: str
    at: str


@dataclass
class Review:
    """Everything reviewed on one slide."""

    slide_id: str
    tiles: dict[tuple[str, int, int], TileMark] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    verdict: SlideVerdict | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    updated_at: str | None = None

    @property
    def empty(self) -> bool:
        return not self.tiles and not self.regions and self.verdict is None

    def state(self) -> str:
        """``none``, ``in progress`` (tiles or regions marked) or ``done`` (slide verdict given)."""
        return "done" if self.verdict else "none" if self.empty else "in progress"

    # -- edits --------------------------------------------------------------------------------
    def _log(self, reviewer: str, action: str, **what: Any) -> str:
        at = now()
        self.history.append({"at": at, "reviewer": reviewer, "action": action, **what})
        del self.history[:-MAX_HISTORY]
        self.updated_at = at
        return at

    def mark_tile(
        self,
        pattern: str,
        x: float,
        y: float,
        size: float,
        verdict: TileVerdict | None,
        reviewer: str,
        probability: float | None = None,
    ) -> None:
        """Confirm or reject tile (x, y) for ``pattern``; ``verdict=None`` clears the mark."""
        if pattern not in PATTERNS:
            raise DataError(f"unknown pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")
        key = (pattern, int(round(x)), int(round(y)))
        at = self._log(reviewer, "tile", pattern=pattern, x=x, y=y, verdict=verdict)
        if verdict is None:
            self.tiles.pop(key, None)
        else:
            self.tiles[key] = TileMark(pattern, float(x), float(y), float(size), verdict, reviewer, at, probability)

    def add_region(self, class_name: str, rings: list[list[list[float]]], reviewer: str) -> Region:
        """A drawn polygon (first ring exterior, others holes; level-0 px, QuPath frame) of a review class."""
        if class_name not in REVIEW_CLASSES:
            raise DataError(f"unknown region class {class_name!r}; expected one of {', '.join(REVIEW_CLASSES)}")
        closed = [r if r and r[0] == r[-1] else [*r, r[0]] for r in rings]
        parsed = [_ring(r, "region", 0) for r in closed]
        region = Region(class_name, [Annotation(class_name, parsed[0], parsed[1:])], reviewer, "")
        region.at = self._log(reviewer, "region", class_name=class_name, id=region.id)
        self.regions.append(region)
        return region

    def remove_region(self, region_id: str, reviewer: str) -> None:
        self.regions = [r for r in self.regions if r.id != region_id]
        self._log(reviewer, "remove_region", id=region_id)

    def set_verdict(self, verdict: SlideVerdictName | None, band: str | None, note: str, reviewer: str) -> None:
        """The slide-level verdict (``None`` clears it); ``band`` one of LOW, INDETERMINATE, HIGH or None."""
        if verdict not in ("agree", "disagree", None):
            raise DataError(f"unknown slide verdict {verdict!r}; expected agree or disagree")
        if band is not None and band not in BANDS:
            raise DataError(f"unknown band {band!r}; expected one of {', '.join(BANDS)}")
        at = self._log(reviewer, "verdict", verdict=verdict, band=band, note=note)
        self.verdict = None if verdict is None else SlideVerdict(verdict, band, note, reviewer, at)

    def to_json(self) -> dict[str, Any]:
        """What the viewer needs (tile marks and regions flattened, verdict, state)."""
        return {
            "slide_id": self.slide_id,
            "state": self.state(),
            "tiles": [
                {"pattern": m.pattern, "x": m.x, "y": m.y, "size": m.size, "verdict": m.verdict, "reviewer": m.reviewer}
                for m in self.tiles.values()
            ],
            "regions": [
                {
                    "id": r.id,
                    "class_name": r.class_name,
                    "rings": [[a.exterior.tolist(), *(h.tolist() for h in a.holes)] for a in r.polygons],
                    "reviewer": r.reviewer,
                }
                for r in self.regions
            ],
            "verdict": None if self.verdict is None else self.verdict.__dict__,
            "updated_at": self.updated_at,
        }


# -- GeoJSON ----------------------------------------------------------------------------------
def _props(class_name: str, reviewer: str, at: str, meta: Mapping[str, str]) -> dict[str, Any]:
    return {
        "objectType": "annotation",
        "isLocked": False,
        "classification": {"name": class_name, "color": class_colour(class_name)},
        "reviewer": reviewer,
        "reviewed_at": at,
        "metadata": {"reviewer": reviewer, "reviewed_at": at, **meta},
    }


def review_feature_collection(review: Review) -> dict[str, Any]:
    """The review as a QuPath ``FeatureCollection`` (tile marks first, then regions)."""
    feats: list[dict[str, Any]] = []
    for m in review.tiles.values():
        x0, y0, x1, y1 = _xy(np.array([[m.x, m.y, m.x + m.size, m.y + m.size]]))[0]
        props = _props(
            m.class_name,
            m.reviewer,
            m.at,
            {"review_kind": "tile", "tile_x": _txt(m.x), "tile_y": _txt(m.y), "tile_size": _txt(m.size)},
        )
        if m.probability is not None:
            props["measurements"] = {m.pattern: round(float(m.probability), 4)}
        feats.append(
            {
                "type": "Feature",
                "id": feature_id(review.slide_id, "review-tile", m.pattern, _txt(m.x), _txt(m.y)),
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": props,
            }
        )
    for r in review.regions:
        polys = [[_xy(a.exterior), *(_xy(h) for h in a.holes)] for a in r.polygons]
        geom = (
            {"type": "Polygon", "coordinates": polys[0]}
            if len(polys) == 1
            else {"type": "MultiPolygon", "coordinates": polys}
        )
        feats.append(
            {
                "type": "Feature",
                "id": r.id,
                "geometry": geom,
                "properties": _props(r.class_name, r.reviewer, r.at, {"review_kind": "region"}),
            }
        )
    return {"type": "FeatureCollection", "features": feats}


def _xy(ring: np.ndarray) -> list[list[int | float]]:
    """A ring's points as JSON numbers: whole level-0 pixels as ints, others to 2 decimals."""
    return [[int(v) if float(v).is_integer() else round(float(v), 2) for v in p] for p in ring.tolist()]


def _txt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(round(float(v), 2))


def _measurements(props: Mapping[str, Any]) -> dict[str, float]:
    """QuPath measurements as a map, whether written as a map or as the older list of {name, value}."""
    meas = props.get("measurements")
    if isinstance(meas, list):
        meas = {m.get("name"): m.get("value") for m in meas if isinstance(m, Mapping)}
    if not isinstance(meas, Mapping):
        return {}
    return {str(k): float(v) for k, v in meas.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _polygons(geom: Any, source: str, i: int, name: str) -> list[Annotation]:
    gtype = geom.get("type") if isinstance(geom, Mapping) else None
    coords = geom.get("coordinates") if isinstance(geom, Mapping) else None
    if gtype == "Polygon":
        polys = [coords]
    elif gtype == "MultiPolygon" and isinstance(coords, list):
        polys = coords
    else:
        raise DataError(f"{source}: feature {i} ({name}): geometry {gtype!r} is not a Polygon/MultiPolygon")
    out = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise DataError(f"{source}: feature {i} ({name}): empty polygon")
        rings = [_ring(r, source, i) for r in poly]
        out.append(Annotation(name, rings[0], rings[1:]))
    return out


def parse_review_geojson(data: Any, slide_id: str, source: str) -> Review:
    """Tile marks and regions from parsed GeoJSON (ours, or QuPath's export of it after an edit).

    Raises:
        DataError: not GeoJSON annotations, a feature without a class, a bad geometry (one line).
    """
    review = Review(slide_id)
    for i, feat in enumerate(_features(data, source)):
        if not isinstance(feat, Mapping):
            raise DataError(f"{source}: feature {i} is not an object")
        props = feat.get("properties") or {}
        name = _class_name(props)
        if not name:
            raise DataError(f"{source}: feature {i} has no classification name")
        raw_meta = props.get("metadata")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
        reviewer = str(props.get("reviewer") or meta.get("reviewer") or "")
        at = str(props.get("reviewed_at") or meta.get("reviewed_at") or "")
        polys = _polygons(feat.get("geometry"), source, i, name)
        pattern = name.removeprefix("not_")
        if meta.get("review_kind") == "tile" and pattern in PATTERNS:
            try:
                x, y = float(meta["tile_x"]), float(meta["tile_y"])
                size = float(meta.get("tile_size") or np.ptp(polys[0].exterior[:, 0]))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{source}: feature {i} ({name}): tile mark without tile_x/tile_y") from None
            verdict: TileVerdict = "confirm" if name == pattern else "false_positive"
            prob = _measurements(props).get(pattern)
            review.tiles[(pattern, int(round(x)), int(round(y)))] = TileMark(
                pattern, x, y, size, verdict, reviewer, at, prob
            )
        else:
            fid = feat.get("id")
            review.regions.append(
                Region(name, polys, reviewer, at, str(fid) if isinstance(fid, (str, int)) else str(uuid.uuid4()))
            )
    return review


# -- files ------------------------------------------------------------------------------------
def load_review(slide_dir: Path, slide_id: str) -> Review:
    """The slide's review (empty when none was saved).

    Raises:
        DataError: ``review.geojson`` or ``review.json`` is corrupt (names the file; it is left as is).
    """
    gj, js = slide_dir / REVIEW_GEOJSON, slide_dir / REVIEW_JSON
    review = Review(slide_id)
    if gj.is_file():
        try:
            data = json.loads(gj.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{gj}: corrupt review file, not JSON ({' '.join(str(exc).split())})") from None
        review = parse_review_geojson(data, slide_id, str(gj))
    if js.is_file():
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"expected format {FORMAT!r}")
            v = meta.get("verdict")
            if v is not None:
                review.verdict = SlideVerdict(
                    v["verdict"], v.get("band"), str(v.get("note") or ""), str(v.get("reviewer") or ""), str(v["at"])
                )
            review.history = list(meta.get("history") or [])
            review.updated_at = meta.get("updated_at")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{js}: corrupt review file ({' '.join(str(exc).split())})") from None
    return review


def save_review(slide_dir: Path, review: Review) -> None:
    """Write ``review.geojson`` then ``review.json`` atomically (each complete or absent)."""
    text = json.dumps(review_feature_collection(review), separators=(",", ":"), allow_nan=False)
    atomic_write_text(slide_dir / REVIEW_GEOJSON, text + "\n")
    atomic_write_json(
        slide_dir / REVIEW_JSON,
        {
            "format": FORMAT,
            "slide_id": review.slide_id,
            "verdict": None if review.verdict is None else review.verdict.__dict__,
            "updated_at": review.updated_at,
            "history": review.history,
        },
    )
    log.info(
        "%s: review saved (%d tile mark(s), %d region(s))", review.slide_id, len(review.tiles), len(review.regions)
    )
