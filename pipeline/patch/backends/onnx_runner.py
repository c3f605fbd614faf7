"""ONNX Runtime backends: export of the patch model and a runner with PatchRunner's interface.

The exported graph takes the tiles as they come from the reader, uint8 ``(B, H, W, 3)`` RGB,
and does the bundle's normalisation itself (``x * 1/(255 std) - mean/std``, then NHWC→NCHW), so
tiles stay uint8 until they reach the execution provider. Outputs: ``logits (B, C)`` and
``embedding (B, D)`` float32; the runner applies the sigmoid. Batch is the only dynamic axis.

Exports are cached (:mod:`pipeline.patch.backends.cache`) under a key of the bundle weights sha256,
normalisation, tile size, backend, exporter version, torch and onnxruntime versions.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_path
from pipeline.patch.backends.cache import cache_key, resolve_cache_dir

if TYPE_CHECKING:
    from models.patch import PatchClassifier

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
"""Bump when the exported graph changes (invalidates cached exports)."""
OPSET = 17
INPUT_NAME = "tiles"
OUTPUT_NAMES = ("logits", "embedding")
ALLOW_SPINNING = False
"""Whether ONNX Runtime's idle worker threads spin: off, because between two batches the cores
belong to the tile readers (a spinning worker would take the core they need)."""


def import_onnxruntime():
    """``onnxruntime``, or a one-line ConfigError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "the ONNX backends need onnxruntime and onnx: pip install -e '.[onnx]' "
            "(or choose --backend torch-fp32 / torch-bf16)"
        ) from None
    return onnxruntime


def onnxruntime_available() -> bool:
    """True when onnxruntime and onnx can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _UInt8Model(nn.Module):
    """uint8 NHWC tiles → (logits, embedding) of a patch classifier, normalisation included."""

    # buffers registered in __init__, declared for the type checker (nn.Module.__getattr__ returns Tensor | Module)
    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: PatchClassifier, mean, std) -> None:
        super().__init__()
        self.model = model
        # the same folded arithmetic as models.preprocess.to_tensor_batch
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32))
        self.register_buffer("shift", torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32))

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (tiles.to(torch.float32) * self.scale - self.shift).permute(0, 3, 1, 2)
        return self.model.forward_with_embedding(x)


def export_key(bundle, backend: str, extra: dict[str, Any] | None = None) -> str:
    """Cache key of a derived ONNX file for ``bundle`` (see module docstring)."""
    import onnxruntime

    norm = bundle.contract.input.normalisation
    parts = {
        "weights_sha256": bundle.weights_sha256,
        "mean": list(norm.mean),
        "std": list(norm.std),
        "tile_px": bundle.contract.input.tile_size_px,
        "backend": backend,
        "export_version": EXPORT_VERSION,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        **(extra or {}),
    }
    return cache_key(parts)


def cached_path(bundle, backend: str, cache_dir: str | Path | None, extra: dict[str, Any] | None = None) -> Path:
    """Where the cached ONNX file for ``bundle`` + ``backend`` lives (may not exist yet)."""
    import onnxruntime

    root = resolve_cache_dir(cache_dir) / "onnx"
    name = (
        f"{bundle.weights_sha256[:16]}-{backend}-ort{onnxruntime.__version__}-{export_key(bundle, backend, extra)}.onnx"
    )
    return root / name


def export_onnx(bundle, target: Path) -> Path:
    """Export ``bundle``'s patch model (uint8 input, see module docstring) to ``target`` atomically.

    Uses the TorchScript-based exporter (``dynamo=False``: no onnxscript needed, a fraction of a
    second); falls back to the torch.export-based exporter if that one is unavailable. The
    bundle's model is copied, never modified.
    """
    inp = bundle.contract.input
    norm = inp.normalisation
    wrapper = _UInt8Model(copy.deepcopy(bundle.model).cpu().float().eval(), norm.mean, norm.std).eval()
    example = torch.zeros((2, inp.tile_size_px, inp.tile_size_px, 3), dtype=torch.uint8)
    with atomic_path(target, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=OPSET,
                do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUT_NAMES}},
            )
        except (TypeError, RuntimeError, ImportError, NotImplementedError) as exc:
            log.info("TorchScript ONNX exporter unavailable (%s); using the torch.export-based one", exc)
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=OPSET,
                dynamic_shapes={"tiles": {0: batch}},
                external_data=False,
            )
    _stamp(
        target,
        {
            "nme.bundle_weights_sha256": bundle.weights_sha256,
            "nme.export_version": str(EXPORT_VERSION),
            "nme.torch": torch.__version__,
        },
    )
    log.info("exported %s to ONNX: %s", bundle.contract.name, target)
    return target


def _stamp(path: Path, meta: dict[str, str]) -> None:
    """Add provenance ``metadata_props`` to an ONNX file (rewritten atomically)."""
    import onnx

    model = onnx.load(str(path))
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))


def ensure_fp32_onnx(bundle, cache_dir: str | Path | None = None) -> Path:
    """The cached fp32 ONNX export of ``bundle``, exported on first use."""
    path = cached_path(bundle, "onnx-fp32", cache_dir)
    if path.is_file():
        log.debug("using cached ONNX export %s", path)
        return path
    return export_onnx(bundle, path)


class OnnxRunner:
    """Runs an exported patch model with ONNX Runtime; same call interface as :class:`pipeline.patch.features.PatchRunner`.

    Args:
        model_path: ONNX file from :func:`export_onnx` (or its int8 quantisation).
        device: ``cpu`` uses CPUExecutionProvider; ``cuda[:N]`` uses CUDAExecutionProvider when
            onnxruntime has it (else CPU, with a warning).
        threads: intra-op threads (default: ``torch.get_num_threads()``, so both backends use the
            same number of cores).
    """

    def __init__(
        self, model_path: Path, device: torch.device, threads: int | None = None, spinning: bool = ALLOW_SPINNING
    ) -> None:
        ort = import_onnxruntime()
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        providers: list[Any] = ["CPUExecutionProvider"]
        self.device = torch.device("cpu")
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
                self.device = device
            else:
                log.warning(
                    "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); running ONNX on the CPU"
                )
        self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        self.model_path = Path(model_path)
        self.providers = self.session.get_providers()

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W, 3) → (probs (B, C) float32, embeddings (B, D) float32)."""
        x = np.ascontiguousarray(tiles)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 tiles (B, H, W, 3), got {x.dtype} {x.shape}")
        logits, emb = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        probs = torch.sigmoid(torch.from_numpy(np.asarray(logits, np.float32))).numpy()
        return probs, np.asarray(emb, np.float32)
