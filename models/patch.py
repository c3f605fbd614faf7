"""Tile-level CNN: a torchvision backbone + a multi-label head (one logit per class).

The model sees normalised float tiles (see :func:`models.preprocess.to_tensor_batch`) and
outputs independent per-class logits (sigmoid, not softmax: a tile can show pallor *and*
parakeratosis). ``"epidermis"`` is an auxiliary class used by the quality gate and the
slide aggregator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from models.backbones import BACKBONES, backbone_spec
from models.errors import WeightsError
from models.state_io import read_state_dict, state_dict_mismatches
from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CLASSES: tuple[str, ...] = ("pallor", "necrolysis", "parakeratosis", "epidermis")
"""Default tile classes: the three NME patterns + the auxiliary epidermis output."""

PATTERN_CLASSES: tuple[str, ...] = ("pallor", "necrolysis", "parakeratosis")
"""The three NME patterns (slide-level pattern heads use this order)."""


class PatchClassifier(nn.Module):
    """Backbone -> dropout -> linear head with one logit per class.

    Args:
        backbone: torchvision builder name, one of :data:`models.backbones.BACKBONES`
            (resnet18/34/50, mobilenet_v3_small/large, efficientnet_b0). Built with
            ``weights=None``; use :func:`load_backbone_weights` for local initial weights.
        classes: output class names, in logit order (unique, non-empty).
        dropout: dropout probability applied to the embedding before the head, in [0, 1).

    Raises:
        ConfigError: unknown backbone, bad class list or dropout.
    """

    def __init__(
        self, backbone: str = "resnet18", classes: Sequence[str] = DEFAULT_CLASSES, dropout: float = 0.0
    ) -> None:
        super().__init__()
        spec = backbone_spec(backbone)
        classes = tuple(classes)
        if not classes or any(not isinstance(c, str) or not c.strip() for c in classes):
            raise ConfigError(f"classes must be a non-empty list of names, got {list(classes)!r}")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"classes must be unique, got {list(classes)!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        self.backbone_name: str = backbone
        self.classes: tuple[str, ...] = classes
        self.dropout_p: float = float(dropout)
        self._embedding_dim: int = spec.embedding_dim
        self.backbone: nn.Module = spec.build()
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(spec.embedding_dim, len(classes))

    @property
    def embedding_dim(self) -> int:
        """Width D of :meth:`forward_features` output."""
        return self._embedding_dim

    @property
    def num_classes(self) -> int:
        """Number of logits C."""
        return len(self.classes)

    def class_index(self, name: str) -> int:
        """Column of class ``name`` in the logits; ConfigError if absent."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise ConfigError(f"class {name!r} not in model classes {list(self.classes)}") from None

    def forward_features(self, x: Tensor) -> Tensor:
        """Embedding of each tile.

        Args:
            x: float tensor ``(B, 3, H, W)``, normalised with the bundle's mean/std.
        Returns:
            ``(B, D)`` embedding, ``D = embedding_dim`` (pooled backbone features, before dropout).
        """
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"expected a float tensor (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        return self.backbone(x)

    def forward_with_embedding(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (B, C), embedding (B, D))`` from one backbone pass."""
        emb = self.forward_features(x)
        return self.head(self.dropout(emb)), emb

    def forward(self, x: Tensor) -> Tensor:
        """Per-class logits ``(B, C)`` (apply ``sigmoid`` for probabilities) of ``(B, 3, H, W)`` tiles."""
        return self.forward_with_embedding(x)[0]

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r}, classes={list(self.classes)}, dropout={self.dropout_p}"


def load_backbone_weights(model: PatchClassifier, path: str | Path) -> None:
    """Initialise ``model.backbone`` from a LOCAL torchvision-style state dict.

    Accepts a ``.safetensors`` file or a torch file read with ``weights_only=True`` (never a
    full unpickle). Keys of torchvision's ImageNet classifier (e.g. ``fc.*`` for ResNets,
    ``classifier.3.*`` for MobileNetV3, ``classifier.1.*`` for EfficientNet) are ignored; every
    other key must match the backbone exactly, in name and shape. The patch head is untouched.

    Raises:
        WeightsError: missing/unreadable file, or mismatched keys/shapes; one line naming the
            file and the first mismatches.
    """
    p = Path(path)
    sd = read_state_dict(p, WeightsError)
    head_prefixes = BACKBONES[model.backbone_name].head_prefixes
    ignored = [k for k in sd if k.startswith(head_prefixes)]
    sd = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
    expected = model.backbone.state_dict()
    problems = state_dict_mismatches(expected, sd)
    if problems:
        raise WeightsError(f"{p}: does not fit backbone {model.backbone_name!r}: {'; '.join(problems)}")
    model.backbone.load_state_dict(sd, strict=True)
    log.info("loaded %d backbone tensors from %s (ignored %d classifier-head keys)", len(sd), p, len(ignored))
