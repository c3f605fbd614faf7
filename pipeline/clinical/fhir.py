"""FHIR R4 (4.0.1) output: one ``collection`` Bundle per slide.

:func:`build_bundle` turns a slide result and its recommendation (from
:func:`pipeline.clinical.rules.recommend`) into:

* a ``Device`` for the model (name, version, sha256, ruleset version; the demo model carries the
  label "trained on synthetic slides only, not for clinical use");
* ``Observation`` s (status ``preliminary``) for the calibrated NME-pattern probability (band as
  interpretation) and each pattern score, each with ``device`` -> the Device;
* a ``DiagnosticReport`` (status ``preliminary``, LOINC 11526-1 "Pathology study") whose
  ``result`` lists the Observations and whose ``conclusion`` summarises the result, the proposals
  and the disclaimer. It has no ``performer``: in R4 that may not be a Device, and a pathologist
  signs out;
* one ``ServiceRequest`` per proposed order: ``status: draft``, ``intent: proposal``, priority,
  code, ``requester`` -> the Device, ``reasonReference`` -> the DiagnosticReport, notes with the
  rule ids, rationale and evidence;
* a ``Provenance`` whose targets are all AI-made resources, ``agent.who`` -> the Device.

AI-made resources (DiagnosticReport, Observations, ServiceRequests) carry
``meta.security`` = v3-ObservationValue ``AIAST``. The subject is a logical Patient reference
(``type`` Patient + identifier when the result has a ``patient_id``, display-only otherwise): the
product does not create Patient resources. ``fullUrl`` s are ``urn:uuid:`` uuid5 values derived
from the slide id and a digest of the content, so the same input gives the same bundle; only
timestamps may differ, and they come from the result when it has one (:data:`TIMESTAMP_KEYS`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from pipeline import DEMO_MODEL_LABEL
from pipeline.core.errors import DataError
from pipeline.result import Recommendations, SlideResult

log = logging.getLogger(__name__)

LOINC = "http://loinc.org"
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
LOCAL_OBSERVATIONS = "urn:nme-pathology:local-observations"
BAND_SYSTEM = "urn:nme-pathology:nme-pattern-band"
SLIDE_ID_SYSTEM = "urn:nme-pathology:slide-id"
PATIENT_ID_SYSTEM = "urn:nme-pathology:patient-id"
ORDER_ID_SYSTEM = "urn:nme-pathology:proposed-order"
MODEL_SHA_SYSTEM = "urn:nme-pathology:model-sha256"
UCUM = "http://unitsofmeasure.org"
#: Result keys read, in order, for the bundle's timestamps; absent -> the current UTC time.
TIMESTAMP_KEYS: tuple[str, ...] = ("created_at",)
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:nme-pathology:fhir")
_SR_CATEGORY = {  # SNOMED CT codes of the R4 example value set servicerequest-category
    "laboratory": ("108252007", "Laboratory procedure"),
    "imaging": ("363679005", "Imaging"),
    "procedure": ("387713003", "Surgical procedure"),
}
_PATTERN_TEXT = {
    "pallor": "Upper-epidermal pallor/vacuolation score (AI, slide level)",
    "necrolysis": "Superficial epidermal necrolysis score (AI, slide level)",
    "parakeratosis": "Confluent parakeratosis score (AI, slide level)",
}


def _timestamp(result: dict) -> str:
    """FHIR instant from the first present :data:`TIMESTAMP_KEYS` value (naive = UTC), else now."""
    for key in TIMESTAMP_KEYS:
        raw = result.get(key)
        if raw in (None, ""):
            continue
        if not isinstance(raw, str):
            raise DataError(f"result: {key}: expected an ISO-8601 timestamp string (got {raw!r})")
        try:
            dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise DataError(f"result: {key}: not an ISO-8601 timestamp (got {raw!r})") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return _instant(dt)
    return _instant(datetime.now(UTC))


def _instant(dt: datetime) -> str:
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{dt.microsecond // 1000:03d}" if dt.microsecond else "") + "Z"


def _digest(result: dict, recommendation: dict) -> str:
    content = {"result": {k: v for k, v in result.items() if k not in TIMESTAMP_KEYS}, "recommendation": recommendation}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def model_label(model: dict) -> str | None:
    """The model's label: its own ``label``, else the demo label when the name says demo, else None."""
    label = model.get("label")
    if isinstance(label, str) and label.strip():
        return label.strip()
    if "demo" in str(model.get("name", "")).lower():
        return DEMO_MODEL_LABEL
    return None


def _ref(url: str, display: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"reference": url}
    if display:
        ref["display"] = display
    return ref


