"""Augmentation of slide bags for aggregator training: a raised sub-threshold baseline.

On tissue the patch model has not seen (another lab's stain, another scanner, real skin that
the generator never drew) the tile probabilities of *normal* tissue drift upwards while staying
below the tile thresholds: the epidermis of a real normal biopsy may sit at 0.2-0.4 for
parakeratosis where synthetic normal skin sits at 0.01. An aggregator trained only on the crisp
training distribution reads that drift as evidence (its inputs are standardised on the training
tiles, where the spread below threshold is tiny) and calls normal skin NME.

:func:`raise_baseline` simulates the drift: per bag and per pattern, every tile below the
pattern's tile threshold (minus a margin) is moved up in logit space by a random amount, but
never past ``threshold - margin``; tiles already near or above the threshold are left alone.
The bag keeps its label, so the aggregator learns that only supra-threshold evidence counts.
"""

from __future__ import annotations

import numpy as np

#: Tile probabilities are clipped to [EPS, 1 - EPS] before the logit.
EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def raise_baseline(
    probs: np.ndarray,
    thresholds: np.ndarray,
    rng: np.random.Generator,
    max_shift: float,
    margin: float = 0.5,
) -> np.ndarray:
    """Raise the sub-threshold tile probabilities of some columns, keeping them below threshold.

    Args:
        probs: (N, C) tile probabilities in [0, 1].
        thresholds: (C,) tile threshold per column; NaN leaves that column untouched.
        rng: random generator (one shift per column is drawn, uniform in [0, ``max_shift``]).
        max_shift: largest shift, in logit units.
        margin: tiles end at most this far (logit units) below their column's threshold.

    Returns:
        (N, C) float32 probabilities; the input is not modified.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(thresholds):
        raise ValueError(f"probs must be (N, {len(thresholds)}), got {probs.shape}")
    out = probs.copy()
    for c, thr in enumerate(np.asarray(thresholds, dtype=np.float64)):
        if not np.isfinite(thr):
            continue
        ceiling = _logit(np.array([thr]))[0] - margin
        z = _logit(probs[:, c])
        below = z < ceiling
        if not below.any():
            continue
        shift = rng.uniform(0.0, max_shift)
        z_new = np.minimum(z[below] + shift, ceiling)
        out[below, c] = 1.0 / (1.0 + np.exp(-z_new))
    return out.astype(np.float32)
