"""The one definition of a slide's ``result.json``: :class:`SlideResult`.

Every status (``ok``, ``non_diagnostic``, ``failed``) and both batch engines write this model;
everything that reads a result (resume checks, the rule layer, FHIR, the report, the summary and
index, ``python -m pipeline.clinical.rules``) reads it through this model. Its JSON Schema is
printed by ``python -m pipeline schema result`` (a copy is kept in ``docs/result.schema.json``).

Units: ``mpp.*`` in µm/px; ``dimensions_level0`` in level-0 pixels (width, height);
``tissue.area_mm2`` in mm²; ``timings`` in seconds (dotted names are sub-stages, not added into
the total); probabilities in [0, 1].

Versions: ``schema_version`` is :data:`SCHEMA_VERSION`. A ``result.json`` without it was written
before the schema existed (same fields): it is read as version 1 when it validates, otherwise
:func:`read_result` raises :class:`ResultFormatError`, whose message says to re-run with
``--force``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_text

SCHEMA_VERSION: Final = 1
RESULT_FILE = "result.json"

Status = Literal["ok", "non_diagnostic", "failed"]
Band = Literal["LOW", "INDETERMINATE", "HIGH"]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class ResultFormatError(DataError):
    """A ``result.json`` that cannot be read as a :class:`SlideResult` (one line, names the file)."""


class _Part(BaseModel):
    """A part of the result: unknown keys are refused (a typo is an error, not a silent extra)."""

    model_config = ConfigDict(extra="forbid")


class ResultModel(_Part):
    """The model bundle and backend that produced the result."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    sha256: str | None = None
    label: str | None = Field(None, description="intended-use label, e.g. the demo model's disclaimer")
    backbone: str | None = None
    aggregator: str | None = None
    backend: str | None = Field(None, description="patch-model backend that ran (pipeline.patch.backends)")
    batch_size: int | None = Field(None, description="tiles per model call")

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class ResultMPP(_Part):
    """Resolutions, µm/px."""

    slide: float | None = Field(None, description="the slide's level-0 µm/px (file metadata or --mpp)")
    requested: float | None = Field(None, description="the model's input µm/px (bundle contract)")
    effective: float | None = Field(None, description="µm/px the tiles were read at")
    source: str | None = Field(None, description="where the slide µm/px came from")
    read_level: int | None = Field(None, description="pyramid level the tiles were read from")


class TissueSummary(_Part):
    """The tissue mask: share of the slide, area, detector flags."""

    fraction: float = Field(ge=0.0, le=1.0)
    area_mm2: float = Field(ge=0.0)
    flags: list[str] = Field(default_factory=list)


class QualitySummary(_Part):
    """The quality gate's flags (machine), reasons (one sentence each) and measurements."""

    flags: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    metrics: dict[str, float | int | None] = Field(default_factory=dict)


class PatternScores(_Part):
    """Slide-level pattern scores in [0, 1]."""

    pallor: Probability
    necrolysis: Probability
    parakeratosis: Probability


class Code(_Part):
    system: str
    code: str
    display: str


class Order(_Part):
    """A proposed order (decision support: a clinician confirms it)."""

    id: str
    display: str
    category: str
    priority: Literal["routine", "urgent"]
    code: Code
    code_verified: bool = True
    additional_codes: list[Code] = Field(default_factory=list)
    rules: list[str] = Field(default_factory=list)
    rationale: list[str] = Field(default_factory=list)
    evidence: list[str] = Field(default_factory=list)
    note: str | None = None


class DifferentialEntry(_Part):
    id: str
    name: str
    why: list[str] = Field(default_factory=list)
    rules: list[str] = Field(default_factory=list)


class RuleFlag(_Part):
    id: str
    message: str
    rules: list[str] = Field(default_factory=list)


class Recommendations(_Part):
    """The rule layer's output for the slide (:func:`pipeline.clinical.rules.recommend`).

    ``error`` is set (and everything else empty) when the rules could not be applied.
    """

    slide_id: str | None = None
    patient_id: str | None = None
    status: Status | None = None
    ruleset_version: str | None = None
    band: Band | None = None
    band_source: str | None = None
    model_band: Band | None = None
    nme_probability: Probability | None = None
    patterns: dict[str, float] | None = None
    glucagon_uln_pg_ml: float | None = None
    glucagon_uln_source: str | None = None
    rules_fired: list[str] = Field(default_factory=list)
    orders: list[Order] = Field(default_factory=list)
    differential: list[DifferentialEntry] = Field(default_factory=list)
    flags: list[RuleFlag] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    clinical_context: dict[str, Any] = Field(default_factory=dict)
    evidence: dict[str, str] = Field(default_factory=dict)
    disclaimer: str | None = None
    error: str | None = None


class ProducedBy(_Part):
    """Which engine, host and process wrote the result."""

    engine: Literal["local", "ray"] = "local"
    host: str | None = None
    pid: int | None = None
    node_id: str | None = Field(None, description="Ray node id (ray engine)")