def _codeable(code: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    cc: dict[str, Any] = {"coding": [{"system": code["system"], "code": code["code"], "display": code["display"]}]}
    if text:
        cc["text"] = text
    return cc


def _subject(result: dict, recommendation: dict) -> dict[str, Any]:
    pid = result.get("patient_id") or recommendation.get("patient_id")
    if pid not in (None, ""):
        return {
            "type": "Patient",
            "identifier": {"system": PATIENT_ID_SYSTEM, "value": str(pid)},
            "display": f"Patient {pid}",
        }
    return {"type": "Patient", "display": f"Patient of slide {result['slide_id']} (patient identifier not supplied)"}


def _conclusion(result: dict, rec: dict, label: str | None) -> str:
    parts: list[str] = ["Preliminary AI-assisted NME-pattern analysis (decision support, not a diagnosis)."]
    status = rec.get("status")
    if status == "failed":
        parts.append(f"Analysis failed: {result.get('error') or 'no reason recorded'}. No recommendations.")
    elif status == "non_diagnostic":
        reasons = "; ".join((result.get("quality") or {}).get("reasons") or []) or "quality gate"
        parts.append(f"Non-diagnostic slide ({reasons}).")
    else:
        p = rec.get("nme_probability")
        ptxt = f" (calibrated probability {p:.2f})" if isinstance(p, (int, float)) else ""
        parts.append(f"NME-pattern band {rec.get('band')}{ptxt}.")
        pats = rec.get("patterns") or {}
        if pats:
            parts.append("Pattern scores: " + ", ".join(f"{k} {v:.2f}" for k, v in pats.items()) + ".")
    if rec.get("orders"):
        parts.append("Proposed orders: " + "; ".join(f"{o['display']} ({o['priority']})" for o in rec["orders"]) + ".")
    if rec.get("differential"):
        parts.append("Differential: " + "; ".join(d["name"] for d in rec["differential"]) + ".")
    for fl in rec.get("flags", []):
        parts.append(f"Flag {fl['id']}: {fl['message']}")
    parts.extend(rec.get("notes", []))
    if label:
        parts.append(f"Model: {label}.")
    parts.append(rec.get("disclaimer", ""))
    return " ".join(x for x in parts if x)


def build_bundle(result: SlideResult | dict, recommendation: Recommendations | dict) -> dict:
    """A FHIR R4 ``collection`` Bundle for one slide (see the module docstring).

    ``result`` is a :class:`~pipeline.result.SlideResult` (or its JSON form, validated against
    it); ``recommendation`` the rule layer's output for it.
    """
    if isinstance(result, SlideResult):
        result = result.to_json_dict()
    if isinstance(recommendation, Recommendations):
        recommendation = recommendation.model_dump(mode="json")
    if not isinstance(result, dict) or not isinstance(recommendation, dict):
        raise DataError("build_bundle: result and recommendation must be objects")
    sid = result.get("slide_id")
    if not isinstance(sid, str) or not sid:
        raise DataError(f"result: slide_id missing or not a string (got {sid!r})")
    if recommendation.get("slide_id") != sid:
        raise DataError(f"recommendation is for slide {recommendation.get('slide_id')!r}, result for {sid!r}")
    model = result.get("model")
    if not isinstance(model, dict) or not model.get("name") or model.get("version") in (None, ""):
        raise DataError(
            f"result (slide {sid}): model {{name, version}} is required for the FHIR Device (got {model!r})"
        )

    ts = _timestamp(result)
    digest = _digest(result, recommendation)

    def url(kind: str, key: str = "") -> str:
        return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{sid}|{digest}|{kind}|{key}')}"

    def security() -> dict[str, Any]:
        return {"security": [dict(AIAST)]}

    label = model_label(model)
    subject = _subject(result, recommendation)
    device_url = url("Device")
    model_name = str(model["name"])
    device_display = f"{model_name} {model['version']}"
    entries: list[dict[str, Any]] = []

    # Device ---------------------------------------------------------------------------------
    device: dict[str, Any] = {
        "resourceType": "Device",
        "status": "active",
        "deviceName": [
            {"name": model_name, "type": "model-name"},
            {"name": "NME-pattern decision support (AI)", "type": "user-friendly-name"},
        ],
        "type": {
            "text": "AI software: NME-pattern classifier for skin-biopsy whole-slide images, with a clinical rule layer"
        },
        "version": [{"type": {"text": "model"}, "value": str(model["version"])}],
    }
    if recommendation.get("ruleset_version"):
        device["version"].append(
            {"type": {"text": "clinical ruleset"}, "value": str(recommendation["ruleset_version"])}
        )
    if model.get("sha256"):
        device["identifier"] = [{"system": MODEL_SHA_SYSTEM, "value": str(model["sha256"])}]
    if label:
        device["safety"] = [{"text": label}]
        device["note"] = [{"text": f"{model_name}: {label}"}]
    entries.append({"fullUrl": device_url, "resource": device})

    # Observations ---------------------------------------------------------------------------
    obs_urls: list[str] = []
    device_ref = _ref(device_url, device_display)
    status = recommendation.get("status")

    def observation(key: str, code: str, text: str, value: float | None, extra: dict | None = None) -> None:
        o: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": security(),
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                            "display": "Laboratory",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": LOCAL_OBSERVATIONS, "code": code, "display": text}], "text": text},
            "subject": subject,
            "issued": ts,
            "device": device_ref,
        }
        if value is not None:
            o["valueQuantity"] = {"value": float(value), "unit": "score (0-1)", "system": UCUM, "code": "1"}
        else:
            absent = "error" if status == "failed" else "not-performed"
            o["dataAbsentReason"] = {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": absent}],
                "text": "analysis failed" if status == "failed" else "slide not diagnostic",
            }
        if label:
            o["note"] = [{"text": f"Model {model_name}: {label}."}]
        o.update(extra or {})
        u = url("Observation", key)
        obs_urls.append(u)
        entries.append({"fullUrl": u, "resource": o})

    band = recommendation.get("band")
    interp = {}
    if band:
        interp = {
            "interpretation": [
                {
                    "coding": [{"system": BAND_SYSTEM, "code": band, "display": f"{band} NME-pattern band"}],
                    "text": f"{band} NME-pattern band (source: {recommendation.get('band_source')})",
                }
            ]
        }
    observation(
        "probability",
        "nme-pattern-probability",
        "Calibrated slide-level NME-pattern probability (AI)",
        recommendation.get("nme_probability"),
        interp,
    )
    for name, score in (recommendation.get("patterns") or {}).items():
        observation(name, f"nme-pattern-{name}", _PATTERN_TEXT.get(name, f"{name} score (AI)"), score)

    # DiagnosticReport -----------------------------------------------------------------------
    dr_url = url("DiagnosticReport")
    entries.append(
        {
            "fullUrl": dr_url,
            "resource": {
                "resourceType": "DiagnosticReport",
                "meta": security(),
                "identifier": [{"system": SLIDE_ID_SYSTEM, "value": sid}],
                "status": "preliminary",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                "code": "SP",
                                "display": "Surgical Pathology",
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [{"system": LOINC, "code": "11526-1", "display": "Pathology study"}],
                    "text": "AI-assisted NME-pattern analysis of a skin biopsy (preliminary)",
                },
                "subject": subject,
                "issued": ts,
                "result": [_ref(u) for u in obs_urls],
                "conclusion": _conclusion(result, recommendation, label),
            },
        }
    )

    # ServiceRequests ------------------------------------------------------------------------
    sr_urls: list[str] = []
    for order in recommendation.get("orders", []):
        notes = [f"Proposed by rules {', '.join(order['rules'])} (ruleset {recommendation.get('ruleset_version')})."]
        notes += list(order.get("rationale", []))
        if order.get("note"):
            notes.append(order["note"])
        if order.get("additional_codes"):
            notes.append(
                "Component or alternative codes: "
                + "; ".join(f"{c['code']} {c['display']} ({c['system']})" for c in order["additional_codes"])
            )
        if not order.get("code_verified", True):
            notes.append(
                f"Code {order['code']['code']} is a local code ({order['code']['system']}): no verified LOINC."
            )
        notes.append(recommendation.get("disclaimer", "Decision support: a clinician confirms every order."))
        cat = _SR_CATEGORY.get(order.get("category", "laboratory"), _SR_CATEGORY["laboratory"])
        sr = {
            "resourceType": "ServiceRequest",
            "meta": security(),
            "identifier": [{"system": ORDER_ID_SYSTEM, "value": f"{sid}/{order['id']}"}],
            "status": "draft",
            "intent": "proposal",
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": cat[0], "display": cat[1]}]}],
            "priority": order["priority"],
            "code": _codeable(order["code"], order["display"]),
            "subject": subject,
            "authoredOn": ts,
            "requester": device_ref,
            "reasonReference": [_ref(dr_url, "AI NME-pattern analysis (preliminary)")],
            "note": [{"text": n} for n in notes if n],
        }
        u = url("ServiceRequest", order["id"])
        sr_urls.append(u)
        entries.append({"fullUrl": u, "resource": sr})

    # Provenance -----------------------------------------------------------------------------
    entries.append(
        {
            "fullUrl": url("Provenance"),
            "resource": {
                "resourceType": "Provenance",
                "target": [_ref(u) for u in [dr_url, *obs_urls, *sr_urls]],
                "recorded": ts,
                "activity": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                            "code": "CREATE",
                            "display": "create",
                        }
                    ]
                },
                "agent": [
                    {
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                    "code": "author",
                                    "display": "Author",
                                }
                            ]
                        },
                        "who": device_ref,
                    }
                ],
            },
        }
    )

    bundle = {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": url("Bundle")},
        "type": "collection",
        "timestamp": ts,
        "entry": entries,
    }
    log.debug("slide %s: FHIR bundle with %d entries", sid, len(entries))
    return bundle
