"""Calibrators, bands and calibration metrics, checked against a known data-generating model."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from scipy.special import expit

from pipeline.core.errors import PipelineError
from pipeline.evaluation.reliability import brier_score, expected_calibration_error, reliability_curve
from pipeline.outputs.reliability_diagram import write_reliability_diagram
from pipeline.slide_model.calibration import (
    PROB_EPS,
    Bands,
    Calibrator,
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    bands_for_target_sensitivity,
    calibrator_from_json,
    make_calibrator,
)


def draw(n: int, seed: int, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Slides from a known model: P(y=1) = sigmoid(z_true); the scorer reports scale * z_true.

    scale > 1: over-confident logits; scale < 1: under-confident.
    """
    rng = np.random.default_rng(seed)
    z_true = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < expit(z_true)).astype(int)
    return scale * z_true, y


@pytest.fixture(scope="module")
def overconfident():
    z_fit, y_fit = draw(2000, seed=1)
    z_test, y_test = draw(5000, seed=2)  # held-out draws from the same model
    return z_fit, y_fit, z_test, y_test


# ---------------------------------------------------------------------------- calibrators
@pytest.mark.parametrize("kind", ["temperature", "platt", "isotonic"])
def test_calibration_lowers_ece_on_held_out_draws(kind, overconfident):
    z_fit, y_fit, z_test, y_test = overconfident
    before = expected_calibration_error(expit(z_test), y_test)
    cal = make_calibrator(kind).fit(z_fit, y_fit)
    p = cal.transform(z_test)
    after = expected_calibration_error(p, y_test)
    assert before > 0.10, before  # the scorer really is over-confident
    assert after < 0.035, (kind, after)
    assert after < before / 4
    assert brier_score(p, y_test) < brier_score(expit(z_test), y_test)
    # the true probabilities are the reference: a calibrated output is close to them
    p_true = expit(z_test / 3.0)
    assert np.mean(np.abs(p - p_true)) < 0.04


def test_temperature_and_platt_recover_the_known_scale(overconfident):
    z_fit, y_fit, _, _ = overconfident
    t = TemperatureScaling().fit(z_fit, y_fit)
    assert 2.6 < t.temperature < 3.4
    pl = PlattScaling().fit(z_fit, y_fit)
    assert 0.28 < pl.a < 0.38 and abs(pl.b) < 0.15


def test_temperature_sharpens_under_confident_scores():
    z_fit, y_fit = draw(2000, seed=3, scale=0.5)
    z_test, y_test = draw(5000, seed=4, scale=0.5)
    t = TemperatureScaling().fit(z_fit, y_fit)
    assert 0.4 < t.temperature < 0.6
    assert (
        expected_calibration_error(t.transform(z_test), y_test) < expected_calibration_error(expit(z_test), y_test) / 2
    )


def test_outputs_are_clipped_and_monotone(overconfident):
    z_fit, y_fit, _, _ = overconfident
    z = np.linspace(-500, 500, 2001)
    for kind in ("temperature", "platt", "isotonic", "none"):
        p = make_calibrator(kind).fit(z_fit, y_fit).transform(z)
        assert p.min() >= PROB_EPS and p.max() <= 1 - PROB_EPS, kind
        if kind != "isotonic":  # parametric maps saturate at +-500 and are clipped, never 0 or 1
            assert p[0] == PROB_EPS and p[-1] == 1 - PROB_EPS, kind
        assert np.all(np.diff(p) >= 0), kind


def test_platt_stays_finite_on_perfectly_separated_slides():
    z = np.r_[np.linspace(-6, -1, 12), np.linspace(1, 6, 10)]
    y = np.r_[np.zeros(12), np.ones(10)]
    pl = PlattScaling().fit(z, y)
    p = pl.transform(z)
    assert math.isfinite(pl.a) and 0 < pl.a < 2
    # Platt's targets are 11/12 for positives and 1/14 for negatives: 22 slides cannot justify more
    assert 0.8 < p[y == 1].mean() < 0.95 and 0.05 < p[y == 0].mean() < 0.2
    assert p.min() > 0.01 and p.max() < 0.99
    assert p[y == 1].min() > p[y == 0].max()
    # plain maximum likelihood on 0/1 labels runs off to near-certainty on the same slides
    plain = PlattScaling(smooth_targets=False).fit(z, y)
    assert plain.a > 10 * pl.a and plain.transform(z)[y == 1].mean() > 0.99


