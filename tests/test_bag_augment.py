"""The aggregator's sub-threshold baseline augmentation (pipeline/training/bag_augment.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.bag_augment import raise_baseline


def test_raises_only_below_threshold_and_never_crosses_it():
    rng = np.random.default_rng(0)
    probs = np.array([[0.01, 0.02, 0.9], [0.05, 0.7, 0.5], [0.3, 0.001, 0.2]], dtype=np.float32)
    thr = np.array([0.6, 0.6, np.nan])
    out = raise_baseline(probs, thr, rng, max_shift=20.0, margin=0.5)
    ceiling = 1 / (1 + np.exp(-(np.log(0.6 / 0.4) - 0.5)))
    assert out[1, 1] == pytest.approx(0.7)  # above threshold: untouched
    assert np.array_equal(out[:, 2], probs[:, 2])  # NaN threshold: column untouched
    below = probs[:, :2] < ceiling
    assert (out[:, :2][below] >= probs[:, :2][below]).all()
    assert (out[:, :2][below] <= ceiling + 1e-6).all()
    assert out[:, :2][below].max() > 0.3  # a shift of up to 20 logits lifts the low tiles to near the ceiling
    assert probs[0, 0] == pytest.approx(0.01)  # the input is not modified


def test_zero_shift_is_identity_and_shape_is_checked():
    probs = np.random.default_rng(1).uniform(0, 1, (50, 4)).astype(np.float32)
    out = raise_baseline(probs, np.array([0.5, 0.5, 0.5, np.nan]), np.random.default_rng(2), max_shift=0.0)
    np.testing.assert_allclose(out, probs, atol=1e-6)
    with pytest.raises(ValueError, match="probs must be"):
        raise_baseline(probs, np.array([0.5, 0.5]), np.random.default_rng(0), max_shift=1.0)
