"""Model bundle = weights + the contract that says how to use them.

On disk a bundle is a **directory**::

    my_model/
      bundle.json         # the contract (human-readable, diffable, reviewed like code)
      model.safetensors   # every state dict, one prefix per component

Why a directory and not one file: the contract stays readable with any text tool (a
reviewer or the regulatory file can diff ``bundle.json`` without Python), safetensors keeps
only tensors, and later artefacts (model card, ONNX export) can be added beside them without
a format change. The two files are tied together by ``weights_sha256`` in ``bundle.json``,
checked on every load, so a half-written or swapped weights file is refused.

``model.safetensors`` holds the patch classifier under the ``patch.`` prefix and every
``extra_tensors`` section (e.g. ``aggregator.``) under its own name. Nothing is ever
unpickled: JSON + safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    AwareDatetime,
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from models.backbones import known_backbone
from models.errors import BundleError
from models.patch import PatchClassifier
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from models.state_io import state_dict_mismatches
from pipeline.core.config import StrictModel, validate
from pipeline.core.errors import ConfigError, MPPError
from pipeline.core.io import atomic_write_bytes, atomic_write_json
from pipeline.tiles.tiling import TilingConfig
from pipeline.tiles.tissue import TissueConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bundle format version written by this code. Version 2 added the tile grid and tissue settings to
``input`` (:class:`InputSpec`); version 1 bundles still load, with today's defaults for those
settings and a logged note."""
READABLE_FORMAT_VERSIONS = (1, 2)
CONTRACT_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
PATCH_SECTION = "patch"
"""Prefix of the patch-classifier tensors in ``model.safetensors``."""

_SECTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class ArchitectureSpec(StrictModel):
    """What :class:`~models.patch.PatchClassifier` to build before loading the weights."""

    backbone: str = Field(description="torchvision backbone name (see models.backbones.BACKBONES)")
    classes: list[str] = Field(min_length=1, description="tile classes, in logit order")
    embedding_dim: int = Field(gt=0, description="width D of the tile embedding")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the head (training only)")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        return known_backbone(v)

    @classmethod
    def of(cls, model: PatchClassifier) -> ArchitectureSpec:
        """The spec that rebuilds ``model``."""
        return cls(
            backbone=model.backbone_name,
            classes=list(model.classes),
            embedding_dim=model.embedding_dim,
            dropout=model.dropout_p,
        )


class NormalisationSpec(StrictModel):
    """Per-channel statistics on the [0, 1] scale: ``x = (rgb / 255 - mean) / std``."""

    mean: tuple[FiniteFloat, FiniteFloat, FiniteFloat] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD


class StainNormalisationSpec(StrictModel):
    """Stain normalisation applied to tiles before the model (:mod:`pipeline.patch.stain_norm`).

    Reinhard colour transfer: the CIELAB statistics of each tile's (``scope="tile"``) or the
    slide's (``scope="slide"``) tissue pixels are mapped to the target's; glass is left alone.
    CIE units: L 0-100, a and b signed (OpenCV's float LAB).
    """

    method: Literal["reinhard"] = "reinhard"
    target_lab_mean: tuple[FiniteFloat, FiniteFloat, FiniteFloat] = Field(
        description="CIELAB (L, a, b) mean of tissue pixels the tiles are mapped to"
    )
    target_lab_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        description="CIELAB (L, a, b) standard deviation of tissue pixels the tiles are mapped to"
    )
    scope: Literal["tile", "slide"] = Field("slide", description="statistics of each tile or of the whole slide")