def test_isotonic_matches_sklearn(overconfident):
    from sklearn.isotonic import IsotonicRegression

    z_fit, y_fit, z_test, _ = overconfident
    ours = IsotonicCalibration().fit(z_fit, y_fit).transform(z_test)
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(z_fit, y_fit).predict(z_test)
    np.testing.assert_allclose(ours, np.clip(ref, PROB_EPS, 1 - PROB_EPS), atol=1e-12)


@pytest.mark.parametrize("kind", ["temperature", "platt", "isotonic", "none"])
def test_json_round_trip_gives_identical_outputs(kind, overconfident):
    z_fit, y_fit, z_test, _ = overconfident
    cal = make_calibrator(kind).fit(z_fit, y_fit)
    data = cal.to_json()  # a JSON-ready dict for the bundle; no pickle
    assert data["kind"] == kind and data["n_fit"] == 2000
    text = json.dumps(data, allow_nan=False)
    assert json.loads(cal.to_json_text()) == data
    expected = cal.transform(z_test)
    back = calibrator_from_json(text)  # through JSON text, as read back from bundle.json
    assert type(back) is type(cal)
    assert np.array_equal(back.transform(z_test), expected)
    assert np.array_equal(calibrator_from_json(json.loads(text)).transform(z_test), expected)
    # the class-specific loader works too (also called on an instance), and refuses another kind
    assert np.array_equal(type(cal).from_json(text).transform(z_test), expected)
    assert np.array_equal(make_calibrator(kind).from_json(data).transform(z_test), expected)
    other = TemperatureScaling if kind != "temperature" else PlattScaling
    with pytest.raises(ValueError, match="kind"):
        other.from_json(text)
    assert np.array_equal(Calibrator.from_dict(cal.to_dict()).transform(z_test), expected)


def test_json_refuses_bad_documents():
    with pytest.raises(ValueError, match="invalid JSON"):
        calibrator_from_json("{not json")
    with pytest.raises(ValueError, match="unknown kind"):
        calibrator_from_json('{"kind": "beta", "params": {}}')
    with pytest.raises(ValueError, match="temperature"):
        calibrator_from_json('{"kind": "temperature", "params": {"temperature": -1}}')
    with pytest.raises(ValueError, match="non-decreasing"):
        calibrator_from_json('{"kind": "isotonic", "params": {"x_thresholds": [0, 1], "y_thresholds": [0.9, 0.1]}}')
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaling().to_json()
    with pytest.raises(RuntimeError, match="not fitted"):
        PlattScaling().transform([0.0])


def test_nan_inf_and_single_class_are_refused():
    z = np.array([0.1, -2.0, 3.0, 0.5])
    y = np.array([0, 0, 1, 1])
    for kind in ("temperature", "platt", "isotonic", "none"):
        with pytest.raises(ValueError, match="NaN"):
            make_calibrator(kind).fit(np.array([0.1, np.nan, 3.0, 0.5]), y)
        with pytest.raises(ValueError, match="inf"):
            make_calibrator(kind).fit(np.array([0.1, np.inf, 3.0, 0.5]), y)
        with pytest.raises(ValueError, match="both classes"):
            make_calibrator(kind).fit(z, np.ones(4))
        cal = make_calibrator(kind).fit(z, y)
        with pytest.raises(ValueError, match=r"1 inf value\(s\) \(first at index 2\)"):
            cal.transform(np.array([0.0, 1.0, -np.inf]))
    with pytest.raises(ValueError, match="0 or 1"):
        make_calibrator("platt").fit(z, np.array([0, 2, 1, 1]))
    with pytest.raises(ValueError, match="length"):
        make_calibrator("platt").fit(z, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="1-D"):
        make_calibrator("platt").fit(z.reshape(2, 2), y)
    # also a one-line PipelineError for the command-line layers
    with pytest.raises(PipelineError):
        make_calibrator("isotonic").fit(z, np.zeros(4))
    with pytest.raises(ValueError, match="unknown calibration"):
        make_calibrator("beta")


