"""Pydantic schema of ``configs/rules.yaml`` and its cross-reference checks.

The YAML is data: bands, thresholds, the order vocabulary with codes, the differential
vocabulary, evidence keys and the rules. Every section forbids unknown keys
(:class:`~pipeline.core.config.StrictModel`). After field validation :func:`check_ruleset` checks what
a field validator cannot see: bands that overlap or leave gaps, rule ids that repeat, orders,
differentials, evidence keys and template placeholders that are not defined, and imaging orders
that are not behind an imaging gate. Every failure is a one-line
:class:`~pipeline.core.errors.ConfigError` naming the file, the place and the value.
"""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.clinical.rules.facts import (
    BAND_NAMES,
    BOOL_FIELDS,
    IMAGING_GATES,
    IMAGING_ORDERS,
    ORDER_IDS,
    PLACEHOLDERS,
    PREDICATES,
)
from pipeline.core.config import StrictModel, read_yaml, validate
from pipeline.core.errors import ConfigError

LOINC_SYSTEM = "http://loinc.org"
BandName = Literal["LOW", "INDETERMINATE", "HIGH"]
Priority = Literal["routine", "urgent"]
Site = Literal["intertriginous", "perioral", "perineal", "acral", "sun_exposed", "trunk", "extremity", "other"]
_ID = re.compile(r"^[a-z][a-z0-9_]*$")
_RULE_ID = re.compile(r"^R[0-9]+[a-z]?$")


def loinc_check_digit(base: str) -> int:
    """LOINC mod-10 check digit of the digits before the hyphen (Luhn, as LOINC specifies)."""
    total = 0
    for i, ch in enumerate(reversed(base)):
        d = int(ch)
        if i % 2 == 0:  # rightmost digit and every second one to its left are doubled
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return (10 - total % 10) % 10


def _check_predicates(cls: type, names: list[str]) -> list[str]:  # noqa: ARG001 - pydantic passes cls
    for n in names:
        if n not in PREDICATES:
            raise ValueError(f"unknown predicate {n!r}; known: {', '.join(sorted(PREDICATES))}")
    return names


class EvidenceDef(StrictModel):
    """A citable source: grade E (guideline/primary), S (review/manual/catalogue), D (design choice)."""

    grade: Literal["E", "S", "D"]
    source: str = Field(min_length=3)

    def citation(self) -> str:
        """The in-text citation, e.g. ``[E: Mayo Clinic Labs test 9358]``."""
        return f"[{self.grade}: {self.source}]"


class CodeDef(StrictModel):
    """A coding: LOINC codes are checked for form and check digit; other systems must be URIs."""

    system: str
    code: str = Field(min_length=1)
    display: str = Field(min_length=1)

    @model_validator(mode="after")
    def _check_code(self) -> CodeDef:
        if self.system == LOINC_SYSTEM:
            m = re.fullmatch(r"([0-9]{1,7})-([0-9])", self.code)
            if not m:
                raise ValueError(f"LOINC code {self.code!r} is not of the form NNNNN-N")
            if loinc_check_digit(m.group(1)) != int(m.group(2)):
                raise ValueError(f"LOINC code {self.code!r} fails its check digit")
        elif not re.match(r"^(urn:[a-z0-9][a-z0-9-]*:\S+|https?://\S+)$", self.system):
            raise ValueError(f"code system {self.system!r} must be {LOINC_SYSTEM} or a URI (urn:... or http...)")
        return self

    @property
    def verified(self) -> bool:
        """True for a LOINC code (listed as verified in the clinical reference), False for a local code."""
        return self.system == LOINC_SYSTEM


class OrderDef(StrictModel):
    """One entry of the order vocabulary: what it is, how it is coded, a standing note."""

    display: str = Field(min_length=3)
    category: Literal["laboratory", "imaging", "procedure"]
    code: CodeDef
    additional_codes: list[CodeDef] = Field(default_factory=list)
    note: str | None = None
    evidence: list[str] = Field(default_factory=list)


class OrderSpec(StrictModel):
    """An order a rule proposes, with its priority and optional extra conditions."""

    id: str
    priority: Priority = "routine"
    when: list[str] = Field(default_factory=list)
    unless: list[str] = Field(default_factory=list)
    note: str | None = None

    check_predicates = field_validator("when", "unless")(_check_predicates)


class DifferentialDef(StrictModel):
    """An entity of the differential diagnosis."""

    name: str = Field(min_length=3)


class DifferentialSpec(StrictModel):
    """A differential entry a rule adds, with why (a template)."""

    id: str
    why: str = Field(min_length=3)


class FlagSpec(StrictModel):
    """A flag a rule raises: a stable id and a message template."""

    id: str
    message: str = Field(min_length=3)
    when: list[str] = Field(default_factory=list)

    check_predicates = field_validator("when")(_check_predicates)

    @field_validator("id")
    @classmethod
    def _flag_id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"flag id {v!r} must be lower_snake_case")
        return v


