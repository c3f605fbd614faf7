"""Fine-tuning: start the patch model from an existing bundle (config ``model.init_bundle``).

The bundle's contract is checked before anything trains (:func:`check_init_bundle`: backbone and
classes must be those of the config, one line naming the field otherwise); its weights are loaded
through :func:`models.bundle.load_bundle` (safetensors, hash-checked against ``bundle.json``;
nothing is unpickled). The new bundle records where it started (:func:`init_provenance`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.bundle import BundleContract, bundle_sha256, load_bundle, read_contract
from models.errors import BundleError
from models.patch import PatchClassifier
from pipeline.core.errors import ConfigError
from pipeline.core.paths import REPO_ROOT
from pipeline.training.config import RunConfig

log = logging.getLogger(__name__)


def bundle_path(cfg: RunConfig) -> Path | None:
    """``model.init_bundle`` resolved against the repository root, or None."""
    p = cfg.model.init_bundle
    if p is None:
        return None
    return p if p.is_absolute() else REPO_ROOT / p


def check_init_bundle(cfg: RunConfig) -> BundleContract | None:
    """The start bundle's contract, checked against the config; None without ``model.init_bundle``.

    Raises:
        ConfigError: unreadable bundle, or another backbone or other classes than the config's.
    """
    path = bundle_path(cfg)
    if path is None:
        return None
    try:
        contract = read_contract(path)
    except BundleError as exc:
        raise ConfigError(f"model.init_bundle: {exc}") from None
    arch = contract.architecture
    if arch.backbone != cfg.model.backbone:
        raise ConfigError(
            f"model.init_bundle: {path} has backbone {arch.backbone!r} but model.backbone is {cfg.model.backbone!r}"
        )
    if list(arch.classes) != list(cfg.labels.classes):
        raise ConfigError(
            f"model.init_bundle: {path} has classes {list(arch.classes)} but labels.classes is {cfg.labels.classes}"
        )
    want = (cfg.tiling.target_mpp, cfg.tiling.tile_px)
    have = (contract.input.mpp, contract.input.tile_size_px)
    if want != have:
        log.warning("%s: trained on %s µm/px x %s px tiles, fine-tuned on %s x %s", path, *have, *want)
    return contract


def load_init_weights(model: PatchClassifier, cfg: RunConfig) -> None:
    """Copy the start bundle's patch weights into ``model`` (same architecture, checked).

    Raises:
        ConfigError: the bundle does not load (hash mismatch, corrupt weights) or its weights do not fit.
    """
    path = bundle_path(cfg)
    if path is None:
        return
    check_init_bundle(cfg)
    try:
        loaded = load_bundle(path)
        model.load_state_dict(loaded.model.state_dict(), strict=True)
    except (BundleError, RuntimeError) as exc:
        raise ConfigError(f"model.init_bundle: {' '.join(str(exc).split())[:300]}") from None
    log.info("fine-tuning from %s (%s %s)", path, loaded.contract.name, loaded.contract.version)


def init_provenance(cfg: RunConfig) -> dict[str, Any] | None:
    """What the new bundle records about its start: path, name, version and sha256 of the bundle."""
    path = bundle_path(cfg)
    if path is None:
        return None
    contract = read_contract(path)
    return {"path": str(path), "name": contract.name, "version": contract.version, "sha256": bundle_sha256(path)}
