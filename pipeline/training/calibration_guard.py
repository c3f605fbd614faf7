"""Calibration that cannot invert: fit the configured calibrator, and fall back to a safe one when the fit is unusable.

* Platt scaling with a slope ``a <= 0`` would map higher aggregator scores to *lower*
  probabilities (it happens on a small set whose out-of-fold scores do not rank the classes);
* isotonic regression on fewer than :data:`MIN_ISOTONIC_PER_CLASS` slides of either class is a
  staircase of a handful of steps.

Either way the fallback is temperature scaling (``p = sigmoid(z / T)`` with ``T > 0``: monotone
increasing by construction, at worst flat), and the reason is returned so that it is logged,
written to ``slide_metrics.json`` (``calibration_fallback``) and recorded in the bundle's
``calibration`` section (``requested`` and ``fallback_reason``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.slide_model.calibration import Calibrator, PlattScaling, TemperatureScaling, make_calibrator

log = logging.getLogger(__name__)

#: Isotonic calibration needs at least this many slides of each class.
MIN_ISOTONIC_PER_CLASS = 10
#: What an unusable fit falls back to.
FALLBACK_KIND = "temperature"


@dataclass
class CalibrationFit:
    """The calibrator to use (None for method ``none``), what was asked for and why it was replaced."""

    calibrator: Calibrator | None
    requested: str
    fallback_reason: str | None = None

    @property
    def kind(self) -> str:
        return self.calibrator.kind if self.calibrator is not None else "none"


def unusable_reason(kind: str, scores: np.ndarray, y: np.ndarray, fitted: Calibrator | None = None) -> str | None:
    """Why a ``kind`` calibrator fitted on (``scores``, ``y``) must not be used, or None."""
    n_pos = int(np.sum(y))
    n_neg = int(len(y) - n_pos)
    if kind == "isotonic" and min(n_pos, n_neg) < MIN_ISOTONIC_PER_CLASS:
        return (
            f"isotonic calibration on {n_pos} positive and {n_neg} negative slides is too few points (needs "
            f"{MIN_ISOTONIC_PER_CLASS} of each)"
        )
    if isinstance(fitted, PlattScaling) and fitted.a <= 0:
        return (
            f"Platt scaling fitted a non-positive slope a={fitted.a:.3g} on {len(y)} slides ({n_pos} positive): "
            "it would give higher scores lower probabilities (the out-of-fold scores do not rank the classes)"
        )
    return None


def fit_calibration(kind: str, scores: np.ndarray, y: np.ndarray, quiet: bool = False) -> CalibrationFit:
    """Fit ``kind`` on out-of-fold ``scores`` (raw logits) and labels ``y``; fall back to temperature
    scaling, with a warning (``quiet``: info), when the fit would be unsafe."""
    if kind == "none":
        return CalibrationFit(None, kind)
    fitted: Calibrator | None = None
    reason = unusable_reason(kind, scores, y)
    if reason is None:
        fitted = make_calibrator(kind).fit(scores, y)
        reason = unusable_reason(kind, scores, y, fitted)
    if reason is None:
        return CalibrationFit(fitted, kind)
    message = f"{reason}; using {FALLBACK_KIND} scaling instead (monotone, cannot invert)"
    log.log(logging.INFO if quiet else logging.WARNING, "calibration: %s", message)
    return CalibrationFit(TemperatureScaling().fit(scores, y), kind, message)
