"""Evaluation metrics: slide level with bootstrap confidence intervals, and tile level per class.

Slide level (:func:`evaluate_slides`): AUROC, AUPRC (average precision), balanced accuracy,
sensitivity and specificity at a probability threshold, sensitivity at 90 % and 95 %
specificity, ECE and Brier score, each with a 95 % percentile-bootstrap interval. When patient
ids are given, whole patients are resampled (their slides are not independent); the seed is
fixed, so the same inputs give the same intervals.

Everything returned is JSON-safe: an undefined value (e.g. AUROC with one class) is ``None``
with a ``reason``, never NaN.

Conventions: probabilities are floats in [0, 1] of shape (N,); labels are 0/1 of shape (N,);
a slide is predicted positive when ``p >= threshold``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.core.io import atomic_write_text
from pipeline.core.validation import InvalidInputError, as_binary_labels, as_probabilities
from pipeline.evaluation.reliability import bin_edges, bin_index
from pipeline.slide_model.calibration import Bands

log = logging.getLogger(__name__)

#: Metrics that need both classes in the (re)sample.
RANKING_METRICS = (
    "auroc",
    "auprc",
    "balanced_accuracy",
    "sensitivity_at_threshold",
    "specificity_at_threshold",
    "sensitivity_at_90_specificity",
    "sensitivity_at_95_specificity",
)
#: Metrics defined with one class too.
CALIBRATION_METRICS = ("ece", "brier")


# --------------------------------------------------------------------------------------------
# core metrics on validated arrays (fast: used inside the bootstrap loop)
# --------------------------------------------------------------------------------------------
def _ranks(p: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (as scipy.stats.rankdata(method='average'))."""
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    boundaries = np.flatnonzero(np.diff(sp)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [sp.size]))
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(p.size, np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _auroc(p: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count 1/2); needs both classes."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    r = _ranks(p)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _curve_counts(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positives when predicting ``p >= t`` for each distinct ``t``, highest first."""
    order = np.argsort(-p, kind="mergesort")
    sp = p[order]
    sy = y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(sp)), sp.size - 1]  # last index of each distinct score
    tps = np.cumsum(sy)[last]
    fps = (last + 1) - tps
    return tps, fps, sp[last]


def _average_precision(p: np.ndarray, y: np.ndarray) -> float:
    """Step-wise average precision, sum_k (R_k - R_{k-1}) P_k (scikit-learn's definition)."""
    tps, fps, _ = _curve_counts(p, y)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _roc(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tps, fps, thr = _curve_counts(p, y)
    n_pos, n_neg = tps[-1], fps[-1]
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, thr]


def _sens_at_spec(p: np.ndarray, y: np.ndarray, specificity: float) -> tuple[float, float]:
    """Max TPR over ROC points with FPR <= 1 - specificity, and the threshold (``p >= t``) there."""
    fpr, tpr, thr = _roc(p, y)
    ok = fpr <= (1.0 - specificity) + 1e-12
    i = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[i]), float(thr[i])


