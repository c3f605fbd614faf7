"""Reviews → sparse tile labels and slide labels (pipeline.review.labels)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.review.labels import reviewed_labels
from pipeline.review.store import Review, save_review


def _builders() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_review_server_tests", Path(__file__).with_name("test_review_server.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reviews_become_sparse_labels(tmp_path: Path) -> None:
    out = _builders().make_output_folder(tmp_path)
    r = Review("S1")
    r.mark_tile("pallor", 0, 224, 224, "confirm", "dr a", 0.95)
    r.mark_tile("necrolysis", 224, 224, 224, "false_positive", "dr b", 0.4)
    # a missed parakeratosis region over the tile at (448, 448), and an exclusion over (1344, 672)
    r.add_region("parakeratosis", [[[440, 440], [680, 440], [680, 680], [440, 680]]], "dr a")
    r.add_region("exclude", [[[1350, 680], [1400, 680], [1400, 720], [1350, 720]]], "dr a")
    r.mark_tile("pallor", 1344, 672, 224, "confirm", "dr a")  # inside the exclusion: dropped
    r.set_verdict("disagree", "LOW", "", "dr c")
    save_review(out / "S1", r)

    labels = reviewed_labels(out)
    assert [s.slide_id for s in labels.slides] == ["S1"]  # S2 has no review
    s = labels.slides[0]
    got = {(int(x), int(y)): (t.tolist(), m.tolist()) for (x, y), t, m in zip(s.coords, s.targets, s.mask)}
    assert got[(0, 224)] == ([1, 0, 0], [True, False, False])
    assert got[(224, 224)] == ([0, 0, 0], [False, True, False])
    assert got[(448, 448)] == ([0, 0, 1], [False, False, True])
    assert (1344, 672) not in got and len(got) == 3
    assert s.tile_size_l0 == 224 and s.slide_mpp == 0.5 and s.slide_path is not None and s.slide_path.is_file()
    assert (s.model_band, s.reviewer_band, s.slide_label) == ("HIGH", "LOW", 0)
    assert s.reviewers == ["dr a", "dr b", "dr c"]
    prov = labels.provenance()
    assert prov["slides"][0]["tile_labels"] == 3 and json.dumps(prov)


def test_agree_keeps_the_model_band(tmp_path: Path) -> None:
    out = _builders().make_output_folder(tmp_path, n_slides=1)
    r = Review("S1")
    r.set_verdict("agree", None, "", "dr a")
    save_review(out / "S1", r)
    s = reviewed_labels(out).slides[0]
    assert s.slide_label == 1 and s.n_labels == 0 and s.coords.shape == (0, 2) and np.all(~s.mask)
