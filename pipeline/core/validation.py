"""Validation of numeric inputs (scores, probabilities, 0/1 labels) shared by calibration and metrics.

Every check raises :class:`InvalidInputError`: a :class:`ValueError` for library callers and a
:class:`~pipeline.core.errors.DataError` (one-line message, no traceback) for the command-line layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.errors import DataError


class InvalidInputError(DataError, ValueError):
    """Scores, probabilities or labels that cannot be used (NaN/inf, wrong shape, one class).

    A :class:`ValueError` for library callers and a :class:`~pipeline.core.errors.PipelineError`
    (one-line message, no traceback) for the command-line layers.
    """


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
def _describe_nonfinite(a: np.ndarray) -> str:
    n_nan = int(np.isnan(a).sum())
    n_inf = int(np.isinf(a).sum())
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_inf:
        parts.append(f"{n_inf} inf")
    first = int(np.flatnonzero(~np.isfinite(a.ravel()))[0])
    return f"{' and '.join(parts)} value(s) (first at index {first})"


def as_finite_1d(values: Any, name: str, allow_empty: bool = False) -> np.ndarray:
    """``values`` as a float64 (N,) array; NaN/inf, other shapes or an empty array raise.

    Raises:
        InvalidInputError: (a ValueError) naming ``name`` and the problem.
    """
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name}: not numeric ({exc})") from None
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise InvalidInputError(f"{name}: expected a 1-D array (N,), got shape {a.shape}")
    if a.size == 0 and not allow_empty:
        raise InvalidInputError(f"{name}: empty array")
    if not np.all(np.isfinite(a)):
        raise InvalidInputError(f"{name}: contains {_describe_nonfinite(a)}; scores must be finite")
    return a


def as_probabilities(values: Any, name: str = "probs") -> np.ndarray:
    """``values`` as float64 (N,) probabilities in [0, 1]; anything else raises InvalidInputError."""
    p = as_finite_1d(values, name)
    if p.min() < 0.0 or p.max() > 1.0:
        raise InvalidInputError(f"{name}: probabilities must lie in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]")
    return p


def as_binary_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    """``y`` as an int8 (N,) array of 0/1 of length ``n`` (bool, int or float 0.0/1.0 accepted)."""
    a = as_finite_1d(y, name)
    if a.shape[0] != n:
        raise InvalidInputError(f"{name}: length {a.shape[0]} does not match the {n} scores")
    bad = ~np.isin(a, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(f"{name}: labels must be 0 or 1, got {a[i]!r} at index {i}")
    return a.astype(np.int8)


def require_both_classes(y: np.ndarray, what: str) -> None:
    """Raise InvalidInputError when ``y`` holds a single class (nothing to calibrate against)."""
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        only = 1 if n_pos else 0
        raise InvalidInputError(
            f"{what} needs both classes, but every one of the {y.size} labels is {only} "
            f"(n_pos={n_pos}, n_neg={n_neg}); no calibration is possible from one class"
        )
