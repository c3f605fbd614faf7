"""Clinical rule layer: one clinical vignette per rule path, bad inputs, ruleset validation, CLI, property.

Each vignette states the patient in words; the assertions are what a clinician reviewing the
rule table (docs/rules.md) expects the product to propose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.clinical.rules import ClinicalContext, load_clinical, load_ruleset, parse_context, recommend
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.paths import REPO_ROOT, RULES_YAML

RS = load_ruleset()
IMAGING = {"ct_or_mri_pancreas", "sstr_pet", "eus"}
NME_PATTERN = {"pallor": 0.82, "necrolysis": 0.71, "parakeratosis": 0.88}
LATE_PATTERN = {"pallor": 0.10, "necrolysis": 0.05, "parakeratosis": 0.90}


def make_result(
    p: float | None = 0.85, band: str | None = "auto", status: str = "ok", patterns: dict | None = None, **extra: Any
) -> dict:
    """A per-slide result.json as batch inference writes it."""
    if band == "auto":
        band = RS.band_of(p) if p is not None else None
    res = {
        "slide_id": extra.pop("slide_id", "S1"),
        "status": status,
        "error": extra.pop("error", None),
        "nme_probability": p,
        "band": band,
        "patterns": patterns if patterns is not None else (dict(NME_PATTERN) if status == "ok" else None),
        "quality": extra.pop("quality", {"flags": [], "reasons": []}),
        "model": {"name": "nme-demo", "version": "0.1.0", "sha256": "ab" * 32},
    }
    res.update(extra)
    return res


def ctx(**fields: Any) -> ClinicalContext:
    return parse_context(fields)


def order_ids(rec: dict) -> set[str]:
    return {o["id"] for o in rec["orders"]}


def order(rec: dict, oid: str) -> dict:
    return next(o for o in rec["orders"] if o["id"] == oid)


def flag_ids(rec: dict) -> set[str]:
    return {f["id"] for f in rec["flags"]}


def diff_ids(rec: dict) -> set[str]:
    return {d["id"] for d in rec["differential"]}


# -- the rule paths, as vignettes -------------------------------------------------------------
def test_r1_non_diagnostic_slide_proposes_rebiopsy_only() -> None:
    """Shave biopsy with no epidermis: the quality gate fails the slide; no model band exists."""
    res = make_result(
        p=None,
        band=None,
        status="non_diagnostic",
        patterns=None,
        quality={"flags": ["no_epidermis"], "reasons": ["no epidermis found"]},
    )
    rec = recommend(res, None, RS)
    assert rec["rules_fired"] == ["R1"]
    assert order_ids(rec) == {"rebiopsy"}
    assert order(rec, "rebiopsy")["priority"] == "routine"
    assert "non_diagnostic" in flag_ids(rec)
    assert "no epidermis found" in next(f for f in rec["flags"] if f["id"] == "non_diagnostic")["message"]
    assert rec["band"] is None and rec["nme_probability"] is None


def test_r2_low_band_without_red_flags_proposes_nothing_and_says_negative_does_not_exclude() -> None:
    """Eczematous rash on the trunk, model LOW, no diabetes: nothing NME-specific."""
    rec = recommend(make_result(p=0.06), ctx(site="trunk", diabetes="no"), RS)
    assert rec["rules_fired"] == ["R2"]
    assert rec["orders"] == []
    assert any("a negative biopsy does not exclude NME" in n for n in rec["notes"])
    assert rec["band"] == "LOW" and rec["nme_probability"] == 0.06


def test_r2b_red_flags_override_a_low_model_result() -> None:
    """New diabetes, 8 kg weight loss, perioral erosive rash; biopsy called LOW by the model."""
    rec = recommend(make_result(p=0.08), ctx(site="perioral", diabetes="yes", weight_loss="yes"), RS)
    assert "R2b" in rec["rules_fired"] and "R2" not in rec["rules_fired"]
    assert order_ids(rec) == {"glucagon", "glucose_hba1c", "cbc"}
    assert order(rec, "glucagon")["priority"] == "urgent"
    assert not order_ids(rec) & IMAGING
    assert any("negative biopsy does not exclude NME" in n for n in rec["notes"])


def test_r2b_needs_a_compatible_site_and_flags_an_unknown_one() -> None:
    """Same facts, but the rash is on the trunk (not compatible) or the site is unrecorded."""
    trunk = recommend(make_result(p=0.08), ctx(site="trunk", diabetes=True, weight_loss=True), RS)
    assert "R2b" not in trunk["rules_fired"] and trunk["orders"] == []
    unknown = recommend(make_result(p=0.08), ctx(diabetes=True, weight_loss=True), RS)
    assert "R2b" not in unknown["rules_fired"]
    assert "red_flags_site_unknown" in flag_ids(unknown)


def test_r2b_applies_to_a_non_diagnostic_slide_too() -> None:
    """Clinical suspicion does not depend on the slide: non-diagnostic biopsy + red flags."""
    res = make_result(
        p=None,
        band=None,
        status="non_diagnostic",
        patterns=None,
        quality={"flags": ["blur"], "reasons": ["out of focus"]},
    )
    rec = recommend(res, ctx(site="perineal", diabetes=1, weight_loss=1), RS)
    assert {"R1", "R2b"} <= set(rec["rules_fired"])
    assert {"rebiopsy", "glucagon"} <= order_ids(rec)


def test_r3_indeterminate_band_rebiopsy_and_first_line_labs() -> None:
    """Psoriasiform dermatitis of the groin, model INDETERMINATE."""
    rec = recommend(make_result(p=0.41), ctx(site="intertriginous"), RS)
    assert "R3" in rec["rules_fired"]
    assert order_ids(rec) == {"rebiopsy", "glucose_hba1c", "cbc", "zinc", "albumin", "liver_panel"}
    assert {"psoriasis", "eczema", "drug_reaction", "zinc_deficiency"} <= diff_ids(rec)
    assert "glucagon" not in order_ids(rec)


def test_r3_late_pattern_with_high_band_adds_rebiopsy_to_r4() -> None:
    """Old lesion: parakeratosis only, yet the slide probability is HIGH."""
    rec = recommend(make_result(p=0.7, patterns=LATE_PATTERN), None, RS)
    assert {"R3", "R4"} <= set(rec["rules_fired"])
    assert {"rebiopsy", "glucagon"} <= order_ids(rec)


def test_r3b_low_band_late_pattern_is_a_note_not_orders() -> None:
    rec = recommend(make_result(p=0.1, patterns=LATE_PATTERN), None, RS)
    assert "R3b" in rec["rules_fired"] and "R3" not in rec["rules_fired"]
    assert rec["orders"] == []
    assert any("late or treated NME" in n for n in rec["notes"])


def test_r4_high_band_glucagon_first_with_preanalytics_and_no_imaging() -> None:
    """Erosive migratory rash of the buttocks, model HIGH, no labs yet."""
    rec = recommend(make_result(p=0.86), ctx(site="intertriginous"), RS)
    assert "R4" in rec["rules_fired"]
    assert order_ids(rec) == {"glucagon", "glucose_hba1c", "cbc", "albumin", "liver_panel", "zinc", "chromogranin_a"}
    g = order(rec, "glucagon")
    assert g["priority"] == "urgent"
    assert rec["orders"][0]["id"] == "glucagon"  # urgent first
    assert g["code"] == {
        "system": "http://loinc.org",
        "code": "2338-2",
        "display": "Glucagon [Mass/volume] in Serum or Plasma",
    }
    for words in (
        "8 h fast",
        "pre-chilled EDTA",
        "on ice",
        "frozen",
        "[E: Mayo Clinic Labs test 9358]",
        "Imaging waits",
    ):
        assert words in g["note"], words
    assert not order_ids(rec) & IMAGING
    assert {"glucagonoma", "nae", "zinc_deficiency", "pellagra", "psoriasis", "pemphigus_foliaceus"} <= diff_ids(rec)
    assert any("[E: Mayo Clinic Labs test 9358]" in r for r in g["rationale"])


def test_r5a_glucagon_above_1000_images_and_screens_men1() -> None:
    """HIGH slide, fasting glucagon 1850 pg/mL, no imaging yet."""
    rec = recommend(make_result(p=0.9), ctx(site="perineal", glucagon_pg_ml=1850), RS)
    assert {"R4", "R5a", "R13"} <= set(rec["rules_fired"])
    assert order(rec, "ct_or_mri_pancreas")["priority"] == "urgent"
    assert order(rec, "sstr_pet")["priority"] == "routine"
    assert "eus" not in order_ids(rec)  # only once CT/MRI is negative
    assert "men1_screen" in order_ids(rec)
    assert "glucagon" not in order_ids(rec)  # already known
    assert "glucagonoma_likely" in flag_ids(rec)


def test_r5a_after_negative_ct_proposes_eus_and_sstr_pet_urgently() -> None:
    rec = recommend(make_result(p=0.9), ctx(glucagon_pg_ml=1200, prior_imaging="negative"), RS)
    assert order(rec, "eus")["priority"] == "urgent"
    assert order(rec, "sstr_pet")["priority"] == "urgent"
    ct = order(rec, "ct_or_mri_pancreas")
    assert ct["priority"] == "routine" and "not a multiphasic pancreas-protocol" in ct["note"]


def test_r5b_glucagon_500_to_999_images_and_flags_confounders() -> None:
    """Cirrhotic patient, INDETERMINATE slide, fasting glucagon 640 pg/mL."""
    rec = recommend(make_result(p=0.35), ctx(glucagon_pg_ml=640, liver_disease="yes"), RS)
    assert "R5b" in rec["rules_fired"] and "R5a" not in rec["rules_fired"]
    assert order(rec, "ct_or_mri_pancreas")["priority"] == "urgent"
    fl = next(f for f in rec["flags"] if f["id"] == "glucagon_confounders")
    assert "known liver disease" in fl["message"] and "sepsis" in fl["message"]
    assert "men1_screen" not in order_ids(rec)


def test_r5c_raised_glucagon_below_500_without_classic_syndrome_no_imaging() -> None:
    """Crohn's disease, INDETERMINATE slide, glucagon 310 pg/mL, laboratory ULN not given."""
    rec = recommend(make_result(p=0.45), ctx(glucagon_pg_ml=310, ibd=True), RS)
    assert "R5c" in rec["rules_fired"]
    assert {"liver_panel", "albumin", "hcv_antibody", "zinc", "amino_acids"} <= order_ids(rec)
    assert not order_ids(rec) & IMAGING
    assert "pseudoglucagonoma" in diff_ids(rec)
    assert rec["glucagon_uln_source"].startswith("ruleset default")
    aa = order(rec, "amino_acids")
    assert aa["code"]["system"] == "urn:nme-pathology:local-orders" and aa["code_verified"] is False
    assert any("ruleset default" in r for r in aa["rationale"])


