"""Calibration of the slide-level NME-pattern score, decision bands, and calibration metrics.

Clinicians act on the slide probability, so it must be *calibrated*: among slides reported at
0.8, about 8 in 10 should show the pattern. The aggregator outputs a raw slide **logit**
(float, any real value); a calibrator fitted on out-of-fold/validation slides maps it to a
probability, and :class:`Bands` turns that probability into LOW / INDETERMINATE / HIGH.

Calibrators (sklearn-style ``fit(scores, y)`` / ``transform(scores)``; ``to_json()`` gives a
JSON-ready dict for the model bundle and ``from_json()`` takes it back (or its text); never pickle):

* :class:`TemperatureScaling`: ``p = sigmoid(z / T)``, one parameter, fitted by minimising the
  negative log-likelihood (a bounded 1-D search; the loss is convex in ``1/T``).
* :class:`PlattScaling`: ``p = sigmoid(a * z + b)``, fitted by maximum likelihood on Platt's
  smoothed targets (as scikit-learn's ``CalibratedClassifierCV(method="sigmoid")``), which keeps
  ``a`` finite when the validation slides are perfectly separated.
* :class:`IsotonicCalibration`: monotone step function (scikit-learn ``IsotonicRegression``);
  the thresholds are stored and linearly interpolated on transform.
* :class:`IdentityCalibration` (``"none"``): ``sigmoid(z)``.

Every calibrator clips its output to ``[PROB_EPS, 1 - PROB_EPS]`` (1e-4): no finite validation
set justifies reporting a probability of exactly 0 or 1.

Metrics: :func:`expected_calibration_error`, :func:`brier_score`, :func:`reliability_curve`
and :func:`write_reliability_diagram` (a PNG drawn with OpenCV; matplotlib is not a dependency).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit

from pipeline.core.config import StrictModel
from pipeline.core.validation import (
    InvalidInputError,
    as_binary_labels,
    as_finite_1d,
    as_probabilities,
    require_both_classes,
)

log = logging.getLogger(__name__)

#: Calibrated probabilities are clipped to [PROB_EPS, 1 - PROB_EPS].
PROB_EPS = 1e-4
#: Version of the JSON layout written by :meth:`Calibrator.to_dict`.
CALIBRATOR_FORMAT_VERSION = 1

CalibratorKind = Literal["temperature", "platt", "isotonic", "none"]
BandName = Literal["LOW", "INDETERMINATE", "HIGH"]


def _clip(p: np.ndarray) -> np.ndarray:
    return np.clip(p, PROB_EPS, 1.0 - PROB_EPS)


def _nll_logistic(z: np.ndarray, t: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(z)`` against (possibly soft) targets ``t``."""
    # -[t log s(z) + (1-t) log(1-s(z))] = logaddexp(0, z) - t*z, numerically stable
    return float(np.mean(np.logaddexp(0.0, z) - t * z))


