"""Out-of-scope stains are flagged by the quality gate with a reason (issue 21, item 7).

An immunohistochemistry-like slide (the real H&E slide CMU-1-Small-Region recoloured into
haematoxylin + DAB by colour deconvolution) and a fluorescence-like one (dark background,
bright single channels) are written as tiled TIFFs with the project's writer and run through
the real analysis (the demo bundle, :class:`pipeline.analysis.SlideAnalyser`, as infer.py
runs it); the real H&E slides and a synthetic one must stay unflagged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.slide_model.quality import DARK_FIELD_REASON, QualityConfig, QualityInputs, assess_quality

REPO = Path(__file__).resolve().parent.parent
OUT_OF_SCOPE = {"non_he_stain", "dark_field"}


def _inputs(**stain) -> QualityInputs:
    n = 100
    epi = np.zeros(n)
    epi[:10] = 0.9
    st = {"he_like_fraction": 0.93, "dab_like_fraction": 0.01, "dark_pixel_fraction": 0.006} | stain
    return QualityInputs(
        n_tiles=n,
        tissue_area_mm2=5.0,
        epidermis_probs=epi,
        tile_blur=np.full(n, 900.0),
        stain_stats=st,
        mpp_effective=0.5,
    )


def test_dab_rule_on_measurements():
    assert assess_quality(_inputs(dab_like_fraction=0.016)).status == "ok"  # CMU H&E
    r = assess_quality(_inputs(he_like_fraction=0.78, dab_like_fraction=0.18))  # haematoxylin-counterstained IHC
    assert r.status == "non_diagnostic" and r.flags == ["non_he_stain"]
    assert "looks like immunohistochemistry (DAB brown in 18% of stained tissue" in r.reasons[0]
    assert "this model reads H&E only" in r.reasons[0] and "\n" not in r.reasons[0]
    r = assess_quality(_inputs(he_like_fraction=0.2, dab_like_fraction=0.75))  # DAB-dominated: one reason
    assert r.flags == ["non_he_stain"] and "immunohistochemistry" in r.reasons[0]
    r = assess_quality(_inputs(he_like_fraction=0.0, dab_like_fraction=0.3, dark_pixel_fraction=0.8))
    assert r.flags == ["dark_field"]  # one stain reason, the dark one first
    assert assess_quality(_inputs(dab_like_fraction=0.3), QualityConfig(max_dab_like_fraction=0.5)).status == "ok"


# ---------------------------------------------------------------------------- real analysis
@pytest.fixture(scope="module")
def analyser():
    from pipeline.evaluation.evaluate import load_analyser

    return load_analyser(REPO / "models" / "demo_bundle")[1]


@pytest.fixture(scope="module")
def cmu_rgb(shared_slides) -> tuple[np.ndarray, float]:
    from pipeline.reading.slide import open_slide

    with open_slide(shared_slides / "CMU-1-Small-Region.svs") as s:
        w, h = s.dimensions
        return s.read_region((0, 0), (w, h), s.plan(s.mpp)), float(s.mpp)


def _write(path: Path, img: np.ndarray, mpp: float) -> Path:
    from pipeline.synthetic.tiff_writer import write_pyramid

    h, w = img.shape[:2]
    write_pyramid(path, lambda x0, y0, bw, bh: img[y0 : y0 + bh, x0 : x0 + bw], w, h, mpp, 90, "stain-scope test")
    return path


def ihc_like(rgb: np.ndarray, dab_share: float) -> np.ndarray:
    """H&E recoloured as IHC: haematoxylin kept as the counterstain, eosin dropped, DAB brown on
    the ``dab_share`` most eosinophilic part of the tissue (inverse colour deconvolution)."""
    from pipeline.training.augment import hed_to_rgb, rgb_to_hed

    hed = rgb_to_hed(rgb)
    e = hed[..., 1]
    thr = np.quantile(e[e > 0.05], 1.0 - dab_share)
    out = np.zeros_like(hed)
    out[..., 0] = np.clip(hed[..., 0], 0, None) * 0.8
    out[..., 2] = np.where(e > thr, 2.0 * e, 0.0)
    return hed_to_rgb(out)


def fluorescence_like(rgb: np.ndarray) -> np.ndarray:
    """Black background, nuclei bright blue (DAPI-like), the rest faint green (autofluorescence)."""
    from pipeline.training.augment import rgb_to_hed

    hed = np.clip(rgb_to_hed(rgb), 0, None)
    out = np.zeros_like(rgb)
    out[..., 2] = np.clip(hed[..., 0] * 500, 0, 255).astype(np.uint8)
    out[..., 1] = np.clip(hed[..., 1] * 300, 0, 255).astype(np.uint8)
    return out


@pytest.mark.shared
@pytest.mark.parametrize("dab_share", [0.5, 0.15])
def test_ihc_like_slide_is_non_diagnostic(analyser, cmu_rgb, tmp_path, dab_share):
    rgb, mpp = cmu_rgb
    a = analyser.analyse(_write(tmp_path / "ihc.tiff", ihc_like(rgb, dab_share), mpp))
    q = a.quality
    assert q.status == "non_diagnostic" and a.prediction is None
    assert [f for f in q.flags if f in OUT_OF_SCOPE] == ["non_he_stain"]
    reason = q.reasons[q.flags.index("non_he_stain")]
    assert "looks like immunohistochemistry (DAB brown in" in reason and "reads H&E only" in reason, reason
    assert q.metrics["dab_like_fraction"] > QualityConfig().max_dab_like_fraction
    assert q.metrics["he_like_fraction"] > QualityConfig().min_he_like_fraction  # the old rule alone missed it


@pytest.mark.shared
def test_fluorescence_like_slide_is_non_diagnostic(analyser, cmu_rgb, tmp_path):
    rgb, mpp = cmu_rgb
    a = analyser.analyse(_write(tmp_path / "fluo.tiff", fluorescence_like(rgb), mpp))
    q = a.quality
    assert q.status == "non_diagnostic" and q.flags[0] == "dark_field" and "non_he_stain" not in q.flags
    assert q.reasons[0].startswith(DARK_FIELD_REASON) and "fluorescence" in q.reasons[0]


@pytest.mark.shared
@pytest.mark.parametrize(
    "rel, mpp",
    [
        ("CMU-1-Small-Region.svs", None),
        ("real_skin/morphea_section3.tif", 0.25),
        ("synthetic:SYN2002-0001.tiff", None),
    ],
)
def test_real_and_synthetic_he_stay_in_scope(analyser, shared_slides, rel, mpp):
    if rel.startswith("synthetic:"):
        path = REPO / "data" / "synthetic" / "demo_slides" / "slides" / rel.split(":", 1)[1]
        if not path.is_file():
            pytest.skip(f"{path} absent (make the demo data)")
    else:
        path = shared_slides / rel
    q = analyser.analyse(path, mpp=mpp).quality
    assert not OUT_OF_SCOPE & set(q.flags), q.reasons
    assert q.status == "ok", q.reasons
    assert q.metrics["dab_like_fraction"] < QualityConfig().max_dab_like_fraction / 2  # margin