def test_r5c_classic_syndrome_justifies_imaging_below_500() -> None:
    """HIGH slide, diabetes, weight loss, glucagon 380 pg/mL: classic syndrome."""
    rec = recommend(make_result(p=0.88), ctx(site="other", diabetes=True, weight_loss=True, glucagon_pg_ml=380), RS)
    assert "R5c" in rec["rules_fired"]
    ct = order(rec, "ct_or_mri_pancreas")
    assert ct["priority"] == "urgent" and "classic" in ct["note"]
    # the same facts with an INDETERMINATE slide are not the classic syndrome: no imaging
    rec = recommend(make_result(p=0.4), ctx(site="other", diabetes=True, weight_loss=True, glucagon_pg_ml=380), RS)
    assert "R5c" in rec["rules_fired"] and not order_ids(rec) & IMAGING
    # nor is a HIGH slide without weight loss
    rec = recommend(make_result(p=0.9), ctx(site="other", diabetes=True, weight_loss="no", glucagon_pg_ml=380), RS)
    assert not order_ids(rec) & IMAGING


def test_r5c_vs_r5d_uses_the_laboratory_uln_when_given() -> None:
    """Same glucagon 310 pg/mL, but this laboratory's ULN is 350: normal, not raised."""
    rec = recommend(make_result(p=0.45), ctx(glucagon_pg_ml=310, glucagon_uln_pg_ml=350), RS)
    assert "R5d" in rec["rules_fired"] and "R5c" not in rec["rules_fired"]
    assert rec["glucagon_uln_pg_ml"] == 350 and rec["glucagon_uln_source"] == "laboratory upper limit"


