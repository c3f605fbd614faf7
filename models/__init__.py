"""Torch building blocks of the NME-pattern model (tensors in, tensors out; no slide files).

* :mod:`models.patch`: :class:`PatchClassifier` (tile CNN) and :func:`load_backbone_weights`.
* :mod:`models.preprocess`: :func:`to_tensor_batch` (uint8 tiles -> normalised float on device).
* :mod:`models.bundle`: the model bundle (``bundle.json`` + ``model.safetensors``).
* :mod:`models.mil`: slide aggregators (gated attention, mean, max).
* :mod:`models.pattern_stats`: transparent slide features + logistic regression.
"""

from __future__ import annotations

from models.backbones import BACKBONES, BackboneSpec, backbone_spec
from models.bundle import (
    CONTRACT_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    AggregatorSpec,
    ArchitectureSpec,
    BundleContract,
    InputSpec,
    LoadedBundle,
    NormalisationSpec,
    TrainingSpec,
    bundle_sha256,
    load_bundle,
    read_contract,
    save_bundle,
)
from models.errors import BundleError, WeightsError
from models.mil import (
    AGGREGATORS,
    BagAggregator,
    GatedAttentionMIL,
    MaxPoolMIL,
    MeanPoolMIL,
    MILOutput,
    build_aggregator,
    pad_bags,
)
from models.patch import DEFAULT_CLASSES, PATTERN_CLASSES, PatchClassifier, load_backbone_weights
from models.pattern_stats import PatternStatistics, PatternStatsClassifier
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_tensor_batch

__all__ = [
    "AGGREGATORS",
    "BACKBONES",
    "CONTRACT_FILE",
    "DEFAULT_CLASSES",
    "FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PATTERN_CLASSES",
    "WEIGHTS_FILE",
    "AggregatorSpec",
    "ArchitectureSpec",
    "BackboneSpec",
    "BagAggregator",
    "BundleContract",
    "BundleError",
    "GatedAttentionMIL",
    "InputSpec",
    "LoadedBundle",
    "MILOutput",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "NormalisationSpec",
    "PatchClassifier",
    "PatternStatistics",
    "PatternStatsClassifier",
    "TrainingSpec",
    "WeightsError",
    "backbone_spec",
    "build_aggregator",
    "bundle_sha256",
    "load_backbone_weights",
    "load_bundle",
    "pad_bags",
    "read_contract",
    "save_bundle",
    "to_tensor_batch",
]
