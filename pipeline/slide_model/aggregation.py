"""Slide-level prediction from tile outputs: aggregator → calibration → band.

:class:`SlidePredictor` is what inference uses; it is rebuilt from a model bundle
(:func:`SlidePredictor.from_bundle`) and never unpickles anything: MIL weights come from the
bundle's safetensors section ``aggregator``, the pattern-statistics model, the calibrator and the
bands from ``bundle.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.mil import BagAggregator, build_aggregator
from models.patch import PATTERN_CLASSES
from models.pattern_stats import PatternStatistics, PatternStatsClassifier
from pipeline.core.errors import ConfigError
from pipeline.patch.features import SlideFeatures
from pipeline.slide_model.calibration import Bands
from pipeline.slide_model.calibration import calibrator_from_json as calibration_from_json

log = logging.getLogger(__name__)


@dataclass
class SlidePrediction:
    """One slide's aggregate.

    Attributes:
        logit: raw aggregator score (before calibration).
        probability: calibrated NME-pattern probability in [0, 1].
        band: ``LOW`` | ``INDETERMINATE`` | ``HIGH``.
        patterns: slide-level score per pattern in [0, 1].
        attention: (N,) per-tile weight (attention or contribution), sums to 1.
    """

    logit: float
    probability: float
    band: str
    patterns: dict[str, float]
    attention: np.ndarray


def calibrator_from_json(data: dict[str, Any] | None):
    """Rebuild the calibrator stored in a bundle (``None`` → identity on the sigmoid)."""
    if not data or data.get("kind", "none") == "none":
        return None
    return calibration_from_json(data)


class SlidePredictor:
    """Aggregator + calibrator + bands."""

    def __init__(
        self,
        kind: str,
        classes: list[str],
        mil: BagAggregator | None = None,
        stats: PatternStatistics | None = None,
        stats_clf: PatternStatsClassifier | None = None,
        calibrator=None,
        bands: Bands | None = None,
        use_embeddings: bool = True,
    ) -> None:
        self.kind = kind
        self.classes = list(classes)
        self.mil = mil.eval() if mil is not None else None
        self.stats, self.stats_clf = stats, stats_clf
        self.calibrator = calibrator
        self.bands = bands or Bands()
        self.use_embeddings = use_embeddings

    # -- building blocks shared with training ------------------------------------------------
    def bag(self, feats: SlideFeatures, probs_override: np.ndarray | None = None) -> torch.Tensor:
        """MIL input (N, D_in) for a slide (``probs_override``: (N, C) tile probabilities to use instead)."""
        assert self.mil is not None
        emb = torch.from_numpy(feats.embeddings) if self.use_embeddings else torch.zeros((len(feats), 0))
        probs = torch.from_numpy(feats.probs if probs_override is None else probs_override)
        return self.mil.make_features(emb, probs) if self.mil.hparams["tile_prob_dim"] else emb

    def raw(self, feats: SlideFeatures) -> tuple[float, dict[str, float], np.ndarray]:
        """(logit, pattern scores, attention) before calibration. Raises ValueError on an empty bag."""
        if len(feats) == 0:
            raise ValueError("no tiles to aggregate")
        if self.kind == "pattern_stats":
            assert self.stats is not None and self.stats_clf is not None
            x = self.stats(feats.probs, feats.coords, feats.tile_size_l0)[None, :]
            logit = float(self.stats_clf.decision_function(x)[0])
            patterns = {p: float(np.sort(feats.column(p))[-8:].mean()) for p in PATTERN_CLASSES if p in self.classes}
            # contribution: tiles weighted by their summed pattern evidence
            ev = sum(feats.column(p) for p in PATTERN_CLASSES if p in self.classes)
            assert isinstance(ev, np.ndarray)  # the pattern-statistics model needs pattern classes
            att = ev / ev.sum() if ev.sum() > 0 else np.full(len(feats), 1.0 / len(feats))
            return logit, patterns, att.astype(np.float32)
        assert self.mil is not None
        with torch.inference_mode():
            out = self.mil(self.bag(feats))
        patterns = {p: float(torch.sigmoid(out.pattern_logits[i])) for i, p in enumerate(PATTERN_CLASSES)}
        return float(out.logit), patterns, out.attention.float().numpy()

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for raw logits (N,)."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.calibrator is None:
            return 1.0 / (1.0 + np.exp(-logits))
        return np.asarray(self.calibrator.transform(logits), dtype=np.float64)

    def predict(self, feats: SlideFeatures) -> SlidePrediction:
        logit, patterns, att = self.raw(feats)
        p = float(self.calibrate(np.array([logit]))[0])
        if not np.isfinite(p):
            raise ValueError("aggregator produced a non-finite probability")
        return SlidePrediction(logit, p, self.bands.band(p), patterns, att)

    # -- bundle -----------------------------------------------------------------------------
    def to_bundle_sections(self) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """(aggregator params for bundle.json, state dict for the safetensors ``aggregator`` section)."""
        if self.kind == "pattern_stats":
            assert self.stats is not None and self.stats_clf is not None
            return {"stats": self.stats.to_json(), "classifier": self.stats_clf.to_json()}, None
        assert self.mil is not None
        return {"hparams": self.mil.hparams, "use_embeddings": self.use_embeddings}, {
            k: v.detach().cpu() for k, v in self.mil.state_dict().items()
        }

    @classmethod
    def from_bundle(cls, contract, extra: dict[str, dict[str, torch.Tensor]]) -> SlidePredictor:
        agg = contract.aggregator
        if agg is None:
            raise ConfigError(f"bundle {contract.name}: no aggregator section; train one with task: aggregator")
        classes = list(contract.architecture.classes)
        bands = Bands(**contract.bands) if contract.bands else Bands()
        calibrator = calibrator_from_json(contract.calibration)
        if agg.type == "pattern_stats":
            stats = PatternStatistics.from_json(agg.params["stats"])
            clf = PatternStatsClassifier.from_json(agg.params["classifier"])
            return cls("pattern_stats", classes, stats=stats, stats_clf=clf, calibrator=calibrator, bands=bands)
        mil = build_aggregator(agg.type, agg.params["hparams"])
        sd = extra.get(agg.weights or "aggregator")
        if sd is None:
            raise ConfigError(f"bundle {contract.name}: aggregator weights missing")
        mil.load_state_dict({k: v.cpu() for k, v in sd.items()})
        return cls(
            agg.type,
            classes,
            mil=mil,
            calibrator=calibrator,
            bands=bands,
            use_embeddings=bool(agg.params.get("use_embeddings", True)),
        )
