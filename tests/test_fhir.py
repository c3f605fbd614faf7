"""FHIR R4 bundle: fhirclient (R4 4.0.1) strict parsing plus the checks fhirclient does not make.

fhirclient checks element names, types and cardinality but not required code bindings or
reference target types, so this file checks those itself against the R4 value sets and the
R4 reference targets of each element used.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from fhirclient.models.bundle import Bundle
from fhirclient.models.fhirabstractbase import FHIRValidationError

from pipeline import DEMO_MODEL_LABEL
from pipeline.clinical.fhir import build_bundle
from pipeline.clinical.rules import load_ruleset, parse_context, recommend
from pipeline.core.errors import DataError

RS = load_ruleset()
AI_MADE = {"DiagnosticReport", "Observation", "ServiceRequest"}
# Required bindings in R4 4.0.1 for the elements we emit.
BINDINGS = {
    ("Bundle", "type"): {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    },
    ("DiagnosticReport", "status"): {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    },
    ("Observation", "status"): {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    },
    ("ServiceRequest", "status"): {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"},
    ("ServiceRequest", "intent"): {
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    },
    ("ServiceRequest", "priority"): {"routine", "urgent", "asap", "stat"},
    ("Device", "status"): {"active", "inactive", "entered-in-error", "unknown"},
}
DEVICE_NAME_TYPES = {
    "udi-label-name",
    "user-friendly-name",
    "patient-reported-name",
    "manufacturer-name",
    "model-name",
    "other",
}
# R4 target types of each reference element used (path within the resource).
TARGETS = {
    ("DiagnosticReport", "result"): {"Observation"},
    ("DiagnosticReport", "subject"): {"Patient", "Group", "Device", "Location"},
    ("Observation", "device"): {"Device", "DeviceMetric"},
    ("Observation", "subject"): {"Patient", "Group", "Device", "Location"},
    ("ServiceRequest", "requester"): {
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Patient",
        "RelatedPerson",
        "Device",
    },
    ("ServiceRequest", "reasonReference"): {"Condition", "Observation", "DiagnosticReport", "DocumentReference"},
    ("ServiceRequest", "subject"): {"Patient", "Group", "Location", "Device"},
    ("Provenance", "agent.who"): {
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
        "Patient",
        "Device",
        "Organization",
    },
    ("Provenance", "target"): None,  # any resource
}
NOT_DEVICE = {("DiagnosticReport", "performer"), ("DiagnosticReport", "resultsInterpreter")}


def _result(p: float | None = 0.88, status: str = "ok", **extra: Any) -> dict:
    res = {
        "slide_id": extra.pop("slide_id", "S-42"),
        "status": status,
        "error": extra.pop("error", None),
        "nme_probability": p,
        "band": RS.band_of(p) if p is not None else None,
        "patterns": {"pallor": 0.8, "necrolysis": 0.66, "parakeratosis": 0.9} if status == "ok" else None,
        "quality": extra.pop("quality", {"flags": [], "reasons": []}),
        "model": extra.pop("model", {"name": "nme-demo", "version": "0.1.0", "sha256": "cd" * 32}),
    }
    res.update(extra)
    return res


def _bundle(res: dict, clinical: dict | None = None, **fields: Any) -> tuple[dict, dict]:
    clinical = {**(clinical or {}), **fields}
    rec = recommend(res, parse_context(clinical) if clinical else None, RS)
    return build_bundle(res, rec), rec


VIGNETTES = {
    "high_glucagon_negative_ct": (
        _result(0.9, patient_id="P-9", created_at="2024-05-01T10:00:00+02:00"),
        {
            "site": "perineal",
            "diabetes": True,
            "weight_loss": True,
            "glucagon_pg_ml": 1400,
            "prior_imaging": "negative",
        },
    ),
    "high_no_labs": (_result(0.75), {}),
    "low": (_result(0.05), {"site": "trunk"}),
    "non_diagnostic": (
        _result(None, status="non_diagnostic", quality={"flags": ["no_epidermis"], "reasons": ["no epidermis"]}),
        {},
    ),
    "failed": (_result(None, status="failed", error="unreadable slide"), {}),
}


def _resources(bundle: dict) -> dict[str, dict]:
    return {e["fullUrl"]: e["resource"] for e in bundle["entry"]}


def _refs(node: Any, path: str = "") -> list[tuple[str, dict]]:
    """(dotted path without list indices, Reference dict) for every Reference-looking dict."""
    out: list[tuple[str, dict]] = []
    if isinstance(node, dict):
        if "reference" in node or ("type" in node and "display" in node and "coding" not in node):
            out.append((path, node))
        for k, v in node.items():
            out += _refs(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for v in node:
            out += _refs(v, path)
    return out


def binding_problems(bundle: dict) -> list[str]:
    """Required-binding violations (fhirclient does not check these)."""
    probs = []
    if bundle.get("type") not in BINDINGS[("Bundle", "type")]:
        probs.append(f"Bundle.type {bundle.get('type')!r}")
    for _url, r in _resources(bundle).items():
        rt = r["resourceType"]
        for (t, el), allowed in BINDINGS.items():
            if t == rt and el in r and r[el] not in allowed:
                probs.append(f"{rt}.{el} {r[el]!r}")
            if t == rt and el == "status" and "status" not in r:
                probs.append(f"{rt}.status missing")
        for dn in r.get("deviceName", []):
            if dn.get("type") not in DEVICE_NAME_TYPES:
                probs.append(f"Device.deviceName.type {dn.get('type')!r}")
        if rt == "ServiceRequest" and "intent" not in r:
            probs.append("ServiceRequest.intent missing")
    return probs


def reference_problems(bundle: dict) -> list[str]:
    """Literal references that do not resolve in the bundle or point at a disallowed type."""
    res = _resources(bundle)
    probs = []
    for _url, r in res.items():
        rt = r["resourceType"]
        for path, ref in _refs({k: v for k, v in r.items() if k != "resourceType"}):
            if (rt, path) in NOT_DEVICE:
                probs.append(f"{rt}.{path} present")
            allowed = TARGETS.get((rt, path), "unlisted")
            if allowed == "unlisted":
                probs.append(f"{rt}.{path}: reference element not in the test's table")
                continue
            if "reference" in ref:
                target = res.get(ref["reference"])
                if target is None:
                    probs.append(f"{rt}.{path} -> {ref['reference']} does not resolve")
                elif allowed is not None and target["resourceType"] not in allowed:
                    probs.append(f"{rt}.{path} -> {target['resourceType']} not allowed")
            else:  # logical reference: its declared type must be allowed
                if allowed is not None and ref.get("type") not in allowed:
                    probs.append(f"{rt}.{path} logical reference type {ref.get('type')!r}")
    return probs


@pytest.mark.parametrize("name", list(VIGNETTES))
def test_bundle_is_valid_r4(name: str) -> None:
    res, clinical = VIGNETTES[name]
    bundle, rec = _bundle(res, clinical)
    Bundle(copy.deepcopy(bundle), strict=True)  # raises FHIRValidationError on any structural problem
    json.dumps(bundle, allow_nan=False)
    assert binding_problems(bundle) == []
    assert reference_problems(bundle) == []
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls))
    assert all(
        re.fullmatch(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u) for u in urls
    )
    assert bundle["type"] == "collection"


def test_checks_catch_what_fhirclient_misses() -> None:
    """The binding and reference checks fail on broken bundles that fhirclient accepts."""
    bundle, _ = _bundle(*VIGNETTES["high_no_labs"])
    broken = copy.deepcopy(bundle)
    sr = next(e["resource"] for e in broken["entry"] if e["resource"]["resourceType"] == "ServiceRequest")
    sr["intent"] = "suggestion"
    sr["priority"] = "whenever"
    dr_entry = next(e for e in broken["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    device_url = next(e["fullUrl"] for e in broken["entry"] if e["resource"]["resourceType"] == "Device")
    dr_entry["resource"]["performer"] = [{"reference": device_url}]
    dr_entry["resource"]["result"].append({"reference": "urn:uuid:00000000-0000-5000-8000-000000000000"})
    Bundle(copy.deepcopy(broken), strict=True)  # fhirclient: fine
    assert len(binding_problems(broken)) == 2
    probs = reference_problems(broken)
    assert any("performer" in p for p in probs) and any("does not resolve" in p for p in probs)
    with pytest.raises(FHIRValidationError):  # and fhirclient does catch structural errors
        bad = copy.deepcopy(bundle)
        bad["entry"][0]["resource"]["colour"] = "blue"
        Bundle(bad, strict=True)


def test_resources_and_their_content() -> None:
    res, clinical = VIGNETTES["high_glucagon_negative_ct"]
    bundle, rec = _bundle(res, clinical)
    by_type: dict[str, list[dict]] = {}
    for e in bundle["entry"]:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    assert {k: len(v) for k, v in by_type.items()} == {
        "Device": 1,
        "Observation": 4,
        "DiagnosticReport": 1,
        "ServiceRequest": len(rec["orders"]),
        "Provenance": 1,
    }
    dr = by_type["DiagnosticReport"][0]
    assert dr["status"] == "preliminary" and dr["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "11526-1",
        "display": "Pathology study",
    }
    assert "performer" not in dr and "resultsInterpreter" not in dr
    assert "HIGH" in dr["conclusion"] and "clinician" in dr["conclusion"]
    assert len(dr["result"]) == 4
    prob = next(o for o in by_type["Observation"] if o["code"]["coding"][0]["code"] == "nme-pattern-probability")
    assert (
        prob["valueQuantity"]["value"] == pytest.approx(0.9)
        and prob["interpretation"][0]["coding"][0]["code"] == "HIGH"
    )
    for o in by_type["Observation"]:
        assert o["status"] == "preliminary" and "device" in o
    srs = {sr["identifier"][0]["value"].split("/")[1]: sr for sr in by_type["ServiceRequest"]}
    assert set(srs) == {o["id"] for o in rec["orders"]}
    for o in rec["orders"]:
        sr = srs[o["id"]]
        assert (sr["status"], sr["intent"], sr["priority"]) == ("draft", "proposal", o["priority"])
        assert sr["code"]["coding"][0]["code"] == o["code"]["code"]
        notes = " ".join(n["text"] for n in sr["note"])
        assert all(r in notes for r in o["rules"]) and "clinician" in notes
    assert srs["eus"]["priority"] == "urgent"
    assert "pre-chilled EDTA" not in json.dumps(srs)  # glucagon known: no glucagon order in this vignette
    subj = srs["ct_or_mri_pancreas"]["subject"]
    assert subj["type"] == "Patient" and subj["identifier"]["value"] == "P-9" and "reference" not in subj
    prov = by_type["Provenance"][0]
    ai_urls = {e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] in AI_MADE}
    assert {t["reference"] for t in prov["target"]} == ai_urls
    device_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    assert prov["agent"][0]["who"]["reference"] == device_url
    for e in bundle["entry"]:
        r = e["resource"]
        sec = r.get("meta", {}).get("security", [])
        has_aiast = any(
            s["code"] == "AIAST" and s["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
            for s in sec
        )
        assert has_aiast == (r["resourceType"] in AI_MADE), r["resourceType"]


def test_glucagon_service_request_carries_preanalytics() -> None:
    bundle, rec = _bundle(*VIGNETTES["high_no_labs"])
    sr = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "ServiceRequest" and e["resource"]["code"]["coding"][0]["code"] == "2338-2"
    )
    notes = " ".join(n["text"] for n in sr["note"])
    assert sr["priority"] == "urgent" and "8 h fast" in notes and "R4" in notes


def test_timestamps_come_from_the_result_and_bundle_is_deterministic() -> None:
    res, clinical = VIGNETTES["high_glucagon_negative_ct"]
    b1, _ = _bundle(copy.deepcopy(res), clinical)
    b2, _ = _bundle(copy.deepcopy(res), clinical)
    assert b1 == b2
    assert b1["timestamp"] == "2024-05-01T08:00:00Z"
    r = _resources(b1)
    assert {
        x.get("issued") or x.get("authoredOn") or x.get("recorded") for x in r.values() if x["resourceType"] != "Device"
    } == {"2024-05-01T08:00:00Z"}
    # without a timestamp in the result only the timestamps may differ
    res2 = {k: v for k, v in res.items() if k != "created_at"}
    strip = re.compile(r'"(timestamp|issued|authoredOn|recorded)": "[^"]+"')
    a, _ = _bundle(copy.deepcopy(res2), clinical)
    b, _ = _bundle(copy.deepcopy(res2), clinical)
    assert strip.sub("", json.dumps(a)) == strip.sub("", json.dumps(b))
    # different content or slide -> different ids
    c, _ = _bundle(dict(res, nme_probability=0.91), clinical)
    d, _ = _bundle(dict(res, slide_id="S-43"), clinical)
    ids = lambda x: {e["fullUrl"] for e in x["entry"]}  # noqa: E731
    assert not ids(b1) & ids(c) and not ids(b1) & ids(d)


def test_demo_model_is_labelled() -> None:
    bundle, _ = _bundle(_result(0.7))
    device = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    assert device["safety"][0]["text"] == DEMO_MODEL_LABEL
    assert (
        DEMO_MODEL_LABEL
        in next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")[
            "conclusion"
        ]
    )
    assert {"model-name": "nme-demo"}.items() <= {d["type"]: d["name"] for d in device["deviceName"]}.items()
    assert device["version"][0]["value"] == "0.1.0" and device["identifier"][0]["value"] == "cd" * 32
    own, _ = _bundle(_result(0.7, model={"name": "nme-demo", "version": "2", "label": "synthetic only (test label)"}))
    dev = next(e["resource"] for e in own["entry"] if e["resource"]["resourceType"] == "Device")
    assert dev["safety"][0]["text"] == "synthetic only (test label)"
    real, _ = _bundle(_result(0.7, model={"name": "nme-resnet", "version": "3"}))
    dev = next(e["resource"] for e in real["entry"] if e["resource"]["resourceType"] == "Device")
    assert "safety" not in dev and "note" not in dev


def test_failed_and_non_diagnostic_bundles() -> None:
    failed, _ = _bundle(*VIGNETTES["failed"])
    types = [e["resource"]["resourceType"] for e in failed["entry"]]
    assert "ServiceRequest" not in types
    obs = next(e["resource"] for e in failed["entry"] if e["resource"]["resourceType"] == "Observation")
    assert obs["dataAbsentReason"]["coding"][0]["code"] == "error" and "valueQuantity" not in obs
    dr = next(e["resource"] for e in failed["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert "unreadable slide" in dr["conclusion"]
    nd, rec = _bundle(*VIGNETTES["non_diagnostic"])
    srs = [e["resource"] for e in nd["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert [sr["code"]["coding"][0]["code"] for sr in srs] == ["skin-rebiopsy"]
    assert srs[0]["subject"] == {
        "type": "Patient",
        "display": "Patient of slide S-42 (patient identifier not supplied)",
    }


def test_bad_inputs_to_build_bundle() -> None:
    res = _result(0.7)
    rec = recommend(res, None, RS)
    with pytest.raises(DataError, match="recommendation is for slide"):
        build_bundle(dict(res, slide_id="other"), rec)
    with pytest.raises(DataError, match="model"):
        build_bundle({k: v for k, v in res.items() if k != "model"}, rec)
    with pytest.raises(DataError, match="created_at.*yesterday"):
        build_bundle(dict(res, created_at="yesterday"), rec)
