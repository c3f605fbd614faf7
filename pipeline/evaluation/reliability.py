"""Calibration metrics: reliability curve, expected calibration error (ECE), Brier score.

Probabilities are floats in [0, 1] of shape (N,), labels 0/1 of shape (N,). Binning (uniform or
quantile bins, ``[e_i, e_{i+1})`` with the last bin closed at 1) is shared with
:mod:`pipeline.evaluation.metrics` through :func:`bin_edges` and :func:`bin_index`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.validation import InvalidInputError, as_binary_labels, as_probabilities


# --------------------------------------------------------------------------------------------
# calibration metrics
# --------------------------------------------------------------------------------------------
def bin_edges(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InvalidInputError(f"n_bins must be a positive integer, got {n_bins!r}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        return np.unique(edges)  # repeated quantiles (ties) merge bins
    raise InvalidInputError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def bin_index(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each probability: [e_i, e_{i+1}) with the last bin closed at 1."""
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, edges.size - 2)


@dataclass
class ReliabilityCurve:
    """Per-bin calibration summary; arrays hold the **non-empty** bins only, in order.

    Attributes:
        bin_lower, bin_upper: bin edges (probability).
        mean_predicted: mean predicted probability of the slides in the bin.
        observed_frequency: fraction of positives in the bin.
        count: slides in the bin.
        edges: every bin edge (n_bins + 1 for "uniform"; fewer when quantiles tie).
    """

    bin_lower: np.ndarray
    bin_upper: np.ndarray
    mean_predicted: np.ndarray
    observed_frequency: np.ndarray
    count: np.ndarray
    edges: np.ndarray
    strategy: str

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def ece(self) -> float:
        """Count-weighted mean |mean_predicted - observed_frequency|."""
        if self.n == 0:
            return 0.0
        return float(np.sum(self.count * np.abs(self.mean_predicted - self.observed_frequency)) / self.n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists of floats/ints)."""
        return {
            "strategy": self.strategy,
            "bins": [
                {
                    "lower": float(lo),
                    "upper": float(hi),
                    "mean_predicted": float(mp),
                    "observed_frequency": float(of),
                    "count": int(c),
                }
                for lo, hi, mp, of, c in zip(
                    self.bin_lower, self.bin_upper, self.mean_predicted, self.observed_frequency, self.count
                )
            ],
            "ece": self.ece(),
        }


def reliability_curve(probs: Any, y: Any, n_bins: int = 10, strategy: str = "uniform") -> ReliabilityCurve:
    """Bin slides by predicted probability; per non-empty bin: mean predicted, observed frequency, count.

    ``strategy="uniform"``: ``n_bins`` equal-width bins on [0, 1]; ``"quantile"``: bins with about
    equal counts (edges at quantiles of ``probs``). Bins are half-open ``[lo, hi)`` except the last.
    """
    p = as_probabilities(probs)
    t = as_binary_labels(y, p.size)
    edges = bin_edges(p, n_bins, strategy)
    idx = bin_index(p, edges)
    nb = edges.size - 1
    count = np.bincount(idx, minlength=nb)
    sum_p = np.bincount(idx, weights=p, minlength=nb)
    sum_y = np.bincount(idx, weights=t.astype(np.float64), minlength=nb)
    keep = count > 0
    c = count[keep]
    return ReliabilityCurve(
        bin_lower=edges[:-1][keep],
        bin_upper=edges[1:][keep],
        mean_predicted=sum_p[keep] / c,
        observed_frequency=sum_y[keep] / c,
        count=c.astype(np.int64),
        edges=edges,
        strategy=strategy,
    )


def expected_calibration_error(probs: Any, y: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    """ECE: count-weighted mean over bins of |mean predicted probability - observed frequency|.

    In [0, 1]; 0 is perfect. Binning as in :func:`reliability_curve`. The binned ECE is biased
    upwards on small samples (noise in each bin's observed frequency), so compare calibrators on
    the same data and the same bins.
    """
    return reliability_curve(probs, y, n_bins, strategy).ece()


def brier_score(probs: Any, y: Any) -> float:
    """Mean squared difference between probability and 0/1 outcome (0 best; 0.25 for a constant 0.5)."""
    p = as_probabilities(probs)
    t = as_binary_labels(y, p.size)
    return float(np.mean((p - t) ** 2))
