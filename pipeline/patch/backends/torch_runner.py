"""PyTorch backends: ``torch-fp32`` (eager fp32, the reference), ``torch-bf16`` (channels_last +
autocast) and ``torch-bf16-compile`` (the same model compiled by ``torch.compile``).

``torch-bf16`` runs bf16 autocast on CPUs with native bf16 (AVX-512 BF16 / AMX) and on CUDA
GPUs that support bf16 (fp16 autocast on older GPUs), with every batch norm folded into the
convolution before it (inference only: the running statistics are constants). On CUDA the uint8
batch goes through a pinned staging buffer and is normalised on the GPU
(:class:`PatchRunner`).

``torch-bf16-compile`` compiles that model with TorchInductor (weights frozen into the graph as
constants) for one batch shape, once per process: 4-6 s with a warm Inductor cache, 30-40 s cold on
the 2-core CPU, and it needs a C++ compiler (CPU) or Triton (CUDA). So ``auto`` never picks it; it
pays off on long runs (see README, "Inference backends").
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.preprocess import to_tensor_batch
from pipeline.core.errors import ConfigError
from pipeline.core.runtime import autocast_context, cpu_bf16_supported, resolve_precision

if TYPE_CHECKING:
    from models.patch import PatchClassifier

log = logging.getLogger(__name__)

BF16_UNAVAILABLE = (
    "backend torch-bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX-BF16); use --backend torch-fp32 or onnx-fp32"
)
COMPILED = "torch-bf16-compile"


class PatchRunner:
    """Applies a loaded bundle's patch model to uint8 tile batches on a device with a precision.

    On CUDA each uint8 batch is copied into a reused pinned (page-locked) host buffer and sent
    to the GPU asynchronously; conversion to float and normalisation happen on the GPU.
    """

    def __init__(
        self,
        model: PatchClassifier,
        mean,
        std,
        device: torch.device,
        precision: str = "auto",
        channels_last: bool = True,
    ) -> None:
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
        x = to_tensor_batch(
            self._stage(tiles), self.mean, self.std, channels_last=self.channels_last, device=self.device
        )
        with autocast_context(self.device, self.precision):
            logits, emb = self._forward(x)
        return torch.sigmoid(logits.float()).cpu().numpy(), emb.float().cpu().numpy()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), embedding (B, D))`` of the normalised batch ``x`` (B, 3, H, W)."""
        return self.model.forward_with_embedding(x)


def bf16_available(device: torch.device) -> bool:
    """True when ``torch-bf16`` can run natively on ``device`` (reduced-precision autocast)."""
    return device.type == "cuda" or cpu_bf16_supported()


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (eval mode) with each BatchNorm2d folded into the Conv2d that feeds only it.

    Uses ``torch.fx`` to find the conv → batch-norm pairs in the traced graph, so the data flow
    decides, not the order in which submodules were registered. The same function in eval mode;
    on the 2-core CPU MobileNetV3-small in bf16 went from ~830 to ~1000 tiles/s (batch norm was a
    quarter of its time). A module fx cannot trace comes back unchanged (logged).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module.eval())
    except Exception as exc:  # noqa: BLE001 - tracing is best effort; the unfused module is correct
        log.warning("batch norm not folded (%s: %s); the model runs unfused", type(exc).__name__, exc)
        return module


def cxx_compiler() -> str | None:
    """Path of a C++ compiler for TorchInductor's CPU kernels (``$CXX``, ``g++``, ``c++`` or ``clang++``), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch-bf16-compile`` cannot run on ``device`` (one line), or None.

    TorchInductor generates C++ (CPU, built with ``$CXX`` or ``g++``/``c++``/``clang++``) or Triton
    (CUDA) kernels; without the tool it fails at the first batch, so this is checked up front.
    """
    if not bf16_available(device):
        return BF16_UNAVAILABLE.replace("torch-bf16", COMPILED, 1)
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return f"backend {COMPILED} on CUDA needs the triton package; use --backend torch-bf16"
        return None
    if cxx_compiler() is None:
        return f"backend {COMPILED} needs a C++ compiler (g++ or clang++ on PATH, or $CXX); use --backend torch-bf16"
    return None


class CompiledPatchRunner(PatchRunner):
    """:class:`PatchRunner` whose full batches run a ``torch.compile``-d forward pass.

    The graph is compiled for one batch shape ``(batch_size, 3, tile_px, tile_px)`` with static
    shapes and frozen weights (Inductor ``freezing``: weights become constants, convolutions get
    pre-packed weights), at construction, by a warm-up call on a zero batch, so that a compile
    failure is a one-line error before any slide and its seconds are not a slide's. Batches of
    another size (each slide's last) run the same folded model eagerly: recompiling for every
    remainder size would cost seconds each.
    """

    def __init__(
        self, model: PatchClassifier, mean, std, device: torch.device, precision: str, batch_size: int, tile_px: int
    ) -> None:
        super().__init__(model, mean, std, device, precision, channels_last=True)
        import numpy as np

        self.batch_size = int(batch_size)
        self._compiled = torch.compile(self.model.forward_with_embedding, dynamic=False, options={"freezing": True})
        t0 = time.perf_counter()
        try:
            self(np.zeros((self.batch_size, tile_px, tile_px, 3), dtype=np.uint8))
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure becomes one line
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ConfigError(
                f"backend {COMPILED}: torch.compile failed ({type(exc).__name__}: {first}); use --backend torch-bf16"
            ) from exc
        self.compile_seconds = time.perf_counter() - t0
        log.info("%s: compiled for batches of %d in %.1f s", COMPILED, self.batch_size, self.compile_seconds)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] == self.batch_size:
            return self._compiled(x)
        return self.model.forward_with_embedding(x)


def make_torch_runner(
    bundle, device: torch.device, backend: str, precision: str = "auto", batch_size: int = 32
) -> PatchRunner:
    """A :class:`PatchRunner` over a private copy of ``bundle.model`` for a torch backend.

    Args:
        bundle: a :class:`models.bundle.LoadedBundle`; its model is copied, never modified.
        device: where to run.
        backend: ``torch-fp32``, ``torch-bf16`` or ``torch-bf16-compile``.
        precision: ``auto`` (bf16 where supported, fp16 on CUDA without bf16) or an explicit
            ``bf16``/``fp16`` for the bf16 backends; ignored for ``torch-fp32``.
        batch_size: tiles per model call; ``torch-bf16-compile`` compiles for this batch size.
    Raises:
        ConfigError: a bf16 backend on a CPU without native bf16; ``torch-bf16-compile`` without
            its compiler, or when compiling fails.
    """
    norm = bundle.contract.input.normalisation
    if backend not in ("torch-fp32", "torch-bf16", COMPILED):
        raise ConfigError(f"not a torch backend: {backend!r}")
    model = copy.deepcopy(bundle.model)
    if backend == "torch-fp32":
        return PatchRunner(model, norm.mean, norm.std, device, "fp32", channels_last=False)
    why = compile_unavailable_reason(device) if backend == COMPILED else None
    if why or not bf16_available(device):
        raise ConfigError(why or BF16_UNAVAILABLE)
    prec = resolve_precision(device, precision)
    if prec == "fp32":
        prec = "bf16"
    model.backbone = fold_batchnorm(model.backbone)
    if backend == COMPILED:
        return CompiledPatchRunner(
            model, norm.mean, norm.std, device, prec, batch_size, bundle.contract.input.tile_size_px
        )
    return PatchRunner(model, norm.mean, norm.std, device, prec, channels_last=True)
