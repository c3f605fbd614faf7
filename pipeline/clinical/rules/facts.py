"""The facts a rule can test, and the small fixed set of named predicates over them.

Rules in ``configs/rules.yaml`` are declarative: each names predicates from :data:`PREDICATES`
(``when`` = all of, ``when_any`` = at least one of, ``unless`` = none of). There is no expression
language on purpose: every condition the product can evaluate is one reviewed Python function
here, with a docstring that says what it means clinically.

:class:`Facts` gathers one slide's facts: the slide result (status, effective band, pattern
scores), the clinical context (may be empty) and the ruleset thresholds that interpret them.
:func:`placeholders` renders the values that rationale/flag/note templates may quote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pipeline.clinical.rules.clinical import ClinicalContext
    from pipeline.clinical.rules.schema import Ruleset

#: Order ids the product may propose, in clinical sequence (also the output order within a priority).
ORDER_IDS: tuple[str, ...] = (
    "glucagon",
    "glucose_hba1c",
    "cbc",
    "albumin",
    "liver_panel",
    "zinc",
    "chromogranin_a",
    "amino_acids",
    "hcv_antibody",
    "niacin",
    "men1_screen",
    "ct_or_mri_pancreas",
    "sstr_pet",
    "eus",
    "rebiopsy",
)
#: Orders that image the patient: only allowed behind an imaging gate (see :data:`IMAGING_GATES`).
IMAGING_ORDERS: frozenset[str] = frozenset({"ct_or_mri_pancreas", "sstr_pet", "eus"})
BAND_NAMES: tuple[str, ...] = ("LOW", "INDETERMINATE", "HIGH")
PRIORITIES: tuple[str, ...] = ("routine", "urgent")
SITES: tuple[str, ...] = (
    "intertriginous",
    "perioral",
    "perineal",
    "acral",
    "sun_exposed",
    "trunk",
    "extremity",
    "other",
)
HCV_VALUES: tuple[str, ...] = ("positive", "negative", "unknown")
PRIOR_IMAGING: tuple[str, ...] = ("none", "negative", "mass", "liver_lesions")
BOOL_FIELDS: tuple[str, ...] = (
    "diabetes",
    "weight_loss",
    "liver_disease",
    "ibd",
    "celiac",
    "pancreatitis",
    "tpn",
    "alcohol",
    "men1_history",
    "pancreatic_mass",
)
NUMBER_FIELDS: tuple[str, ...] = ("zinc_ug_dl", "glucagon_pg_ml", "glucagon_uln_pg_ml", "albumin_g_dl")
PATTERNS: tuple[str, ...] = ("pallor", "necrolysis", "parakeratosis")

_FACT_LABELS = {
    "diabetes": "diabetes or new hyperglycaemia",
    "weight_loss": "weight loss",
    "liver_disease": "known liver disease",
    "ibd": "inflammatory bowel disease",
    "celiac": "coeliac disease",
    "pancreatitis": "pancreatitis",
    "tpn": "parenteral nutrition",
    "alcohol": "alcohol use",
    "men1_history": "personal or family history of MEN1",
    "pancreatic_mass": "known pancreatic mass",
}


@dataclass(frozen=True)
class Facts:
    """Everything the predicates may look at for one slide."""

    slide_id: str
    status: str  # ok | non_diagnostic | failed
    band: str | None  # effective band (see engine.resolve_band)
    probability: float | None
    patterns: dict[str, float] | None
    quality_reasons: tuple[str, ...]
    clinical: ClinicalContext
    ruleset: Ruleset
    glucagon_uln: float = 0.0  # ULN used: the laboratory's if given, else the ruleset default
    glucagon_uln_source: str = "ruleset default"

    # -- derived values -------------------------------------------------------------------
    def is_true(self, name: str) -> bool:
        """True only when the clinical boolean ``name`` is known to be true (unknown is not true)."""
        return getattr(self.clinical, name) is True

    @property
    def glucagon(self) -> float | None:
        """Known fasting plasma glucagon in pg/mL, or None."""
        return self.clinical.glucagon_pg_ml


# -- predicates ------------------------------------------------------------------------------
Predicate = Callable[[Facts], bool]
PREDICATES: dict[str, Predicate] = {}
#: Predicates that justify imaging on their own: a raised glucagon, a known lesion, or the classic syndrome.
IMAGING_GATES: frozenset[str] = frozenset(
    {
        "glucagon_ge_typical",
        "glucagon_suggestive_not_typical",
        "glucagon_ge_suggestive",
        "glucagon_raised",
        "glucagon_raised_below_suggestive",
        "known_mass_or_liver_lesions",
        "classic_syndrome",
    }
)


def predicate(fn: Predicate) -> Predicate:
    """Register ``fn`` under its own name."""
    PREDICATES[fn.__name__] = fn
    return fn


@predicate
def slide_ok(f: Facts) -> bool:
    """The slide was analysed and is diagnostic (status ``ok``)."""
    return f.status == "ok"


@predicate
def slide_non_diagnostic(f: Facts) -> bool:
    """The slide failed the quality gate (no/too little epidermis, out-of-scope stain, blur)."""
    return f.status == "non_diagnostic"


@predicate
def band_low(f: Facts) -> bool:
    """Effective band is LOW."""
    return f.band == "LOW"


@predicate
def band_indeterminate(f: Facts) -> bool:
    """Effective band is INDETERMINATE."""
    return f.band == "INDETERMINATE"


@predicate
def band_high(f: Facts) -> bool:
    """Effective band is HIGH."""
    return f.band == "HIGH"


@predicate
def band_not_low(f: Facts) -> bool:
    """A band is known and it is not LOW."""
    return f.band is not None and f.band != "LOW"


@predicate
def band_not_high(f: Facts) -> bool:
    """The slide does not support NME: band LOW/INDETERMINATE or no band (non-diagnostic)."""
    return f.band != "HIGH"


@predicate
def late_pattern(f: Facts) -> bool:
    """Late/nonspecific pattern: parakeratosis high while pallor and necrolysis are both low."""
    if not f.patterns:
        return False
    t = f.ruleset.thresholds
    return (
        f.patterns["parakeratosis"] >= t.pattern_high
        and f.patterns["pallor"] < t.pattern_low
        and f.patterns["necrolysis"] < t.pattern_low
    )


@predicate
def red_flags(f: Facts) -> bool:
    """Clinical red flags: every ``red_flags.all_true`` fact is true and the site is a compatible one."""
    rf = f.ruleset.red_flags
    return all(f.is_true(n) for n in rf.all_true) and f.clinical.site in rf.sites


@predicate
def red_flag_facts_site_unknown(f: Facts) -> bool:
    """The red-flag facts are present but the rash site is unknown (cannot decide R2b)."""
    rf = f.ruleset.red_flags
    return all(f.is_true(n) for n in rf.all_true) and f.clinical.site is None


@predicate
def classic_syndrome(f: Facts) -> bool:
    """The classic glucagonoma syndrome as defined in ``classic_syndrome`` of the ruleset."""
    cs = f.ruleset.classic_syndrome
    if f.band not in cs.bands:
        return False
    if cs.sites is not None and f.clinical.site not in cs.sites:
        return False
    return all(f.is_true(n) for n in cs.all_true)


@predicate
def clinicopathologic_discordance(f: Facts) -> bool:
    """Clinical red flags while the slide does not support NME (band not HIGH)."""
    return red_flags(f) and band_not_high(f)


@predicate
def glucagon_known(f: Facts) -> bool:
    """A fasting plasma glucagon value is known."""
    return f.glucagon is not None


@predicate
def glucagon_ge_typical(f: Facts) -> bool:
    """Glucagon at or above the level typical of glucagonoma (default 1000 pg/mL)."""
    return f.glucagon is not None and f.glucagon >= f.ruleset.thresholds.glucagon_typical_pg_ml


@predicate
def glucagon_ge_suggestive(f: Facts) -> bool:
    """Glucagon at or above the highly suggestive level (default 500 pg/mL)."""
    return f.glucagon is not None and f.glucagon >= f.ruleset.thresholds.glucagon_suggestive_pg_ml


@predicate
def glucagon_suggestive_not_typical(f: Facts) -> bool:
    """Glucagon in [suggestive, typical): default 500–999 pg/mL."""
    t = f.ruleset.thresholds
    return f.glucagon is not None and t.glucagon_suggestive_pg_ml <= f.glucagon < t.glucagon_typical_pg_ml


@predicate
def glucagon_raised(f: Facts) -> bool:
    """Glucagon above the upper limit of normal in use (laboratory's, else the ruleset default)."""
    return f.glucagon is not None and f.glucagon > f.glucagon_uln


@predicate
def glucagon_raised_below_suggestive(f: Facts) -> bool:
    """Glucagon above the ULN but below the suggestive level (pseudoglucagonoma range)."""
    return glucagon_raised(f) and f.glucagon < f.ruleset.thresholds.glucagon_suggestive_pg_ml  # type: ignore[operator]


@predicate
def glucagon_normal(f: Facts) -> bool:
    """Glucagon known and at or below the ULN in use."""
    return f.glucagon is not None and f.glucagon <= f.glucagon_uln


@predicate
def prior_imaging_negative(f: Facts) -> bool:
    """Cross-sectional imaging of the pancreas was done and reported negative."""
    return f.clinical.prior_imaging == "negative"


@predicate
def known_mass_or_liver_lesions(f: Facts) -> bool:
    """A pancreatic mass or liver lesions are already known."""
    return f.is_true("pancreatic_mass") or f.clinical.prior_imaging in ("mass", "liver_lesions")


@predicate
def site_acral(f: Facts) -> bool:
    """Biopsy from an acral site (dorsal feet/hands)."""
    return f.clinical.site == "acral"


@predicate
def site_sun_exposed(f: Facts) -> bool:
    """Biopsy from a sun-exposed site."""
    return f.clinical.site == "sun_exposed"


@predicate
def hcv_positive(f: Facts) -> bool:
    """Hepatitis C known positive."""
    return f.clinical.hcv == "positive"


@predicate
def hcv_known(f: Facts) -> bool:
    """Hepatitis C status known (positive or negative)."""
    return f.clinical.hcv in ("positive", "negative")


@predicate
def liver_disease(f: Facts) -> bool:
    """Known liver disease."""
    return f.is_true("liver_disease")


@predicate
def low_albumin(f: Facts) -> bool:
    """Albumin known and below the ruleset's lower limit."""
    a = f.clinical.albumin_g_dl
    return a is not None and a < f.ruleset.thresholds.albumin_lower_limit_g_dl


@predicate
def zinc_known(f: Facts) -> bool:
    """A zinc level is known."""
    return f.clinical.zinc_ug_dl is not None


@predicate
def low_zinc(f: Facts) -> bool:
    """Zinc known and below the ruleset's lower limit."""
    z = f.clinical.zinc_ug_dl
    return z is not None and z < f.ruleset.thresholds.zinc_lower_limit_ug_dl


@predicate
def zinc_risk(f: Facts) -> bool:
    """Risk of zinc deficiency: parenteral nutrition or malabsorption (IBD, coeliac, pancreatitis)."""
    return any(f.is_true(n) for n in ("tpn", "ibd", "celiac", "pancreatitis"))


@predicate
def malabsorption(f: Facts) -> bool:
    """IBD, coeliac disease or pancreatitis (exocrine insufficiency) known."""
    return any(f.is_true(n) for n in ("ibd", "celiac", "pancreatitis"))


@predicate
def alcohol(f: Facts) -> bool:
    """Alcohol use recorded."""
    return f.is_true("alcohol")


@predicate
def men1_history(f: Facts) -> bool:
    """Personal or family history of MEN1."""
    return f.is_true("men1_history")


@predicate
def diabetes(f: Facts) -> bool:
    """Diabetes or new hyperglycaemia recorded."""
    return f.is_true("diabetes")


@predicate
def weight_loss(f: Facts) -> bool:
    """Weight loss recorded."""
    return f.is_true("weight_loss")


# -- template placeholders -------------------------------------------------------------------
def _num(x: float | None, unit: str) -> str:
    if x is None:
        return "unknown"
    return f"{x:g} {unit}"


def _patterns_text(f: Facts) -> str:
    if not f.patterns:
        return "pattern scores not available"
    return ", ".join(f"{p} {f.patterns[p]:.2f}" for p in PATTERNS)


def _band_text(f: Facts) -> str:
    if f.band is None:
        return "no band (slide not diagnostic)" if f.status != "ok" else "no band"
    prob = f" (p = {f.probability:.2f})" if f.probability is not None else ""
    return f"{f.band}{prob}"


def _true_facts(f: Facts, names: tuple[str, ...] | list[str], joiner: str = ", ") -> str:
    got = [_FACT_LABELS.get(n, n) for n in names if f.is_true(n)]
    return joiner.join(got) if got else "none recorded"


PLACEHOLDERS: dict[str, Callable[[Facts], str]] = {
    "slide_id": lambda f: f.slide_id,
    "band": _band_text,
    "probability": lambda f: "unknown" if f.probability is None else f"{f.probability:.2f}",
    "patterns": _patterns_text,
    "site": lambda f: (f.clinical.site or "unknown").replace("_", "-"),
    "glucagon": lambda f: _num(f.glucagon, "pg/mL"),
    "glucagon_uln": lambda f: f"{f.glucagon_uln:g} pg/mL ({f.glucagon_uln_source})",
    "zinc": lambda f: _num(f.clinical.zinc_ug_dl, "µg/dL"),
    "albumin": lambda f: _num(f.clinical.albumin_g_dl, "g/dL"),
    "hcv": lambda f: f.clinical.hcv or "unknown",
    "prior_imaging": lambda f: (f.clinical.prior_imaging or "unknown").replace("_", " "),
    "quality_reasons": lambda f: "; ".join(f.quality_reasons) if f.quality_reasons else "no reason given",
    "red_flag_facts": lambda f: _true_facts(f, f.ruleset.red_flags.all_true, " and "),
    "confounders": lambda f: _true_facts(f, ("liver_disease", "pancreatitis", "diabetes", "tpn", "alcohol")),
    "zinc_risk_facts": lambda f: _true_facts(f, ("tpn", "ibd", "celiac", "pancreatitis")),
    "glucagon_suggestive": lambda f: f"{f.ruleset.thresholds.glucagon_suggestive_pg_ml:g} pg/mL",
    "glucagon_typical": lambda f: f"{f.ruleset.thresholds.glucagon_typical_pg_ml:g} pg/mL",
}


class _Values(dict):
    """``str.format_map`` source that renders a placeholder on first use."""

    def __init__(self, facts: Facts) -> None:
        super().__init__()
        self._facts = facts

    def __missing__(self, key: str) -> str:
        value = PLACEHOLDERS[key](self._facts)
        self[key] = value
        return value


def render(template: str, facts: Facts) -> str:
    """Fill ``{placeholder}`` fields of ``template`` (names validated when the ruleset loads)."""
    return template.format_map(_Values(facts))
