"""Keep glibc from returning every large temporary array to the kernel while rendering.

The renderer makes many short-lived float32 arrays of a few MB. With glibc's defaults each of
them is a fresh ``mmap`` whose pages fault in on first touch and are unmapped on free, which
costs about a third of the rendering time in kernel work. :func:`reuse_freed_memory` raises
the mmap and trim thresholds for the duration of a ``with`` block (freed blocks stay in the
heap and are reused), then restores glibc's defaults and trims the heap. Elsewhere than glibc
(macOS, musl) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024
_LOCK = threading.Lock()
_DEPTH = 0


def _libc() -> ctypes.CDLL | None:
    try:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        if lib is None or not hasattr(lib, "mallopt") or not hasattr(lib, "malloc_trim"):
            return None
        return lib
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory(threshold: int = 32 << 20) -> Iterator[None]:
    """Within the block, allocations below ``threshold`` bytes (at most 32 MiB, glibc's cap on
    64-bit) come from the heap, and freed memory is kept for reuse."""
    global _DEPTH
    lib = _libc()
    if lib is None:
        yield
        return
    with _LOCK:
        _DEPTH += 1
        if _DEPTH == 1:
            ok = lib.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))
            lib.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(1 << 30))
            log.debug("mallopt mmap threshold %d: %s", threshold, "ok" if ok else "refused")
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                lib.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_DEFAULT_THRESHOLD))
                lib.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_DEFAULT_THRESHOLD))
                lib.malloc_trim(ctypes.c_size_t(0))
