"""Inference backends for the patch model, chosen by flag/config (never by environment at import).

* ``torch-fp32``: eager fp32, contiguous memory: the reference every other backend is checked against.
* ``torch-bf16``: channels_last + bf16 autocast (CPUs with native bf16, CUDA; fp16 on CUDA GPUs
  without bf16).
* ``torch-bf16-compile``: that model compiled by ``torch.compile`` (TorchInductor, frozen weights)
  once per process; never chosen by ``auto`` (seconds to compile, needs a C++ compiler or Triton).
* ``onnx-fp32``: the model exported to ONNX, run by ONNX Runtime (CPU, or CUDA when onnxruntime has it).
* ``onnx-int8``: that export statically quantised to int8 (QDQ, per-channel), calibrated on tiles.
* ``auto``: the fastest backend allowed for this bundle on this hardware (:func:`resolve_backend`).

Every runner takes uint8 tiles ``(B, H, W, 3)`` (numpy) and returns ``(probs (B, C) float32,
embeddings (B, D) float32)``, normalising with the bundle contract's mean/std, and has a
``device`` attribute. Modules: :mod:`.torch_runner`, :mod:`.onnx_runner`, :mod:`.int8`,
:mod:`.record` (the agreement record), :mod:`.cache`, :mod:`.agreement` (the check, a CLI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.core.errors import ConfigError
from pipeline.patch.backends.record import has_entries_for, record_for, verdict

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

REFERENCE = "torch-fp32"
CONCRETE_BACKENDS = ("torch-fp32", "torch-bf16", "torch-bf16-compile", "onnx-fp32", "onnx-int8")
BACKENDS = ("auto", *CONCRETE_BACKENDS)
BACKEND_HELP = (
    "auto (fastest backend that passed the agreement check for this bundle; without a record "
    "torch-bf16 on bf16 hardware, else torch-fp32) | torch-fp32 (reference) | torch-bf16 "
    "(channels_last + bf16 autocast) | torch-bf16-compile (torch-bf16 compiled by torch.compile at start-up, "
    "for long runs; never chosen by auto) | onnx-fp32 (ONNX Runtime) | onnx-int8 (ONNX Runtime, static int8)"
)

#: ``auto`` tries these in order (fastest first) and takes the first the agreement record allows.
PREFERENCE = {"cpu": ("onnx-int8", "torch-bf16", "onnx-fp32"), "cuda": ("torch-bf16", "onnx-fp32")}


#: Tiles per model batch when none is given, by device type. On the 2-core CPU, batches of 64
#: made the peak RSS of a slide 4x larger in area 8-19 % above that of a small slide (the heap
#: that the model's larger activations are freed into fragments with the number of batches),
#: 32 kept it at 4-8 % for ~10 % less throughput with torch-bf16 (ONNX Runtime: the same speed).
#: GPUs keep the earlier default (not measured here: no GPU was lent).
DEFAULT_BATCH_SIZE = {"cpu": 32, "cuda": 64}


def default_batch_size(device) -> int:
    """:data:`DEFAULT_BATCH_SIZE` for ``device`` (a ``torch.device``); 32 for other device types."""
    return DEFAULT_BATCH_SIZE.get(getattr(device, "type", "cpu"), 32)


class Runner(Protocol):
    """What the pipeline needs from a backend."""

    device: torch.device

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Resolution:
    """The backend a request resolved to, and why."""

    backend: str
    reason: str


def check_backend_name(backend: str) -> None:
    """One-line ConfigError for a name that is not in :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run here (one line), or None when it can."""
    from pipeline.patch.backends.onnx_runner import onnxruntime_available
    from pipeline.patch.backends.torch_runner import (
        BF16_UNAVAILABLE,
        COMPILED,
        bf16_available,
        compile_unavailable_reason,
    )

    if backend == "torch-bf16" and not bf16_available(device):
        return BF16_UNAVAILABLE
    if backend == COMPILED:
        return compile_unavailable_reason(device)
    if backend.startswith("onnx") and not onnxruntime_available():
        return (
            f"backend {backend} needs onnxruntime and onnx: pip install -e '.[onnx]' "
            "(or choose --backend torch-fp32 / torch-bf16)"
        )
    return None


def resolve_backend(bundle, device: torch.device, backend: str = "auto", precision: str = "auto") -> Resolution:
    """Turn a requested backend (maybe ``auto``) into a concrete one for ``bundle`` on ``device``.

    ``auto``: with an agreement record for this bundle's weights that has entries for this
    device type, the first backend of :data:`PREFERENCE` that can run here and passed (same
    runtime version), else ``torch-fp32``. Without such a record: ``torch-bf16`` where the
    hardware has bf16 (logged as unverified), else ``torch-fp32``. ``precision="fp32"`` forces
    ``torch-fp32``.

    An explicit backend is always used if it can run here (a warning when the record says it
    failed). Raises ConfigError (one line) for an unknown name or a backend that cannot run here.
    """
    check_backend_name(backend)
    record = record_for(Path(bundle.path), bundle.weights_sha256)
    dtype = device.type if device.type in PREFERENCE else "cpu"
    if backend != "auto":
        why = unavailable_reason(backend, device)
        if why:
            raise ConfigError(why)
        if backend != REFERENCE:
            v = verdict(record, backend, dtype)
            if v.passed is False:
                log.warning("using %s as requested, although %s", backend, v.detail)
            elif v.passed is None:
                log.info("%s: not verified against torch-fp32 for this bundle (%s)", backend, v.detail)
        return Resolution(backend, "requested")
    if precision == "fp32":
        return Resolution(REFERENCE, "precision fp32 requested")
    if has_entries_for(record, dtype):
        allowed = []
        for cand in PREFERENCE[dtype]:
            if unavailable_reason(cand, device):
                continue
            v = verdict(record, cand, dtype)
            if v.passed:
                allowed.append((cand, v))
            else:
                log.info("auto: not %s (%s)", cand, v.detail)
        if not allowed:
            return Resolution(REFERENCE, "no faster backend passed the agreement check for this bundle")
        speeds = measured_speeds(record, device)
        if speeds:  # the record was measured on this machine: fastest measured first
            allowed.sort(key=lambda cv: -speeds.get(cv[0], 0.0))
        cand, v = allowed[0]
        return Resolution(
            cand, v.detail + (f"; fastest here ({speeds.get(cand, 0):.0f} tiles/s measured)" if speeds else "")
        )
    from pipeline.core.runtime import resolve_precision

    if unavailable_reason("torch-bf16", device) is None and resolve_precision(device, precision) in ("bf16", "fp16"):
        log.warning(
            "backend auto -> torch-bf16: unverified for this bundle (no agreement record for its weights on %s; "
            "run python -m pipeline.evaluation.agreement --write)",
            dtype,
        )
        return Resolution("torch-bf16", "bf16 hardware, no agreement record (unverified)")
    return Resolution(REFERENCE, "no bf16 hardware and no agreement record")


def measured_speeds(record: dict | None, device: torch.device) -> dict[str, float]:
    """Model tiles/s per backend from ``record`` when it was measured on this machine (same CPU/GPU), else {}."""
    from pipeline.patch.backends.record import machine_id

    if not record:
        return {}
    here = machine_id(device)
    return {
        name: float(e["model_tiles_per_s"])
        for name, e in record["backends"].items()
        if isinstance(e, dict) and e.get("machine_id") == here and isinstance(e.get("model_tiles_per_s"), (int, float))
    }


def make_runner(
    bundle,
    device: torch.device,
    precision: str = "auto",
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> tuple[Runner, str]:
    """A runner for ``bundle``'s patch model; returns (runner, resolved backend name).

    Args:
        bundle: a :class:`models.bundle.LoadedBundle` (its model is copied, never modified).
        device: where to run (``torch.device``).
        precision: ``auto`` or an explicit autocast precision for ``torch-bf16``.
        backend: a name of :data:`BACKENDS`.
        cache_dir: where ONNX exports and int8 models are cached (default
            :func:`pipeline.patch.backends.cache.default_cache_dir`).
        batch_size: tiles per call the caller will use (``torch-bf16-compile`` compiles for it;
            default: :func:`default_batch_size` of ``device``).
    Raises:
        ConfigError: unknown backend, onnxruntime missing, bf16 requested on a CPU without bf16,
            ``torch-bf16-compile`` without its compiler or failing to compile.
    """
    res = resolve_backend(bundle, device, backend, precision)
    name = res.backend
    if name in ("torch-fp32", "torch-bf16", "torch-bf16-compile"):
        from pipeline.patch.backends.torch_runner import make_torch_runner

        if batch_size is None:
            batch_size = default_batch_size(device)
        runner: Runner = make_torch_runner(bundle, device, name, precision, batch_size)
    elif name == "onnx-fp32":
        from pipeline.patch.backends.onnx_runner import OnnxRunner, ensure_fp32_onnx

        runner = OnnxRunner(ensure_fp32_onnx(bundle, cache_dir), device)
    else:
        from pipeline.patch.backends.int8 import ensure_int8_onnx
        from pipeline.patch.backends.onnx_runner import OnnxRunner

        runner = OnnxRunner(ensure_int8_onnx(bundle, cache_dir), device)
    log.info("patch model backend: %s on %s (%s)", name, runner.device, res.reason)
    return runner, name


__all__ = [
    "BACKENDS",
    "BACKEND_HELP",
    "CONCRETE_BACKENDS",
    "PREFERENCE",
    "REFERENCE",
    "Resolution",
    "Runner",
    "check_backend_name",
    "make_runner",
    "resolve_backend",
    "unavailable_reason",
]
