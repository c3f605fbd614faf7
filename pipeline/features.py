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
import os
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


def lower_thread_priority(nice: int = 19) -> None:
    """Make the calling thread yield the CPU to the model's threads (Linux: per-thread nice value).

    When the model runs on the CPU with as many threads as cores, readers at normal priority
    pre-empt its threads and every parallel region then waits for the pre-empted one; at the
    lowest priority the readers fill the gaps the model leaves instead. (``SCHED_IDLE`` gave the
    model another ~6 % on the idle 2-core CPU, but its threads get ~0.3 % of a core against any
    busy thread: on a machine shared with other jobs the readers would starve the model.)
    No-op where unsupported.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


def runs_on_cpu(runner) -> bool:
    """True when ``runner`` (any backend's runner, see :mod:`pipeline.backends`) computes on the CPU."""
    return getattr(getattr(runner, "device", None), "type", "cpu") == "cpu"


class TileReader:
    """Reads tiles of one slide in reader threads into a bounded queue of uint8 batches.

    Horizontally adjacent tiles of a batch (the grid is in raster order) are read with one
    ``read_region`` of up to ``max_strip_tiles`` tiles and sliced (identical pixels, fewer calls);
    with ``low_priority`` (the model runs on the CPU) the reader threads run at the lowest CPU
    priority so that they use the cycles the model leaves instead of pre-empting it.

    Iterating yields ``(indices (B,), tiles uint8 (B, H, W, 3), sharpness (B,))`` in tile order;
    :meth:`stain` gives the stain statistics of all tiles read (on a regular sample of every
    ``stain_pixel_stride``-th pixel of every ``stain_pixel_stride``-th row, see
    :class:`pipeline.quality.StainAccumulator`).
    Errors in a reader thread are re-raised in the consumer.
    """

    def __init__(self, path: Path, mpp: float | None, coords: np.ndarray, plan: ReadPlan, tile_px: int,
                 batch_size: int, threads: int = 2, prefetch_batches: int = 2,
                 background_rgb: tuple[int, int, int] = (255, 255, 255), low_priority: bool = False,
                 max_strip_tiles: int = 16, stain_pixel_stride: int = 4) -> None:
        self.path, self.mpp, self.coords, self.plan, self.tile_px = path, mpp, coords, plan, tile_px
        self.low_priority = low_priority
        self.max_strip_tiles = max_strip_tiles
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, prefetch_batches))
        self._stop = threading.Event()
        self._busy = [0.0] * self.threads  # per reader thread: no shared counter to race on
        self._stain = [StainAccumulator(background_rgb, pixel_stride=stain_pixel_stride) for _ in range(self.threads)]

    @property
    def read_seconds(self) -> float:
        """Busy time of the reader threads (reading, decoding, per-tile statistics), summed over threads, s."""
        return float(sum(self._busy))

    def _work(self, worker: int, batches: list[int], slots: dict[int, Any], cond: threading.Condition) -> None:
        if self.low_priority:
            lower_thread_priority()
        try:
            with open_slide(self.path, mpp=self.mpp) as slide:
                strip_step = self._strip_step(slide)
                for b in batches:
                    if self._stop.is_set():
                        return
                    t0 = time.perf_counter()
                    idx = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, len(self.coords)))
                    tiles = self._read(slide, idx, strip_step)
                    stats = np.array([tile_sharpness(t) for t in tiles], np.float32)
                    self._stain[worker].update(tiles)
                    self._busy[worker] += time.perf_counter() - t0
                    with cond:
                        while b - self._next_out >= self.queue.maxsize * self.threads and not self._stop.is_set():
                            cond.wait(0.1)
                        slots[b] = (idx, tiles, stats)
                        cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - hand over to the consumer
            with cond:
                slots[-1 - worker] = exc
                cond.notify_all()

    def _strip_step(self, slide) -> int | None:
        """Level-0 x step between horizontally adjacent tiles that can be read as one strip, or None.

        Strips give the same pixels as tile-by-tile reads only when the level is read as is (no
        resize) at an integer downsample; otherwise every tile is read on its own.
        """
        if self.max_strip_tiles < 2 or self.plan.resized:
            return None
        ds = float(slide.reader.level_downsamples[self.plan.level])
        if abs(ds - round(ds)) > 1e-9:
            return None
        return self.tile_px * int(round(ds))

    def _read(self, slide, idx: np.ndarray, strip_step: int | None) -> np.ndarray:
        """uint8 (len(idx), tile_px, tile_px, 3) tiles ``idx``; runs of adjacent tiles in a row are read as one strip."""
        px = self.tile_px
        tiles = np.empty((len(idx), px, px, 3), np.uint8)
        xy = self.coords[idx]
        k = 0
        while k < len(idx):
            end = k + 1
            if strip_step is not None and xy[k, 0] % (strip_step // px) == 0 and xy[k, 1] % (strip_step // px) == 0:
                while (end < len(idx) and end - k < self.max_strip_tiles and xy[end, 1] == xy[k, 1]
                       and xy[end, 0] - xy[end - 1, 0] == strip_step):
                    end += 1
            x, y = int(xy[k, 0]), int(xy[k, 1])
            if end - k == 1:
                tiles[k] = slide.read_region((x, y), (px, px), self.plan)
            else:
                strip = slide.read_region((x, y), (px * (end - k), px), self.plan)
                tiles[k:end] = strip.reshape(px, end - k, px, 3).transpose(1, 0, 2, 3)
            k = end
        return tiles

    def stain(self) -> dict[str, Any]:
        """Stain statistics over every tile read so far (all reader threads merged)."""
        total = StainAccumulator(self._stain[0].background_rgb, pixel_stride=self._stain[0].pixel_stride)
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
    """Applies a loaded bundle's patch model to uint8 tile batches on a device with a precision.

    On CUDA each uint8 batch is copied into a reused pinned (page-locked) host buffer and sent
    to the GPU asynchronously; conversion to float and normalisation happen on the GPU.
    """

    def __init__(self, model: torch.nn.Module, mean, std, device: torch.device, precision: str = "auto",
                 channels_last: bool = True) -> None:
        self.model = model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean, self.std = tuple(mean), tuple(std)
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self._pinned: torch.Tensor | None = None

    def _stage(self, tiles: np.ndarray) -> torch.Tensor | np.ndarray:
        """The uint8 batch, through a pinned staging buffer when the device is a GPU.

        The buffer is reused: safe because :meth:`__call__` waits for the outputs (``.cpu()``),
        hence for the copy, before the next batch overwrites it.
        """
        if self.device.type != "cuda":
            return tiles
        t = torch.from_numpy(np.ascontiguousarray(tiles))
        if self._pinned is None or self._pinned.shape[0] < t.shape[0] or self._pinned.shape[1:] != t.shape[1:]:
            self._pinned = torch.empty(t.shape, dtype=torch.uint8).pin_memory()
        buf = self._pinned[: t.shape[0]]
        buf.copy_(t)
        return buf

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W, 3) → (probs (B, C) float32, embeddings (B, D) float32)."""
        x = to_tensor_batch(self._stage(tiles), self.mean, self.std, channels_last=self.channels_last, device=self.device)
        with autocast_context(self.device, self.precision):
            logits, emb = self._forward(x)
        return torch.sigmoid(logits.float()).cpu().numpy(), emb.float().cpu().numpy()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), embedding (B, D))`` of the normalised batch ``x`` (B, 3, H, W)."""
        return self.model.forward_with_embedding(x)


