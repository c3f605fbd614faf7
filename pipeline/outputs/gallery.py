"""The report gallery's candidate tiles: pixels of the best-scoring tiles per class, kept while streaming."""

from __future__ import annotations

import numpy as np


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
            order = np.argsort(-scores, kind="stable")[: self.keep]
            self._best[name] = (scores[order], kept[order])
        wanted = {int(i) for _, kept in self._best.values() for i in kept}
        self._slot = {i: s for i, s in self._slot.items() if i in wanted}
        if self._pool is None and len(tiles):
            self._pool = np.empty((len(self.columns) * self.keep, *tiles.shape[1:]), tiles.dtype)
        free = sorted(set(range(0 if self._pool is None else len(self._pool))) - set(self._slot.values()))
        for j, i in enumerate(np.asarray(idx).tolist()):
            if i in wanted and i not in self._slot:
                assert self._pool is not None  # allocated above: this batch has tiles
                slot = free.pop(0)
                self._pool[slot] = tiles[j]
                self._slot[i] = slot

    def pixels(self) -> dict[int, np.ndarray]:
        """{tile index: uint8 (H, W, 3)} of every tile kept (copies)."""
        if self._pool is None:  # nothing offered yet: no slots either
            return {}
        return {i: self._pool[s].copy() for i, s in self._slot.items()}
