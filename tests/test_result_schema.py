"""The one slide result: ``result.json`` of every status validates against the printed JSON Schema,
the docs copy of the schema is current, old results are read or refused in one line, and every
entry point composes the per-slide steps through :mod:`pipeline.analysis`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from conftest import REPO, assert_results_match_schema, skin_like_image, write_pyramid_tiff

from pipeline.result import (
    SCHEMA_VERSION,
    ResultFormatError,
    SlideResult,
    parse_result,
    read_result,
    result_json_schema,
)

DEMO_BUNDLE = REPO / "models" / "demo_bundle"


def test_cli_prints_the_schema_and_the_docs_copy_is_current():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "schema", "result"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == result_json_schema()
    docs = json.loads((REPO / "docs" / "result.schema.json").read_text())
    assert docs == printed, (
        "docs/result.schema.json is stale: python -m pipeline schema result > docs/result.schema.json"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "schema", "bundle"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "schema takes one of: result" in bad.stderr


@pytest.mark.slow
def test_mixed_local_batch_validates_against_the_schema(tmp_path):
    """ok, non_diagnostic and failed slides of one batch all write schema-valid results."""
    from pipeline.batch.runner import BatchOptions, run_batch
    from pipeline.synthetic import generate_dataset

    slides = tmp_path / "slides"
    generate_dataset(tmp_path / "syn", n=1, seed=43, mpp=0.5, classes=["nme"], size_um=(1600, 1200), overwrite=True)
    slides.mkdir()
    for p in (tmp_path / "syn" / "slides").glob("*.tiff"):
        p.rename(slides / p.name)
    # a pink smear without epidermis: the quality gate refuses it
    pink = skin_like_image(1200, 900, seed=3)
    pink[:] = (225, 150, 185)
    write_pyramid_tiff(slides / "no_epidermis.tiff", pink, mpp=0.5)
    (slides / "broken.svs").write_bytes(b"not a slide at all" * 100)
    out = tmp_path / "out"
    run_batch(BatchOptions(slides_dir=slides, out_dir=out, model=DEMO_BUNDLE, quiet=True))
    results = assert_results_match_schema(out)
    assert {r["status"] for r in results.values()} == {"ok", "non_diagnostic", "failed"}, {
        k: (r["status"], r["error"], r["quality"]["flags"]) for k, r in results.items()
    }
    for r in results.values():
        assert r["schema_version"] == SCHEMA_VERSION and r["produced_by"]["engine"] == "local"
        assert r["model"]["name"] and r["model"]["label"]
    assert "\n" not in results["broken"]["error"]


def _minimal(**kw):
    return {"slide_id": "S1", "status": "failed", "error": "x", **kw}


def test_a_result_from_before_the_schema_is_read_and_a_foreign_one_refused(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "result.json").write_text(json.dumps(_minimal()))  # no schema_version: the previous version's files
    assert read_result(old).schema_version == SCHEMA_VERSION
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "result.json").write_text(json.dumps(_minimal(probability_of_nme=0.3)))
    with pytest.raises(ResultFormatError) as ei:
        read_result(bad)
    msg = str(ei.value)
    assert "\n" not in msg and "unknown field 'probability_of_nme'" in msg and "--force" in msg and str(bad) in msg
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "result.json").write_text(json.dumps(_minimal(schema_version=99)))
    with pytest.raises(ResultFormatError, match=r"schema_version 99 .*--force"):
        read_result(newer)


def test_resume_redoes_an_unreadable_result_with_a_one_line_warning(tmp_path, caplog):
    from pipeline.batch.state import is_done

    d = tmp_path / "S1"
    d.mkdir()
    (d / "result.json").write_text(json.dumps({"slide_id": "S1", "status": "ok", "band": "LOW"}))
    with caplog.at_level("WARNING"):
        assert not is_done(d)
    assert "missing field 'nme_probability'" in caplog.text
    SlideResult(slide_id="S1", status="non_diagnostic").write(d)
    assert is_done(d)


def test_ok_needs_probability_and_patterns():
    with pytest.raises(ResultFormatError, match="missing field 'patterns'"):
        parse_result({"slide_id": "S1", "status": "ok", "nme_probability": 0.2, "band": "LOW"})
    with pytest.raises(ResultFormatError, match=r"nme_probability: .*(less than or equal|finite)"):
        parse_result(
            {
                "slide_id": "S1",
                "status": "ok",
                "nme_probability": 1.5,
                "band": "LOW",
                "patterns": {"pallor": 0, "necrolysis": 0, "parakeratosis": 0},
            }
        )


#: modules that may compose the per-slide steps (open → tissue → grid → features → gate → aggregation):
#: the analysis, and the tiles layer's tile_slide (tissue + grid: the first step, one function)
COMPOSERS = {"pipeline/analysis.py", "pipeline/tiles/tiling.py"}
#: the steps: calling two or more of them in one module is composing them
STEPS = {"detect_tissue", "make_grid", "extract_features", "assess_quality"}


def test_only_the_analysis_composes_the_per_slide_steps():
    offenders = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel in COMPOSERS:
            continue
        called = {
            n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call)
        }
        used = called & STEPS
        # tile_slide (tissue + grid, one function of the tiles layer) is the first step, not a composition
        if len(used) >= 2 or ("extract_features" in called and rel != "pipeline/patch/features.py"):
            offenders[rel] = sorted(used)
    assert not offenders, f"per-slide steps composed outside pipeline/analysis.py: {offenders}"
