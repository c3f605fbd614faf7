"""On-disk cache of a slide's patch-model outputs: ``<cache_dir>/<slide_id>.features.h5``.

Keyed by slide fingerprint + model sha256 (+ :data:`CACHE_VERSION`); reused when all match,
rewritten atomically otherwise; stale or unreadable caches are ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_path
from pipeline.patch.features import SlideFeatures

log = logging.getLogger(__name__)

CACHE_VERSION = 2


def cache_path(cache_dir: Path, slide_id: str) -> Path:
    return cache_dir / f"{slide_id}.features.h5"


def save_features(
    path: Path, feats: SlideFeatures, fingerprint: str, model_sha256: str, extra: dict[str, Any] | None = None
) -> None:
    """Write features atomically with the cache key in the attributes."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name in ("coords", "probs", "embeddings", "sharpness"):
            f.create_dataset(name, data=getattr(feats, name))
        f.attrs["stain"] = json.dumps(feats.stain)
        f.attrs["cache_version"] = CACHE_VERSION
        f.attrs["fingerprint"] = fingerprint
        f.attrs["model_sha256"] = model_sha256
        f.attrs["classes"] = ",".join(feats.classes)
        f.attrs["tile_size_l0"] = feats.tile_size_l0
        for k, v in (extra or {}).items():
            f.attrs[k] = v


def load_features(path: Path, fingerprint: str, model_sha256: str) -> SlideFeatures | None:
    """Cached features if ``path`` exists and matches both keys; None otherwise (stale caches are ignored)."""
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if (
                int(f.attrs.get("cache_version", -1)) != CACHE_VERSION
                or f.attrs.get("fingerprint") != fingerprint
                or f.attrs.get("model_sha256") != model_sha256
            ):
                log.info("%s: feature cache from another slide version or model; recomputing", path)
                return None
            return SlideFeatures(
                coords=f["coords"][:],
                probs=f["probs"][:],
                embeddings=f["embeddings"][:],
                sharpness=f["sharpness"][:],
                stain=json.loads(str(f.attrs["stain"])),
                classes=str(f.attrs["classes"]).split(","),
                tile_size_l0=float(f.attrs["tile_size_l0"]),
                meta={"cached": True},
            )
    except (OSError, KeyError, ValueError) as exc:
        log.warning("%s: unreadable feature cache (%s); recomputing", path, exc)
        return None