def test_r5d_normal_glucagon_no_imaging_consider_other_necrolytic_erythemas() -> None:
    """HIGH slide on the feet, glucagon 60 pg/mL."""
    rec = recommend(make_result(p=0.8), ctx(glucagon_pg_ml=60, glucagon_uln_pg_ml=130), RS)
    assert "R5d" in rec["rules_fired"]
    assert not order_ids(rec) & IMAGING
    assert {"zinc", "hcv_antibody"} <= order_ids(rec)
    assert {"nae", "zinc_deficiency", "pellagra", "efa_biotin"} <= diff_ids(rec)
    assert "rebiopsy" not in order_ids(rec)


def test_r5d_discordant_red_flags_with_low_slide_proposes_rebiopsy() -> None:
    rec = recommend(make_result(p=0.1), ctx(site="perineal", diabetes=True, weight_loss=True, glucagon_pg_ml=70), RS)
    assert {"R2b", "R5d"} <= set(rec["rules_fired"])
    assert "rebiopsy" in order_ids(rec) and "R5d" in order(rec, "rebiopsy")["rules"]
    assert "glucagon" not in order_ids(rec)


def test_r6_acral_site_hcv_and_zinc_unless_hcv_known() -> None:
    """Dorsal-foot psoriasiform plaques, model LOW."""
    rec = recommend(make_result(p=0.1), ctx(site="acral"), RS)
    assert "R6" in rec["rules_fired"]
    assert order_ids(rec) == {"hcv_antibody", "zinc"}
    assert "nae" in diff_ids(rec)
    known = recommend(make_result(p=0.1), ctx(site="acral", hcv="negative"), RS)
    assert order_ids(known) == {"zinc"}
    positive = recommend(make_result(p=0.1), ctx(site="trunk", hcv="positive"), RS)
    assert "R6" in positive["rules_fired"] and "hcv_antibody" not in order_ids(positive)


