"""Slide aggregators (multiple-instance learning) over a bag of tile features.

A bag is one slide's tiles: ``features (N, D_in)``, typically the tile embedding
concatenated with the tile class probabilities (:meth:`BagAggregator.make_features`).
Every aggregator maps it to a :class:`MILOutput`:

* ``logit``: slide logit of the NME pattern (``sigmoid`` -> uncalibrated probability);
* ``pattern_logits``: one slide logit per pattern (pallor, necrolysis, parakeratosis),
  a multi-task head trained from per-slide pattern flags;
* ``attention``: each tile's share of the slide representation (sums to 1 over the tiles).

Batches of bags of different sizes are supported by padding: ``features (B, N_max, D_in)``
with ``mask (B, N_max)`` (True = real tile); see :func:`pad_bags`. Padded positions get zero
attention and never influence the outputs.

Aggregators: :class:`GatedAttentionMIL` (Ilse, Tomczak & Welling, ICML 2018, gated
attention), :class:`MeanPoolMIL` and :class:`MaxPoolMIL` baselines. :func:`build_aggregator`
rebuilds one from ``(type, params)`` as stored in a bundle's ``aggregator`` section.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.patch import PATTERN_CLASSES
from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class MILOutput:
    """Aggregator output for one bag (or a padded batch of bags).

    Attributes:
        logit: slide NME-pattern logit, shape ``()`` (or ``(B,)`` for a batch).
        pattern_logits: per-pattern slide logits ``(P,)`` (or ``(B, P)``), P = 3 by default.
        attention: tile weights ``(N,)`` (or ``(B, N_max)``), >= 0, sum to 1 over real tiles,
            exactly 0 at padded positions.
    """

    logit: Tensor
    pattern_logits: Tensor
    attention: Tensor


def pad_bags(bags: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack bags ``(N_i, D)`` into ``features (B, N_max, D)`` (zero padded) and ``mask (B, N_max)`` (bool)."""
    if not bags:
        raise ValueError("pad_bags: no bags given")
    dims = {b.shape[-1] for b in bags}
    if any(b.dim() != 2 for b in bags) or len(dims) != 1:
        raise ValueError(f"pad_bags: every bag must be (N_i, D) with the same D, got {[tuple(b.shape) for b in bags]}")
    n_max = max(b.shape[0] for b in bags)
    ref = bags[0]
    feats = ref.new_zeros((len(bags), n_max, ref.shape[1]))
    mask = torch.zeros((len(bags), n_max), dtype=torch.bool, device=ref.device)
    for i, b in enumerate(bags):
        feats[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return feats, mask


class BagAggregator(nn.Module):
    """Common part of every aggregator: input checks, projection, masking, heads.

    ``features -> standardise -> Linear(D_in, hidden) -> ReLU -> Dropout -> pooling -> heads``

    The standardisation uses the buffers ``input_mean``/``input_std`` ``(D_in,)`` (identity
    until :meth:`fit_input_stats` is called on training features); they are part of the
    state dict, so they travel with the bundle. (Per-tile LayerNorm is deliberately not used:
    it rescales each tile by its own spread and hides the magnitude of outlier tiles, which is
    exactly the signal a few abnormal tiles carry.)

    Args:
        embedding_dim: width D of the tile embedding part of the features.
        tile_prob_dim: number of tile probabilities appended to the embedding (0 = embedding
            only). ``D_in = embedding_dim + tile_prob_dim``.
        hidden_dim: width of the projected tile representation.
        dropout: dropout probability after the projection (and in the attention branch).
        n_patterns: number of per-pattern slide logits.
    """

    kind: ClassVar[str] = ""
    # buffers registered in __init__, declared for the type checker (nn.Module.__getattr__ returns Tensor | Module)
    input_mean: Tensor
    input_std: Tensor

    def __init__(
        self,
        embedding_dim: int,
        tile_prob_dim: int = len(PATTERN_CLASSES) + 1,
        hidden_dim: int = 256,
        dropout: float = 0.25,
        n_patterns: int = len(PATTERN_CLASSES),
    ) -> None:
        super().__init__()
        if embedding_dim < 0 or tile_prob_dim < 0 or embedding_dim + tile_prob_dim == 0:
            raise ConfigError(
                f"{type(self).__name__}: need embedding_dim + tile_prob_dim > 0, got {embedding_dim} + {tile_prob_dim}"
            )
        if hidden_dim <= 0 or n_patterns <= 0 or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"{type(self).__name__}: hidden_dim and n_patterns must be > 0 and dropout in [0, 1), "
                f"got {hidden_dim}, {n_patterns}, {dropout}"
            )
        self._hparams: dict[str, Any] = dict(
            embedding_dim=embedding_dim,
            tile_prob_dim=tile_prob_dim,
            hidden_dim=hidden_dim,
            dropout=dropout,
            n_patterns=n_patterns,
        )
        self.in_dim = embedding_dim + tile_prob_dim
        self.register_buffer("input_mean", torch.zeros(self.in_dim))
        self.register_buffer("input_std", torch.ones(self.in_dim))
        self.project = nn.Sequential(nn.Linear(self.in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.slide_head = nn.Linear(hidden_dim, 1)
        self.pattern_head = nn.Linear(hidden_dim, n_patterns)

    @property
    def hparams(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (for a bundle's ``aggregator.params``)."""
        return dict(self._hparams)

    @torch.no_grad()
    def fit_input_stats(self, features: Tensor, eps: float = 1e-6) -> None:
        """Set the input standardisation from training tile features ``(M, D_in)`` (tiles of many slides).

        Constant columns get ``std = 1``.
        """
        if features.dim() != 2 or features.shape[1] != self.in_dim or features.shape[0] < 2:
            raise ValueError(f"need features (M >= 2, {self.in_dim}), got {tuple(features.shape)}")
        f = features.to(device=self.input_mean.device, dtype=torch.float64)
        std = f.std(dim=0)
        std[std < eps] = 1.0
        self.input_mean.copy_(f.mean(dim=0))
        self.input_std.copy_(std)

    def make_features(self, embeddings: Tensor, tile_probs: Tensor | None = None) -> Tensor:
        """Concatenate tile embeddings ``(..., N, D)`` with tile probabilities ``(..., N, C)``.

        ``tile_probs`` must be given iff ``tile_prob_dim > 0`` (C must equal it). Returns
        ``(..., N, D_in)``.
        """
        want_d, want_c = self._hparams["embedding_dim"], self._hparams["tile_prob_dim"]
        if embeddings.shape[-1] != want_d:
            raise ValueError(f"embeddings have width {embeddings.shape[-1]}, aggregator expects {want_d}")
        if want_c == 0:
            if tile_probs is not None:
                raise ValueError("this aggregator was built with tile_prob_dim=0; do not pass tile_probs")
            return embeddings
        if tile_probs is None or tile_probs.shape[-1] != want_c or tile_probs.shape[:-1] != embeddings.shape[:-1]:
            got = None if tile_probs is None else tuple(tile_probs.shape)
            raise ValueError(
                f"tile_probs must be (..., N, {want_c}) matching embeddings {tuple(embeddings.shape)}, got {got}"
            )
        return torch.cat([embeddings, tile_probs.to(embeddings.dtype)], dim=-1)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Aggregate one bag ``(N, D_in)`` or a padded batch ``(B, N_max, D_in)`` with ``mask (B, N_max)``.

        Raises:
            ValueError: wrong shapes, or a bag with no (unmasked) tile: the caller should mark
                that slide non-diagnostic.
        """
        batched = features.dim() == 3
        if features.dim() not in (2, 3) or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"features must be (N, {self.in_dim}) or (B, N, {self.in_dim}), got {tuple(features.shape)}"
            )
        x = features if batched else features.unsqueeze(0)
        if mask is None:
            m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            m = mask if batched else mask.unsqueeze(0)
            if m.shape != x.shape[:2]:
                raise ValueError(f"mask must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            m = m.to(device=x.device, dtype=torch.bool)
        if x.shape[1] == 0 or not bool(m.any(dim=1).all()):
            raise ValueError("empty bag: no tiles to aggregate (mark the slide non-diagnostic)")
        h = self.project((x - self.input_mean) / self.input_std)  # (B, N, H)
        z, attention = self._pool(h, m)  # (B, H), (B, N)
        logit = self.slide_head(z).squeeze(-1)  # (B,)
        pattern_logits = self.pattern_head(z)  # (B, P)
        if not batched:
            return MILOutput(logit[0], pattern_logits[0], attention[0])
        return MILOutput(logit, pattern_logits, attention)

    def _pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``h (B, N, H)``, ``mask (B, N)`` -> slide representation ``(B, H)``, tile weights ``(B, N)``."""
        raise NotImplementedError


class GatedAttentionMIL(BagAggregator):
    """Gated-attention pooling (Ilse et al., 2018).

    Score of tile i: ``s_i = w^T (tanh(V h_i) * sigmoid(U h_i))``; weights ``a = softmax(s)``
    over the bag's tiles; slide representation ``z = sum_i a_i h_i``.

    Args (beyond :class:`BagAggregator`):
        attention_dim: width of the V and U projections.
    """

    kind: ClassVar[str] = "gated_attention"

    def __init__(
        self,
        embedding_dim: int,
        tile_prob_dim: int = len(PATTERN_CLASSES) + 1,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
        n_patterns: int = len(PATTERN_CLASSES),
    ) -> None:
        super().__init__(embedding_dim, tile_prob_dim, hidden_dim, dropout, n_patterns)
        if attention_dim <= 0:
            raise ConfigError(f"GatedAttentionMIL: attention_dim must be > 0, got {attention_dim}")
        self._hparams["attention_dim"] = attention_dim
        self.attn_v = nn.Linear(hidden_dim, attention_dim)
        self.attn_u = nn.Linear(hidden_dim, attention_dim)
        self.attn_w = nn.Linear(attention_dim, 1)
        self.attn_dropout = nn.Dropout(dropout)

    def _pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        gated = torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))  # (B, N, A)
        scores = self.attn_w(self.attn_dropout(gated)).squeeze(-1)  # (B, N)
        scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)  # padded -> exactly 0
        z = torch.bmm(attention.unsqueeze(1), h).squeeze(1)  # (B, H)
        return z, attention


class MeanPoolMIL(BagAggregator):
    """Baseline: mean of the projected tiles; attention is uniform (1/N)."""

    kind: ClassVar[str] = "mean"

    def _pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        weights = mask.to(h.dtype)
        attention = weights / weights.sum(dim=1, keepdim=True)
        return torch.bmm(attention.unsqueeze(1), h).squeeze(1), attention


class MaxPoolMIL(BagAggregator):
    """Baseline: element-wise max over the projected tiles.

    Attention of tile i = fraction of the H feature channels whose maximum comes from tile i
    (a channel whose maximum is shared by several tiles, e.g. all zero after the ReLU, is
    split equally between them, which keeps the attention permutation-equivariant).
    """

    kind: ClassVar[str] = "max"

    def _pool(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        masked = h.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, N, H)
        z = masked.max(dim=1).values  # (B, H)
        is_max = (masked == z.unsqueeze(1)) & mask.unsqueeze(-1)  # (B, N, H)
        share = is_max.to(h.dtype) / is_max.sum(dim=1, keepdim=True).to(h.dtype)
        return z, share.mean(dim=2)  # (B, N)


AGGREGATORS: dict[str, type[BagAggregator]] = {cls.kind: cls for cls in (GatedAttentionMIL, MeanPoolMIL, MaxPoolMIL)}
"""Aggregator kind -> class (the ``type`` of a bundle's ``aggregator`` section)."""


def build_aggregator(kind: str, params: dict[str, Any]) -> BagAggregator:
    """Rebuild an aggregator from ``(type, params)`` (``params`` = :attr:`BagAggregator.hparams`).

    Raises:
        ConfigError: unknown kind (naming the allowed ones) or bad parameters.
    """
    cls = AGGREGATORS.get(kind)
    if cls is None:
        raise ConfigError(f"unknown aggregator type {kind!r}; allowed: {', '.join(sorted(AGGREGATORS))}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"aggregator {kind!r}: bad parameters {sorted(params)} ({exc})") from None
