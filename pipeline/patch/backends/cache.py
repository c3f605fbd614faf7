"""On-disk cache of derived model files (ONNX exports, int8 models, calibration slides).

Location: ``cache_dir`` when given, else ``$NME_PIPELINE_CACHE`` (read when called, never at
import), else ``$XDG_CACHE_HOME/nme-pipeline``, else ``~/.cache/nme-pipeline``. Entries are named
by what they were derived from (bundle weights sha256, backend, runtime versions, ...) so a new
bundle or runtime never reuses a stale file. Every file is written atomically; nothing is ever
downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "NME_PIPELINE_CACHE"


def default_cache_dir() -> Path:
    """The cache root (see module docstring); not created here."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nme-pipeline"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` or :func:`default_cache_dir`, created if missing."""
    d = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_key(parts: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``parts`` (what a cached file depends on)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