def test_r6_acral_high_still_gets_glucagon() -> None:
    rec = recommend(make_result(p=0.9), ctx(site="acral", hcv="unknown"), RS)
    assert {"glucagon", "hcv_antibody", "zinc"} <= order_ids(rec)


def test_r7_liver_disease_or_low_albumin() -> None:
    """Alcoholic cirrhosis; and separately albumin 2.6 g/dL."""
    for c in (ctx(liver_disease="true"), ctx(albumin_g_dl="2.6")):
        rec = recommend(make_result(p=0.1), c, RS)
        assert "R7" in rec["rules_fired"]
        assert {"liver_panel", "albumin", "zinc", "amino_acids"} <= order_ids(rec)
    normal = recommend(make_result(p=0.1), ctx(albumin_g_dl=4.1), RS)
    assert "R7" not in normal["rules_fired"]


def test_r8_low_zinc_prompts_repletion_and_risk_factors_order_zinc() -> None:
    """Zinc 38 µg/dL; and separately a patient on parenteral nutrition with zinc unknown."""
    low = recommend(make_result(p=0.1), ctx(zinc_ug_dl=38), RS)
    assert "R8" in low["rules_fired"] and "zinc_repletion_prompt" in flag_ids(low)
    assert "zinc" not in order_ids(low)  # already known
    tpn = recommend(make_result(p=0.1), ctx(tpn="yes"), RS)
    assert "R8" in tpn["rules_fired"] and "zinc" in order_ids(tpn)
    assert "zinc_repletion_prompt" not in flag_ids(tpn)


def test_r8_low_zinc_does_not_remove_glucagon_when_high() -> None:
    rec = recommend(make_result(p=0.9), ctx(zinc_ug_dl=40, diabetes=True, weight_loss=True, site="perineal"), RS)
    assert "glucagon" in order_ids(rec)


def test_r9_sun_exposed_or_alcohol_niacin() -> None:
    for c in (ctx(site="sun_exposed"), ctx(alcohol="Yes")):
        rec = recommend(make_result(p=0.3), c, RS)
        assert "R9" in rec["rules_fired"] and "niacin" in order_ids(rec)
        assert "pellagra" in diff_ids(rec)
        assert order(rec, "niacin")["code"]["system"] == "urn:nme-pathology:local-orders"


def test_r10_known_mass_expedites_sstr_pet_and_eus() -> None:
    """Incidental pancreatic tail mass on a CT; LOW slide; glucagon not yet measured."""
    for c in (ctx(prior_imaging="mass"), ctx(pancreatic_mass=True), ctx(prior_imaging="liver_lesions")):
        rec = recommend(make_result(p=0.1), c, RS)
        assert "R10" in rec["rules_fired"]
        assert order(rec, "sstr_pet")["priority"] == "urgent"
        assert order(rec, "eus")["priority"] == "urgent"
        assert order(rec, "glucagon")["priority"] == "urgent"
        assert "known_lesion" in flag_ids(rec)


def test_r13_men1_history_screens_calcium_pth_prolactin() -> None:
    rec = recommend(make_result(p=0.1), ctx(men1_history="1"), RS)
    assert "R13" in rec["rules_fired"]
    o = order(rec, "men1_screen")
    assert {c["code"] for c in o["additional_codes"]} == {"17861-6", "2731-8", "2842-3"}


def test_failed_slide_gives_no_orders_and_says_why() -> None:
    res = make_result(p=None, band=None, status="failed", patterns=None, error="slide file truncated")
    rec = recommend(res, ctx(glucagon_pg_ml=2000, men1_history=True), RS)
    assert rec["orders"] == [] and rec["rules_fired"] == []
    fl = next(f for f in rec["flags"] if f["id"] == "analysis_failed")
    assert "slide file truncated" in fl["message"]
    assert rec["disclaimer"]


