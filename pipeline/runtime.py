"""Facts about the machine the pipeline runs on (detected at run time, never at import)."""

from __future__ import annotations

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
