"""Transparent slide features from tile probabilities, and a logistic-regression slide classifier.

:class:`PatternStatistics` turns one slide's tile outputs into a fixed-length, named feature
vector that a pathologist can read (e.g. "fraction of epidermal tiles with necrolysis").
:class:`PatternStatsClassifier` is a standardised logistic regression on those features whose
parameters export to JSON (for a bundle's ``aggregator`` section; no pickle) and whose
predictions are computed from those exported numbers, so a reloaded classifier gives the
same probabilities bit for bit.

Units: coordinates and tile sizes are level-0 pixels; probabilities are in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from torch import Tensor

from models.patch import DEFAULT_CLASSES, PATTERN_CLASSES
from pipeline.core.errors import ConfigError, DataError


def _as_numpy(x: np.ndarray | Tensor, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}: expected numbers, got {arr.dtype}")
    return arr.astype(np.float64, copy=False)


class PatternStatistics:
    """Slide feature extractor over tile probabilities ``(N, C)`` and tile coordinates ``(N, 2)``.

    Definitions (``thr[p]`` = per-pattern threshold; epidermal tile = epidermis prob >
    ``epidermis_threshold``; neighbourhood of a tile = tiles whose coordinates lie within
    ``radius_tiles * tile_size_px`` level-0 px of it, itself included):

    per pattern p in ``patterns``:
      * ``{p}_topk_mean``: mean of the ``top_k`` largest probabilities of p over all tiles
        (all tiles when N < top_k);
      * ``{p}_max``: largest probability of p;
      * ``{p}_epi_mean``: mean probability of p over epidermal tiles (0 if none);
      * ``{p}_epi_pos_frac``: fraction of epidermal tiles with prob > thr[p] (0 if none);

    slide-wide:
      * ``epidermis_frac``: fraction of tiles that are epidermal;
      * ``epidermis_log1p_count``: log(1 + number of epidermal tiles);
      * ``cooccur_{a}_{b}_frac`` for each pattern pair: fraction of epidermal tiles whose
        neighbourhood contains a tile positive for a and a tile positive for b;
      * ``cooccur_all_frac``: same, with every pattern present in the neighbourhood.

    Args:
        classes: tile class names in the column order of ``probs``.
        patterns: the patterns to describe (must be in ``classes``).
        epidermis_class: auxiliary epidermis class (must be in ``classes``).
        thresholds: per-pattern positive threshold (mapping) or one value for all.
        epidermis_threshold: probability above which a tile counts as epidermal.
        top_k: number of tiles in the top-k mean.
        radius_tiles: neighbourhood radius in tile edges (1.5 = the 8 grid neighbours).
    """

    def __init__(
        self,
        classes: Sequence[str] = DEFAULT_CLASSES,
        patterns: Sequence[str] = PATTERN_CLASSES,
        epidermis_class: str = "epidermis",
        thresholds: Mapping[str, float] | float = 0.5,
        epidermis_threshold: float = 0.5,
        top_k: int = 8,
        radius_tiles: float = 1.5,
    ) -> None:
        self.classes = tuple(classes)
        self.patterns = tuple(patterns)
        self.epidermis_class = epidermis_class
        unknown = [c for c in (*self.patterns, epidermis_class) if c not in self.classes]
        if unknown or len(self.patterns) < 2:
            raise ConfigError(
                f"pattern statistics: need >= 2 patterns and an epidermis class among "
                f"{list(self.classes)}; unknown {unknown}"
            )
        thr = (
            {p: float(thresholds) for p in self.patterns} if isinstance(thresholds, (int, float)) else dict(thresholds)
        )
        missing = [p for p in self.patterns if p not in thr]
        if missing:
            raise ConfigError(f"pattern statistics: thresholds missing for {missing}")
        self.thresholds = {p: float(thr[p]) for p in self.patterns}
        if (
            top_k < 1
            or radius_tiles < 0
            or not all(0 <= t <= 1 for t in (*self.thresholds.values(), epidermis_threshold))
        ):
            raise ConfigError("pattern statistics: top_k >= 1, radius_tiles >= 0 and thresholds in [0, 1] required")
        self.epidermis_threshold = float(epidermis_threshold)
        self.top_k = int(top_k)
        self.radius_tiles = float(radius_tiles)
        self._pairs = [(a, b) for i, a in enumerate(self.patterns) for b in self.patterns[i + 1 :]]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the feature vector entries, in order."""
        names = [f"{p}_{s}" for p in self.patterns for s in ("topk_mean", "max", "epi_mean", "epi_pos_frac")]
        names += ["epidermis_frac", "epidermis_log1p_count"]
        names += [f"cooccur_{a}_{b}_frac" for a, b in self._pairs] + ["cooccur_all_frac"]
        return tuple(names)

    def to_json(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-able dict (inverse of :meth:`from_json`)."""
        return {
            "classes": list(self.classes),
            "patterns": list(self.patterns),
            "epidermis_class": self.epidermis_class,
            "thresholds": dict(self.thresholds),
            "epidermis_threshold": self.epidermis_threshold,
            "top_k": self.top_k,
            "radius_tiles": self.radius_tiles,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatternStatistics:
        return cls(**data)

    def __call__(self, probs: np.ndarray | Tensor, coords: np.ndarray | Tensor, tile_size_px: float) -> np.ndarray:
        """Feature vector of one slide.

        Args:
            probs: ``(N, C)`` tile probabilities (after sigmoid), columns in ``classes`` order.
            coords: ``(N, 2)`` tile positions (x, y) in level-0 px (any fixed reference point
                of the tile, e.g. its top-left corner).
            tile_size_px: tile edge in level-0 px (e.g. 448 for 224 px tiles at 0.5 µm/px read
                from a 0.25 µm/px scan).
        Returns:
            ``(F,)`` float64, entries named by :attr:`feature_names`.
        Raises:
            ValueError: empty bag or inconsistent shapes.
        """
        p = _as_numpy(probs, "probs")
        xy = _as_numpy(coords, "coords")
        if p.ndim != 2 or p.shape[1] != len(self.classes) or xy.shape != (p.shape[0], 2):
            raise ValueError(f"probs must be (N, {len(self.classes)}) and coords (N, 2), got {p.shape} and {xy.shape}")
        if p.shape[0] == 0:
            raise ValueError("empty bag: no tiles to describe (mark the slide non-diagnostic)")
        if not (tile_size_px > 0 and math.isfinite(tile_size_px)):
            raise ValueError(f"tile_size_px must be > 0, got {tile_size_px!r}")
        n = p.shape[0]
        col = {c: i for i, c in enumerate(self.classes)}
        epi = p[:, col[self.epidermis_class]] > self.epidermis_threshold
        n_epi = int(epi.sum())
        positive = {q: p[:, col[q]] > self.thresholds[q] for q in self.patterns}

        feats: list[float] = []
        for q in self.patterns:
            v = p[:, col[q]]
            k = min(self.top_k, n)
            feats.append(float(np.partition(v, n - k)[n - k :].mean()))
            feats.append(float(v.max()))
            feats.append(float(v[epi].mean()) if n_epi else 0.0)
            feats.append(float(positive[q][epi].mean()) if n_epi else 0.0)
        feats.append(n_epi / n)
        feats.append(math.log1p(n_epi))

        # neighbourhood "contains a positive tile" per pattern, by one pass over close pairs
        near = {q: positive[q].copy() for q in self.patterns}
        pairs = cKDTree(xy).query_pairs(self.radius_tiles * tile_size_px, output_type="ndarray")
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            for q in self.patterns:
                near[q][i] |= positive[q][j]
                near[q][j] |= positive[q][i]
        for a, b in self._pairs:
            feats.append(float((near[a] & near[b])[epi].mean()) if n_epi else 0.0)
        all_near = np.logical_and.reduce([near[q] for q in self.patterns])
        feats.append(float(all_near[epi].mean()) if n_epi else 0.0)
        return np.asarray(feats, dtype=np.float64)


class PatternStatsClassifier:
    """Logistic regression on standardised :class:`PatternStatistics` features.

    ``P(NME pattern) = sigmoid(intercept + sum_f coef_f * (x_f - mean_f) / scale_f)``.

    Args:
        feature_names: names of the columns of X (stored with the parameters and checked on load).
        C: inverse L2 regularisation strength (scikit-learn's ``C``).
        class_weight: ``None`` (default: probabilities follow the training prevalence) or
            ``"balanced"`` (scikit-learn semantics; shifts the intercept, recalibrate afterwards).
        max_iter: solver iterations.
    """

    def __init__(
        self, feature_names: Sequence[str], C: float = 1.0, class_weight: str | None = None, max_iter: int = 1000
    ) -> None:
        self.feature_names = tuple(feature_names)
        self.C = float(C)
        self.class_weight = class_weight
        self.max_iter = int(max_iter)
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_: float | None = None

    def _check_x(self, X: np.ndarray | Tensor) -> np.ndarray:
        x = _as_numpy(X, "X")
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"X must be (n_slides, {len(self.feature_names)}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("X contains NaN/inf")
        return x

    def fit(self, X: np.ndarray | Tensor, y: np.ndarray | Sequence[int]) -> PatternStatsClassifier:
        """Fit on ``X (n_slides, F)`` and binary labels ``y (n_slides,)`` (1 = NME pattern).

        Raises:
            DataError: fewer than two classes in ``y`` or labels not in {0, 1}.
        """
        from sklearn.linear_model import LogisticRegression  # training-only dependency

        x = self._check_x(X)
        labels = np.asarray(y).astype(np.int64).ravel()
        if labels.shape[0] != x.shape[0] or not set(np.unique(labels)) <= {0, 1}:
            raise DataError(
                f"labels must be {x.shape[0]} values in {{0, 1}}, got {labels.shape[0]} values "
                f"{sorted(set(np.unique(labels).tolist()))}"
            )
        if len(np.unique(labels)) < 2:
            raise DataError("cannot fit the slide classifier: labels contain a single class")
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        lr = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)
        lr.fit((x - mean) / scale, labels)
        self.mean_, self.scale_ = mean, scale
        self.coef_ = lr.coef_.ravel().astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    def decision_function(self, X: np.ndarray | Tensor) -> np.ndarray:
        """Slide logits ``(n_slides,)``."""
        if self.coef_ is None or self.mean_ is None or self.scale_ is None or self.intercept_ is None:
            raise RuntimeError("PatternStatsClassifier is not fitted")
        x = self._check_x(X)
        return ((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def predict_proba(self, X: np.ndarray | Tensor) -> np.ndarray:
        """P(NME pattern) per slide, shape ``(n_slides,)`` (NB: 1-D, unlike scikit-learn's (n, 2))."""
        z = self.decision_function(X)
        return 1.0 / (1.0 + np.exp(-z))

    def coefficients(self) -> dict[str, float]:
        """Per-feature coefficient on the standardised scale (larger = more evidence for NME)."""
        if self.coef_ is None:
            raise RuntimeError("PatternStatsClassifier is not fitted")
        return dict(zip(self.feature_names, self.coef_.tolist()))

    def to_json(self) -> dict[str, Any]:
        """Hyper-parameters and fitted parameters as plain JSON (for the bundle; no pickle)."""
        if self.coef_ is None or self.mean_ is None or self.scale_ is None:
            raise RuntimeError("PatternStatsClassifier is not fitted")
        return {
            "feature_names": list(self.feature_names),
            "C": self.C,
            "class_weight": self.class_weight,
            "max_iter": self.max_iter,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatternStatsClassifier:
        """Rebuild a fitted classifier from :meth:`to_json` output.

        Raises:
            ConfigError: missing fields or vectors whose length differs from ``feature_names``.
        """
        try:
            obj = cls(data["feature_names"], C=data["C"], class_weight=data["class_weight"], max_iter=data["max_iter"])
            vecs = {k: np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef")}
            intercept = float(data["intercept"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"pattern-statistics classifier parameters invalid ({type(exc).__name__}: {exc})"
            ) from None
        bad = [k for k, v in vecs.items() if v.shape != (len(obj.feature_names),) or not np.isfinite(v).all()]
        if bad or not math.isfinite(intercept) or (vecs["scale"] <= 0).any():
            raise ConfigError(
                f"pattern-statistics classifier parameters invalid: {bad or 'intercept/scale'} "
                f"do not fit {len(obj.feature_names)} features"
            )
        obj.mean_, obj.scale_, obj.coef_, obj.intercept_ = vecs["mean"], vecs["scale"], vecs["coef"], intercept
        return obj