# -- merging, bands, output contract ------------------------------------------------------------
def test_orders_are_deduplicated_most_urgent_wins_rules_and_rationales_unioned() -> None:
    rec = recommend(make_result(p=0.9), ctx(site="perioral", diabetes=True, weight_loss=True), RS)
    assert [o["id"] for o in rec["orders"]].count("glucagon") == 1
    g = order(rec, "glucagon")
    assert g["rules"] == ["R2b", "R4"] and len(g["rationale"]) == 2
    # sstr_pet: routine from R5a, urgent from R10 -> urgent, both rules listed
    rec = recommend(make_result(p=0.9), ctx(glucagon_pg_ml=1500, prior_imaging="mass"), RS)
    s = order(rec, "sstr_pet")
    assert s["priority"] == "urgent" and s["rules"] == ["R5a", "R10"]
    assert len(rec["orders"]) == len(order_ids(rec))


def test_result_band_used_when_consistent_recomputed_when_not() -> None:
    near = recommend(make_result(p=0.55, band="HIGH"), None, RS)  # ruleset: INDETERMINATE, within tolerance
    assert near["band"] == "HIGH" and near["band_source"] == "result" and "band_mismatch" in flag_ids(near)
    far = recommend(make_result(p=0.93, band="LOW"), None, RS)
    assert far["band"] == "HIGH" and far["band_source"] == "ruleset" and "band_mismatch" in flag_ids(far)
    assert "glucagon" in order_ids(far)
    same = recommend(make_result(p=0.7, band="HIGH"), None, RS)
    assert same["band_source"] == "result" and "band_mismatch" not in flag_ids(same)
    computed = recommend(make_result(p=0.7, band=None), None, RS)
    assert computed["band"] == "HIGH" and computed["band_source"] == "ruleset"
    only_band = recommend(make_result(p=None, band="INDETERMINATE"), None, RS)
    assert only_band["band"] == "INDETERMINATE"


def test_band_policy_ruleset_always_recomputes(tmp_path: Path) -> None:
    rs = _ruleset_with(tmp_path, lambda d: d.update(band_policy="ruleset"))
    rec = recommend(make_result(p=0.55, band="HIGH"), None, rs)
    assert rec["band"] == "INDETERMINATE" and "band_mismatch" in flag_ids(rec)


def test_recommendation_contract_and_citations() -> None:
    rec = recommend(
        make_result(p=0.9, patient_id="P7"),
        ctx(site="acral", diabetes=True, weight_loss=True, glucagon_pg_ml=700, zinc_ug_dl=40),
        RS,
    )
    json.dumps(rec, allow_nan=False)
    for key in ("orders", "differential", "flags", "disclaimer", "ruleset_version", "band", "nme_probability", "notes"):
        assert key in rec
    assert rec["ruleset_version"] == RS.ruleset_version and rec["patient_id"] == "P7"
    assert "clinician" in rec["disclaimer"]
    for o in rec["orders"]:
        assert o["priority"] in ("routine", "urgent") and o["rules"] and o["rationale"]
        assert all(("[E:" in r or "[S:" in r or "[D:" in r) for r in o["rationale"])
        assert set(o["code"]) == {"system", "code", "display"}
        assert o["code_verified"] == (o["code"]["system"] == "http://loinc.org")
    assert set(rec["evidence"]) >= {k for o in rec["orders"] for k in o["evidence"]}


def test_quality_warnings_on_an_ok_slide_are_flagged() -> None:
    rec = recommend(
        make_result(p=0.3, quality={"flags": ["little_epidermis"], "reasons": ["epidermis < 5% of tissue"]}), None, RS
    )
    assert "quality_warning" in flag_ids(rec)


# -- clinical context loading -------------------------------------------------------------------
def test_csv_booleans_empty_cells_and_patient_rows_merge(tmp_path: Path) -> None:
    f = tmp_path / "clinical.csv"
    f.write_text(
        "slide_id,patient_id,site,diabetes,weight_loss,hcv,zinc_ug_dl,glucagon_pg_ml\n"
        "S1,P1,perioral,,No,,,\n"
        ",P1,,YES,1,negative,55,\n"
        "S2,,acral,0,true,unknown,,1200\n",
        encoding="utf-8",
    )
    table = load_clinical(f, slide_ids={"S1", "S2"})
    c1 = table.lookup("S1", "P1")
    assert (c1.site, c1.diabetes, c1.weight_loss, c1.hcv, c1.zinc_ug_dl) == ("perioral", True, False, "negative", 55.0)
    assert c1.glucagon_pg_ml is None
    c2 = table.lookup("S2")
    assert (c2.diabetes, c2.weight_loss, c2.hcv, c2.glucagon_pg_ml) == (False, True, "unknown", 1200.0)
    assert table.lookup("S3", "P1").diabetes is True  # slide without a row: patient row
    assert table.lookup("S3") is None


