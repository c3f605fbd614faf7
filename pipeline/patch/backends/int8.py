"""``onnx-int8``: static int8 quantisation of the ONNX export, calibrated on real tiles read from slides.

ONNX Runtime ``quantize_static`` in QDQ format, per-channel int8 weights, uint8 activations
(U8S8, the fast path of ONNX Runtime on x86), MinMax calibration. The normalisation nodes in
front of the first convolution stay float (their output is quantised at that convolution's input
anyway).

Calibration tiles: by default (:data:`DEFAULT_CALIBRATION`) 192 tiles drawn with a fixed seed
from the tissue tiles of 4 synthetic slides (NME, normal, psoriasiform, spongiotic; 2000x1500 µm)
generated once into the cache (:func:`pipeline.synthetic.generate_dataset` with a fixed seed), so
the int8 model is the same on every machine with the same runtime versions and can be checked
once for agreement; the set's id is part of the int8 cache key. Tiles are
read exactly as inference reads them (tissue mask, grid, read plan at the bundle's µm/px).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.io import atomic_path
from pipeline.core.runtime import cpu_int8_dot_supported
from pipeline.patch.backends.cache import resolve_cache_dir
from pipeline.patch.backends.onnx_runner import INPUT_NAME, cached_path, ensure_fp32_onnx, import_onnxruntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSet:
    """The default calibration tiles: synthetic slides made with a fixed seed, tiles drawn with it."""

    seed: int = 8081
    n_slides: int = 4
    classes: tuple[str, ...] = ("nme", "normal", "psoriasiform", "spongiotic")
    size_um: tuple[float, float] = (2000.0, 1500.0)
    n_tiles: int = 192
    version: int = 1

    @property
    def id(self) -> str:
        """Names this set in the int8 cache key (a different set is a different int8 model)."""
        w, h = self.size_um
        return f"synthetic-s{self.seed}-n{self.n_slides}-{w:g}x{h:g}-{'+'.join(self.classes)}-k{self.n_tiles}-v{self.version}"


DEFAULT_CALIBRATION = CalibrationSet()
CALIBRATION_BATCH = 16


def default_calibration_slides(
    cache_dir: str | Path | None = None, mpp: float = 0.5, spec: CalibrationSet | None = None
) -> list[Path]:
    """The calibration slides of ``spec`` (default :data:`DEFAULT_CALIBRATION`), generated into the cache on first use."""
    from pipeline.synthetic import generate_dataset

    spec = spec or DEFAULT_CALIBRATION
    root = resolve_cache_dir(cache_dir) / "calibration" / f"{spec.id}-mpp{mpp:g}"
    if not (root / "labels.csv").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.seed}.", dir=root.parent))
        try:
            log.info("generating %d synthetic calibration slides into %s", spec.n_slides, root)
            generate_dataset(
                tmp,
                n=spec.n_slides,
                seed=spec.seed,
                mpp=mpp,
                classes=list(spec.classes),
                size_um=spec.size_um,
                overwrite=True,
            )
            try:
                os.replace(tmp, root)
            except OSError:  # another process finished first
                if not (root / "labels.csv").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted((root / "slides").glob("*.tiff"))


def calibration_tiles(slides: Sequence[Path], tiling, n_tiles: int, seed: int, mpp: float | None = None) -> np.ndarray:
    """Up to ``n_tiles`` tissue tiles, uint8 ``(K, H, W, 3)``, spread evenly over ``slides``.

    Tiles are drawn without replacement with ``numpy.random.default_rng(seed)`` from each slide's
    tile grid (the same tissue mask and grid as inference) and read in grid order.
    """
    from pipeline.reading.slide import open_slide
    from pipeline.tiles.tiling import tile_slide

    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    per_slide = max(1, -(-n_tiles // max(1, len(slides))))
    for path in slides:
        with open_slide(path, mpp=mpp) as slide:
            grid, _, _, _ = tile_slide(slide, tiling)
            if not len(grid):
                continue
            pick = np.sort(rng.choice(len(grid), size=min(per_slide, len(grid)), replace=False))
            for x, y in grid.coords[pick]:
                out.append(slide.read_region((int(x), int(y)), (grid.tile_px, grid.tile_px), grid.plan))
    if not out:
        raise ValueError("no tissue tiles in the calibration slides")
    return np.stack(out[:n_tiles])


class TileCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over uint8 tiles ``(K, H, W, 3)`` in batches."""

    def __init__(self, tiles: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self.tiles, self.batch_size = tiles, batch_size
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.tiles), self.batch_size):
            yield {INPUT_NAME: np.ascontiguousarray(self.tiles[i : i + self.batch_size])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        assert self._it is not None
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def _nodes_before_first_conv(model_path: Path) -> list[str]:
    """Names of the nodes in front of the first Conv (the normalisation), kept in float."""
    import onnx

    names = []
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type == "Conv":
            break
        names.append(node.name)
    return names


def quantise_int8(fp32_path: Path, target: Path, tiles: np.ndarray, reduce_range: bool = False) -> Path:
    """Static int8 quantisation of ``fp32_path`` calibrated on ``tiles``; written atomically to ``target``.

    ``reduce_range``: 7-bit weights, for CPUs without VNNI (:func:`pipeline.core.runtime.cpu_int8_dot_supported`),
    where 8-bit weights saturate ONNX Runtime's int16 accumulation (measured on a 2-core AVX2 EPYC:
    largest tile-probability difference to fp32 0.27 with 8-bit weights).
    """
    import_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="nme-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        with atomic_path(target, suffix=".onnx") as out:
            quantize_static(
                str(pre),
                str(out),
                TileCalibrationReader(tiles),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=_nodes_before_first_conv(pre),
                reduce_range=reduce_range,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
    log.info("quantised %s to int8 (%d calibration tiles): %s", fp32_path.name, len(tiles), target)
    return target


def ensure_int8_onnx(bundle, cache_dir: str | Path | None = None, spec: CalibrationSet | None = None) -> Path:
    """The cached int8 model of ``bundle`` calibrated on ``spec`` (default :data:`DEFAULT_CALIBRATION`), made on first use."""
    spec = spec or DEFAULT_CALIBRATION
    reduce_range = not cpu_int8_dot_supported()
    path = cached_path(
        bundle, "onnx-int8", cache_dir, {"calibration": spec.id, **({"reduce_range": True} if reduce_range else {})}
    )
    if path.is_file():
        log.debug("using cached int8 model %s", path)
        return path
    fp32 = ensure_fp32_onnx(bundle, cache_dir)
    inp = bundle.contract.input
    slides = default_calibration_slides(cache_dir, mpp=inp.mpp, spec=spec)
    tiles = calibration_tiles(slides, inp.tiling(), n_tiles=spec.n_tiles, seed=spec.seed)  # the bundle's own tile grid
    return quantise_int8(fp32, path, tiles, reduce_range=reduce_range)
