"""Clinical context per slide or per patient: the model, and loading from CSV or JSON.

Every field is optional; unknown is ``None`` and is never read as "no". Input formats:

* CSV with a header containing ``slide_id`` and/or ``patient_id``; empty cells are unknown.
* JSON: a list of objects (each with ``slide_id`` and/or ``patient_id``), or a mapping keyed by
  slide id (``{"S1": {...}}``); a value that carries ``"patient_id"`` equal to its key and no
  ``slide_id`` is a patient-level entry.

Booleans accept true/false/yes/no/1/0 (any case; JSON booleans too), ``hcv`` is
positive/negative/unknown, numbers are non-negative and finite. A bad value, an unknown column,
a duplicate id or a row for a slide that is not in the batch is a one-line
:class:`~pipeline.core.errors.DataError` naming the file, the row, the field and the value.

Lookup (:meth:`ClinicalTable.lookup`) takes the slide's row and the patient's row and merges
them: slide-level values win, patient-level values fill the unknowns.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError, field_validator, model_validator

from pipeline.clinical.rules.facts import BOOL_FIELDS, HCV_VALUES, NUMBER_FIELDS, PRIOR_IMAGING, SITES
from pipeline.core.config import StrictModel
from pipeline.core.errors import DataError

log = logging.getLogger(__name__)

_TRUE = {"true", "yes", "1", "y"}
_FALSE = {"false", "no", "0", "n"}
_UNKNOWN = {"", "unknown", "na", "n/a"}


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in _UNKNOWN)


class ClinicalContext(StrictModel):
    """Clinical facts for one slide (or one patient); every field optional, None = unknown."""

    slide_id: str | None = None
    patient_id: str | None = None
    site: str | None = None
    diabetes: bool | None = None
    weight_loss: bool | None = None
    liver_disease: bool | None = None
    ibd: bool | None = None
    celiac: bool | None = None
    pancreatitis: bool | None = None
    tpn: bool | None = None
    alcohol: bool | None = None
    men1_history: bool | None = None
    pancreatic_mass: bool | None = None
    hcv: str | None = None
    zinc_ug_dl: float | None = None
    glucagon_pg_ml: float | None = None
    glucagon_uln_pg_ml: float | None = None
    albumin_g_dl: float | None = None
    prior_imaging: str | None = None

    @field_validator("slide_id", "patient_id", mode="before")
    @classmethod
    def _ident(cls, v: Any) -> str | None:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"must be a string id (got {v!r})")
        return str(v).strip()

    @field_validator(*BOOL_FIELDS, mode="before")
    @classmethod
    def _boolean(cls, v: Any) -> bool | None:
        if isinstance(v, bool):
            return v
        if _blank(v):
            return None
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str):
            s = v.strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
        raise ValueError(f"must be true/false/yes/no/1/0 or empty (got {v!r})")

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _number(cls, v: Any) -> float | None:
        if _blank(v):
            return None
        if isinstance(v, bool):
            raise ValueError(f"must be a number (got {v!r})")
        try:
            x = float(v.strip()) if isinstance(v, str) else float(v)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number (got {v!r})") from None
        if not math.isfinite(x):
            raise ValueError(f"must be a finite number (got {v!r})")
        if x < 0:
            raise ValueError(f"must not be negative (got {v!r})")
        return x

    @field_validator("site", mode="before")
    @classmethod
    def _site(cls, v: Any) -> str | None:
        return _choice(v, SITES, aliases={"sun-exposed": "sun_exposed"})

    @field_validator("hcv", mode="before")
    @classmethod
    def _hcv(cls, v: Any) -> str | None:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return _choice(v, HCV_VALUES)

    @field_validator("prior_imaging", mode="before")
    @classmethod
    def _prior(cls, v: Any) -> str | None:
        return _choice(v, PRIOR_IMAGING, aliases={"liver-lesions": "liver_lesions"})

    @model_validator(mode="after")
    def _uln_positive(self) -> ClinicalContext:
        if self.glucagon_uln_pg_ml is not None and self.glucagon_uln_pg_ml == 0:
            raise ValueError("glucagon_uln_pg_ml must be above 0 (got 0)")
        return self

    def merged_over(self, base: ClinicalContext | None) -> ClinicalContext:
        """This context's known values, with ``base`` filling what is unknown here."""
        if base is None:
            return self
        mine = self.model_dump()
        theirs = base.model_dump()
        return ClinicalContext(**{k: (mine[k] if mine[k] is not None else theirs[k]) for k in mine})

    def known(self) -> dict[str, Any]:
        """The known fields (ids excluded), for echoing in the recommendation."""
        return {k: v for k, v in self.model_dump().items() if v is not None and k not in ("slide_id", "patient_id")}


def _choice(v: Any, allowed: tuple[str, ...], aliases: dict[str, str] | None = None) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if not isinstance(v, str):
        raise ValueError(f"must be one of {', '.join(allowed)} (got {v!r})")
    s = v.strip().lower()
    s = (aliases or {}).get(s, s)
    if s not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)} (got {v!r})")
    return s


FIELDS: tuple[str, ...] = tuple(ClinicalContext.model_fields)