def test_json_list_and_mapping(tmp_path: Path) -> None:
    lst = tmp_path / "c.json"
    lst.write_text(
        json.dumps(
            [{"slide_id": "S1", "diabetes": True, "zinc_ug_dl": 70}, {"patient_id": "P2", "men1_history": "yes"}]
        )
    )
    t = load_clinical(lst, slide_ids={"S1"})
    assert t.lookup("S1").zinc_ug_dl == 70 and t.lookup("S9", "P2").men1_history is True
    mp = tmp_path / "m.json"
    mp.write_text(json.dumps({"S1": {"site": "acral"}, "P2": {"patient_id": "P2", "alcohol": 1}}))
    t = load_clinical(mp, slide_ids={"S1"})
    assert t.lookup("S1").site == "acral" and t.lookup("SX", "P2").alcohol is True


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("site", "forearm", ["site", "forearm", "intertriginous"]),
        ("zinc_ug_dl", "low", ["zinc_ug_dl", "low", "number"]),
        ("glucagon_pg_ml", "-20", ["glucagon_pg_ml", "-20", "negative"]),
        ("albumin_g_dl", "nan", ["albumin_g_dl", "nan"]),
        ("hcv", "maybe", ["hcv", "maybe", "positive"]),
        ("diabetes", "perhaps", ["diabetes", "perhaps"]),
        ("prior_imaging", "ct", ["prior_imaging", "ct"]),
        ("glucagon_uln_pg_ml", "0", ["glucagon_uln_pg_ml"]),
        ("favourite_colour", "blue", ["favourite_colour", "allowed"]),
    ],
)
def test_bad_clinical_values_are_one_line_errors(field: str, value: str, words: list[str]) -> None:
    with pytest.raises(DataError) as ei:
        parse_context({"slide_id": "S1", field: value}, "clinical.csv line 2")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("clinical.csv line 2")
    for w in words:
        assert w in msg, (w, msg)


