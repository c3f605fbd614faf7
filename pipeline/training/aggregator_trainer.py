"""Slide aggregator training: patient-level k-fold cross-validation, calibration on out-of-fold
predictions, then a final model on all slides.

Outputs in ``<run>/aggregator/``: ``oof_predictions.csv``, ``slide_metrics.json`` (AUROC, AUPRC,
balanced accuracy, sensitivity at 90/95 % specificity, ECE, Brier with 95 % bootstrap CIs),
``per_diagnosis.csv``, ``reliability.png`` (after calibration) and ``reliability_uncalibrated.png``.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.mil import build_aggregator
from models.patch import PATTERN_CLASSES
from models.pattern_stats import PatternStatistics, PatternStatsClassifier
from pipeline.core.errors import DataError
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.evaluation.metrics import evaluate_slides, per_group_table, write_table_csv
from pipeline.evaluation.reliability import expected_calibration_error
from pipeline.outputs.reliability_diagram import write_reliability_diagram
from pipeline.patch.features import SlideFeatures
from pipeline.slide_model.aggregation import SlidePredictor
from pipeline.slide_model.calibration import Bands, bands_for_target_sensitivity
from pipeline.training.bag_augment import raise_baseline
from pipeline.training.calibration_guard import fit_calibration
from pipeline.training.config import AggregatorConfig

log = logging.getLogger(__name__)


@dataclass
class SlideExample:
    slide_id: str
    patient_id: str
    diagnosis: str
    y: int
    patterns: np.ndarray  # (3,) slide pattern flags
    feats: SlideFeatures


def _new_predictor(
    cfg: AggregatorConfig, classes: list[str], emb_dim: int, thresholds: dict[str, float]
) -> SlidePredictor:
    if cfg.type == "pattern_stats":
        stats = PatternStatistics(classes=classes, thresholds={p: thresholds.get(p, 0.5) for p in PATTERN_CLASSES})
        return SlidePredictor(
            "pattern_stats", classes, stats=stats, stats_clf=PatternStatsClassifier(stats.feature_names)
        )
    mil = build_aggregator(
        cfg.type,
        {
            "embedding_dim": emb_dim if cfg.use_embeddings else 0,
            "tile_prob_dim": len(classes),
            "hidden_dim": cfg.hidden_dim,
            "dropout": cfg.dropout,
        },
    )
    return SlidePredictor(cfg.type, classes, mil=mil, use_embeddings=cfg.use_embeddings)


def fit_predictor(
    cfg: AggregatorConfig, examples: list[SlideExample], classes: list[str], thresholds: dict[str, float], seed: int
) -> SlidePredictor:
    """Fit one aggregator (no calibration) on ``examples``."""
    ys = np.array([e.y for e in examples])
    if len(set(ys.tolist())) < 2:
        raise DataError(f"aggregator training set has a single class (all nme_pattern = {ys[0]}); need both")
    emb_dim = examples[0].feats.embeddings.shape[1]
    pred = _new_predictor(cfg, classes, emb_dim, thresholds)
    if pred.kind == "pattern_stats":
        assert pred.stats is not None and pred.stats_clf is not None
        X = np.stack([pred.stats(e.feats.probs, e.feats.coords, e.feats.tile_size_l0) for e in examples])
        pred.stats_clf.fit(X, ys)
        return pred
    torch.manual_seed(seed)
    mil = pred.mil
    assert mil is not None  # every kind but pattern_stats has a MIL model
    mil.train()
    opt = torch.optim.AdamW(mil.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bags = [pred.bag(e.feats) for e in examples]
    mil.fit_input_stats(torch.cat(bags))  # standardise raw embeddings + probabilities on the training tiles
    targets = torch.tensor(ys, dtype=torch.float32)
    pats = torch.from_numpy(np.stack([e.patterns for e in examples]).astype(np.float32))
    pos = float(ys.sum())
    pos_weight = torch.tensor((len(ys) - pos) / max(pos, 1.0))
    rng = np.random.default_rng(seed)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    bce_p = nn.BCEWithLogitsLoss()
    # thresholds per prob column; the epidermis column (NaN) is never shifted
    col_thr = np.array([thresholds.get(c, np.nan) if c in PATTERN_CLASSES else np.nan for c in classes])
    for _epoch in range(cfg.epochs):
        for i in rng.permutation(len(bags)):
            bag = bags[i]
            if cfg.baseline_shift > 0 and rng.random() < cfg.baseline_shift_prob:
                probs = raise_baseline(examples[i].feats.probs, col_thr, rng, cfg.baseline_shift)
                bag = pred.bag(examples[i].feats, probs_override=probs)
            out = mil(bag)
            loss = bce(out.logit[None], targets[i : i + 1]) + cfg.pattern_loss_weight * bce_p(
                out.pattern_logits, pats[i]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    mil.eval()
    return pred


def train_aggregator(
    cfg: AggregatorConfig,
    examples: list[SlideExample],
    folds: list[list[str]],
    classes: list[str],
    thresholds: dict[str, float],
    out_dir: Path,
    seed: int = 0,
) -> tuple[SlidePredictor, dict[str, Any]]:
    """Cross-validate, calibrate on out-of-fold logits, fit the final model; write the reports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    empty = [e.slide_id for e in examples if len(e.feats) == 0]
    if empty:
        log.warning("excluded from aggregator training (no tiles): %s", ", ".join(empty))
    examples = [e for e in examples if len(e.feats) > 0]
    pos_patients = {e.patient_id for e in examples if e.y == 1}
    neg_patients = {e.patient_id for e in examples if e.y == 0}
    if len(pos_patients) < 2 or len(neg_patients) < 2:
        raise DataError(
            f"aggregator cross-validation needs at least 2 patients of each class; have {len(pos_patients)} with "
            f"nme_pattern=1 and {len(neg_patients)} with nme_pattern=0 (single-class folds have no AUROC)"
        )
    by_id = {e.slide_id: e for e in examples}
    oof = np.full(len(examples), np.nan)
    index = {e.slide_id: i for i, e in enumerate(examples)}
    for k, fold in enumerate(folds):
        test_ids = [s for s in fold if s in by_id]
        if not test_ids:
            continue
        train_ex = [e for e in examples if e.slide_id not in set(test_ids)]
        pred = fit_predictor(cfg, train_ex, classes, thresholds, seed + k)
        for s in test_ids:
            oof[index[s]] = pred.raw(by_id[s].feats)[0]
        log.info("fold %d/%d: %d held-out slides", k + 1, len(folds), len(test_ids))
    if np.isnan(oof).any():
        raise DataError("some slides were in no cross-validation fold")
    y = np.array([e.y for e in examples])
    patients = [e.patient_id for e in examples]
    # Cross-fitted calibration for honest reporting; the shipped calibrator is fitted on all OOF logits.
    cal_kind = cfg.calibration.method
    calibrated = np.empty_like(oof)
    fold_of = {s: k for k, f in enumerate(folds) for s in f}
    for k in range(len(folds)):
        te = np.array([fold_of[e.slide_id] == k for e in examples])
        if not te.any():
            continue
        if cal_kind == "none" or len(set(y[~te].tolist())) < 2:
            calibrated[te] = 1 / (1 + np.exp(-oof[te]))
        else:
            fold_cal = fit_calibration(cal_kind, oof[~te], y[~te], quiet=True).calibrator
            calibrated[te] = fold_cal.transform(oof[te]) if fold_cal is not None else 1 / (1 + np.exp(-oof[te]))
    cal_fit = fit_calibration(cal_kind, oof, y)  # falls back to a safe calibrator when the fit would invert
    final_cal = cal_fit.calibrator
    bands = Bands(low=cfg.calibration.band_low, high=cfg.calibration.band_high)
    if cfg.calibration.target_sensitivity:
        bands = bands_for_target_sensitivity(calibrated, y, target_sensitivity=cfg.calibration.target_sensitivity)
    metrics = evaluate_slides(calibrated, y, patient_ids=patients, threshold=0.5, n_boot=cfg.bootstrap, seed=seed)
    raw_prob = 1 / (1 + np.exp(-oof))
    metrics["ece_uncalibrated"] = float(expected_calibration_error(raw_prob, y))
    metrics["n_slides"] = int(len(y))
    metrics["n_positive"] = int(y.sum())
    metrics["calibration"] = cal_kind
    if cal_fit.fallback_reason:
        metrics["calibration_fallback"] = {"used": cal_fit.kind, "reason": cal_fit.fallback_reason}
    metrics["bands"] = {"low": bands.low, "high": bands.high}
    groups = [e.diagnosis or ("nme" if e.y else "other") for e in examples]
    table = per_group_table(calibrated, y, groups, bands=bands)
    write_table_csv(out_dir / "per_diagnosis.csv", table)
    metrics["per_diagnosis"] = table
    write_reliability_diagram(
        out_dir / "reliability.png", calibrated, y, n_bins=10, title=f"Out-of-fold, {cal_kind} calibration"
    )
    write_reliability_diagram(
        out_dir / "reliability_uncalibrated.png", raw_prob, y, n_bins=10, title="Out-of-fold, uncalibrated"
    )
    atomic_write_json(out_dir / "slide_metrics.json", metrics)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide_id", "patient_id", "diagnosis", "nme_pattern", "oof_logit", "oof_probability"])
    for e, lg, p in zip(examples, oof, calibrated):
        w.writerow([e.slide_id, e.patient_id, e.diagnosis, e.y, f"{lg:.5f}", f"{p:.5f}"])
    atomic_write_text(out_dir / "oof_predictions.csv", buf.getvalue())

    final = fit_predictor(cfg, examples, classes, thresholds, seed + 100)
    final.calibrator = final_cal
    final.bands = bands
    return final, metrics
