"""Read a slide's tiles in background threads into a bounded queue of uint8 batches.

Each reader thread has its own slide handle (OpenSlide decodes without the GIL); per-tile
statistics the quality gate needs (sharpness, stain) are computed here, hidden behind the model.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.reading.slide import ReadPlan, open_slide
from pipeline.tiles.measurements import StainAccumulator, tile_sharpness


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


class TileReader:
    """Reads tiles of one slide in reader threads into a bounded queue of uint8 batches.

    Horizontally adjacent tiles of a batch (the grid is in raster order) are read with one
    ``read_region`` of up to ``max_strip_tiles`` tiles and sliced (identical pixels, fewer calls);
    with ``low_priority`` (the model runs on the CPU) the reader threads run at the lowest CPU
    priority so that they use the cycles the model leaves instead of pre-empting it.

    Iterating yields ``(indices (B,), tiles uint8 (B, H, W, 3), sharpness (B,))`` in tile order;
    :meth:`stain` gives the stain statistics of all tiles read (on a regular sample of every
    ``stain_pixel_stride``-th pixel of every ``stain_pixel_stride``-th row, see
    :class:`pipeline.slide_model.quality.StainAccumulator`).
    Errors in a reader thread are re-raised in the consumer.
    """

    def __init__(
        self,
        path: Path,
        mpp: float | None,
        coords: np.ndarray,
        plan: ReadPlan,
        tile_px: int,
        batch_size: int,
        threads: int = 2,
        prefetch_batches: int = 2,
        background_rgb: tuple[int, int, int] = (255, 255, 255),
        low_priority: bool = False,
        max_strip_tiles: int = 16,
        stain_pixel_stride: int = 4,
    ) -> None:
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
                while (
                    end < len(idx)
                    and end - k < self.max_strip_tiles
                    and xy[end, 1] == xy[k, 1]
                    and xy[end, 0] - xy[end - 1, 0] == strip_step
                ):
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
        workers = [
            threading.Thread(target=self._work, args=(w, a, slots, cond), daemon=True)
            for w, a in enumerate(assignments)
        ]
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


def read_tiles_at(path: Path, mpp: float | None, coords: np.ndarray, plan: ReadPlan, tile_px: int) -> list[np.ndarray]:
    """Read a few tiles (e.g. the gallery's top tiles) as RGB uint8 arrays."""
    with open_slide(path, mpp=mpp) as slide:
        return [slide.read_region((int(x), int(y)), (tile_px, tile_px), plan) for x, y in coords]
