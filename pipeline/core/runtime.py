"""Facts about the machine the pipeline runs on (detected at run time, never at import)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    return frozenset(_cpu_flags())


@functools.lru_cache(maxsize=1)
def cpu_description() -> str:
    """CPU model name and logical core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores)"


@functools.lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX-BF16)."""
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_int8_dot_supported() -> bool:
    """True when the CPU has VNNI int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX-INT8).

    Without them ONNX Runtime's u8 x s8 kernels add pairs of products in int16 (``vpmaddubsw``),
    which saturates for 8-bit weights: int8 models then need 7-bit weights (``reduce_range``).
    """
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & _cpu_flags())


def resolve_device(spec: str = "auto"):
    """``auto`` → the first CUDA device if present, else CPU; otherwise ``torch.device(spec)``."""
    import torch

    from pipeline.core.errors import ConfigError

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device {spec!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine")
    return dev


def resolve_precision(device, precision: str = "auto") -> str:
    """``auto`` → ``bf16`` on CUDA with bf16 or on CPUs with native bf16, else ``fp32``."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_supported() else "fp32"


def autocast_context(device, precision: str = "auto"):
    """Autocast for the chosen precision (a no-op context for fp32)."""
    import contextlib

    import torch

    p = resolve_precision(device, precision)
    if p == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@functools.cache
def _libc_function(name: str):
    """The C library's function ``name`` (None where the library or the function is missing,
    e.g. ``malloc_trim``/``mallopt`` outside glibc, ``mallinfo2`` before glibc 2.33)."""
    import ctypes.util

    try:
        lib_name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(lib_name) if lib_name else None
    except OSError:
        return None
    return getattr(lib, name, None) if lib is not None else None


def _malloc_trim():
    """glibc's ``malloc_trim`` or None."""
    return _libc_function("malloc_trim")


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel on every ``free``
    (process-wide; a no-op where the C library is not glibc). Returns whether it was applied.

    With glibc's defaults every block of 128 KiB to 32 MiB (dynamic threshold) or larger is a
    fresh ``mmap``, unmapped when freed, and freed heap tops over the trim threshold go back at
    once: every model batch then faults its activations in again (a 64-tile fp32 batch of
    MobileNetV3 allocates blocks of ~50 MB). Measured on the 2-core CPU, model alone on uint8
    batches: torch-fp32 173 → 378 tiles/s and torch-bf16 539 → 804 at batch 64, and 1.4 M →
    33 k page faults per 512 tiles. So: ``M_MMAP_MAX = 0`` (every allocation from the heaps, the
    main thread's grows with ``brk``) and automatic trimming only above 1 GiB free. Memory then
    goes back where the pipeline says so (:class:`HeapReserve`: after a slide's tissue detection
    and outputs, what exceeds the model's working memory), which keeps the RSS of a long run at
    the model's footprint plus the working set instead of the largest slide seen so far.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_MAX, ctypes.c_int(0)))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_KEEP_TRIM_THRESHOLD))) and ok
    log.debug("glibc: mmap off, trim threshold %d: %s", _KEEP_TRIM_THRESHOLD, "ok" if ok else "refused")
    return ok


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's ``mallinfo2`` returning :class:`_MallInfo2` (glibc >= 2.33; None elsewhere)."""
    fn = _libc_function("mallinfo2")
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


def heap_free_bytes() -> int | None:
    """Bytes that malloc holds free in its heaps (glibc ``mallinfo2().fordblks``); None where unknown."""
    fn = _mallinfo2()
    return int(fn().fordblks) if fn is not None else None


def release_free_memory(min_free_bytes: int = 128 << 20) -> bool:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Skipped while less than ``min_free_bytes`` is free (where glibc can say): memory given back
    is paid in page faults when it is needed again. Returns whether it trimmed. Batch inference
    uses :class:`HeapReserve`, which sets the bound from what the model needs.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    free = heap_free_bytes()
    if free is not None and free < min_free_bytes:
        return False
    trim(0)
    return True


class HeapReserve:
    """When a batch run gives freed memory back: only what exceeds the model's own working memory.

    Large temporary arrays (tissue detection, heatmaps: tens of bytes per thumbnail pixel) are
    freed into glibc's heap, which keeps them (:func:`keep_freed_memory`): the process's RSS would
    then stay at the largest slide seen so far instead of returning to the model's footprint.
    But the model's activations and tile batches are freed after every slide too, and the next
    slide needs them again at once: given back, they are faulted in again (with a fixed 128 MiB
    bound, torch-bf16 at batch 64 re-faulted ~500 pages per tile, 1.4 ms of system time per
    tile, a fifth of the CPU time on the 2-core CPU). So the bound grows to the free memory seen
    right after a model stage (:meth:`note_model_done`, with 25 % headroom; at least ``floor``
    and at most ``ceiling`` bytes: what another stage happened to free at that moment cannot
    raise it without limit), and :meth:`release` trims only above it. Thread-safe enough: the
    bound only grows.
    """

    def __init__(self, floor: int = 128 << 20, ceiling: int = _KEEP_TRIM_THRESHOLD) -> None:
        self.floor, self.ceiling = int(floor), int(ceiling)
        self.reserve = int(floor)

    def note_model_done(self) -> None:
        """Call right after the model stage of a slide: what is free now is the model's working memory."""
        free = heap_free_bytes()
        if free is not None:
            self.reserve = min(self.ceiling, max(self.reserve, int(free * 1.25)))

    def release(self) -> bool:
        """Trim the heap if more than the reserve is free; whether it trimmed."""
        return release_free_memory(min_free_bytes=self.reserve)
