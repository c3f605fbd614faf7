"""Run the patch model over a slide's tiles: per-tile probabilities and embeddings (:class:`SlideFeatures`).

Streaming: :class:`~pipeline.patch.reader.TileReader` threads read and decode tiles ahead of the
model into a bounded queue of uint8 batches, so memory stays bounded whatever the slide size and
the CNN is never starved. Tiles stay uint8 until the batch is on the device. Cached on disk by
:mod:`pipeline.patch.cache`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.patch.backends import Runner
from pipeline.patch.reader import TileReader
from pipeline.reading.slide import ReadPlan

log = logging.getLogger(__name__)


class TileObserver(Protocol):
    """Offered every batch as it streams past the model (e.g. the report gallery's candidates)."""

    def update(self, idx: np.ndarray, tiles: np.ndarray, probs: np.ndarray) -> None:
        """``idx`` (B,) tile indices, ``tiles`` (B, H, W, 3) uint8, ``probs`` (B, C) float32."""


@dataclass
class SlideFeatures:
    """Patch-model outputs for one slide.

    Attributes:
        coords: (N, 2) int64 level-0 top-left of each tile.
        probs: (N, C) float32 sigmoid probabilities, columns = ``classes``.
        embeddings: (N, D) float32 tile embeddings.
        sharpness: (N,) float32 variance of the Laplacian of each grey tile (focus measure,
            :func:`pipeline.tiles.measurements.tile_sharpness`).
        stain: slide-level :class:`pipeline.tiles.measurements.StainAccumulator` statistics over all tiles.
        classes: class names of ``probs``.
        tile_size_l0: level-0 footprint of a tile, px.
    """

    coords: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    sharpness: np.ndarray
    stain: dict[str, Any]
    classes: list[str]
    tile_size_l0: float
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def column(self, name: str) -> np.ndarray:
        return self.probs[:, self.classes.index(name)]


def runs_on_cpu(runner) -> bool:
    """True when ``runner`` (any backend's runner, see :mod:`pipeline.patch.backends`) computes on the CPU."""
    return getattr(getattr(runner, "device", None), "type", "cpu") == "cpu"


def extract_features(
    path: Path,
    mpp: float | None,
    coords: np.ndarray,
    plan: ReadPlan,
    tile_px: int,
    tile_size_l0: float,
    runner: Runner,
    classes: list[str],
    batch_size: int = 64,
    reader_threads: int = 2,
    progress=None,
    background_rgb: tuple[int, int, int] = (255, 255, 255),
    keep_top: TileObserver | None = None,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SlideFeatures:
    """Stream all tiles of a slide through ``runner``. ``progress(n_done)`` is called per batch.

    ``meta`` of the result holds wall seconds: ``seconds`` (all), ``model_seconds`` (in
    ``runner``), ``wait_seconds`` (waiting for the reader threads) and ``read_seconds`` (busy
    time of the reader threads, summed over threads: mostly hidden behind the model).
    ``keep_top``, if given, is offered every batch (e.g. the report gallery's candidates).
    ``normalise``, if given, maps each uint8 batch before the model (stain normalisation,
    :func:`pipeline.patch.stain_norm.normaliser_for`; its time is in ``model_seconds`` and
    ``normalise_seconds``); the sharpness and stain statistics and ``keep_top`` see the tiles as read.
    """
    n = len(coords)
    # outputs of the whole slide in blocks allocated once (at the first batch), filled batch by
    # batch: per-batch output arrays kept to the end would be scattered through the memory the
    # model's activations are freed into, and the heap would grow with the number of batches
    probs: np.ndarray | None = None
    emb: np.ndarray | None = None  # allocated together with probs
    stats = np.zeros(n, np.float32)
    t_model = 0.0
    t0 = time.perf_counter()
    t_wait = 0.0
    t_norm = 0.0
    reader = TileReader(
        path,
        mpp,
        coords,
        plan,
        tile_px,
        batch_size,
        threads=reader_threads,
        background_rgb=background_rgb,
        low_priority=runs_on_cpu(runner),
    )
    batches = iter(reader)
    while True:
        t1 = time.perf_counter()
        item = next(batches, None)  # waiting here = reading/decoding not hidden behind the model
        t2 = time.perf_counter()
        t_wait += t2 - t1
        if item is None:
            break
        idx, tiles, sharp = item
        model_in = tiles
        if normalise is not None:
            model_in = normalise(tiles)
            t_norm += time.perf_counter() - t2
        p, e = runner(model_in)
        t_model += time.perf_counter() - t2
        if keep_top is not None:
            keep_top.update(idx, tiles, p)
        if probs is None or emb is None:
            probs = np.empty((n, p.shape[1]), np.float32)
            emb = np.empty((n, e.shape[1]), np.float32)
        probs[idx], emb[idx], stats[idx] = p, e, sharp
        del p, e, tiles, model_in
        if progress is not None:
            progress(len(idx))
    if probs is None or emb is None:
        probs = np.zeros((0, len(classes)), np.float32)
        emb = np.zeros((0, 0), np.float32)
    if not np.isfinite(probs).all():
        raise PipelineError(f"{path}: the patch model produced non-finite outputs")
    total = time.perf_counter() - t0
    return SlideFeatures(
        coords=np.asarray(coords, np.int64),
        probs=probs.astype(np.float32),
        embeddings=emb.astype(np.float32),
        sharpness=stats,
        stain=reader.stain(),
        classes=list(classes),
        tile_size_l0=float(tile_size_l0),
        meta={
            "seconds": total,
            "model_seconds": t_model,
            "wait_seconds": t_wait,
            "read_seconds": reader.read_seconds,
            **({"normalise_seconds": t_norm} if normalise is not None else {}),
        },
    )