class TopTiles:
    """Pixels of the best-scoring tiles per class, kept as the tiles stream past (no second read).

    For each named column of the model's output, the ``2 * k`` highest-scoring tiles seen so far
    are kept (copies, uint8); with ties at the cut a later caller may still need one that was not
    kept (:func:`read_tiles_at` reads those). Memory: ``len(columns) * 2k`` tiles.
    """

    def __init__(self, columns: dict[str, int], k: int) -> None:
        self.columns, self.keep = dict(columns), max(1, 2 * int(k))
        self._best: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (scores, indices)
        # the kept pixels live in one block allocated once (slots reused): no long-lived tile-sized
        # blocks scattered through the memory the model's activations are freed into
        self._pool: np.ndarray | None = None
        self._slot: dict[int, int] = {}  # tile index -> slot in the pool

    def update(self, idx: np.ndarray, tiles: np.ndarray, probs: np.ndarray) -> None:
        """Offer a batch: ``idx`` (B,) tile indices, ``tiles`` (B, H, W, 3) uint8, ``probs`` (B, C)."""
        for name, col in self.columns.items():
            scores, kept = self._best.get(name, (np.zeros(0, np.float32), np.zeros(0, np.int64)))
            scores = np.concatenate([scores, probs[:, col].astype(np.float32)])
            kept = np.concatenate([kept, np.asarray(idx, np.int64)])
            order = np.argsort(-scores, kind="stable")[:self.keep]
            self._best[name] = (scores[order], kept[order])
        wanted = {int(i) for _, kept in self._best.values() for i in kept}
        self._slot = {i: s for i, s in self._slot.items() if i in wanted}
        if self._pool is None and len(tiles):
            self._pool = np.empty((len(self.columns) * self.keep, *tiles.shape[1:]), tiles.dtype)
        free = sorted(set(range(0 if self._pool is None else len(self._pool))) - set(self._slot.values()))
        for j, i in enumerate(np.asarray(idx).tolist()):
            if i in wanted and i not in self._slot:
                slot = free.pop(0)
                self._pool[slot] = tiles[j]
                self._slot[i] = slot

    def pixels(self) -> dict[int, np.ndarray]:
        """{tile index: uint8 (H, W, 3)} of every tile kept (copies)."""
        return {i: self._pool[s].copy() for i, s in self._slot.items()}