class Rule(StrictModel):
    """A rule: fires when all ``when``, at least one ``when_any`` (if given) and no ``unless`` hold."""

    id: str
    title: str = Field(min_length=3)
    when: list[str] = Field(default_factory=list)
    when_any: list[str] = Field(default_factory=list)
    unless: list[str] = Field(default_factory=list)
    orders: list[OrderSpec] = Field(default_factory=list)
    differential: list[DifferentialSpec] = Field(default_factory=list)
    flags: list[FlagSpec] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    rationale: str = Field(min_length=10)
    evidence: list[str] = Field(min_length=1)

    check_predicates = field_validator("when", "when_any", "unless")(_check_predicates)

    @field_validator("id")
    @classmethod
    def _rule_id(cls, v: str) -> str:
        if not _RULE_ID.match(v):
            raise ValueError(f"rule id {v!r} must look like R4 or R5a")
        return v

    @model_validator(mode="after")
    def _has_condition(self) -> Rule:
        if not self.when and not self.when_any:
            raise ValueError(f"rule {self.id} has no condition (when / when_any)")
        return self


class Band(StrictModel):
    """A probability band [lower, upper); the top band includes 1.0."""

    name: BandName
    lower: float = Field(ge=0.0, le=1.0)
    upper: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if not self.lower < self.upper:
            raise ValueError(f"band {self.name}: lower {self.lower} must be below upper {self.upper}")
        return self


class Thresholds(StrictModel):
    """Numeric thresholds (units in the names)."""

    glucagon_suggestive_pg_ml: float = Field(default=500.0, gt=0)
    glucagon_typical_pg_ml: float = Field(default=1000.0, gt=0)
    glucagon_default_uln_pg_ml: float = Field(default=150.0, gt=0)
    zinc_lower_limit_ug_dl: float = Field(default=60.0, gt=0)
    albumin_lower_limit_g_dl: float = Field(default=3.5, gt=0)
    pattern_high: float = Field(default=0.5, gt=0, lt=1)
    pattern_low: float = Field(default=0.3, gt=0, lt=1)
    band_tolerance: float = Field(default=0.10, ge=0, le=0.5)

    @model_validator(mode="after")
    def _consistent(self) -> Thresholds:
        for name in type(self).model_fields:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if not self.glucagon_default_uln_pg_ml < self.glucagon_suggestive_pg_ml < self.glucagon_typical_pg_ml:
            raise ValueError(
                "glucagon thresholds must satisfy default ULN < suggestive < typical "
                f"(got {self.glucagon_default_uln_pg_ml:g} < {self.glucagon_suggestive_pg_ml:g} < "
                f"{self.glucagon_typical_pg_ml:g})"
            )
        if not self.pattern_low <= self.pattern_high:
            raise ValueError(f"pattern_low {self.pattern_low} must not exceed pattern_high {self.pattern_high}")
        return self


class FactSet(StrictModel):
    """A named conjunction of clinical facts (used for red flags and the classic syndrome)."""

    description: str = Field(min_length=10)
    all_true: list[str] = Field(min_length=1)
    sites: list[Site] | None = None
    bands: list[BandName] | None = None

    @field_validator("all_true")
    @classmethod
    def _bools(cls, v: list[str]) -> list[str]:
        for n in v:
            if n not in BOOL_FIELDS:
                raise ValueError(f"{n!r} is not a boolean clinical field; allowed: {', '.join(BOOL_FIELDS)}")
        return v


class RedFlags(FactSet):
    """Clinical red flags (R2b): all facts true and a compatible rash site (unknown site: no)."""

    sites: list[Site] = Field(min_length=1)

    @model_validator(mode="after")
    def _no_bands(self) -> RedFlags:
        if self.bands is not None:
            raise ValueError("red_flags are clinical only: 'bands' is not allowed here")
        return self


class ClassicSyndrome(FactSet):
    """The classic glucagonoma syndrome: the slide band is one of ``bands`` and all facts are true."""

    bands: list[BandName] = Field(min_length=1)


class Ruleset(StrictModel):
    """The whole of ``configs/rules.yaml``."""

    ruleset_version: str = Field(min_length=1)
    disclaimer: str = Field(min_length=20)
    band_policy: Literal["result_if_consistent", "ruleset"] = "result_if_consistent"
    bands: list[Band] = Field(min_length=3, max_length=3)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    red_flags: RedFlags
    classic_syndrome: ClassicSyndrome
    evidence: dict[str, EvidenceDef] = Field(min_length=1)
    orders: dict[str, OrderDef] = Field(min_length=1)
    differential: dict[str, DifferentialDef] = Field(default_factory=dict)
    rules: list[Rule] = Field(min_length=1)

    def band_of(self, p: float) -> str:
        """The ruleset band of probability ``p`` (bands are [lower, upper); the top one includes 1)."""
        for b in self.bands:
            if b.lower <= p < b.upper:
                return b.name
        return self.bands[-1].name

    def band(self, name: str) -> Band:
        """The band called ``name``."""
        return next(b for b in self.bands if b.name == name)

    def cite(self, keys: list[str]) -> str:
        """In-text citations for evidence ``keys``."""
        return " ".join(self.evidence[k].citation() for k in keys)


