"""Reviews on disk: the GeoJSON round trip, including the shapes QuPath writes back after an edit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import DataError
from pipeline.review.store import (
    REVIEW_GEOJSON,
    Review,
    load_review,
    parse_review_geojson,
    review_feature_collection,
    save_review,
)

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[20, 20], [40, 20], [40, 40], [20, 40], [20, 20]]


def _review() -> Review:
    r = Review("S1")
    r.mark_tile("pallor", 448, 224, 224, "confirm", "dr a", probability=0.31)
    r.mark_tile("necrolysis", 0, 224, 224, "false_positive", "dr b", probability=0.6)
    r.add_region("parakeratosis", [SQUARE, HOLE], "dr a")
    r.add_region("exclude", [[[500, 500], [600, 500], [550.5, 600.25]]], "dr a")  # open ring: closed on save
    r.set_verdict("disagree", "LOW", "pallor only at the edge", "dr a")
    return r


def test_round_trip_through_files(tmp_path: Path) -> None:
    r = _review()
    save_review(tmp_path, r)
    back = load_review(tmp_path, "S1")
    assert {k: (m.verdict, m.reviewer, m.probability) for k, m in back.tiles.items()} == {
        ("pallor", 448, 224): ("confirm", "dr a", 0.31),
        ("necrolysis", 0, 224): ("false_positive", "dr b", 0.6),
    }
    assert [g.class_name for g in back.regions] == ["parakeratosis", "exclude"]
    assert len(back.regions[0].polygons[0].holes) == 1
    assert back.regions[1].polygons[0].exterior[-1].tolist() == [500, 500]
    assert back.verdict is not None and (back.verdict.verdict, back.verdict.band) == ("disagree", "LOW")
    assert [h["action"] for h in back.history] == ["tile", "tile", "region", "region", "verdict"]
    assert back.state() == "done"
    # saving what was read gives the same file (stable ids, coordinates)
    first = (tmp_path / REVIEW_GEOJSON).read_text()
    save_review(tmp_path, back)
    assert (tmp_path / REVIEW_GEOJSON).read_text() == first


def test_geojson_is_qupath_shaped(tmp_path: Path) -> None:
    fc = review_feature_collection(_review())
    assert fc["type"] == "FeatureCollection"
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert names == ["pallor", "not_necrolysis", "parakeratosis", "exclude"]
    for f in fc["features"]:
        p = f["properties"]
        assert p["objectType"] == "annotation" and len(p["classification"]["color"]) == 3
        assert p["reviewer"] and p["reviewed_at"] and p["metadata"]["reviewer"] == p["reviewer"]
        assert all(isinstance(v, str) for v in p["metadata"].values())  # QuPath metadata is a string map
    tile = fc["features"][0]
    assert tile["geometry"]["coordinates"] == [[[448, 224], [672, 224], [672, 448], [448, 448], [448, 224]]]
    assert tile["properties"]["measurements"] == {"pallor": 0.31}


def _qupath_edit(fc: dict) -> dict:
    """What QuPath 0.4/0.5 writes back after an edit: extra keys dropped, measurements as a list, a multipolygon."""
    out = []
    for f in fc["features"]:
        p = f["properties"]
        props = {
            "objectType": "annotation",
            "classification": {"name": p["classification"]["name"], "color": [1, 2, 3]},
        }
        props["metadata"] = p["metadata"]  # QuPath keeps object metadata, drops reviewer/reviewed_at
        if "measurements" in p:
            props["measurements"] = [{"name": k, "value": v} for k, v in p["measurements"].items()]
        out.append({"type": "Feature", "id": f["id"], "geometry": f["geometry"], "properties": props})
    # a region drawn in QuPath: a multipolygon with a hole, classification as a plain string
    out.append(
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [[SQUARE, HOLE], [[[200, 200], [300, 200], [250, 300], [200, 200]]]],
            },
            "properties": {
                "objectType": "annotation",
                "classification": "not_pallor",
                "measurements": {"Area µm^2": 5.0},
            },
        }
    )
    # and an unrelated class (kept, written back)
    out.append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
            "properties": {"classification": {"name": "Tumor"}},
        }
    )
    return {"type": "FeatureCollection", "features": out}


def test_read_back_after_a_qupath_edit(tmp_path: Path) -> None:
    edited = _qupath_edit(review_feature_collection(_review()))
    (tmp_path / REVIEW_GEOJSON).write_text(json.dumps(edited))
    back = load_review(tmp_path, "S1")
    assert back.tiles[("pallor", 448, 224)].probability == 0.31  # measurement list read
    assert back.tiles[("pallor", 448, 224)].reviewer == "dr a"  # from metadata
    assert [g.class_name for g in back.regions] == ["parakeratosis", "exclude", "not_pallor", "Tumor"]
    multi = back.regions[2]
    assert len(multi.polygons) == 2 and len(multi.polygons[0].holes) == 1
    save_review(tmp_path, back)  # written back: the multipolygon stays one
    again = json.loads((tmp_path / REVIEW_GEOJSON).read_text())
    assert [f["geometry"]["type"] for f in again["features"]][-2:] == ["MultiPolygon", "Polygon"]


@pytest.mark.parametrize("shape", ["feature", "list"])
def test_bare_feature_and_list(shape: str) -> None:
    feat = review_feature_collection(_review())["features"][0]
    data = feat if shape == "feature" else [feat]
    r = parse_review_geojson(data, "S1", "x.geojson")
    assert list(r.tiles) == [("pallor", 448, 224)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "corrupt review file"),
        ('{"type": "Point"}', "not GeoJSON annotations"),
        ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]}', "no classification"),
        (
            '{"type":"Feature","geometry":{"type":"Point","coordinates":[1,2]},"properties":{"classification":"pallor"}}',
            "not a Polygon",
        ),
    ],
)
def test_corrupt_review_geojson(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / REVIEW_GEOJSON).write_text(text)
    with pytest.raises(DataError, match=match):
        load_review(tmp_path, "S1")


def test_corrupt_review_json(tmp_path: Path) -> None:
    (tmp_path / "review.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="review.json: corrupt review file"):
        load_review(tmp_path, "S1")


def test_edits_validate_and_clear() -> None:
    r = Review("S1")
    with pytest.raises(DataError, match="unknown pattern"):
        r.mark_tile("tumour", 0, 0, 224, "confirm", "a")
    with pytest.raises(DataError, match="unknown region class"):
        r.add_region("Tumor", [SQUARE], "a")
    with pytest.raises(DataError, match="unknown band"):
        r.set_verdict("agree", "MEDIUM", "", "a")
    r.mark_tile("pallor", 0, 0, 224, "confirm", "a")
    r.mark_tile("pallor", 0, 0, 224, None, "a")
    assert r.tiles == {} and r.state() == "none"
    reg = r.add_region("pallor", [SQUARE], "a")
    assert r.state() == "in progress"
    r.remove_region(reg.id, "a")
    assert r.regions == [] and np.isfinite(len(r.history))