class InputSpec(StrictModel):
    """What tiles the model expects."""

    mpp: PositiveFloat = Field(0.5, description="tile resolution in micrometres per pixel")
    mpp_tolerance: float = Field(
        0.1, ge=0.0, lt=1.0, description="allowed relative deviation |effective_mpp / mpp - 1| of a slide read"
    )
    tile_size_px: int = Field(224, gt=0, description="tile edge in pixels at `mpp`")
    normalisation: NormalisationSpec = Field(default_factory=NormalisationSpec)
    channel_order: Literal["RGB"] = "RGB"
    overlap: float = Field(0.0, ge=0.0, lt=1.0, description="fractional overlap of neighbouring tiles (0 = abutting)")
    min_tissue: float = Field(0.1, ge=0.0, le=1.0, description="minimum tissue fraction of a tile")
    tissue: TissueConfig = Field(
        default_factory=TissueConfig, description="tissue detector settings the model was trained with"
    )
    stain_normalisation: StainNormalisationSpec | None = Field(
        None, description="stain normalisation of tiles before the model; None (the default) = none"
    )

    @model_serializer(mode="wrap")
    def _omit_no_stain_normalisation(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``stain_normalisation`` out of ``bundle.json`` when it is None (unchanged contract bytes)."""
        data = handler(self)
        if data.get("stain_normalisation", 0) is None:
            del data["stain_normalisation"]
        return data

    def tiling(self) -> TilingConfig:
        """The tile grid inference must lay out to see a slide as training did."""
        return TilingConfig(
            target_mpp=self.mpp,
            mpp_tolerance=self.mpp_tolerance,
            tile_px=self.tile_size_px,
            overlap=self.overlap,
            min_tissue=self.min_tissue,
            tissue=self.tissue,
        )

    def check_mpp(self, effective_mpp: float | None, source: str = "slide", model: str = "the model") -> None:
        """Refuse tiles read at the wrong scale instead of silently resizing.

        Args:
            effective_mpp: µm/px of the pixels that will be tiled (level mpp x any downsample).
            source: what is being checked (slide path), for the message.
            model: the model's name, for the message.
        Raises:
            MPPError: ``effective_mpp`` is missing, not positive, or deviates from ``mpp`` by
                more than ``mpp_tolerance`` (relative).
        """
        want, tol = self.mpp, self.mpp_tolerance
        if effective_mpp is None or not math.isfinite(effective_mpp) or effective_mpp <= 0:
            raise MPPError(
                f"{source}: resolution unknown or invalid ({effective_mpp!r} µm/px); model {model} needs {want} µm/px"
            )
        deviation = effective_mpp / want - 1.0
        if abs(deviation) > tol + 1e-9:
            raise MPPError(
                f"{source}: read at {effective_mpp:.4g} µm/px but model {model} expects "
                f"{want:g} µm/px ± {tol:.0%} ({deviation:+.0%}); refusing to resize silently"
            )

    @classmethod
    def from_tiling(cls, tiling: TilingConfig, **kwargs: Any) -> InputSpec:
        """The input spec of a model trained on tiles laid out by ``tiling``."""
        return cls(
            mpp=tiling.target_mpp,
            mpp_tolerance=tiling.mpp_tolerance,
            tile_size_px=tiling.tile_px,
            overlap=tiling.overlap,
            min_tissue=tiling.min_tissue,
            tissue=tiling.tissue,
            **kwargs,
        )


class TrainingSpec(StrictModel):
    """Provenance of the weights."""

    config: dict[str, Any] = Field(description="the resolved training config")
    config_sha256: str = Field(description="sha256 hex of the canonical JSON of `config`")
    code_version: str = Field(description="package version and/or git commit that trained the model")
    created: AwareDatetime = Field(
        default_factory=lambda: datetime.now(UTC), description="ISO 8601 time the bundle was created (with time zone)"
    )
    metrics: dict[str, FiniteFloat] | None = Field(None, description="validation metrics, name -> value")
    init_bundle: dict[str, Any] | None = Field(
        None, description="fine-tuned from this bundle: path, name, version, sha256 (absent: trained from scratch)"
    )
    reviews: list[dict[str, Any]] | None = Field(
        None,
        description="reviewed output folders trained on: per folder its slides, reviewers, review times and label "
        "counts (absent: no reviews)",
    )

    @model_serializer(mode="wrap")
    def _omit_unset_provenance(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``init_bundle`` / ``reviews`` out of ``bundle.json`` when None (unchanged contract bytes)."""
        data = handler(self)
        for key in ("init_bundle", "reviews"):
            if data.get(key, 0) is None:
                del data[key]
        return data

    @classmethod
    def from_config(
        cls, config: BaseModel | Mapping[str, Any], code_version: str, metrics: Mapping[str, float] | None = None
    ) -> TrainingSpec:
        """Record a resolved config (pydantic model or plain dict) and its hash.

        ``config_sha256`` hashes ``json.dumps(config, sort_keys=True)``, the same canonical form
        as :func:`pipeline.core.config.config_hash`, whose 16-digit value is its prefix.
        """
        data = config.model_dump(mode="json") if isinstance(config, BaseModel) else json.loads(json.dumps(dict(config)))
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        return cls(
            config=data,
            config_sha256=digest,
            code_version=code_version,
            metrics=dict(metrics) if metrics is not None else None,
        )


class AggregatorSpec(StrictModel):
    """Slide aggregator to rebuild at inference (filled by the training code)."""

    type: str = Field(description="aggregator kind, e.g. 'gated_attention', 'mean', 'max', 'pattern_stats'")
    params: dict[str, Any] = Field(default_factory=dict, description="constructor arguments / JSON parameters")
    weights: str | None = Field(None, description="section of model.safetensors with its state dict, if any")


class BundleContract(StrictModel):
    """Everything inference must know and check besides the weights (``bundle.json``)."""

    format_version: int = Field(FORMAT_VERSION, description="bundle format version")
    name: str = Field(min_length=1, description="model name")
    version: str = Field(min_length=1, description="model version")
    label: str = Field(description="intended-use label shown with every result, e.g. the demo disclaimer")
    architecture: ArchitectureSpec
    input: InputSpec = Field(default_factory=InputSpec)
    thresholds: dict[str, Probability] = Field(description="tile probability threshold per class (every class)")
    training: TrainingSpec
    aggregator: AggregatorSpec | None = None
    calibration: dict[str, Any] | None = Field(None, description="slide-probability calibration parameters")
    bands: dict[str, Any] | None = Field(None, description="probability bands for reporting")
    weights_sha256: str | None = Field(None, description="sha256 of model.safetensors; written by save_bundle")

    @field_validator("format_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"format_version {v} not supported (this code reads {READABLE_FORMAT_VERSIONS})")
        return v

    @model_validator(mode="after")
    def _thresholds_cover_classes(self) -> BundleContract:
        classes = self.architecture.classes
        missing = [c for c in classes if c not in self.thresholds]
        extra = [c for c in self.thresholds if c not in classes]
        if missing or extra:
            raise ValueError(f"thresholds must name exactly the classes {classes}; missing {missing}, unknown {extra}")
        return self

    def check_mpp(self, effective_mpp: float | None, source: str = "slide") -> None:
        """:meth:`InputSpec.check_mpp` with this model's name in the message."""
        self.input.check_mpp(effective_mpp, source=source, model=self.name)


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle read back by :func:`load_bundle`.

    Attributes:
        path: the bundle directory.
        contract: the validated ``bundle.json``.
        model: patch classifier with its weights, in ``eval()`` mode, on the requested device.
        extra: every non-patch section of ``model.safetensors``: ``{section: state_dict}``,
            tensors on the requested device (e.g. ``extra["aggregator"]``).
        sha256: :func:`bundle_sha256` of the bundle, for provenance.
        weights_sha256: sha256 of ``model.safetensors`` as read (verified against the contract's
            ``weights_sha256`` when that is present): the key for anything derived from the weights.
    """

    path: Path
    contract: BundleContract
    model: PatchClassifier
    extra: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    sha256: str = ""
    weights_sha256: str = ""


def bundle_sha256(directory: str | Path) -> str:
    """Provenance hash of a bundle: sha256 over ``bundle.json`` then ``model.safetensors``.

    Each file contributes ``name + NUL + 8-byte little-endian length + bytes``, so the value
    changes if either file changes. Returns 64 hex digits.
    """
    d = Path(directory)
    h = hashlib.sha256()
    for name in (CONTRACT_FILE, WEIGHTS_FILE):
        p = d / name
        if not p.is_file():
            raise BundleError(f"{d}: not a model bundle ({name} missing)")
        h.update(name.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _flatten(
    model: PatchClassifier, extra_tensors: Mapping[str, Mapping[str, Tensor]] | None, directory: Path
) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    sections: dict[str, Mapping[str, Tensor]] = {PATCH_SECTION: model.state_dict()}
    for name, sd in (extra_tensors or {}).items():
        if not isinstance(name, str) or not _SECTION_RE.match(name) or name == PATCH_SECTION:
            raise BundleError(
                f"{directory}: extra_tensors section name {name!r} must match "
                f"[A-Za-z][A-Za-z0-9_]* and not be {PATCH_SECTION!r}"
            )
        sections[name] = sd
    for name, sd in sections.items():
        for key, value in sd.items():
            if not isinstance(value, Tensor):
                raise BundleError(f"{directory}: {name}.{key} is {type(value).__name__}, not a tensor")
            t = value.detach().to("cpu").clone().contiguous()
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise BundleError(f"{directory}: {name}.{key} contains NaN/inf; refusing to save diverged weights")
            tensors[f"{name}.{key}"] = t
    return tensors


def save_bundle(
    directory: str | Path,
    model: PatchClassifier,
    contract: BundleContract,
    extra_tensors: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> str:
    """Write ``model`` + ``contract`` (+ optional extra state dicts) as a bundle directory.

    Args:
        directory: bundle directory (created; existing bundle files are replaced atomically,
            weights first, so an interrupted save leaves a bundle that fails its hash check).
        model: the trained patch classifier (any device).
        contract: its contract; ``architecture`` must describe ``model`` (use
            :meth:`ArchitectureSpec.of`). ``weights_sha256`` is filled in here.
        extra_tensors: further state dicts by section name (e.g. ``{"aggregator":
            agg.state_dict()}``), stored under ``<section>.`` prefixes.
    Returns:
        :func:`bundle_sha256` of the written bundle.
    Raises:
        BundleError: architecture mismatch, bad section name, non-tensor or non-finite values.
    """
    d = Path(directory)
    actual = ArchitectureSpec.of(model)
    if contract.architecture != actual:
        raise BundleError(
            f"{d}: contract architecture {contract.architecture.model_dump()} does not describe "
            f"the model {actual.model_dump()}"
        )
    sections = set(extra_tensors or {})
    if contract.aggregator is not None and contract.aggregator.weights and contract.aggregator.weights not in sections:
        raise BundleError(
            f"{d}: aggregator.weights names section {contract.aggregator.weights!r} "
            f"but extra_tensors has {sorted(sections)}"
        )
    blob = st_save(
        _flatten(model, extra_tensors, d), metadata={"format": "pt", "bundle_format_version": str(FORMAT_VERSION)}
    )
    final = contract.model_copy(
        update={"weights_sha256": hashlib.sha256(blob).hexdigest(), "format_version": FORMAT_VERSION}
    )
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / WEIGHTS_FILE, blob)
    atomic_write_json(d / CONTRACT_FILE, final.model_dump(mode="json"))
    digest = bundle_sha256(d)
    log.info(
        "saved bundle %s (%s %s, %d bytes of weights, sha256 %s)",
        d,
        contract.name,
        contract.version,
        len(blob),
        digest[:16],
    )
    return digest


def read_contract(directory: str | Path) -> BundleContract:
    """Read and validate ``bundle.json`` only (no weights); cheap, for checks before loading.

    Raises:
        BundleError: missing directory/file, invalid JSON, unsupported ``format_version``,
            or a contract that does not validate; one line naming the file.
    """
    return _read_contract(Path(directory))[0]


def _read_contract(d: Path) -> tuple[BundleContract, bytes]:
    if not d.is_dir():
        raise BundleError(f"{d}: model bundle directory not found")
    path = d / CONTRACT_FILE
    if not path.is_file():
        raise BundleError(f"{d}: not a model bundle ({CONTRACT_FILE} missing)")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BundleError(f"{path}:{where} invalid JSON") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: top level must be an object, got {type(data).__name__}")
    if data.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise BundleError(
            f"{path}: format_version {data.get('format_version')!r} not supported "
            f"(this code reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
        )
    if data["format_version"] == 1:
        log.info(
            "%s: bundle format 1 records no tile grid or tissue settings; using today's defaults "
            "(re-save the bundle to record them)",
            path,
        )
    try:
        return validate(BundleContract, data, str(path)), raw
    except ConfigError as exc:
        raise BundleError(str(exc)) from None


def _framed_sha256(files: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in files:
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def load_bundle(directory: str | Path, device: torch.device | str = "cpu") -> LoadedBundle:
    """Load a bundle: validated contract, patch classifier with weights, raw extra state dicts.

    The weights file is read once, hashed (checked against ``weights_sha256``) and parsed
    with safetensors; nothing is unpickled.

    Args:
        directory: bundle directory written by :func:`save_bundle`.
        device: where to put the model and the extra tensors (``"cpu"``, ``"cuda:0"``, ...).
    Raises:
        BundleError: missing files, wrong format version, hash mismatch, unreadable weights,
            or weights that do not match the architecture; one line naming the file.
    """
    d = Path(directory)
    contract, contract_raw = _read_contract(d)
    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        raise BundleError(f"{d}: not a model bundle ({WEIGHTS_FILE} missing)")
    blob = wpath.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if contract.weights_sha256 is None:
        log.warning("%s: bundle.json has no weights_sha256; weights integrity not verified", d)
    elif digest != contract.weights_sha256:
        raise BundleError(
            f"{wpath}: sha256 {digest[:16]}... does not match weights_sha256 "
            f"{contract.weights_sha256[:16]}... in {CONTRACT_FILE} (file changed or swapped)"
        )
    try:
        flat = st_load(blob)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise BundleError(
            f"{wpath}: not a valid safetensors file ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from None
    sections: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        section, sep, rest = key.partition(".")
        if not sep or not rest:
            raise BundleError(f"{wpath}: tensor {key!r} has no '<section>.' prefix")
        sections.setdefault(section, {})[rest] = value
    patch_sd = sections.pop(PATCH_SECTION, None)
    if patch_sd is None:
        raise BundleError(f"{wpath}: no '{PATCH_SECTION}.' tensors (patch classifier weights missing)")
    arch = contract.architecture
    model = PatchClassifier(arch.backbone, arch.classes, arch.dropout)
    if model.embedding_dim != arch.embedding_dim:
        raise BundleError(
            f"{d / CONTRACT_FILE}: architecture.embedding_dim {arch.embedding_dim} but backbone "
            f"{arch.backbone!r} gives {model.embedding_dim}"
        )
    problems = state_dict_mismatches(model.state_dict(), patch_sd)
    if problems:
        raise BundleError(
            f"{wpath}: weights do not match architecture {arch.backbone!r} with "
            f"{len(arch.classes)} classes in {CONTRACT_FILE}: {'; '.join(problems)}"
        )
    agg = contract.aggregator
    if agg is not None and agg.weights and agg.weights not in sections:
        raise BundleError(f"{wpath}: aggregator weights section {agg.weights!r} missing (sections: {sorted(sections)})")
    model.load_state_dict(patch_sd, strict=True)
    model.to(device).eval()
    extra = {name: {k: v.to(device) for k, v in sd.items()} for name, sd in sections.items()}
    bundle_digest = _framed_sha256([(CONTRACT_FILE, contract_raw), (WEIGHTS_FILE, blob)])  # as bundle_sha256
    log.info("loaded bundle %s (%s %s, backbone %s) on %s", d, contract.name, contract.version, arch.backbone, device)
    return LoadedBundle(
        path=d, contract=contract, model=model, extra=extra, sha256=bundle_digest, weights_sha256=digest
    )