def test_bad_clinical_files(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("slide_id,site\nS1,perioral\nS9,acral\n")
    with pytest.raises(DataError, match=r"S9.*not among"):
        load_clinical(f, slide_ids={"S1"})
    f.write_text("slide_id,sitee\nS1,perioral\n")
    with pytest.raises(DataError, match=r"unknown column 'sitee'"):
        load_clinical(f)
    f.write_text("slide_id,site\nS1,perioral\nS1,acral\n")
    with pytest.raises(DataError, match="duplicate row"):
        load_clinical(f)
    f.write_text("site,diabetes\nperioral,yes\n")
    with pytest.raises(DataError, match="slide_id or patient_id column"):
        load_clinical(f)
    f.write_text("slide_id,zinc_ug_dl\nS1,12..5\n")
    with pytest.raises(DataError, match=r"line 2 \(S1\): zinc_ug_dl: must be a number \(got '12..5'\)"):
        load_clinical(f)
    with pytest.raises(DataError, match="not found"):
        load_clinical(tmp_path / "missing.csv")
    j = tmp_path / "c.json"
    j.write_text('{"S1": {"slide_id": "S2"}}')
    with pytest.raises(DataError, match="differs from its key"):
        load_clinical(j)
    j.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected an object"):
        load_clinical(j)


def test_patient_id_mismatch_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("slide_id,patient_id,site\nS1,P1,perioral\n")
    t = load_clinical(f, slide_ids={"S1"})
    with pytest.raises(DataError, match="patient_id 'P1'.*'P2'"):
        t.lookup("S1", "P2")


@pytest.mark.parametrize(
    "mutate,words",
    [
        (lambda r: r.pop("slide_id"), ["slide_id", "missing"]),
        (lambda r: r.pop("status"), ["status", "missing"]),
        (lambda r: r.pop("patterns"), ["patterns", "missing"]),
        (lambda r: r.update(status="done"), ["status", "done"]),
        (lambda r: r.update(nme_probability=1.7), ["nme_probability", "1.7"]),
        (lambda r: r.update(nme_probability="high"), ["nme_probability", "high"]),
        (lambda r: r.update(band="VERY_HIGH"), ["band", "VERY_HIGH"]),
        (lambda r: r["patterns"].pop("pallor"), ["patterns.pallor", "missing"]),
        (lambda r: r["patterns"].update(necrolysis=-0.1), ["patterns.necrolysis", "-0.1"]),
        (lambda r: r.update(nme_probability=None, band=None), ["nme_probability or band"]),
    ],
)
def test_bad_results_are_one_line_errors(mutate, words: list[str]) -> None:  # noqa: ANN001
    res = make_result(p=0.7)
    mutate(res)
    with pytest.raises(DataError) as ei:
        recommend(res, None, RS)
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_implausible_laboratory_uln_is_rejected() -> None:
    with pytest.raises(DataError, match="glucagon_uln_pg_ml 800 .*units"):
        recommend(make_result(p=0.7), ctx(glucagon_pg_ml=900, glucagon_uln_pg_ml=800), RS)


def test_context_for_another_slide_is_rejected() -> None:
    with pytest.raises(DataError, match="'S2' given for slide 'S1'"):
        recommend(make_result(p=0.7), ctx(slide_id="S2"), RS)


# -- ruleset validation -------------------------------------------------------------------------
def _ruleset_with(tmp_path: Path, edit) -> Any:  # noqa: ANN001
    data = yaml.safe_load(RULES_YAML.read_text(encoding="utf-8"))
    edit(data)
    p = tmp_path / "rules.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_ruleset(p)


def _rule(data: dict, rid: str) -> dict:
    return next(r for r in data["rules"] if r["id"] == rid)


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda d: _rule(d, "R4")["orders"].append({"id": "glucagn"}), r"R4.*unknown order id 'glucagn'"),
        (lambda d: d["orders"].update(pet_scan=d["orders"]["sstr_pet"]), r"unknown order id 'pet_scan'"),
        (lambda d: d["bands"][1].update(lower=0.15), r"LOW \(upper 0.2\) overlaps INDETERMINATE"),
        (lambda d: d["bands"][1].update(lower=0.25), r"gap between LOW .* INDETERMINATE"),
        (lambda d: d["bands"][2].update(upper=0.95), r"HIGH must end at 1"),
        (lambda d: d["thresholds"].update(glucagon_suggestive_pg_ml=1500), r"default ULN < suggestive < typical"),
        (lambda d: d["thresholds"].update(zinc_lower_limit_ug_dl=-1), r"zinc_lower_limit_ug_dl"),
        (lambda d: d["orders"]["glucagon"]["code"].update(code="2338-3"), r"2338-3.*check digit"),
        (
            lambda d: _rule(d, "R4")["orders"].append({"id": "ct_or_mri_pancreas", "priority": "urgent"}),
            r"R4.*imaging order 'ct_or_mri_pancreas' is not behind an imaging gate",
        ),
        (lambda d: _rule(d, "R4").update(when=["slide_ok", "band_hihg"]), r"unknown predicate 'band_hihg'"),
        (lambda d: _rule(d, "R4").update(rationale="NME pattern {bnad} seen here"), r"unknown placeholder \{bnad\}"),
        (lambda d: _rule(d, "R4").update(evidence=["MAYO_9999"]), r"unknown evidence key 'MAYO_9999'"),
        (lambda d: _rule(d, "R4").update(priorty="urgent"), r"unknown key 'rules.\d+.priorty'"),
        (lambda d: _rule(d, "R4")["orders"][0].update(priority="stat"), r"priority"),
        (lambda d: d["rules"].append(dict(_rule(d, "R4"))), r"duplicate rule id 'R4'"),
        (lambda d: d.pop("ruleset_version"), r"ruleset_version"),
    ],
)
def test_bad_rulesets_are_config_errors(tmp_path: Path, edit, pattern: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=pattern) as ei:
        _ruleset_with(tmp_path, edit)
    assert "\n" not in str(ei.value)


def test_shipped_ruleset_covers_the_rule_table_and_vocabulary() -> None:
    ids = {r.id for r in RS.rules}
    assert {"R1", "R2", "R2b", "R3", "R4", "R5a", "R5b", "R5c", "R5d", "R6", "R7", "R8", "R9", "R10", "R13"} <= ids
    assert set(RS.orders) == {
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
    }
    assert [(b.name, b.lower, b.upper) for b in RS.bands] == [
        ("LOW", 0.0, 0.2),
        ("INDETERMINATE", 0.2, 0.6),
        ("HIGH", 0.6, 1.0),
    ]
    local = {k for k, o in RS.orders.items() if o.code.system != "http://loinc.org"}
    assert {"amino_acids", "niacin", "eus", "rebiopsy"} <= local
    assert all("local code" in RS.orders[k].code.display for k in local)


# -- command line ---------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.clinical.rules", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_prints_recommendation_and_writes_fhir(tmp_path: Path) -> None:
    r = tmp_path / "result.json"
    r.write_text(json.dumps(make_result(p=0.9, slide_id="SL-1", created_at="2024-05-01T10:00:00Z")))
    c = tmp_path / "clinical.csv"
    c.write_text("slide_id,site,diabetes,weight_loss,glucagon_pg_ml\nSL-1,perineal,yes,yes,1400\n")
    out = tmp_path / "bundle.json"
    p = _cli(str(r), "--clinical", str(c), "--fhir", str(out))
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["slide_id"] == "SL-1" and "ct_or_mri_pancreas" in order_ids(rec)
    bundle = json.loads(out.read_text())
    assert bundle["resourceType"] == "Bundle" and bundle["timestamp"] == "2024-05-01T10:00:00Z"


