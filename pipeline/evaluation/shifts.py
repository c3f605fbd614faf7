"""Acquisition shifts for the robustness table: what another lab's stain, scanner or camera does to a tile.

Each shift is a deterministic function of a uint8 RGB tile batch ``(B, H, W, 3)`` (the same
batch always gives the same output), applied between the tile reader and the patch model by
:class:`ShiftedRunner`. The resolution shift is not a tile transform: it is measured on slides
written at 0.25 µm/px (a 40x scan), which the pipeline reads down to the model's 0.5 µm/px.

* ``stain``: stronger haematoxylin, weaker eosin and a blue cast (HED concentrations scaled
  1.25 / 0.8, DAB-channel offset), a different lab's staining protocol;
* ``blur``: Gaussian blur, sigma 1.2 px at 0.5 µm/px (0.6 µm; a slightly out-of-focus scan);
* ``jpeg``: JPEG re-compression at quality 40 (a heavily compressed export);
* ``camera``: a microscope-camera photo: warm white balance (R x1.08, B x0.88), gamma 1.25 and
  reduced contrast.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from pipeline.patch.backends import Runner
from pipeline.training.augment import hed_to_rgb, rgb_to_hed

TileShift = Callable[[np.ndarray], np.ndarray]


def _stain(tiles: np.ndarray) -> np.ndarray:
    hed = rgb_to_hed(tiles)
    hed *= np.array([1.25, 0.8, 1.0], np.float32)
    hed[..., 2] += 0.03
    return hed_to_rgb(hed)


def _blur(tiles: np.ndarray) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(t, (0, 0), 1.2) for t in tiles])


def _jpeg(tiles: np.ndarray) -> np.ndarray:
    out = np.empty_like(tiles)
    for i, t in enumerate(tiles):
        ok, buf = cv2.imencode(".jpg", t[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 40])
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        if decoded is None:  # pragma: no cover - OpenCV failure
            raise RuntimeError("JPEG round trip failed")
        out[i] = decoded[..., ::-1]
    return out


def _camera(tiles: np.ndarray) -> np.ndarray:
    x = tiles.astype(np.float32) / 255.0
    x = x * np.array([1.08, 1.0, 0.88], np.float32)
    x = np.clip(x, 0.0, 1.0) ** 1.25
    x = 0.5 + (x - 0.5) * 0.85
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


SHIFTS: dict[str, TileShift | None] = {"none": None, "stain": _stain, "blur": _blur, "jpeg": _jpeg, "camera": _camera}
#: shifts measured on slides written at 0.25 µm/px instead of a tile transform
RESOLUTION_SHIFTS = ("scan_0.25um",)


class ShiftedRunner:
    """A patch-model runner that sees every batch through ``shift`` (same interface as the runner)."""

    def __init__(self, runner: Runner, shift: TileShift) -> None:
        self.runner, self.shift = runner, shift
        self.device = runner.device

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.runner(self.shift(np.ascontiguousarray(tiles)))