def test_identity_is_sigmoid():
    z = np.array([-2.0, 0.0, 2.0])
    cal = make_calibrator("none").fit(z, [0, 1, 1])
    np.testing.assert_allclose(cal.transform(z), expit(z))


# ---------------------------------------------------------------------------- bands
def test_band_edges():
    b = Bands()
    assert (b.low, b.high) == (0.20, 0.60)
    assert b.band(0.0) == "LOW"
    assert b.band(np.nextafter(0.20, 0)) == "LOW"
    assert b.band(0.20) == "INDETERMINATE"  # p == low is INDETERMINATE
    assert b.band(np.nextafter(0.60, 0)) == "INDETERMINATE"
    assert b.band(0.60) == "HIGH"  # p == high is HIGH
    assert b.band(1.0) == "HIGH"
    assert b.band_many([0.1, 0.2, 0.6]) == ["LOW", "INDETERMINATE", "HIGH"]
    for bad in (float("nan"), -0.1, 1.1):
        with pytest.raises(ValueError):
            b.band(bad)


@pytest.mark.parametrize("low,high", [(0.6, 0.2), (0.3, 0.3), (0.0, 0.5), (0.2, 1.0), (-0.1, 0.5)])
def test_invalid_bands_are_refused(low, high):
    with pytest.raises(ValidationError):
        Bands(low=low, high=high)


def test_bands_are_strict_models():
    with pytest.raises(ValidationError, match="extra"):
        Bands(low=0.2, high=0.6, middle=0.4)
    b = Bands()
    with pytest.raises(ValidationError):
        b.low = 0.7  # validated on assignment too: low must stay below high


def test_bands_for_target_sensitivity_achieves_targets(overconfident):
    z_fit, y_fit, z_test, y_test = overconfident
    p = PlattScaling().fit(z_fit, y_fit).transform(z_test)
    for sens_target, spec_target in ((0.95, 0.95), (0.90, 0.98), (0.99, 0.90)):
        b = bands_for_target_sensitivity(p, y_test, sens_target, spec_target)
        assert 0 < b.low < b.high < 1
        sens = np.mean(p[y_test == 1] >= b.low)
        spec = np.mean(p[y_test == 0] < b.high)
        assert sens >= sens_target and sens < sens_target + 0.01  # achieved, not overshot much
        assert spec >= spec_target and spec < spec_target + 0.01
        # the achieved sensitivity is what band() reports
        names = np.array(b.band_many(p[y_test == 1]))
        assert np.mean(names != "LOW") == sens


def test_bands_for_target_sensitivity_hand_example_and_ties():
    # 4 positives, one pair tied at 0.4; 5 negatives
    pos = [0.9, 0.7, 0.4, 0.4]
    neg = [0.1, 0.2, 0.3, 0.5, 0.8]
    p = np.array(pos + neg)
    y = np.array([1] * 4 + [0] * 5)
    b = bands_for_target_sensitivity(p, y, target_sensitivity=0.75, high_specificity=0.8)
    # sensitivity: k = ceil(0.75*4) = 3 -> 3rd largest positive 0.4 (tied with the 4th: both kept
    # >= low); next lower distinct score 0.3 -> low = 0.35; achieved sensitivity 4/4.
    assert b.low == pytest.approx(0.35)
    # specificity: j = ceil(0.8*5) = 4 -> 4th smallest negative 0.5; next higher score 0.7 -> high = 0.6
    assert b.high == pytest.approx(0.6)
    assert np.mean(p[y == 1] >= b.low) == 1.0
    assert np.mean(p[y == 0] < b.high) == 0.8


