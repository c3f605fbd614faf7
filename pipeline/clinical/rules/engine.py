"""Evaluate the ruleset for one slide result and its clinical context.

:func:`recommend` is the library entry point (the batch runner calls it per slide). It
validates the slide result, decides the effective band (:func:`resolve_band`), gathers the
:class:`~pipeline.clinical.rules.facts.Facts`, evaluates every rule in file order and merges what fired:

* orders are deduplicated by id; the most urgent priority wins; rule ids, rationales, evidence
  keys and notes of merged orders are unioned (first-seen order);
* differential entries and flags are merged by id the same way;
* a ``failed`` slide fires no rule: no orders, one flag with the reason.

Nothing here knows about torch or files; bad input raises :class:`~pipeline.core.errors.DataError`.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.clinical.rules.clinical import ClinicalContext
from pipeline.clinical.rules.facts import ORDER_IDS, PREDICATES, PRIORITIES, Facts, render
from pipeline.clinical.rules.schema import Rule, Ruleset
from pipeline.core.errors import DataError
from pipeline.result import SlideResult, parse_result

log = logging.getLogger(__name__)

_PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}  # higher = more urgent


# -- band ------------------------------------------------------------------------------------
def resolve_band(res: SlideResult, rs: Ruleset) -> tuple[str | None, str | None, str | None]:
    """The band to act on, where it came from, and a mismatch message (or None).

    Policy ``result_if_consistent`` (default): the result's own band comes from the model bundle,
    whose thresholds are set on validation data, so it is used when it is *consistent* with the
    calibrated probability: the probability lies inside that band's ruleset interval widened by
    ``thresholds.band_tolerance`` on each side. Otherwise, and when the result has no band, the
    band is recomputed from the probability with the ruleset bands, and a mismatch is flagged.
    Policy ``ruleset``: always recompute when a probability is present.
    """
    if res.status != "ok":
        return None, None, None
    p = res.nme_probability
    if p is None:
        return res.band, "result", None  # no probability: the result's band is all there is
    computed = rs.band_of(p)
    if res.band is None:
        return computed, "ruleset", None
    if rs.band_policy == "ruleset":
        msg = (
            None
            if res.band == computed
            else (
                f"model band {res.band} differs from the ruleset band {computed} for p = {p:.3f}; "
                "the ruleset band is used (band_policy: ruleset)"
            )
        )
        return computed, "ruleset", msg
    if res.band == computed:
        return res.band, "result", None
    b = rs.band(res.band)
    tol = rs.thresholds.band_tolerance
    if b.lower - tol <= p <= b.upper + tol:
        msg = (
            f"model band {res.band} differs from the ruleset band {computed} for p = {p:.3f} but is within "
            f"the tolerance ({tol:g}); the model bundle's band is used"
        )
        return res.band, "result", msg
    msg = (
        f"model band {res.band} is inconsistent with p = {p:.3f} (ruleset band {computed}, tolerance "
        f"{tol:g}); the ruleset band {computed} is used"
    )
    return computed, "ruleset", msg


# -- evaluation ------------------------------------------------------------------------------
def _holds(names: list[str], facts: Facts) -> list[bool]:
    return [PREDICATES[n](facts) for n in names]


def rule_fires(rule: Rule, facts: Facts) -> bool:
    """all(when) and (any(when_any) if when_any) and not any(unless)."""
    if not all(_holds(rule.when, facts)):
        return False
    if rule.when_any and not any(_holds(rule.when_any, facts)):
        return False
    return not any(_holds(rule.unless, facts))


def _add_unique(seq: list, item: Any) -> None:
    if item not in seq:
        seq.append(item)


def _code_dict(code: Any) -> dict[str, Any]:
    return {"system": code.system, "code": code.code, "display": code.display}


def build_facts(
    res: SlideResult, clinical: ClinicalContext | None, rs: Ruleset
) -> tuple[Facts, str | None, str | None]:
    """Facts for ``res``; also returns the band source and a band-mismatch message."""
    ctx = clinical or ClinicalContext()
    band, band_source, mismatch = resolve_band(res, rs)
    t = rs.thresholds
    if ctx.glucagon_uln_pg_ml is not None:
        uln, uln_source = ctx.glucagon_uln_pg_ml, "laboratory upper limit"
        if uln >= t.glucagon_suggestive_pg_ml:
            raise DataError(
                f"slide {res.slide_id}: glucagon_uln_pg_ml {uln:g} is not below the "
                f"{t.glucagon_suggestive_pg_ml:g} pg/mL threshold; check the units (pg/mL)"
            )
    else:
        uln, uln_source = t.glucagon_default_uln_pg_ml, "ruleset default; the laboratory upper limit was not given"
    patterns = res.patterns.model_dump() if res.patterns is not None else None
    facts = Facts(
        slide_id=res.slide_id,
        status=res.status,
        band=band,
        probability=res.nme_probability,
        patterns=patterns,
        quality_reasons=tuple(res.quality.reasons or res.quality.flags),
        clinical=ctx,
        ruleset=rs,
        glucagon_uln=uln,
        glucagon_uln_source=uln_source,
    )
    return facts, band_source, mismatch


def recommend(
    result: SlideResult | dict[str, Any], clinical: ClinicalContext | None, ruleset: Ruleset
) -> dict[str, Any]:
    """The recommendation for one slide result, as the JSON object :class:`pipeline.result.Recommendations` reads.

    ``result`` is a :class:`~pipeline.result.SlideResult` or its JSON form (validated here).
    Raises DataError when the result or the clinical context is invalid or they disagree.
    """
    res = parse_result(result)
    if clinical is not None and clinical.slide_id and clinical.slide_id != res.slide_id:
        raise DataError(f"clinical context for slide {clinical.slide_id!r} given for slide {res.slide_id!r}")
    if clinical is not None and res.patient_id and clinical.patient_id and clinical.patient_id != res.patient_id:
        raise DataError(
            f"slide {res.slide_id!r}: clinical patient_id {clinical.patient_id!r} differs from "
            f"the result's {res.patient_id!r}"
        )
    rs = ruleset
    facts, band_source, mismatch = build_facts(res, clinical, rs)
    patient_id = res.patient_id or (clinical.patient_id if clinical is not None else None)

    orders: dict[str, dict[str, Any]] = {}
    differential: dict[str, dict[str, Any]] = {}
    flags: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    fired: list[str] = []

    def flag(fid: str, message: str, rule_id: str | None = None) -> None:
        entry = flags.setdefault(fid, {"id": fid, "messages": [], "rules": []})
        _add_unique(entry["messages"], message)
        if rule_id:
            _add_unique(entry["rules"], rule_id)

    if res.status == "failed":
        flag(
            "analysis_failed",
            f"slide analysis failed: {res.error or 'no reason recorded'}; no recommendations were made for this slide",
        )
    else:
        if mismatch:
            flag("band_mismatch", mismatch)
        if res.status == "ok" and res.quality.flags:
            flag("quality_warning", "quality gate warnings: " + "; ".join(res.quality.reasons or res.quality.flags))
        for rule in rs.rules:
            if not rule_fires(rule, facts):
                continue
            fired.append(rule.id)
            rationale = f"{rule.id}: {render(rule.rationale, facts)} {rs.cite(rule.evidence)}"
            for spec in rule.orders:
                if not all(_holds(spec.when, facts)) or any(_holds(spec.unless, facts)):
                    continue
                od = rs.orders[spec.id]
                entry = orders.get(spec.id)
                if entry is None:
                    entry = orders[spec.id] = {
                        "id": spec.id,
                        "display": od.display,
                        "category": od.category,
                        "priority": spec.priority,
                        "code": _code_dict(od.code),
                        "code_verified": od.code.verified,
                        "additional_codes": [_code_dict(c) for c in od.additional_codes],
                        "rules": [],
                        "rationale": [],
                        "evidence": [],
                        "_notes": [],
                    }
                    if od.note:
                        cite = f" {rs.cite(od.evidence)}" if od.evidence else ""
                        entry["_notes"].append(render(od.note, facts) + cite)
                    for ek in od.evidence:
                        _add_unique(entry["evidence"], ek)
                elif _PRIORITY_RANK[spec.priority] > _PRIORITY_RANK[entry["priority"]]:
                    entry["priority"] = spec.priority
                _add_unique(entry["rules"], rule.id)
                _add_unique(entry["rationale"], rationale)
                for ek in rule.evidence:
                    _add_unique(entry["evidence"], ek)
                if spec.note:
                    _add_unique(entry["_notes"], f"{rule.id}: {render(spec.note, facts)}")
            for d in rule.differential:
                entry = differential.setdefault(
                    d.id, {"id": d.id, "name": rs.differential[d.id].name, "why": [], "rules": []}
                )
                _add_unique(entry["why"], f"{rule.id}: {render(d.why, facts)}")
                _add_unique(entry["rules"], rule.id)
            for fl in rule.flags:
                if all(_holds(fl.when, facts)):
                    flag(fl.id, render(fl.message, facts), rule.id)
            for n in rule.notes:
                _add_unique(notes, render(n, facts))

    order_list = sorted(orders.values(), key=lambda o: (-_PRIORITY_RANK[o["priority"]], ORDER_IDS.index(o["id"])))
    for o in order_list:
        o["note"] = " ".join(o.pop("_notes")) or None
    flag_list = [{"id": f["id"], "message": " ".join(f["messages"]), "rules": f["rules"]} for f in flags.values()]
    cited = sorted(
        {k for o in order_list for k in o["evidence"]} | {k for r in rs.rules if r.id in fired for k in r.evidence}
    )
    rec = {
        "slide_id": res.slide_id,
        "patient_id": patient_id,
        "status": res.status,
        "ruleset_version": rs.ruleset_version,
        "band": facts.band,
        "band_source": band_source,
        "model_band": res.band,
        "nme_probability": res.nme_probability,
        "patterns": facts.patterns,
        "glucagon_uln_pg_ml": facts.glucagon_uln if facts.glucagon is not None else None,
        "glucagon_uln_source": facts.glucagon_uln_source if facts.glucagon is not None else None,
        "rules_fired": fired,
        "orders": order_list,
        "differential": list(differential.values()),
        "flags": flag_list,
        "notes": notes,
        "clinical_context": facts.clinical.known(),
        "evidence": {k: rs.evidence[k].citation() for k in cited},
        "disclaimer": rs.disclaimer,
    }
    log.debug("slide %s: rules %s, %d order(s)", res.slide_id, ",".join(fired) or "-", len(order_list))
    return rec
