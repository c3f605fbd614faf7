"""The tile rules of ``python -m pipeline.evaluate``: which tiles count as positive for a pattern."""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.evaluate import _tile_aurocs


def test_thin_bands_count_by_the_epidermal_rule_not_the_tile_rule():
    rng = np.random.default_rng(0)
    n = 200
    epi = np.full(n, 0.3, np.float32)  # thin real epidermis: 30 % of every tile
    cov = np.zeros(n, np.float32)
    cov[:40] = 0.1  # a band filling a third of the tile's epidermis, 10 % of the tile
    cov[40:50] = 0.01  # a corner of a band: touches, below both rules, left out
    probs = rng.uniform(0.0, 0.5, n).astype(np.float32)
    probs[:40] += 0.5  # the model ranks the band tiles first
    covs = {p: [cov] for p in ("pallor", "necrolysis", "parakeratosis")}
    prob = {p: [probs] for p in covs}
    out = _tile_aurocs(prob, covs, epi)["pallor"]
    assert out["auroc"] is None and out["n_pos"] == 0  # no tile is half inside the band
    assert out["n_pos_epidermal"] == 40
    assert out["auroc_epidermal"] == 1.0
