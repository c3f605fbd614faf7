"""Extra slide sets for training (real skin, patterns painted on real skin): slide tables that name
slides by path with a split column, per-set sampling weights, and the real-skin set shipped in data/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, skin_like_image, write_pyramid_tiff

from pipeline.core.errors import ConfigError, DataError
from pipeline.reading.slide import ReadPlan
from pipeline.training.config import DataConfig, RunConfig
from pipeline.training.data import SlideRecord, SlideTiles, balanced_sample, load_slide_table

HEADER = "slide_id,patient_id,diagnosis,nme_pattern,pallor,necrolysis,parakeratosis,path,mpp,split\n"


def _table(root: Path, rows: list[str]) -> DataConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(HEADER + "".join(r + "\n" for r in rows))
    return DataConfig(root=root)


def test_slides_named_by_path_with_mpp_and_split(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_pyramid_tiff(outside / "a.tiff", skin_like_image(400, 300), mpp=None)
    write_pyramid_tiff(outside / "b.tiff", skin_like_image(400, 300), mpp=0.5)
    cfg = _table(
        tmp_path / "set",
        ["A,pA,normal,0,0,0,0,../elsewhere/a.tiff,0.25,train", f"B,pB,normal,0,0,0,0,{outside / 'b.tiff'},,VAL"],
    )
    recs = {r.slide_id: r for r in load_slide_table(cfg, tmp_path, require_annotations=False)}
    assert recs["A"].path == (outside / "a.tiff").resolve() and recs["A"].mpp == 0.25 and recs["A"].split == "train"
    assert recs["B"].path == outside / "b.tiff" and recs["B"].mpp is None and recs["B"].split == "val"
    assert "path" not in recs["A"].extra and "split" not in recs["A"].extra


def test_bad_split_and_missing_path_are_one_line_errors(tmp_path):
    write_pyramid_tiff(tmp_path / "a.tiff", skin_like_image(300, 200), mpp=0.5)
    cfg = _table(tmp_path / "s1", ["A,pA,normal,0,0,0,0,../a.tiff,,holdout"])
    with pytest.raises(DataError, match=r"slide 'A': column 'split' must be train, val or test, got 'holdout'"):
        load_slide_table(cfg, tmp_path, require_annotations=False)
    cfg = _table(tmp_path / "s2", ["A,pA,normal,0,0,0,0,../nowhere.tiff,,"])
    with pytest.raises(DataError, match="slides listed but not found at their path column: A") as ei:
        load_slide_table(cfg, tmp_path, require_annotations=False)
    assert "\n" not in str(ei.value)


def _tiles(n: int, weight: float, epidermal: bool = False) -> SlideTiles:
    targets = np.zeros((n, 4), np.float32)
    if epidermal:
        targets[:, 3] = 1
    rec = SlideRecord("s", "p", Path("x"), None, {})
    return SlideTiles(
        rec,
        np.zeros((n, 2), np.int64),
        targets,
        np.ones((n, 4), bool),
        targets.copy(),
        ReadPlan(0, 0.5, 0.5, 0.5),
        224.0,
        weight=weight,
    )


def test_weighted_sets_are_drawn_in_proportion_to_their_weight():
    pos = _tiles(50, 1.0)
    pos.targets[:, 0] = 1  # a pattern-positive slide so the positive half has a pool
    main, extra = _tiles(900, 1.0), _tiles(100, 9.0)
    items = balanced_sample([pos, main, extra], 4000, 3, seed=1)
    neg = items[items[:, 0] != 0]
    share = float(np.mean(neg[:, 0] == 2))
    assert 0.45 < share < 0.55, share  # 100 tiles x 9 against 900 x 1: half of the negatives
    same = balanced_sample([pos, main, _tiles(100, 1.0)], 4000, 3, seed=1)
    assert float(np.mean(same[same[:, 0] != 0][:, 0] == 2)) < 0.15  # unweighted: by tile count
    assert np.array_equal(balanced_sample([pos, main, extra], 4000, 3, seed=1), items)  # deterministic


def test_extra_data_config_is_validated():
    cfg = RunConfig.model_validate(
        {
            "extra_data": [
                {"root": "data/real_skin", "weight": 8, "split": "auto", "class_map": {"stratum_corneum": "epidermis"}}
            ]
        }
    )
    assert cfg.extra_data[0].weight == 8 and cfg.extra_data[0].painted is None
    from pipeline.core.config import validate

    with pytest.raises(ConfigError, match="weight"):
        validate(RunConfig, {"extra_data": [{"root": "x", "weight": 0}]}, "cfg.yaml")
    with pytest.raises(ConfigError, match="splitt"):
        validate(RunConfig, {"extra_data": [{"root": "x", "splitt": "train"}]}, "cfg.yaml")


@pytest.mark.shared
def test_the_real_skin_set_resolves_to_the_shared_slides(shared_slides):
    recs = {
        r.slide_id: r for r in load_slide_table(DataConfig(root=Path("data/real_skin")), REPO, require_annotations=True)
    }
    assert set(recs) == {"CMU-1-Small-Region", "morphea_section3"}
    assert recs["morphea_section3"].mpp == 0.25 and recs["morphea_section3"].split == "train"
    assert recs["CMU-1-Small-Region"].mpp is None and recs["CMU-1-Small-Region"].split == "val"
    for r in recs.values():
        assert r.path.is_file() and r.annotation is not None and r.flags["nme_pattern"] == 0
