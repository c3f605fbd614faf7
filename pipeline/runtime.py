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
