"""Run the patch model over a slide's tiles: per-tile probabilities and embeddings, cached on disk.

Streaming: reader threads (each with its own slide handle; OpenSlide decodes without the GIL)
read and decode tiles ahead of the model into a bounded queue of uint8 batches, so memory stays
bounded whatever the slide size and the CNN is never starved. Tiles stay uint8 until the batch is
on the device. Cheap per-tile statistics the quality gate needs (sharpness, stain) are computed
in the reader threads, hidden behind the model.

Cache: ``<cache_dir>/<slide_id>.features.h5`` keyed by slide fingerprint + model sha256; reused
when both match, rewritten atomically otherwise.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.preprocess import to_tensor_batch
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.quality import StainAccumulator, tile_sharpness
from pipeline.runtime import autocast_context
from pipeline.slide import ReadPlan, open_slide

log = logging.getLogger(__name__)

CACHE_VERSION = 2


@dataclass
class SlideFeatures:
    """Patch-model outputs for one slide.

    Attributes:
        coords: (N, 2) int64 level-0 top-left of each tile.
        probs: (N, C) float32 sigmoid probabilities, columns = ``classes``.
        embeddings: (N, D) float32 tile embeddings.
        sharpness: (N,) float32 variance of the Laplacian of each grey tile (focus measure,
            :func:`pipeline.quality.tile_sharpness`).
        stain: slide-level :class:`pipeline.quality.StainAccumulator` statistics over all tiles.
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


class TileReader:
    """Reads tiles of one slide in reader threads into a bounded queue of uint8 batches.

    Iterating yields ``(indices (B,), tiles uint8 (B, H, W, 3), sharpness (B,))`` in tile order;
    :meth:`stain` gives the stain statistics of all tiles read.
    Errors in a reader thread are re-raised in the consumer.
    """

    def __init__(self, path: Path, mpp: float | None, coords: np.ndarray, plan: ReadPlan, tile_px: int,
                 batch_size: int, threads: int = 2, prefetch_batches: int = 4,
                 background_rgb: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.path, self.mpp, self.coords, self.plan, self.tile_px = path, mpp, coords, plan, tile_px
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, prefetch_batches))
        self._stop = threading.Event()
        self.read_seconds = 0.0
        self._stain = [StainAccumulator(background_rgb) for _ in range(self.threads)]

    def _work(self, worker: int, batches: list[int], slots: dict[int, Any], cond: threading.Condition) -> None:
        try:
            with open_slide(self.path, mpp=self.mpp) as slide:
                for b in batches:
                    if self._stop.is_set():
                        return
                    t0 = time.perf_counter()
                    idx = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, len(self.coords)))
                    tiles = np.empty((len(idx), self.tile_px, self.tile_px, 3), np.uint8)
                    stats = np.empty(len(idx), np.float32)
                    for k, i in enumerate(idx):
                        x, y = self.coords[i]
                        tiles[k] = slide.read_region((int(x), int(y)), (self.tile_px, self.tile_px), self.plan)
                        stats[k] = tile_sharpness(tiles[k])
                    self._stain[worker].update(tiles)
                    self.read_seconds += time.perf_counter() - t0
                    with cond:
                        while b - self._next_out >= self.queue.maxsize * self.threads and not self._stop.is_set():
                            cond.wait(0.1)
                        slots[b] = (idx, tiles, stats)
                        cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - hand over to the consumer
            with cond:
                slots[-1 - worker] = exc
                cond.notify_all()

    def stain(self) -> dict[str, Any]:
        """Stain statistics over every tile read so far (all reader threads merged)."""
        total = StainAccumulator(self._stain[0].background_rgb)
        for acc in self._stain:
            total.merge(acc)
        return total.result()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        n_batches = (len(self.coords) + self.batch_size - 1) // self.batch_size
        slots: dict[int, Any] = {}
        cond = threading.Condition()
        self._next_out = 0
        assignments = [list(range(w, n_batches, self.threads)) for w in range(self.threads)]
        workers = [threading.Thread(target=self._work, args=(w, a, slots, cond), daemon=True) for w, a in enumerate(assignments)]
        for t in workers:
            t.start()
        try:
            for b in range(n_batches):
                with cond:
                    while b not in slots:
                        errors = [v for k, v in slots.items() if k < 0]
                        if errors:
                            raise errors[0]
                        cond.wait(0.5)
                    item = slots.pop(b)
                    self._next_out = b + 1
                    cond.notify_all()
                yield item
        finally:
            self._stop.set()
            with cond:
                cond.notify_all()
            for t in workers:
                t.join(timeout=10)