@pytest.mark.parametrize("case", ["bad_site", "other_slide", "bad_result", "missing_file", "bad_json", "bad_rules"])
def test_cli_bad_input_one_line_error(tmp_path: Path, case: str) -> None:
    r = tmp_path / "result.json"
    r.write_text(json.dumps(make_result(p=0.9, slide_id="SL-1")))
    c = tmp_path / "clinical.csv"
    c.write_text("slide_id,site\nSL-1,perioral\n")
    args = [str(r), "--clinical", str(c)]
    expect = ""
    if case == "bad_site":
        c.write_text("slide_id,site\nSL-1,elbow\n")
        expect = "elbow"
    elif case == "other_slide":
        c.write_text("slide_id,site\nSL-1,perioral\nSL-2,acral\n")
        expect = "SL-2"
    elif case == "bad_result":
        r.write_text(json.dumps(make_result(p=0.9, slide_id="SL-1", band="MEDIUM")))
        expect = "band"
    elif case == "missing_file":
        args = [str(tmp_path / "nope.json")]
        expect = "not found"
    elif case == "bad_json":
        r.write_text("{not json")
        expect = "invalid JSON"
    elif case == "bad_rules":
        bad = tmp_path / "rules.yaml"
        bad.write_text("ruleset_version: '1'\nbands: [\n")
        args += ["--rules", str(bad)]
        expect = "invalid YAML"
    p = _cli(*args)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


# -- property: no imaging without a raised glucagon, a known lesion or the classic syndrome --------
_bool = st.sampled_from([None, True, False])
_num = lambda lo, hi: st.one_of(st.none(), st.floats(min_value=lo, max_value=hi, allow_nan=False))  # noqa: E731


@st.composite
def _cases(draw) -> tuple[dict, dict]:  # noqa: ANN001
    status = draw(st.sampled_from(["ok", "ok", "ok", "non_diagnostic", "failed"]))
    if status == "ok":
        p = draw(st.one_of(st.none(), st.floats(min_value=0, max_value=1)))
        band = (
            draw(st.sampled_from(["LOW", "INDETERMINATE", "HIGH"]))
            if p is None
            else draw(st.sampled_from([None, "LOW", "INDETERMINATE", "HIGH", RS.band_of(p)]))
        )
        patterns = {k: draw(st.floats(min_value=0, max_value=1)) for k in ("pallor", "necrolysis", "parakeratosis")}
        res = make_result(p=p, band=band, patterns=patterns)
    else:
        res = make_result(p=None, band=None, status=status, patterns=None, error="x")
    fields = {
        "site": draw(
            st.sampled_from(
                [None, "intertriginous", "perioral", "perineal", "acral", "sun_exposed", "trunk", "extremity", "other"]
            )
        ),
        **{
            b: draw(_bool)
            for b in (
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
        },
        "hcv": draw(st.sampled_from([None, "positive", "negative", "unknown"])),
        "zinc_ug_dl": draw(_num(0, 200)),
        "albumin_g_dl": draw(_num(0, 6)),
        "glucagon_pg_ml": draw(
            st.one_of(st.none(), st.floats(min_value=0, max_value=3000), st.sampled_from([150.0, 500.0, 1000.0]))
        ),
        "glucagon_uln_pg_ml": draw(st.one_of(st.none(), st.floats(min_value=1, max_value=499))),
        "prior_imaging": draw(st.sampled_from([None, "none", "negative", "mass", "liver_lesions"])),
    }
    return res, fields


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_property_no_imaging_without_raised_glucagon_known_lesion_or_classic_syndrome(case) -> None:  # noqa: ANN001
    res, fields = case
    rec = recommend(res, parse_context(fields), RS)
    ids = [o["id"] for o in rec["orders"]]
    assert len(ids) == len(set(ids))
    if res["status"] == "failed":
        assert ids == []
    if IMAGING & set(ids):
        g, uln = fields["glucagon_pg_ml"], fields["glucagon_uln_pg_ml"] or RS.thresholds.glucagon_default_uln_pg_ml
        raised = g is not None and g > uln
        lesion = fields["pancreatic_mass"] is True or fields["prior_imaging"] in ("mass", "liver_lesions")
        classic = rec["band"] == "HIGH" and fields["diabetes"] is True and fields["weight_loss"] is True
        assert raised or lesion or classic, (fields, rec["rules_fired"])
    if rec["band"] == "LOW" and not rec["rules_fired"][1:] and rec["rules_fired"][:1] == ["R2"]:
        assert ids == []