def _confusion(p: np.ndarray, y: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    return tp, fp, fn, tn


def _ece(p: np.ndarray, y: np.ndarray, edges: np.ndarray) -> float:
    """Binned ECE on validated arrays (same binning as :func:`pipeline.slide_model.calibration.reliability_curve`)."""
    idx = bin_index(p, edges)
    nb = edges.size - 1
    count = np.bincount(idx, minlength=nb)
    gap = np.abs(
        np.bincount(idx, weights=p, minlength=nb) - np.bincount(idx, weights=y.astype(np.float64), minlength=nb)
    )
    return float(gap.sum() / max(1, count.sum()))  # sum_b n_b |mean_p - mean_y| / N


def _all_metrics(p: np.ndarray, y: np.ndarray, threshold: float, edges: np.ndarray) -> dict[str, float | None]:
    n_pos = int(y.sum())
    out: dict[str, float | None] = dict.fromkeys(RANKING_METRICS)
    if 0 < n_pos < y.size:
        tp, fp, fn, tn = _confusion(p, y, threshold)
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        out.update(
            {
                "auroc": _auroc(p, y),
                "auprc": _average_precision(p, y),
                "balanced_accuracy": (sens + spec) / 2.0,
                "sensitivity_at_threshold": sens,
                "specificity_at_threshold": spec,
                "sensitivity_at_90_specificity": _sens_at_spec(p, y, 0.90)[0],
                "sensitivity_at_95_specificity": _sens_at_spec(p, y, 0.95)[0],
            }
        )
    out["ece"] = _ece(p, y, edges)
    out["brier"] = float(np.mean((p - y) ** 2))
    return out


# --------------------------------------------------------------------------------------------
# public single metrics (validate, return None when undefined)
# --------------------------------------------------------------------------------------------
def _validated(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = as_probabilities(probs)
    return p, as_binary_labels(y, p.size)


def _has_both(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


def auroc(probs: Any, y: Any) -> float | None:
    """Area under the ROC curve (ties count 1/2); ``None`` if only one class is present."""
    p, t = _validated(probs, y)
    return _auroc(p, t) if _has_both(t) else None


def average_precision(probs: Any, y: Any) -> float | None:
    """AUPRC as step-wise average precision; ``None`` without positives (or without negatives)."""
    p, t = _validated(probs, y)
    return _average_precision(p, t) if _has_both(t) else None


def roc_curve(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score plus (0, 0) at threshold +inf."""
    p, t = _validated(probs, y)
    if not _has_both(t):
        raise InvalidInputError("roc_curve needs both classes")
    return _roc(p, t)


def sensitivity_at_specificity(probs: Any, y: Any, specificity: float = 0.95) -> tuple[float | None, float | None]:
    """Highest sensitivity among ROC operating points with specificity >= ``specificity``.

    Returns (sensitivity, threshold): slides with ``p >= threshold`` are called positive.
    The threshold is ``None`` when no threshold meets the specificity except "call nothing
    positive" (sensitivity 0), and both are ``None`` with a single class.
    """
    if not 0.0 < specificity <= 1.0:
        raise InvalidInputError(f"specificity must be in (0, 1], got {specificity}")
    p, t = _validated(probs, y)
    if not _has_both(t):
        return None, None
    sens, thr = _sens_at_spec(p, t, specificity)
    return sens, (thr if math.isfinite(thr) else None)


def balanced_accuracy(probs: Any, y: Any, threshold: float = 0.5) -> float | None:
    """(sensitivity + specificity) / 2 with positives called at ``p >= threshold``."""
    p, t = _validated(probs, y)
    if not _has_both(t):
        return None
    tp, fp, fn, tn = _confusion(p, t, threshold)
    return (tp / (tp + fn) + tn / (tn + fp)) / 2.0


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------
def _resample_units(n: int, patient_ids: Sequence[Any] | None) -> list[np.ndarray]:
    """Slide indices of each resampling unit (a patient, or one slide)."""
    if patient_ids is None:
        return [np.array([i]) for i in range(n)]
    ids = list(patient_ids)
    if len(ids) != n:
        raise InvalidInputError(f"patient_ids: length {len(ids)} does not match the {n} slides")
    if any(i is None or (isinstance(i, float) and math.isnan(i)) for i in ids):
        raise InvalidInputError("patient_ids: missing (None/NaN) patient id; give every slide a patient id")
    groups: dict[Any, list[int]] = {}
    for idx, pid in enumerate(ids):
        groups.setdefault(pid, []).append(idx)
    return [np.asarray(v) for v in groups.values()]


def bootstrap_samples(
    n: int, patient_ids: Sequence[Any] | None = None, n_boot: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """``n_boot`` index arrays into the N slides, resampled with replacement.

    With ``patient_ids`` each resample draws as many patients as there are (with replacement)
    and takes all slides of each drawn patient, so its size varies; otherwise N slides.
    """
    units = _resample_units(n, patient_ids)
    rng = np.random.default_rng(seed)
    if patient_ids is None:
        return [rng.integers(0, n, size=n) for _ in range(n_boot)]
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(units), size=len(units))
        out.append(np.concatenate([units[k] for k in pick]))
    return out


def _ci_entry(
    value: float | None, boots: list[float], n_boot: int, reason: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": value, "ci95": None, "n_boot_used": len(boots)}
    if value is None:
        entry["reason"] = reason or "undefined on these data"
    elif n_boot == 0:
        entry["reason"] = "bootstrap disabled (n_boot=0)"
    elif len(boots) < max(2, n_boot // 2):
        entry["reason"] = f"only {len(boots)} of {n_boot} resamples had both classes; interval not reported"
    else:
        lo, hi = np.percentile(np.asarray(boots), [2.5, 97.5])
        entry["ci95"] = [float(lo), float(hi)]
    if extra:
        entry.update(extra)
    return entry


def evaluate_slides(
    probs: Any,
    y: Any,
    patient_ids: Sequence[Any] | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Slide-level metrics with 95 % percentile-bootstrap intervals (JSON-safe, no NaN).

    Args:
        probs: calibrated slide probabilities (N,).
        y: 0/1 slide labels (N,).
        patient_ids: optional patient of each slide (N,); whole patients are resampled.
        threshold: slides with ``p >= threshold`` are called positive (balanced accuracy,
            sensitivity/specificity at threshold).
        n_boot: bootstrap resamples (0 disables intervals).
        seed: seed of the resampling (fixed: reproducible intervals).
        n_bins: uniform bins of the ECE.

    Returns:
        ``{"n_slides", "n_patients", "n_pos", "n_neg", "prevalence", "threshold", "bootstrap",
        <metric>: {"value", "ci95": [lo, hi] | None, "n_boot_used", ["reason"]}, ...}``
        for the metrics in :data:`RANKING_METRICS` and :data:`CALIBRATION_METRICS`. Resamples with
        one class are skipped for the ranking metrics only (ECE and Brier are defined on one
        class). Sensitivity at 90/95 % specificity also carries the full-data ``threshold``.
    """
    p, t = _validated(probs, y)
    if not (0.0 <= float(threshold) <= 1.0):
        raise InvalidInputError(f"threshold must be in [0, 1], got {threshold}")
    if n_boot < 0:
        raise InvalidInputError(f"n_boot must be >= 0, got {n_boot}")
    n_pos = int(t.sum())
    n_neg = int(t.size - n_pos)
    edges = bin_edges(p, n_bins, "uniform")
    point = _all_metrics(p, t, threshold, edges)
    samples = bootstrap_samples(p.size, patient_ids, n_boot, seed) if n_boot else []
    boots: dict[str, list[float]] = {k: [] for k in point}
    n_one_class = 0
    for idx in samples:
        m = _all_metrics(p[idx], t[idx], threshold, edges)
        if m["auroc"] is None:
            n_one_class += 1
        for k, v in m.items():
            if v is not None:
                boots[k].append(v)
    reason_one_class = f"only one class present (n_pos={n_pos}, n_neg={n_neg})"
    extra: dict[str, dict[str, Any]] = {}
    if _has_both(t):
        for name, spec in (("sensitivity_at_90_specificity", 0.90), ("sensitivity_at_95_specificity", 0.95)):
            thr = _sens_at_spec(p, t, spec)[1]
            extra[name] = {"threshold": thr if math.isfinite(thr) else None}
    n_patients = len(set(patient_ids)) if patient_ids is not None else None
    result: dict[str, Any] = {
        "n_slides": int(p.size),
        "n_patients": n_patients,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "prevalence": n_pos / p.size,
        "threshold": float(threshold),
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "unit": "patient" if patient_ids is not None else "slide",
            "interval": "percentile 2.5-97.5",
            "resamples_with_one_class": n_one_class,
        },
    }
    for k, v in point.items():
        result[k] = _ci_entry(v, boots[k], n_boot, reason_one_class if k in RANKING_METRICS else None, extra.get(k))
    return result


# --------------------------------------------------------------------------------------------
# per-group table
# --------------------------------------------------------------------------------------------
TOTAL_GROUP = "(all)"


def per_group_table(
    probs: Any,
    y: Any | None,
    groups: Sequence[Any],
    threshold: float = 0.5,
    bands: Bands | None = None,
    include_total: bool = True,
) -> list[dict[str, Any]]:
    """One row per group (e.g. diagnosis), sorted by group name, plus an ``(all)`` row.

    Columns: ``group``, ``n``, ``n_label_positive`` (``None`` if ``y`` is None),
    ``mean_probability``, ``fraction_predicted_positive`` (``p >= threshold``), and the band
    counts ``n_LOW``, ``n_INDETERMINATE``, ``n_HIGH`` under ``bands`` (default :class:`Bands`).
    A missing group (None) is reported as ``"(missing)"``.
    """
    p = as_probabilities(probs)
    t = as_binary_labels(y, p.size) if y is not None else None
    g = ["(missing)" if v is None else str(v) for v in groups]
    if len(g) != p.size:
        raise InvalidInputError(f"groups: length {len(g)} does not match the {p.size} probabilities")
    b = bands or Bands()
    names = np.asarray(b.band_many(p)) if p.size else np.asarray([], dtype=str)
    garr = np.asarray(g, dtype=object)

    def row(name: str, sel: np.ndarray) -> dict[str, Any]:
        ps = p[sel]
        return {
            "group": name,
            "n": int(sel.sum()),
            "n_label_positive": int(t[sel].sum()) if t is not None else None,
            "mean_probability": float(ps.mean()),
            "fraction_predicted_positive": float(np.mean(ps >= threshold)),
            "n_LOW": int(np.sum(names[sel] == "LOW")),
            "n_INDETERMINATE": int(np.sum(names[sel] == "INDETERMINATE")),
            "n_HIGH": int(np.sum(names[sel] == "HIGH")),
        }

    rows = [row(name, garr == name) for name in sorted(set(g))]
    if include_total:
        rows.append(row(TOTAL_GROUP, np.ones(p.size, bool)))
    return rows


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InvalidInputError(f"table value {v} is not finite")
        return repr(v)
    s = str(v)
    # spreadsheet formula injection: text starting with = + - @ is shown literally
    if s and s[0] in "=+-@\t\r":
        try:
            float(s)
        except ValueError:
            s = "'" + s
    return s


def write_table_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) as CSV atomically; columns in first-seen order unless given.

    ``None`` becomes an empty cell; text that a spreadsheet would run as a formula is quoted
    with a leading apostrophe.
    """
    cols: list[str] = list(columns) if columns is not None else []
    if columns is None:
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in cols])
    return atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# tile level, multi-label
# --------------------------------------------------------------------------------------------
def _multilabel_arrays(
    probs: Any, targets: Any, mask: Any | None, class_names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise InvalidInputError(f"probs: expected shape (N, C), got {p.shape}")
    t = np.asarray(targets, dtype=np.float64)
    if t.shape != p.shape:
        raise InvalidInputError(f"targets: shape {t.shape} does not match probs {p.shape}")
    if mask is None:
        m = np.ones(p.shape, bool)
    else:
        m = np.asarray(mask)
        if m.shape != p.shape:
            raise InvalidInputError(f"mask: shape {m.shape} does not match probs {p.shape}")
        m = m.astype(bool)
    if not np.all(np.isfinite(p)):
        raise InvalidInputError(f"probs: contains {int((~np.isfinite(p)).sum())} NaN/inf value(s)")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise InvalidInputError(f"probs: must lie in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]")
    tm = t[m]
    if tm.size and not np.all(np.isin(tm, (0.0, 1.0))):
        raise InvalidInputError("targets: labelled entries (mask True) must be 0 or 1")
    n_cls = p.shape[1]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n_cls)]
    if len(names) != n_cls:
        raise InvalidInputError(f"class_names: {len(names)} names for {n_cls} columns")
    if len(set(names)) != len(names):
        raise InvalidInputError("class_names: duplicate names")
    return p, t, m, names


def _one_class_reason(n_pos: int, n_neg: int) -> str | None:
    if n_pos + n_neg == 0:
        return "no labelled tiles for this class"
    if n_pos == 0:
        return f"no positive tiles among {n_neg} labelled; AUROC/AUPRC/F1 undefined"
    if n_neg == 0:
        return f"no negative tiles among {n_pos} labelled; AUROC/AUPRC undefined"
    return None


def _best_threshold(p: np.ndarray, y: np.ndarray, rule: str, specificity: float = 0.98) -> float:
    """Threshold maximising F1, Youden's J, or sensitivity at ``specificity`` or more (``p >= t`` positive).

    Ties: the highest threshold. The threshold is placed halfway between the chosen score and the next lower distinct score,
    which classifies these data identically and leaves a margin on both sides.
    """
    tps, fps, thr = _curve_counts(p, y)
    n_pos, n_neg = tps[-1], fps[-1]
    if rule == "f1":
        score = 2 * tps / (2 * tps + fps + (n_pos - tps))
    elif rule == "youden":
        score = tps / n_pos - fps / n_neg
    elif rule == "specificity":
        ok = np.flatnonzero(fps <= (1.0 - specificity) * n_neg + 1e-9)
        if ok.size == 0:  # even the top score has too many negatives at or above it
            return float(min(1.0, np.nextafter(thr[0], np.inf)))
        # the most sensitive threshold within the specificity budget; among equally sensitive ones the
        # highest (placed halfway to the next lower score below), i.e. the widest margin above the negatives
        score = np.zeros(thr.size)
        score[int(np.flatnonzero(tps == tps[ok[-1]])[0])] = 1.0
    else:
        raise InvalidInputError(f"rule must be 'f1', 'youden' or 'specificity', got {rule!r}")
    i = int(np.argmax(score))
    if i + 1 < thr.size:
        return float((thr[i] + thr[i + 1]) / 2.0)
    return float(thr[i])


def pick_thresholds(
    probs: Any,
    targets: Any,
    mask: Any | None = None,
    class_names: Sequence[str] | None = None,
    rule: Literal["f1", "youden", "specificity"] = "f1",
    default: float = 0.5,
    specificity: float = 0.98,
) -> dict[str, float]:
    """Per-class probability thresholds chosen on validation tiles.

    Args:
        probs: (N, C) tile probabilities.
        targets: (N, C) 0/1 labels (any value where ``mask`` is False).
        mask: (N, C) bool, True where the label is known; None = all known.
        class_names: C names (default ``class_0`` ...).
        rule: ``"f1"`` maximises F1; ``"youden"`` maximises sensitivity + specificity - 1;
            ``"specificity"`` maximises sensitivity among thresholds whose specificity on the
            labelled negatives is at least ``specificity``, taking the highest such threshold
            (for a model that must stay quiet on normal tissue).
        default: used (with a warning) for a class whose labelled tiles hold one class only.

    Returns:
        ``{class_name: threshold}`` for every class (a tile is positive when ``p >= threshold``).
    """
    if rule not in ("f1", "youden", "specificity"):
        raise InvalidInputError(f"rule must be 'f1', 'youden' or 'specificity', got {rule!r}")
    if not 0 < specificity < 1:
        raise InvalidInputError(f"specificity must be in (0, 1), got {specificity}")
    p, t, m, names = _multilabel_arrays(probs, targets, mask, class_names)
    out: dict[str, float] = {}
    for c, name in enumerate(names):
        sel = m[:, c]
        yc = t[sel, c].astype(np.int8)
        n_pos = int(yc.sum())
        reason = _one_class_reason(n_pos, yc.size - n_pos)
        if reason is not None:
            log.warning("class %s: %s; threshold left at the default %.3g", name, reason, default)
            out[name] = float(default)
        else:
            out[name] = _best_threshold(p[sel, c], yc, rule, specificity)
    return out


def multilabel_tile_metrics(
    probs: Any,
    targets: Any,
    mask: Any | None = None,
    class_names: Sequence[str] | None = None,
    thresholds: Mapping[str, float | None] | Sequence[float | None] | None = None,
    default_threshold: float = 0.5,
) -> dict[str, Any]:
    """Per-class tile metrics for a multi-label patch model (JSON-safe).

    Args:
        probs: (N, C) tile probabilities in [0, 1].
        targets: (N, C) 0/1 labels; entries where ``mask`` is False are ignored (may be NaN).
        mask: (N, C) bool, True where a label is known; None = all known.
        class_names: C names (default ``class_0`` ...).
        thresholds: per-class thresholds (mapping by name or sequence of C), e.g. from
            :func:`pick_thresholds` on *validation* tiles; missing/None -> ``default_threshold``.

    Returns:
        ``{"per_class": {name: {"n", "n_pos", "n_neg", "auroc", "auprc", "f1", "precision",
        "recall", "threshold", "threshold_source", "reason"}}, "macro": {"auroc", "auprc", "f1",
        "n_classes"}}``. A class with one class among its labelled tiles gets ``None`` metrics
        and a ``reason``; the macro averages cover the classes where a value is defined.
    """
    p, t, m, names = _multilabel_arrays(probs, targets, mask, class_names)
    if thresholds is None:
        thr_map: dict[str, float | None] = {}
    elif isinstance(thresholds, Mapping):
        unknown = [k for k in thresholds if k not in names]
        if unknown:
            raise InvalidInputError(f"thresholds: unknown class(es) {unknown}; classes are {names}")
        thr_map = dict(thresholds)
    else:
        seq = list(thresholds)
        if len(seq) != len(names):
            raise InvalidInputError(f"thresholds: {len(seq)} values for {len(names)} classes")
        thr_map = dict(zip(names, seq))
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        sel = m[:, c]
        pc, yc = p[sel, c], t[sel, c].astype(np.int8)
        n_pos = int(yc.sum())
        n_neg = int(yc.size - n_pos)
        thr = thr_map.get(name)
        source = "given"
        if thr is None:
            thr, source = float(default_threshold), "default"
        thr = float(thr)
        if not (math.isfinite(thr) and 0.0 <= thr <= 1.0):
            raise InvalidInputError(f"thresholds: {name}: {thr} is not in [0, 1]")
        entry: dict[str, Any] = {
            "n": int(yc.size),
            "n_pos": n_pos,
            "n_neg": n_neg,
            "threshold": thr,
            "threshold_source": source,
        }
        reason = _one_class_reason(n_pos, n_neg)
        if reason is not None:
            entry.update(
                {"auroc": None, "auprc": None, "f1": None, "precision": None, "recall": None, "reason": reason}
            )
        else:
            tp, fp, fn, _ = _confusion(pc, yc, thr)
            precision = tp / (tp + fp) if tp + fp else None
            recall = tp / (tp + fn)
            f1 = 2 * tp / (2 * tp + fp + fn)
            entry.update(
                {
                    "auroc": _auroc(pc, yc),
                    "auprc": _average_precision(pc, yc),
                    "f1": f1,
                    "precision": precision,
                    "recall": recall,
                    "reason": None
                    if precision is not None
                    else "no tile at or above the threshold; precision undefined",
                }
            )
        per_class[name] = entry

    def macro(key: str) -> float | None:
        vals = [e[key] for e in per_class.values() if e[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "per_class": per_class,
        "macro": {
            "auroc": macro("auroc"),
            "auprc": macro("auprc"),
            "f1": macro("f1"),
            "n_classes": sum(1 for e in per_class.values() if e["auroc"] is not None),
        },
    }


__all__ = [
    "auroc",
    "average_precision",
    "roc_curve",
    "sensitivity_at_specificity",
    "balanced_accuracy",
    "bootstrap_samples",
    "evaluate_slides",
    "per_group_table",
    "write_table_csv",
    "pick_thresholds",
    "multilabel_tile_metrics",
    "RANKING_METRICS",
    "CALIBRATION_METRICS",
]