def _one_line(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(row)"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown field {loc!r}; allowed: {', '.join(FIELDS)}"
    if "(got " not in msg and not isinstance(err.get("input"), dict):
        msg += f" (got {err.get('input')!r})"
    return f"{source}: {loc}: {msg}"


def parse_context(data: Any, source: str = "clinical context") -> ClinicalContext:
    """Validate one mapping into a :class:`ClinicalContext`; DataError naming the field and value."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected an object of clinical fields, got {type(data).__name__}")
    try:
        return ClinicalContext.model_validate(data)
    except ValidationError as exc:
        raise DataError(_one_line(source, exc)) from None


@dataclass
class ClinicalTable:
    """Clinical contexts keyed by slide id and by patient id."""

    source: str = "clinical context"
    by_slide: dict[str, ClinicalContext] = field(default_factory=dict)
    by_patient: dict[str, ClinicalContext] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.by_slide) + len(self.by_patient)

    def add(self, ctx: ClinicalContext, where: str) -> None:
        """Add a row: slide-level when it has a slide_id, else patient-level; duplicates are errors."""
        if ctx.slide_id:
            if ctx.slide_id in self.by_slide:
                raise DataError(f"{where}: duplicate row for slide_id {ctx.slide_id!r}")
            self.by_slide[ctx.slide_id] = ctx
        elif ctx.patient_id:
            if ctx.patient_id in self.by_patient:
                raise DataError(f"{where}: duplicate row for patient_id {ctx.patient_id!r}")
            self.by_patient[ctx.patient_id] = ctx
        else:
            raise DataError(f"{where}: row has neither slide_id nor patient_id")

    def lookup(self, slide_id: str, patient_id: str | None = None) -> ClinicalContext | None:
        """The slide's row merged over its patient's row (slide values win); None when neither exists.

        A slide row whose ``patient_id`` contradicts the result's ``patient_id`` is a DataError.
        """
        srow = self.by_slide.get(slide_id)
        if srow is not None and patient_id and srow.patient_id and srow.patient_id != patient_id:
            raise DataError(
                f"{self.source}: slide {slide_id!r} has patient_id {srow.patient_id!r} "
                f"but the slide result says {patient_id!r}"
            )
        pid = patient_id or (srow.patient_id if srow is not None else None)
        prow = self.by_patient.get(pid) if pid else None
        if srow is None and prow is None:
            return None
        if srow is None:
            return prow.model_copy(update={"slide_id": slide_id})  # type: ignore[union-attr]
        merged = srow.merged_over(prow)
        if pid and merged.patient_id is None:
            merged = merged.model_copy(update={"patient_id": pid})
        return merged

    def check_slides(self, slide_ids: set[str] | None, patient_ids: set[str] | None = None) -> None:
        """Every slide row must name a known slide (and every patient row a known patient, if given)."""
        if slide_ids is not None:
            for sid in sorted(self.by_slide):
                if sid not in slide_ids:
                    raise DataError(
                        f"{self.source}: clinical row for slide_id {sid!r}, which is not among "
                        f"the {len(slide_ids)} slide(s) of this run"
                    )
        if patient_ids is not None:
            for pid in sorted(self.by_patient):
                if pid not in patient_ids:
                    raise DataError(
                        f"{self.source}: clinical row for patient_id {pid!r}, which is not among "
                        f"the patients of this run"
                    )


def _read_csv(path: Path) -> ClinicalTable:
    table = ClinicalTable(source=str(path))
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() if h else h for h in (reader.fieldnames or [])]
            if not header:
                raise DataError(f"{path}: empty CSV (no header)")
            for h in header:
                if not h:
                    raise DataError(f"{path}: empty column name in the header")
                if h not in FIELDS:
                    raise DataError(f"{path}: unknown column {h!r}; allowed: {', '.join(FIELDS)}")
            if len(set(header)) != len(header):
                raise DataError(f"{path}: duplicate column in the header")
            if "slide_id" not in header and "patient_id" not in header:
                raise DataError(f"{path}: needs a slide_id or patient_id column")
            reader.fieldnames = header
            for line_no, row in enumerate(reader, start=2):
                if None in row:
                    raise DataError(f"{path} line {line_no}: more cells than columns")
                if all(_blank(v) for v in row.values()):
                    continue
                rid = row.get("slide_id") or row.get("patient_id") or "?"
                where = f"{path} line {line_no} ({rid})"
                table.add(parse_context(dict(row), where), where)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    return table


def _read_json(path: Path) -> ClinicalTable:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON (line {exc.lineno}: {exc.msg})") from None
    table = ClinicalTable(source=str(path))
    if isinstance(data, list):
        for i, item in enumerate(data):
            where = f"{path} [{i}]"
            table.add(parse_context(item, where), where)
    elif isinstance(data, dict):
        for key, item in data.items():
            where = f"{path} [{key!r}]"
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected an object of clinical fields, got {type(item).__name__}")
            item = dict(item)
            sid = item.get("slide_id")
            if sid not in (None, "") and str(sid) != key:
                raise DataError(f"{where}: slide_id {sid!r} differs from its key {key!r}")
            is_patient = sid in (None, "") and str(item.get("patient_id") or "") == key
            if not is_patient:
                item["slide_id"] = key
            table.add(parse_context(item, where), where)
    else:
        raise DataError(f"{path}: expected a JSON list of objects or a mapping keyed by id, got {type(data).__name__}")
    return table


def load_clinical(
    path: str | Path, slide_ids: set[str] | None = None, patient_ids: set[str] | None = None
) -> ClinicalTable:
    """Load a clinical-context CSV or JSON file (by suffix; ``.json`` is JSON, anything else CSV).

    ``slide_ids``: the slides of this run; a row for any other slide is a DataError naming it.
    ``patient_ids``: likewise for patient-level rows, when given.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: clinical context file not found")
    table = _read_json(p) if p.suffix.lower() == ".json" else _read_csv(p)
    table.check_slides(slide_ids, patient_ids)
    log.info(
        "clinical context: %d slide row(s), %d patient row(s) from %s", len(table.by_slide), len(table.by_patient), p
    )
    return table