def _template_fields(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def check_ruleset(rs: Ruleset, source: str) -> None:
    """Cross-reference checks; raises a one-line ConfigError naming the place and the value."""

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    # bands: LOW, INDETERMINATE, HIGH in order, from 0 to 1, no overlap, no gap
    names = [b.name for b in rs.bands]
    if names != list(BAND_NAMES):
        fail(f"bands must be {', '.join(BAND_NAMES)} in that order (got {', '.join(names)})")
    if rs.bands[0].lower != 0.0:
        fail(f"bands: LOW must start at 0 (got {rs.bands[0].lower})")
    if rs.bands[-1].upper != 1.0:
        fail(f"bands: HIGH must end at 1 (got {rs.bands[-1].upper})")
    for a, b in zip(rs.bands, rs.bands[1:]):
        if b.lower < a.upper:
            fail(f"bands: {a.name} (upper {a.upper}) overlaps {b.name} (lower {b.lower})")
        if b.lower > a.upper:
            fail(f"bands: gap between {a.name} (upper {a.upper}) and {b.name} (lower {b.lower})")

    for key in rs.orders:
        if key not in ORDER_IDS:
            fail(f"orders: unknown order id {key!r}; allowed: {', '.join(ORDER_IDS)}")
    for key, od in rs.orders.items():
        if (od.category == "imaging") != (key in IMAGING_ORDERS):
            fail(f"orders.{key}: category {od.category!r} disagrees with the imaging order list")
        for ek in od.evidence:
            if ek not in rs.evidence:
                fail(f"orders.{key}: unknown evidence key {ek!r}")
        if od.note:
            _check_template(od.note, f"orders.{key}.note", fail)

    seen: set[str] = set()
    for i, rule in enumerate(rs.rules):
        where = f"rules[{i}] ({rule.id})"
        if rule.id in seen:
            fail(f"{where}: duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        for ek in rule.evidence:
            if ek not in rs.evidence:
                fail(f"{where}: unknown evidence key {ek!r}; defined: {', '.join(sorted(rs.evidence))}")
        _check_template(rule.rationale, f"{where}.rationale", fail)
        for n in rule.notes:
            _check_template(n, f"{where}.notes", fail)
        for fl in rule.flags:
            _check_template(fl.message, f"{where}.flags.{fl.id}", fail)
        for d in rule.differential:
            if d.id not in rs.differential:
                fail(f"{where}: unknown differential id {d.id!r}; defined: {', '.join(sorted(rs.differential))}")
            _check_template(d.why, f"{where}.differential.{d.id}", fail)
        for spec in rule.orders:
            if spec.id not in rs.orders:
                fail(f"{where}: unknown order id {spec.id!r}; defined: {', '.join(sorted(rs.orders))}")
            if spec.note:
                _check_template(spec.note, f"{where}.orders.{spec.id}.note", fail)
            if spec.id in IMAGING_ORDERS and not _gated(rule, spec):
                fail(
                    f"{where}: imaging order {spec.id!r} is not behind an imaging gate "
                    f"(one of {', '.join(sorted(IMAGING_GATES))} in 'when', or every 'when_any' entry a gate)"
                )


def _gated(rule: Rule, spec: OrderSpec) -> bool:
    """An imaging order needs a gate among the conjunctive conditions, or only gates in when_any."""
    if any(p in IMAGING_GATES for p in [*rule.when, *spec.when]):
        return True
    return bool(rule.when_any) and all(p in IMAGING_GATES for p in rule.when_any)


def _check_template(text: str, where: str, fail) -> None:  # noqa: ANN001 - local callback
    try:
        fields = _template_fields(text)
    except ValueError as exc:
        fail(f"{where}: malformed template ({exc})")
        return
    for name in fields:
        if name not in PLACEHOLDERS:
            fail(f"{where}: unknown placeholder {{{name}}}; known: {', '.join(sorted(PLACEHOLDERS))}")


def default_rules_path() -> Path:
    """``configs/rules.yaml`` of this checkout."""
    from pipeline.core.paths import RULES_YAML

    return RULES_YAML


def load_ruleset(path: str | Path | None = None) -> Ruleset:
    """Read, validate and cross-check a ruleset (default ``configs/rules.yaml``); ConfigError on any problem."""
    p = Path(path) if path is not None else default_rules_path()
    data = read_yaml(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    rs = validate(Ruleset, data, str(p))
    check_ruleset(rs, str(p))
    return rs


__all__ = [
    "Band",
    "ClassicSyndrome",
    "CodeDef",
    "DifferentialDef",
    "DifferentialSpec",
    "EvidenceDef",
    "FlagSpec",
    "LOINC_SYSTEM",
    "OrderDef",
    "OrderSpec",
    "RedFlags",
    "Rule",
    "Ruleset",
    "Thresholds",
    "check_ruleset",
    "load_ruleset",
    "loinc_check_digit",
]
