"""Slide-level metrics with bootstrap intervals, the per-group table and tile-level metrics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from pipeline.evaluation.metrics import (
    RANKING_METRICS,
    auroc,
    average_precision,
    balanced_accuracy,
    bootstrap_samples,
    evaluate_slides,
    multilabel_tile_metrics,
    per_group_table,
    pick_thresholds,
    sensitivity_at_specificity,
    write_table_csv,
)
from pipeline.slide_model.calibration import Bands

ALL_METRICS = (*RANKING_METRICS, "ece", "brier")


def noisy_slides(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    y = (rng.random(n) < p).astype(int)  # calibrated by construction, AUROC about 0.83
    return p, y


# ---------------------------------------------------------------------------- point metrics
def test_auroc_and_auprc_match_sklearn_with_ties():
    rng = np.random.default_rng(5)
    for n in (7, 60, 400):
        p = np.round(rng.random(n), 1)  # many ties
        y = (rng.random(n) < p).astype(int)
        y[:2] = [0, 1]
        assert auroc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert average_precision(p, y) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_sensitivity_at_specificity_hand_example():
    neg = np.arange(1, 21) / 100  # 20 negatives: 0.01 ... 0.20
    pos = np.array([0.19, 0.30, 0.35, 0.40, 0.15, 0.12, 0.50, 0.60, 0.05, 0.195])
    p = np.r_[neg, pos]
    y = np.r_[np.zeros(20), np.ones(10)]
    # 95 % specificity allows 1 false positive of 20: threshold above 0.19, i.e. 0.195 (FP: 0.20);
    # positives >= 0.195: 0.195, 0.30, 0.35, 0.40, 0.50, 0.60 -> 6/10
    assert sensitivity_at_specificity(p, y, 0.95) == (pytest.approx(0.6), 0.195)
    # 90 % allows 2 false positives: threshold 0.19 (FP: 0.19, 0.20); + positive 0.19 -> 7/10
    assert sensitivity_at_specificity(p, y, 0.90) == (pytest.approx(0.7), 0.19)
    # 100 %: nothing above the highest negative but 0.30 ... -> 5/10 at threshold 0.30
    assert sensitivity_at_specificity(p, y, 1.0) == (pytest.approx(0.5), 0.30)
    r = evaluate_slides(p, y, n_boot=50)
    assert r["sensitivity_at_95_specificity"]["value"] == pytest.approx(0.6)
    assert r["sensitivity_at_95_specificity"]["threshold"] == 0.195
    assert r["sensitivity_at_90_specificity"]["value"] == pytest.approx(0.7)


def test_balanced_accuracy_at_threshold():
    p = np.array([0.1, 0.4, 0.5, 0.8, 0.3, 0.9])
    y = np.array([0, 0, 0, 0, 1, 1])
    # threshold 0.5: negatives 2/4 correct, positives 1/2 -> (0.5 + 0.5) / 2; p == 0.5 counts positive
    assert balanced_accuracy(p, y, 0.5) == pytest.approx(0.5)
    assert balanced_accuracy(p, y, 0.25) == pytest.approx((1 / 4 + 2 / 2) / 2)


# ---------------------------------------------------------------------------- bootstrap
def test_perfect_ranker_has_auroc_one_with_degenerate_interval():
    p = np.r_[np.linspace(0.0, 0.4, 30), np.linspace(0.6, 1.0, 20)]
    y = np.r_[np.zeros(30), np.ones(20)]
    r = evaluate_slides(p, y, n_boot=300)
    assert r["auroc"]["value"] == 1.0 and r["auroc"]["ci95"] == [1.0, 1.0]
    assert r["auprc"]["value"] == 1.0 and r["auprc"]["ci95"] == [1.0, 1.0]
    assert r["sensitivity_at_95_specificity"]["value"] == 1.0


@pytest.mark.parametrize("with_patients", [False, True])
def test_intervals_contain_the_point_estimate(with_patients):
    p, y = noisy_slides(300)
    pid = np.repeat(np.arange(150), 2) if with_patients else None
    r = evaluate_slides(p, y, patient_ids=pid, n_boot=1000, seed=0)
    for k in ALL_METRICS:
        lo, hi = r[k]["ci95"]
        assert lo <= r[k]["value"] <= hi, k
        assert lo < hi, k  # 300 noisy slides: a real interval, not a point
        assert r[k]["n_boot_used"] == 1000
    assert 0.75 < r["auroc"]["value"] < 0.9
    assert r["bootstrap"]["unit"] == ("patient" if with_patients else "slide")
    assert r["n_patients"] == (150 if with_patients else None)


def test_bootstrap_is_reproducible():
    p, y = noisy_slides(120, seed=3)
    a = evaluate_slides(p, y, n_boot=200, seed=7)
    b = evaluate_slides(p, y, n_boot=200, seed=7)
    c = evaluate_slides(p, y, n_boot=200, seed=8)
    assert a == b
    assert a["auroc"]["ci95"] != c["auroc"]["ci95"]


def test_patient_level_bootstrap_keeps_patients_together():
    pid = ["A", "A", "A", "B", "C", "C", "D", "E", "E", "E"]
    members = {k: [i for i, v in enumerate(pid) if v == k] for k in set(pid)}
    for idx in bootstrap_samples(len(pid), pid, n_boot=200, seed=1):
        counts = np.bincount(idx, minlength=len(pid))
        for rows in members.values():
            # every slide of a patient is drawn as often as the patient was drawn
            assert len(set(counts[rows])) == 1
        n_patients_drawn = sum(counts[rows[0]] for rows in members.values())
        assert n_patients_drawn == 5
    with pytest.raises(ValueError, match="length"):
        bootstrap_samples(3, ["A", "B"])
    with pytest.raises(ValueError, match="missing"):
        bootstrap_samples(2, ["A", None])


def test_patient_level_interval_is_wider_for_correlated_slides():
    # each patient contributes 5 identical slides: slide-level resampling pretends to have 5x the
    # evidence; patient-level resampling matches the interval of the 60 distinct patients
    p, y = noisy_slides(60, seed=11)
    p5, y5, pid = np.repeat(p, 5), np.repeat(y, 5), np.repeat(np.arange(60), 5)

    def width(r):
        lo, hi = r["auroc"]["ci95"]
        return hi - lo

    w_patient = width(evaluate_slides(p5, y5, patient_ids=pid, n_boot=1000))
    w_slide = width(evaluate_slides(p5, y5, n_boot=1000))
    w_distinct = width(evaluate_slides(p, y, n_boot=1000))
    assert w_patient > 1.7 * w_slide
    assert w_patient == pytest.approx(w_distinct, rel=0.25)


def test_one_class_gives_none_with_reason_never_nan():
    p = np.array([0.1, 0.3, 0.2, 0.05, 0.4])
    y = np.zeros(5, int)
    assert auroc(p, y) is None and average_precision(p, y) is None
    assert sensitivity_at_specificity(p, y) == (None, None)
    r = evaluate_slides(p, y, n_boot=100)
    text = json.dumps(r, allow_nan=False)  # no NaN anywhere
    for k in RANKING_METRICS:
        assert r[k]["value"] is None and r[k]["ci95"] is None
        assert "one class" in r[k]["reason"] and "n_pos=0" in r[k]["reason"]
    assert r["brier"]["value"] == pytest.approx(np.mean(p**2))  # defined with one class
    assert r["ece"]["ci95"] is not None
    assert "NaN" not in text


def test_rare_positives_report_how_many_resamples_were_used():
    p = np.r_[np.linspace(0, 0.5, 29), [0.9]]
    y = np.r_[np.zeros(29), [1]]  # one positive slide: about 37 % of resamples lack it
    r = evaluate_slides(p, y, n_boot=400, seed=0)
    used = r["auroc"]["n_boot_used"]
    assert 200 < used < 300
    assert r["bootstrap"]["resamples_with_one_class"] == 400 - used
    json.dumps(r, allow_nan=False)


def test_evaluate_slides_validates_inputs():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_slides([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_slides([0.1, 1.5], [0, 1])
    with pytest.raises(ValueError, match="length"):
        evaluate_slides([0.1, 0.5], [0, 1, 1])


# ---------------------------------------------------------------------------- tables
def test_per_group_table_hand_example(tmp_path):
    p = [0.05, 0.3, 0.7, 0.9, 0.1, 0.6, 0.2]
    y = [0, 0, 1, 1, 0, 1, 0]
    g = ["NME", "eczema", "NME", "NME", "eczema", "psoriasis", "psoriasis"]
    rows = per_group_table(p, y, g, threshold=0.5, bands=Bands(low=0.2, high=0.6))
    by = {r["group"]: r for r in rows}
    assert [r["group"] for r in rows] == ["NME", "eczema", "psoriasis", "(all)"]
    assert by["NME"] == {
        "group": "NME",
        "n": 3,
        "n_label_positive": 2,
        "mean_probability": pytest.approx(0.55),
        "fraction_predicted_positive": pytest.approx(2 / 3),
        "n_LOW": 1,
        "n_INDETERMINATE": 0,
        "n_HIGH": 2,
    }
    # psoriasis: 0.6 is HIGH (p == high), 0.2 is INDETERMINATE (p == low)
    assert (by["psoriasis"]["n_LOW"], by["psoriasis"]["n_INDETERMINATE"], by["psoriasis"]["n_HIGH"]) == (0, 1, 1)
    assert by["(all)"]["n"] == 7 and by["(all)"]["n_LOW"] + by["(all)"]["n_INDETERMINATE"] + by["(all)"]["n_HIGH"] == 7

    out = write_table_csv(tmp_path / "groups.csv", rows + [{"group": "=HYPERLINK(1)", "n": None}])
    assert [f.name for f in tmp_path.iterdir()] == ["groups.csv"]
    read = list(csv.DictReader(out.open()))
    assert read[0]["group"] == "NME" and float(read[0]["mean_probability"]) == pytest.approx(0.55)
    assert read[-1]["group"] == "'=HYPERLINK(1)" and read[-1]["n"] == ""
    with pytest.raises(ValueError, match="length"):
        per_group_table(p, y, g[:-1])


# ---------------------------------------------------------------------------- tile level
def tile_data(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 4)) < [0.3, 0.1, 0.2, 0.5]).astype(float)
    probs = np.clip(targets * 0.35 + rng.random((n, 4)) * 0.65, 0, 1)
    targets[:, 1] = 0.0  # class 1 has no positive tile
    mask = rng.random((n, 4)) < 0.8
    targets[~mask] = np.nan  # unknown labels may be NaN
    return probs, targets, mask


def test_multilabel_tile_metrics_match_sklearn_and_respect_the_mask():
    probs, targets, mask = tile_data()
    names = ["pallor", "necrolysis", "parakeratosis", "epidermis"]
    thr = {"pallor": 0.5, "parakeratosis": 0.6}
    m = multilabel_tile_metrics(probs, targets, mask, names, thresholds=thr)
    json.dumps(m, allow_nan=False)
    for c, name in enumerate(names):
        e = m["per_class"][name]
        sel = mask[:, c]
        assert e["n"] == sel.sum() and e["n_pos"] + e["n_neg"] == e["n"]
        if name == "necrolysis":
            assert e["auroc"] is None and e["auprc"] is None and e["f1"] is None
            assert "no positive" in e["reason"]
            continue
        yt, pc = targets[sel, c], probs[sel, c]
        assert e["auroc"] == pytest.approx(roc_auc_score(yt, pc))
        assert e["auprc"] == pytest.approx(average_precision_score(yt, pc))
        t = thr.get(name, 0.5)
        assert e["threshold"] == t and e["threshold_source"] == ("given" if name in thr else "default")
        assert e["f1"] == pytest.approx(f1_score(yt, pc >= t))
    assert m["macro"]["n_classes"] == 3
    assert m["macro"]["auroc"] == pytest.approx(
        np.mean([m["per_class"][n]["auroc"] for n in names if n != "necrolysis"])
    )
    # the mask matters: counting unknown labels as negatives changes the numbers
    filled = np.nan_to_num(targets, nan=0.0)
    m_all = multilabel_tile_metrics(probs, filled, None, names)
    assert m_all["per_class"]["pallor"]["n"] == 600 != m["per_class"]["pallor"]["n"]


def test_pick_thresholds_maximise_the_rule():
    probs, targets, mask = tile_data(seed=1)
    names = ["a", "b", "c", "d"]
    for rule in ("f1", "youden"):
        thr = pick_thresholds(probs, targets, mask, names, rule=rule)
        assert set(thr) == set(names) and all(0 <= v <= 1 for v in thr.values())
        assert thr["b"] == 0.5  # one class only: documented default
        for c in (0, 2, 3):
            sel = mask[:, c]
            yt, pc = targets[sel, c].astype(int), probs[sel, c]

            def score(t):
                pred = pc >= t
                if rule == "f1":  # 2TP / (2TP + FP + FN), written out (sklearn is slow in this loop)
                    tp = np.sum(pred & (yt == 1))
                    return 2 * tp / (2 * tp + np.sum(pred & (yt == 0)) + np.sum(~pred & (yt == 1)))
                return pred[yt == 1].mean() - pred[yt == 0].mean()

            brute = max(score(t) for t in np.unique(pc))
            assert score(thr[names[c]]) == pytest.approx(brute)
    # a sequence of thresholds works as well as a mapping
    seq = multilabel_tile_metrics(probs, targets, mask, names, thresholds=[0.4, None, 0.5, 0.6])
    assert seq["per_class"]["a"]["threshold"] == 0.4 and seq["per_class"]["b"]["threshold_source"] == "default"
    with pytest.raises(ValueError, match="rule"):
        pick_thresholds(probs, targets, mask, names, rule="accuracy")
    with pytest.raises(ValueError, match="unknown class"):
        multilabel_tile_metrics(probs, targets, mask, names, thresholds={"z": 0.5})
    with pytest.raises(ValueError, match="shape"):
        multilabel_tile_metrics(probs, targets[:, :3], mask, names)


def test_pick_thresholds_at_a_specificity():
    probs, targets, mask = tile_data(seed=2)
    names = ["a", "b", "c", "d"]
    for target in (0.9, 0.99):
        thr = pick_thresholds(probs, targets, mask, names, rule="specificity", specificity=target)
        for c in (0, 2, 3):
            sel = mask[:, c]
            yt, pc = targets[sel, c].astype(int), probs[sel, c]
            neg = pc[yt == 0]
            t = thr[names[c]]
            pos = pc[yt == 1]
            assert (neg < t).mean() >= target  # the specificity is reached ...
            feasible = [u for u in np.unique(pc) if (neg < u).mean() >= target]
            assert (pos >= t).mean() == max((pos >= u).mean() for u in feasible)  # ... at the best sensitivity ...
            lowest_called = pc[pc >= t].min()  # t lies just below it: the highest threshold at that sensitivity
            assert not any((pos >= u).mean() == (pos >= t).mean() for u in np.unique(pc) if u > lowest_called)
    with pytest.raises(ValueError, match="specificity"):
        pick_thresholds(probs, targets, mask, names, rule="specificity", specificity=1.0)