class PatchRunner:
    """Applies a loaded bundle's patch model to uint8 tile batches on a device with a precision."""

    def __init__(self, model: torch.nn.Module, mean, std, device: torch.device, precision: str = "auto",
                 channels_last: bool = True) -> None:
        self.model = model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean, self.std = tuple(mean), tuple(std)
        self.device, self.precision, self.channels_last = device, precision, channels_last

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W, 3) → (probs (B, C) float32, embeddings (B, D) float32)."""
        x = to_tensor_batch(tiles, self.mean, self.std, channels_last=self.channels_last, device=self.device)
        with autocast_context(self.device, self.precision):
            logits, emb = self.model.forward_with_embedding(x)
        return torch.sigmoid(logits.float()).cpu().numpy(), emb.float().cpu().numpy()


def extract_features(path: Path, mpp: float | None, coords: np.ndarray, plan: ReadPlan, tile_px: int, tile_size_l0: float,
                     runner: PatchRunner, classes: list[str], batch_size: int = 64, reader_threads: int = 2,
                     progress=None, background_rgb: tuple[int, int, int] = (255, 255, 255)) -> SlideFeatures:
    """Stream all tiles of a slide through ``runner``. ``progress(n_done)`` is called per batch."""
    n = len(coords)
    emb_dim = None
    probs_l, emb_l, stats_l = [], [], []
    t_model = 0.0
    t0 = time.perf_counter()
    reader = TileReader(path, mpp, coords, plan, tile_px, batch_size, threads=reader_threads, background_rgb=background_rgb)
    for idx, tiles, stats in reader:
        t1 = time.perf_counter()
        p, e = runner(tiles)
        t_model += time.perf_counter() - t1
        probs_l.append(p)
        emb_l.append(e)
        stats_l.append(stats)
        emb_dim = e.shape[1]
        if progress is not None:
            progress(len(idx))
    if n == 0:
        probs = np.zeros((0, len(classes)), np.float32)
        emb = np.zeros((0, emb_dim or 0), np.float32)
        stats = np.zeros(0, np.float32)
    else:
        probs, emb, stats = np.concatenate(probs_l), np.concatenate(emb_l), np.concatenate(stats_l)
    if not np.isfinite(probs).all():
        raise PipelineError(f"{path}: the patch model produced non-finite outputs")
    total = time.perf_counter() - t0
    return SlideFeatures(coords=np.asarray(coords, np.int64), probs=probs.astype(np.float32), embeddings=emb.astype(np.float32),
                         sharpness=stats, stain=reader.stain(), classes=list(classes),
                         tile_size_l0=float(tile_size_l0),
                         meta={"seconds": total, "model_seconds": t_model, "read_seconds": reader.read_seconds})


# ----------------------------------------------------------------------------- cache


def cache_path(cache_dir: Path, slide_id: str) -> Path:
    return cache_dir / f"{slide_id}.features.h5"


def save_features(path: Path, feats: SlideFeatures, fingerprint: str, model_sha256: str, extra: dict[str, Any] | None = None) -> None:
    """Write features atomically with the cache key in the attributes."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name in ("coords", "probs", "embeddings", "sharpness"):
                f.create_dataset(name, data=getattr(feats, name))
            f.attrs["stain"] = json.dumps(feats.stain)
            f.attrs["cache_version"] = CACHE_VERSION
            f.attrs["fingerprint"] = fingerprint
            f.attrs["model_sha256"] = model_sha256
            f.attrs["classes"] = ",".join(feats.classes)
            f.attrs["tile_size_l0"] = feats.tile_size_l0
            for k, v in (extra or {}).items():
                f.attrs[k] = v


def load_features(path: Path, fingerprint: str, model_sha256: str) -> SlideFeatures | None:
    """Cached features if ``path`` exists and matches both keys; None otherwise (stale caches are ignored)."""
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if (int(f.attrs.get("cache_version", -1)) != CACHE_VERSION or f.attrs.get("fingerprint") != fingerprint
                    or f.attrs.get("model_sha256") != model_sha256):
                log.info("%s: feature cache from another slide version or model; recomputing", path)
                return None
            return SlideFeatures(
                coords=f["coords"][:], probs=f["probs"][:], embeddings=f["embeddings"][:], sharpness=f["sharpness"][:],
                stain=json.loads(str(f.attrs["stain"])), classes=str(f.attrs["classes"]).split(","),
                tile_size_l0=float(f.attrs["tile_size_l0"]), meta={"cached": True},
            )
    except (OSError, KeyError, ValueError) as exc:
        log.warning("%s: unreadable feature cache (%s); recomputing", path, exc)
        return None


def read_tiles_at(path: Path, mpp: float | None, coords: np.ndarray, plan: ReadPlan, tile_px: int) -> list[np.ndarray]:
    """Read a few tiles (e.g. the gallery's top tiles) as RGB uint8 arrays."""
    with open_slide(path, mpp=mpp) as slide:
        return [slide.read_region((int(x), int(y)), (tile_px, tile_px), plan) for x, y in coords]