class SlideResult(_Part):
    """One slide's result: ``OUT/<slide_id>/result.json``.

    ``status``: ``ok`` (the model judged the slide: probability, band and patterns are set),
    ``non_diagnostic`` (the quality gate refused it: see ``quality``; no probability) or
    ``failed`` (``error`` says why in one line; the batch went on).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    slide_id: str = Field(min_length=1)
    slide_path: str | None = None
    patient_id: str | None = None
    status: Status
    error: str | None = None
    nme_probability: Probability | None = Field(None, description="calibrated slide NME-pattern probability")
    nme_logit: float | None = Field(None, description="aggregator score before calibration")
    band: Band | None = None
    patterns: PatternScores | None = Field(None, description="slide pattern scores (status ok only)")
    patterns_tile_max: dict[str, float] | None = Field(
        None, description="highest tile probability per pattern (non-diagnostic slides with tiles)"
    )
    calibration_note: str | None = None
    n_tiles: int = Field(0, ge=0)
    mpp: ResultMPP = Field(default_factory=ResultMPP)
    reader: str | None = Field(None, description="which reader opened the slide")
    dimensions_level0: tuple[int, int] | None = Field(None, description="(width, height) in level-0 px")
    fingerprint: str | None = Field(None, description="content fingerprint of the slide (cache key)")
    tissue: TissueSummary | None = None
    quality: QualitySummary = Field(default_factory=QualitySummary)
    recommendations: Recommendations | None = None
    model: ResultModel | None = None
    heatmap_mpp: float | None = Field(None, description="µm/px of the heatmap images and the report thumbnail")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")
    versions: dict[str, str] = Field(default_factory=dict, description="package versions")
    produced_by: ProducedBy | None = None
    created_at: str | None = Field(None, description="ISO 8601 time (UTC) the result was made")
    files: list[str] = Field(default_factory=list, description="files in the slide's folder that belong to this result")

    @field_validator("nme_probability", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("patient_id", mode="before")
    @classmethod
    def _pid(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v or None

    @model_validator(mode="after")
    def _complete(self) -> SlideResult:
        if self.status == "ok":
            if self.nme_probability is None and self.band is None:
                raise ValueError("status 'ok' needs nme_probability or band (both are null)")
            if self.patterns is None:
                raise ValueError("status 'ok' needs patterns {pallor, necrolysis, parakeratosis}")
        return self

    # -- JSON ---------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """The JSON form written to ``result.json`` (every field, nulls included)."""
        return self.model_dump(mode="json")

    def write(self, slide_dir: Path) -> Path:
        """Write ``slide_dir/result.json`` atomically; returns its path."""
        path = Path(slide_dir) / RESULT_FILE
        atomic_write_text(path, json.dumps(self.to_json_dict(), indent=2, allow_nan=False))
        return path

    def describe(self) -> str:
        """One log line: status with probability and band, or the reason."""
        if self.nme_probability is not None:
            return f"{self.status} p={self.nme_probability:.3f} {self.band}"
        return f"{self.status} ({self.error or '; '.join(self.quality.reasons)})"

    @property
    def done(self) -> bool:
        """Finished (``ok`` or ``non_diagnostic``): resume skips it when its files are complete."""
        return self.status in ("ok", "non_diagnostic")


def result_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``result.json``."""
    schema = SlideResult.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "NME-pattern slide result (result.json)"
    return schema


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"missing field {loc!r}"
    if err["type"] == "extra_forbidden":
        return f"unknown field {loc!r}"
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"{loc}: {msg}{shown}"


def parse_result(data: Any, source: str = "result") -> SlideResult:
    """Validate a result object (parsed JSON); a :class:`ResultFormatError` names the bad field.

    A result without ``schema_version`` (written before the schema existed) is read as version 1.
    """
    if isinstance(data, SlideResult):
        return data
    if not isinstance(data, dict):
        raise ResultFormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
    sid = data.get("slide_id")
    if isinstance(sid, str) and sid:
        source = f"{source} (slide {sid})"
    for key in ("slide_id", "status"):
        if key not in data:
            raise ResultFormatError(f"{source}: missing field {key!r}")
    if data.get("status") == "ok":
        for key in ("nme_probability", "band", "patterns"):
            if key not in data:
                raise ResultFormatError(f"{source}: missing field {key!r} (required when status is 'ok')")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ResultFormatError(
            f"{source}: schema_version {version!r} is not one this version reads "
            f"({SCHEMA_VERSION}); re-run the slide with --force"
        )
    try:
        return SlideResult.model_validate({**data, "schema_version": SCHEMA_VERSION})
    except ValidationError as exc:
        raise ResultFormatError(f"{source}: {_first_error(exc)}") from None


def read_result(slide_dir: Path) -> SlideResult:
    """``slide_dir/result.json`` as a :class:`SlideResult`.

    Raises:
        ResultFormatError: the file is missing, not JSON, or not a result this version reads (the
            message names the file and says to re-run with ``--force``).
    """
    path = Path(slide_dir) / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultFormatError(f"{path}: no result (not processed yet)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultFormatError(
            f"{path}: unreadable result ({' '.join(str(exc).split())}); it is redone on the next run"
        ) from None
    try:
        return parse_result(data, source=str(path))
    except ResultFormatError as exc:
        raise ResultFormatError(
            f"{exc}; written by another version of the pipeline? re-run with --force to redo this slide"
        ) from None


def read_result_or_none(slide_dir: Path) -> SlideResult | None:
    """:func:`read_result`, or None when there is no readable result."""
    try:
        return read_result(slide_dir)
    except ResultFormatError:
        return None