def test_bands_for_separated_classes_keep_low_below_high():
    p = np.array([0.05, 0.1, 0.15, 0.2, 0.7, 0.8, 0.9, 0.95])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    b = bands_for_target_sensitivity(p, y, 1.0, 1.0)
    # sensitivity rule alone gives low = 0.45, specificity rule alone high = 0.45: swapped/widened
    assert b.low < b.high
    assert np.all(p[y == 1] >= b.low) and np.all(p[y == 0] < b.high)
    with pytest.raises(ValueError, match="both classes"):
        bands_for_target_sensitivity(p, np.ones(8))
    with pytest.raises(ValueError, match="target_sensitivity"):
        bands_for_target_sensitivity(p, y, target_sensitivity=1.5)
    assert isinstance(Bands.for_target_sensitivity(p, y), Bands)


# ---------------------------------------------------------------------------- metrics
def test_ece_and_brier_hand_examples():
    # 10 slides at p = 0.7, 7 positive: perfectly calibrated
    assert expected_calibration_error(np.full(10, 0.7), [1] * 7 + [0] * 3) == pytest.approx(0.0)
    # 10 slides at p = 0.9, 5 positive: gap 0.4
    assert expected_calibration_error(np.full(10, 0.9), [1] * 5 + [0] * 5) == pytest.approx(0.4)
    # two bins: 4 slides at 0.1 (1 positive: gap 0.15), 6 at 0.8 (3 positive: gap 0.3)
    p = np.r_[np.full(4, 0.1), np.full(6, 0.8)]
    y = np.r_[[1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert expected_calibration_error(p, y) == pytest.approx(0.4 * 0.15 + 0.6 * 0.3)
    assert brier_score([0.0, 1.0, 0.5], [0, 1, 1]) == pytest.approx(0.25 / 3)
    assert brier_score(np.full(4, 0.5), [0, 1, 0, 1]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error([0.2, np.nan], [0, 1])


def test_reliability_curve_bins(overconfident):
    _, _, z_test, y_test = overconfident
    p = expit(z_test)
    for strategy in ("uniform", "quantile"):
        c = reliability_curve(p, y_test, n_bins=10, strategy=strategy)
        assert c.count.sum() == p.size
        assert np.all(c.mean_predicted >= c.bin_lower) and np.all(c.mean_predicted <= c.bin_upper)
        assert np.all((c.observed_frequency >= 0) & (c.observed_frequency <= 1))
        json.dumps(c.to_dict(), allow_nan=False)
    q = reliability_curve(p, y_test, n_bins=10, strategy="quantile")
    assert q.count.min() >= 0.9 * p.size / 10 and q.count.max() <= 1.1 * p.size / 10
    # edge value 1.0 falls in the last bin, 0.0 in the first; empty bins are left out
    c = reliability_curve([0.0, 1.0], [0, 1], n_bins=10)
    assert c.count.tolist() == [1, 1] and c.bin_upper[-1] == 1.0 and c.bin_lower[0] == 0.0
    with pytest.raises(ValueError, match="strategy"):
        reliability_curve(p, y_test, strategy="log")


def test_reliability_diagram_png(tmp_path, overconfident):
    _, _, z_test, y_test = overconfident
    out = write_reliability_diagram(
        tmp_path / "sub" / "reliability.png", expit(z_test), y_test, n_bins=10, title="Over-confident scorer"
    )
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["reliability.png"]  # no temporary left behind
    img = cv2.imread(str(out))
    assert img.shape == (900, 900, 3)
    # non-trivial: bars, dots, text drawn (many colours, a good share of non-white pixels)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    assert 0.10 < np.mean(img.min(axis=2) < 250) < 0.7
    # the bar colour covers a region proportional to the observed frequencies
    bar = np.all(np.abs(img.astype(int) - (226, 186, 120)) < 4, axis=2)
    assert bar.mean() > 0.1
    # a calibrated model draws smaller gap segments (red) than an over-confident one
    cal = TemperatureScaling().fit(*draw(2000, seed=1)).transform(z_test)
    out2 = write_reliability_diagram(tmp_path / "cal.png", cal, y_test)
    red = lambda im: np.mean(np.all(np.abs(im.astype(int) - (90, 90, 220)) < 30, axis=2))  # noqa: E731
    assert red(cv2.imread(str(out2))) < red(img) / 3