def extract_features(path: Path, mpp: float | None, coords: np.ndarray, plan: ReadPlan, tile_px: int, tile_size_l0: float,
                     runner: PatchRunner, classes: list[str], batch_size: int = 64, reader_threads: int = 2,
                     progress=None, background_rgb: tuple[int, int, int] = (255, 255, 255),
                     keep_top: TopTiles | None = None) -> SlideFeatures:
    """Stream all tiles of a slide through ``runner``. ``progress(n_done)`` is called per batch.

    ``meta`` of the result holds wall seconds: ``seconds`` (all), ``model_seconds`` (in
    ``runner``), ``wait_seconds`` (waiting for the reader threads) and ``read_seconds`` (busy
    time of the reader threads, summed over threads: mostly hidden behind the model).
    ``keep_top``, if given, is offered every batch (e.g. the report gallery's candidates).
    """
    n = len(coords)
    # outputs of the whole slide in blocks allocated once (at the first batch), filled batch by
    # batch: per-batch output arrays kept to the end would be scattered through the memory the
    # model's activations are freed into, and the heap would grow with the number of batches
    probs = emb = None
    stats = np.zeros(n, np.float32)
    t_model = 0.0
    t0 = time.perf_counter()
    t_wait = 0.0
    reader = TileReader(path, mpp, coords, plan, tile_px, batch_size, threads=reader_threads, background_rgb=background_rgb,
                        low_priority=runs_on_cpu(runner))
    batches = iter(reader)
    while True:
        t1 = time.perf_counter()
        item = next(batches, None)  # waiting here = reading/decoding not hidden behind the model
        t2 = time.perf_counter()
        t_wait += t2 - t1
        if item is None:
            break
        idx, tiles, sharp = item
        p, e = runner(tiles)
        t_model += time.perf_counter() - t2
        if keep_top is not None:
            keep_top.update(idx, tiles, p)
        if probs is None:
            probs = np.empty((n, p.shape[1]), np.float32)
            emb = np.empty((n, e.shape[1]), np.float32)
        probs[idx], emb[idx], stats[idx] = p, e, sharp
        del p, e, tiles
        if progress is not None:
            progress(len(idx))
    if probs is None:
        probs = np.zeros((0, len(classes)), np.float32)
        emb = np.zeros((0, 0), np.float32)
    if not np.isfinite(probs).all():
        raise PipelineError(f"{path}: the patch model produced non-finite outputs")
    total = time.perf_counter() - t0
    return SlideFeatures(coords=np.asarray(coords, np.int64), probs=probs.astype(np.float32), embeddings=emb.astype(np.float32),
                         sharpness=stats, stain=reader.stain(), classes=list(classes),
                         tile_size_l0=float(tile_size_l0),
                         meta={"seconds": total, "model_seconds": t_model, "wait_seconds": t_wait,
                               "read_seconds": reader.read_seconds})


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
