"""Registry of torchvision backbones usable by :class:`models.patch.PatchClassifier`.

Each entry builds the torchvision network with ``weights=None`` (never downloads), removes
its ImageNet classifier and reports the embedding width. The module keeps torchvision's own
parameter names, so a torchvision state dict (minus the classifier keys listed in
:attr:`BackboneSpec.head_prefixes`) loads into it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision.models as tvm
from torch import nn

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    """How to turn one torchvision classifier into a feature extractor.

    Attributes:
        build: ``() -> nn.Module`` returning the headless backbone; its forward maps
            ``(B, 3, H, W)`` float images to ``(B, embedding_dim)`` features.
        embedding_dim: width D of the feature vector.
        head_prefixes: state-dict key prefixes of torchvision's ImageNet classifier that
            were removed (ignored when loading torchvision weights).
    """

    build: Callable[[], nn.Module]
    embedding_dim: int
    head_prefixes: tuple[str, ...]


def _resnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        net = getattr(tvm, name)(weights=None)
        net.fc = nn.Identity()  # features = global-average-pooled last stage
        return net

    return build


def _mobilenet_v3(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        net = getattr(tvm, name)(weights=None)
        # keep torchvision's pre-logit Linear + Hardswish (ImageNet-trained, same key names
        # classifier.0.*); drop its dropout (ours is configurable) and final Linear.
        net.classifier = nn.Sequential(net.classifier[0], net.classifier[1])
        return net

    return build


def _efficientnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        net = getattr(tvm, name)(weights=None)
        net.classifier = nn.Identity()  # features = pooled 1280-d vector, before its dropout
        return net

    return build


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(_resnet("resnet18"), 512, ("fc.",)),
    "resnet34": BackboneSpec(_resnet("resnet34"), 512, ("fc.",)),
    "resnet50": BackboneSpec(_resnet("resnet50"), 2048, ("fc.",)),
    "mobilenet_v3_small": BackboneSpec(_mobilenet_v3("mobilenet_v3_small"), 1024, ("classifier.3.",)),
    "mobilenet_v3_large": BackboneSpec(_mobilenet_v3("mobilenet_v3_large"), 1280, ("classifier.3.",)),
    "efficientnet_b0": BackboneSpec(_efficientnet("efficientnet_b0"), 1280, ("classifier.1.",)),
}
"""Backbone name -> spec. Names are torchvision's builder names."""


def known_backbone(name: str) -> str:
    """``name`` if it is a registered backbone, else ValueError listing the allowed ones (for pydantic validators)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(BACKBONES))}")
    return name


def backbone_spec(name: str) -> BackboneSpec:
    """Look up ``name``; an unknown name is a one-line :class:`ConfigError` listing the allowed ones."""
    spec = BACKBONES.get(name)
    if spec is None:
        raise ConfigError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(BACKBONES))}")
    return spec
