"""The review loop: reviewed output folders as training data, fine-tuning from a bundle, provenance.

End to end on small synthetic slides: the shipped demo bundle is run over slides where it misses
tiles, a scripted reviewer reviews them from ground truth through the review app's store,
``train.py`` fine-tunes the bundle on the reviews, and the reviewed tiles' error goes down.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from models.bundle import TrainingSpec, read_contract
from pipeline.core.config import validate
from pipeline.core.errors import ConfigError, DataError
from pipeline.tiles.tiling import TilingConfig
from pipeline.training.config import ReviewedSource, RunConfig
from pipeline.training.init_bundle import check_init_bundle
from pipeline.training.reviewed import read_reviewed, reviewed_patch_data

DEMO = REPO / "models" / "demo_bundle"


def _loop() -> Any:
    spec = importlib.util.spec_from_file_location("_review_loop", REPO / "benchmarks" / "review_loop.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reviewed_source_and_init_bundle_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"reviewed\.0\.wieght") as info:
        validate(RunConfig, {"reviewed": [{"output": "x", "wieght": 2}]}, "cfg.yaml")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not both"):
        validate(
            RunConfig, {"model": {"init_weights": str(DEMO / "model.safetensors"), "init_bundle": str(DEMO)}}, "c.yaml"
        )


def test_init_bundle_must_match_the_architecture() -> None:
    ok = validate(RunConfig, {"model": {"init_bundle": str(DEMO)}}, "cfg.yaml")
    assert check_init_bundle(ok) is not None
    fewer = validate(
        RunConfig,
        {"model": {"init_bundle": str(DEMO)}, "labels": {"classes": ["pallor"], "positive_coverage": {"pallor": 0.2}}},
        "cfg.yaml",
    )
    with pytest.raises(
        ConfigError, match=r"^model\.init_bundle: .* has classes .* but labels\.classes is \['pallor'\]$"
    ):
        check_init_bundle(fewer)
    other = validate(RunConfig, {"model": {"init_bundle": str(DEMO), "backbone": "resnet18"}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="has backbone 'mobilenet_v3_small' but model.backbone is 'resnet18'"):
        check_init_bundle(other)
    missing = validate(RunConfig, {"model": {"init_bundle": "/nonexistent/bundle"}}, "cfg.yaml")
    with pytest.raises(ConfigError, match="model.init_bundle: .*not found"):
        check_init_bundle(missing)


def test_existing_bundles_load_and_old_contracts_keep_their_bytes() -> None:
    contract = read_contract(DEMO)  # written before training.reviews / init_bundle existed
    assert contract.training.reviews is None and contract.training.init_bundle is None
    dumped = contract.training.model_dump(mode="json")
    assert "reviews" not in dumped and "init_bundle" not in dumped
    spec = TrainingSpec.from_config({"a": 1}, code_version="x")
    spec.reviews = [{"out_dir": "o", "slides": []}]
    assert TrainingSpec.model_validate(spec.model_dump(mode="json")).reviews == spec.reviews


def test_not_a_batch_output_folder_is_one_line(tmp_path: Path) -> None:
    cfg = validate(RunConfig, {"reviewed": [{"output": str(tmp_path)}]}, "cfg.yaml")
    with pytest.raises(DataError, match="not a batch output folder") as info:
        read_reviewed(cfg.reviewed)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Demo bundle over 2 reviewed slides, scripted reviews, a 2-epoch fine-tune (2 x 160 tiles) on them."""
    lp = _loop()
    w = tmp_path_factory.mktemp("loop")
    replay = lp.make_slides(w / "replay", 3, 501)
    revs = lp.make_slides(w / "reviewed_slides", 2, 502)
    out = lp.run_infer(revs / "slides", w / "out", DEMO)
    actions = lp.review_from_truth(out, revs)
    cfg = lp.finetune_config(w, replay, out, DEMO, epochs=2, tiles=160)
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"lp": lp, "out": out, "actions": actions, "bundle": w / "run" / "bundle", "cfg": cfg, "stdout": proc.stdout}


@pytest.mark.slow
def test_fine_tune_on_reviews_lowers_the_reviewed_tiles_error(loop: dict[str, Any]) -> None:
    lp, out = loop["lp"], loop["out"]
    assert loop["actions"]["missed_region"] > 0  # the demo bundle misses tiles on these slides
    tiles = lp.reviewed_tiles_of(out)
    before = lp.reviewed_tile_error(DEMO, tiles)
    after = lp.reviewed_tile_error(loop["bundle"], tiles)
    assert before["all"]["n"] == after["all"]["n"] > 20
    assert after["all"]["mae"] < 0.8 * before["all"]["mae"], (before, after)
    assert after["all"]["error_rate"] <= before["all"]["error_rate"], (before, after)


@pytest.mark.slow
def test_the_bundle_records_which_reviews_by_whom_and_when(loop: dict[str, Any]) -> None:
    contract = json.loads((loop["bundle"] / "bundle.json").read_text())
    training = contract["training"]
    assert training["init_bundle"]["name"] == "nme-demo" and len(training["init_bundle"]["sha256"]) == 64
    (src,) = training["reviews"]
    assert Path(src["out_dir"]) == loop["out"].resolve() and src["weight"] == 20
    assert src["used_for"] == ["tile labels"]  # task patch: the verdicts are not used
    assert src["reviewers"] == ["scripted reviewer"] and src["last_review_at"]
    reviewed = {s["slide_id"] for s in src["slides"]}
    assert reviewed == {p.name for p in loop["out"].iterdir() if (p / "review.json").is_file()}
    assert all(s["tile_labels"] > 0 and s["updated_at"] and s["reviewers"] for s in src["slides"])
    assert training["config"]["reviewed"][0]["output"] == str(loop["out"])
    assert read_contract(loop["bundle"]).training.reviews == training["reviews"]
    # train.py's closing says so, and that a task: patch bundle is not yet one infer.py can run
    said = loop["stdout"]
    assert f"fine-tuned from: {DEMO} (nme-demo " in said
    assert f"reviews: 2 slide(s) of {loop['out'].resolve()} by scripted reviewer (last " in said
    assert "note: patch model only (task: patch): infer.py needs a slide aggregator too" in said


def test_train_closing_says_how_to_run_a_full_bundle() -> None:
    import train

    lines = train.closing_lines(DEMO)
    assert lines[0] == f"bundle: {DEMO}" and lines[-1].endswith(f"infer.py SLIDES_DIR --out OUT_DIR --model {DEMO}")
    assert not any(line.startswith(("fine-tuned from", "reviews:", "note:")) for line in lines)  # shipped: from scratch


@pytest.mark.slow
def test_a_reviewed_slide_in_the_patch_data_is_refused(loop: dict[str, Any]) -> None:
    sets = read_reviewed([ReviewedSource(output=loop["out"])])
    sid = sets[0].labels.slides[0].slide_id
    with pytest.raises(DataError, match=f"reviewed slides already in another patch data set: {sid}$"):
        reviewed_patch_data(sets, ["pallor", "necrolysis", "parakeratosis", "epidermis"], TilingConfig(), {sid})
    with pytest.raises(DataError, match=f"also reviewed in {loop['out'].resolve()}$"):
        read_reviewed([ReviewedSource(output=loop["out"]), ReviewedSource(output=loop["out"])])
