"""Facts about the machine the pipeline runs on (detected at run time, never at import)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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


def resolve_device(spec: str = "auto"):
    """``auto`` → the first CUDA device if present, else CPU; otherwise ``torch.device(spec)``."""
    import torch

    from pipeline.errors import ConfigError

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


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None where the C library has none, e.g. macOS or musl)."""
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(lib, "malloc_trim", None) if lib is not None else None


def return_large_blocks_to_os(threshold: int = 16 << 20) -> None:
    """Serve allocations of ``threshold`` bytes or more (thumbnail-sized arrays of large slides)
    with their own ``mmap``, unmapped when freed (glibc ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere).

    glibc otherwise raises that threshold after the first large block is freed (up to 32 MiB)
    and keeps later blocks of that size in its heaps, so the RSS of a long inference run keeps
    the high-water mark of its largest slide. Blocks below the threshold (a 64-tile uint8 batch
    is 9.6 MB, tile strips a few MB) are reused from the heap: every fresh ``mmap`` is paid in
    page faults, and at 1 MiB that was 0.7 s of system time per 600 tiles (~10 % of the
    throughput) on the 2-core CPU. Freed heap memory goes back after each stage
    (:func:`release_free_memory`).
    """
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return
    mallopt = getattr(lib, "mallopt", None) if lib is not None else None
    if mallopt is not None:
        mallopt(-3, ctypes.c_int(int(threshold)))  # M_MMAP_THRESHOLD


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's ``mallinfo2`` (glibc >= 2.33; None elsewhere)."""
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        fn = getattr(ctypes.CDLL(name), "mallinfo2", None) if name else None
    except OSError:
        return None
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


def heap_free_bytes() -> int | None:
    """Bytes that malloc holds free in its heaps (glibc ``mallinfo2().fordblks``); None where unknown."""
    fn = _mallinfo2()
    return int(fn().fordblks) if fn is not None else None


def release_free_memory(min_free_bytes: int = 128 << 20) -> bool:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Large temporary arrays (tissue detection, heatmaps: tens of bytes per thumbnail pixel) are
    freed into glibc's heap, which otherwise keeps them: the process's RSS would then grow with
    the largest slide seen so far instead of returning to the model's footprint between slides.
    Trimming is skipped while less than ``min_free_bytes`` is free (where glibc can say): memory
    given back is paid in page faults when the next slide needs it again, and trimming after
    every stage cost ~0.2 s of system time per 600 tiles (~10 % of the throughput) on the
    2-core CPU. With 128 MiB a batch of small slides mostly keeps its ~100 MiB of working memory
    for the next slide and large slides still give theirs back. Returns whether it trimmed.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    free = heap_free_bytes()
    if free is not None and free < min_free_bytes:
        return False
    trim(0)
    return True