# --------------------------------------------------------------------------------------------
# calibrators
# --------------------------------------------------------------------------------------------
class Calibrator:
    """Base class: maps raw slide logits (float (N,)) to calibrated probabilities (float (N,)).

    Subclasses implement ``_fit``, ``_transform`` and ``_params`` / ``_set_params``.
    """

    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Calibrator]]] = {}

    def __init__(self) -> None:
        self.fitted = False
        self.n_fit: int | None = None
        self.n_pos_fit: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Calibrator._registry[cls.kind] = cls

    # -- sklearn-style API -------------------------------------------------------------
    def fit(self, scores: Any, y: Any) -> Calibrator:
        """Fit on raw logits ``scores`` (N,) and binary labels ``y`` (N,); returns self.

        Raises:
            InvalidInputError: NaN/inf scores, labels other than 0/1, or a single class.
        """
        z = as_finite_1d(scores, "scores")
        t = as_binary_labels(y, z.size)
        require_both_classes(t, f"{type(self).__name__}.fit")
        self._fit(z, t)
        self.fitted = True
        self.n_fit = int(z.size)
        self.n_pos_fit = int(t.sum())
        log.debug("fitted %s on %d slides (%d positive): %s", self.kind, z.size, self.n_pos_fit, self._params())
        return self

    def transform(self, scores: Any) -> np.ndarray:
        """Calibrated probabilities (float64 (N,), in [1e-4, 1 - 1e-4]) for raw logits ``scores``."""
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() or from_json() first")
        z = as_finite_1d(scores, "scores", allow_empty=True)
        return _clip(self._transform(z))

    def fit_transform(self, scores: Any, y: Any) -> np.ndarray:
        return self.fit(scores, y).transform(scores)

    __call__ = transform

    # -- serialisation -----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """JSON-ready parameters (a dict of plain lists/floats, no NaN), for the model bundle's JSON.

        ``{"kind", "format_version", "params", "n_fit", "n_pos_fit"}``. ``json.dumps`` writes
        floats with full precision, so a JSON text round trip reproduces the outputs exactly.
        Use :meth:`to_json_text` for a string.
        """
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; nothing to serialise")
        data = {
            "kind": self.kind,
            "format_version": CALIBRATOR_FORMAT_VERSION,
            "params": self._params(),
            "n_fit": self.n_fit,
            "n_pos_fit": self.n_pos_fit,
        }
        json.dumps(data, allow_nan=False)  # guard: never NaN/inf in a bundle
        return data

    to_dict = to_json

    def to_json_text(self) -> str:
        """:meth:`to_json` as JSON text."""
        return json.dumps(self.to_json(), allow_nan=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """Rebuild a fitted calibrator from :meth:`to_json` output (any kind when called on the base)."""
        if not isinstance(data, dict) or "kind" not in data or "params" not in data:
            raise InvalidInputError("calibrator JSON: expected an object with 'kind' and 'params'")
        kind = data["kind"]
        target = Calibrator._registry.get(kind)
        if target is None:
            raise InvalidInputError(
                f"calibrator JSON: unknown kind {kind!r}; expected one of {sorted(Calibrator._registry)}"
            )
        if cls is not Calibrator and target is not cls:
            raise InvalidInputError(f"calibrator JSON holds kind {kind!r}, not {cls.kind!r}")
        version = data.get("format_version", CALIBRATOR_FORMAT_VERSION)
        if version != CALIBRATOR_FORMAT_VERSION:
            raise InvalidInputError(
                f"calibrator JSON: format_version {version!r} is not supported (expected {CALIBRATOR_FORMAT_VERSION})"
            )
        obj = target()
        obj._set_params(data["params"])
        obj.fitted = True
        obj.n_fit = data.get("n_fit")
        obj.n_pos_fit = data.get("n_pos_fit")
        return obj

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | bytes) -> Calibrator:
        """Rebuild a fitted calibrator from :meth:`to_json` output (the dict, or its JSON text)."""
        if isinstance(data, (str, bytes, bytearray)):
            try:
                parsed = json.loads(data)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"calibrator JSON: invalid JSON ({exc.msg} at position {exc.pos})") from None
            return cls.from_dict(parsed)
        return cls.from_dict(data)

    def __repr__(self) -> str:
        state = self._params() if self.fitted else "unfitted"
        return f"{type(self).__name__}({state})"

    # -- to implement ------------------------------------------------------------------
    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform(self, z: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_params(self, params: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _finite_param(params: dict[str, Any], key: str) -> float:
    try:
        v = float(params[key])
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError(f"calibrator JSON: parameter {key!r} missing or not a number") from None
    if not math.isfinite(v):
        raise InvalidInputError(f"calibrator JSON: parameter {key!r} is not finite ({v})")
    return v


class IdentityCalibration(Calibrator):
    """``p = sigmoid(z)``: no calibration (kind ``"none"``); ``fit`` only validates the data."""

    kind = "none"

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        pass

    def _transform(self, z: np.ndarray) -> np.ndarray:
        return expit(z)

    def _params(self) -> dict[str, Any]:
        return {}

    def _set_params(self, params: dict[str, Any]) -> None:
        pass


class TemperatureScaling(Calibrator):
    """``p = sigmoid(z / T)`` with one temperature ``T > 0`` (Guo et al. 2017, binary form).

    ``T`` minimises the mean negative log-likelihood. The loss is convex in ``beta = 1/T``, so a
    bounded Brent search on ``beta`` in ``[1/max_temperature, 1/min_temperature]`` finds the
    global optimum. ``T > 1`` softens over-confident logits, ``T < 1`` sharpens. Scores that rank
    the classes the wrong way round cannot be fixed by a temperature: the search then stops at
    ``max_temperature`` (every probability near 0.5) and a warning is logged.
    """

    kind = "temperature"

    def __init__(self, min_temperature: float = 0.01, max_temperature: float = 100.0) -> None:
        super().__init__()
        if not 0 < min_temperature < max_temperature:
            raise ValueError("need 0 < min_temperature < max_temperature")
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.temperature: float = 1.0

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        t = y.astype(np.float64)
        res = minimize_scalar(
            lambda beta: _nll_logistic(beta * z, t),
            bounds=(1.0 / self.max_temperature, 1.0 / self.min_temperature),
            method="bounded",
            options={"xatol": 1e-7},
        )
        beta = float(res.x)
        self.temperature = 1.0 / beta
        if self.temperature >= self.max_temperature * 0.999:
            log.warning(
                "temperature scaling hit its upper bound T=%.3g: the scores barely rank the classes", self.temperature
            )
        elif self.temperature <= self.min_temperature * 1.001:
            log.warning(
                "temperature scaling hit its lower bound T=%.3g: classes perfectly separated?", self.temperature
            )

    def _transform(self, z: np.ndarray) -> np.ndarray:
        return expit(z / self.temperature)

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def _set_params(self, params: dict[str, Any]) -> None:
        t = _finite_param(params, "temperature")
        if t <= 0:
            raise InvalidInputError(f"calibrator JSON: temperature must be positive, got {t}")
        self.temperature = t


class PlattScaling(Calibrator):
    """``p = sigmoid(a * z + b)`` (Platt 1999) on the raw logit ``z``.

    Fitted by maximum likelihood (L-BFGS with the analytic gradient) against Platt's smoothed
    targets ``(N+ + 1) / (N+ + 2)`` for positives and ``1 / (N- + 2)`` for negatives, as
    scikit-learn's sigmoid calibration does; this keeps ``a`` finite on perfectly separated
    validation data. ``smooth_targets=False`` fits the plain 0/1 labels.
    """

    kind = "platt"

    def __init__(self, smooth_targets: bool = True) -> None:
        super().__init__()
        self.smooth_targets = smooth_targets
        self.a: float = 1.0
        self.b: float = 0.0

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        n_pos = float(y.sum())
        n_neg = float(y.size - n_pos)
        if self.smooth_targets:
            t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
        else:
            t = y.astype(np.float64)
        # standardise z for conditioning, then map the solution back
        mu, sd = float(z.mean()), float(z.std()) or 1.0
        zs = (z - mu) / sd

        def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
            lin = w[0] * zs + w[1]
            r = expit(lin) - t
            return _nll_logistic(lin, t), np.array([np.mean(r * zs), np.mean(r)])

        prior = math.log((n_pos + 1.0) / (n_neg + 1.0))
        res = minimize(
            loss_grad,
            x0=np.array([1.0, prior]),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14},
        )
        a_s, b_s = (float(v) for v in res.x)
        self.a = a_s / sd
        self.b = b_s - a_s * mu / sd
        if self.a <= 0:
            log.warning("Platt scaling fitted a non-positive slope a=%.3g: the scores do not rank the classes", self.a)

    def _transform(self, z: np.ndarray) -> np.ndarray:
        return expit(self.a * z + self.b)

    def _params(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "smooth_targets": self.smooth_targets}

    def _set_params(self, params: dict[str, Any]) -> None:
        self.a = _finite_param(params, "a")
        self.b = _finite_param(params, "b")
        self.smooth_targets = bool(params.get("smooth_targets", True))


class IsotonicCalibration(Calibrator):
    """Monotone non-decreasing map fitted with scikit-learn's ``IsotonicRegression``.

    Only the thresholds (``X_thresholds_``, ``y_thresholds_``) are kept; ``transform`` linearly
    interpolates between them (as scikit-learn does) and holds the end values outside the fitted
    range. Needs more data than the parametric calibrators (a few hundred slides) and yields
    plateaus (many slides share a probability).
    """

    kind = "isotonic"

    def __init__(self) -> None:
        super().__init__()
        self.x_thresholds: np.ndarray = np.zeros(0)
        self.y_thresholds: np.ndarray = np.zeros(0)

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(z, y.astype(np.float64))
        self.x_thresholds = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds = np.asarray(iso.y_thresholds_, dtype=np.float64)

    def _transform(self, z: np.ndarray) -> np.ndarray:
        if self.x_thresholds.size == 1:
            return np.full(z.shape, self.y_thresholds[0])
        return np.interp(z, self.x_thresholds, self.y_thresholds)

    def _params(self) -> dict[str, Any]:
        return {"x_thresholds": self.x_thresholds.tolist(), "y_thresholds": self.y_thresholds.tolist()}

    def _set_params(self, params: dict[str, Any]) -> None:
        try:
            x = np.asarray(params["x_thresholds"], dtype=np.float64)
            y = np.asarray(params["y_thresholds"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError(
                "calibrator JSON: isotonic needs numeric 'x_thresholds' and 'y_thresholds'"
            ) from None
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise InvalidInputError(
                "calibrator JSON: isotonic thresholds must be two 1-D lists of the same non-zero length"
            )
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise InvalidInputError("calibrator JSON: isotonic thresholds must be finite")
        if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
            raise InvalidInputError("calibrator JSON: isotonic thresholds must be non-decreasing")
        self.x_thresholds, self.y_thresholds = x, y


def make_calibrator(kind: CalibratorKind | str) -> Calibrator:
    """A new, unfitted calibrator: ``"temperature"``, ``"platt"``, ``"isotonic"`` or ``"none"``."""
    cls = Calibrator._registry.get(kind)
    if cls is None:
        raise InvalidInputError(f"unknown calibration {kind!r}; expected one of temperature, platt, isotonic, none")
    return cls()


def calibrator_from_json(data: dict[str, Any] | str | bytes) -> Calibrator:
    """Any fitted calibrator from its :meth:`Calibrator.to_json` dict or JSON text."""
    return Calibrator.from_json(data)


# --------------------------------------------------------------------------------------------
# bands
# --------------------------------------------------------------------------------------------
class Bands(StrictModel):
    """Decision bands on the calibrated slide probability.

    * ``LOW``: ``p < low``
    * ``INDETERMINATE``: ``low <= p < high``
    * ``HIGH``: ``p >= high``
    """

    low: float = Field(0.20, gt=0, lt=1, description="LOW below this calibrated probability.")
    high: float = Field(0.60, gt=0, lt=1, description="HIGH at or above this calibrated probability.")

    @model_validator(mode="after")
    def _ordered(self) -> Bands:
        if not self.low < self.high:
            raise ValueError(f"bands need 0 < low < high < 1, got low={self.low} high={self.high}")
        return self

    def band(self, p: float) -> BandName:
        """Band of one calibrated probability ``p`` in [0, 1]."""
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise InvalidInputError(f"band: probability must be a number, got {p!r}") from None
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise InvalidInputError(f"band: probability must be a finite number in [0, 1], got {v}")
        if v < self.low:
            return "LOW"
        if v < self.high:
            return "INDETERMINATE"
        return "HIGH"

    def band_many(self, probs: Any) -> list[BandName]:
        """Band of each probability in ``probs`` (N,)."""
        p = as_probabilities(probs)
        out = np.where(p < self.low, "LOW", np.where(p < self.high, "INDETERMINATE", "HIGH"))
        return out.tolist()

    @classmethod
    def for_target_sensitivity(
        cls, probs: Any, y: Any, target_sensitivity: float = 0.95, high_specificity: float = 0.95
    ) -> Bands:
        """See :func:`bands_for_target_sensitivity`."""
        return bands_for_target_sensitivity(probs, y, target_sensitivity, high_specificity)


def bands_for_target_sensitivity(
    probs: Any, y: Any, target_sensitivity: float = 0.95, high_specificity: float = 0.95
) -> Bands:
    """Bands set on validation / out-of-fold calibrated probabilities.

    * ``low``: at least ``target_sensitivity`` of the positives have ``p >= low`` (they are not
      LOW). With ``k = ceil(target * n_pos)`` and ``v`` the k-th largest positive probability,
      ``low`` is placed halfway between ``v`` and the next lower distinct probability of any
      slide (or at ``v / 2`` if none is lower). Slides tied at ``v`` are never split: all of them
      are at or above ``low``, so the achieved sensitivity can exceed the target.
    * ``high``: the specificity at ``high`` (negatives with ``p < high``, i.e. not HIGH) is at
      least ``high_specificity``. With ``j = ceil(high_specificity * n_neg)`` and ``w`` the j-th
      smallest negative probability, ``high`` is placed halfway between ``w`` and the next higher
      distinct probability (or ``(w + 1) / 2``). Ties at ``w`` all fall below ``high``.
    * If the two rules cross (``low >= high``: the classes are well separated), the values are
      swapped: lowering ``low`` only raises sensitivity and raising ``high`` only raises
      specificity, so both guarantees still hold, and the INDETERMINATE band covers the gap
      between the classes. Exact equality is widened by 1e-6.

    Both guarantees hold *on these data*; on new slides they hold only as well as the
    validation set represents them, so use out-of-fold predictions from enough slides.

    Args:
        probs: calibrated probabilities (N,).
        y: binary labels (N,), both classes present.
        target_sensitivity: in (0, 1].
        high_specificity: in (0, 1].
    """
    p = as_probabilities(probs)
    t = as_binary_labels(y, p.size)
    require_both_classes(t, "bands_for_target_sensitivity")
    for name, v in (("target_sensitivity", target_sensitivity), ("high_specificity", high_specificity)):
        if not 0.0 < float(v) <= 1.0:
            raise InvalidInputError(f"{name} must be in (0, 1], got {v}")
    distinct = np.unique(p)
    pos = np.sort(p[t == 1])[::-1]
    neg = np.sort(p[t == 0])
    k = max(1, math.ceil(target_sensitivity * pos.size - 1e-9))
    v = float(pos[k - 1])
    lower = distinct[distinct < v]
    low = (v + float(lower[-1])) / 2.0 if lower.size else v / 2.0
    j = max(1, math.ceil(high_specificity * neg.size - 1e-9))
    w = float(neg[j - 1])
    higher = distinct[distinct > w]
    high = (w + float(higher[0])) / 2.0 if higher.size else (w + 1.0) / 2.0
    if low > high:
        log.info("band rules crossed (low %.4g >= high %.4g): classes separated; swapping", low, high)
        low, high = high, low
    if low == high:
        low, high = low - 5e-7, high + 5e-7
    low = min(max(low, 1e-6), 1.0 - 2e-6)
    high = min(max(high, low + 1e-6), 1.0 - 1e-6)
    bands = Bands(low=low, high=high)
    sens = float(np.mean(p[t == 1] >= bands.low))
    spec = float(np.mean(p[t == 0] < bands.high))
    log.info(
        "bands from %d slides: low=%.4f (sensitivity %.3f, target %.3f), high=%.4f (specificity %.3f, target %.3f)",
        p.size,
        bands.low,
        sens,
        target_sensitivity,
        bands.high,
        spec,
        high_specificity,
    )
    return bands


__all__ = [
    "PROB_EPS",
    "InvalidInputError",
    "Calibrator",
    "IdentityCalibration",
    "TemperatureScaling",
    "PlattScaling",
    "IsotonicCalibration",
    "make_calibrator",
    "calibrator_from_json",
    "Bands",
    "bands_for_target_sensitivity",
]
