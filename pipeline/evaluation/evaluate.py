"""Measure a model bundle on synthetic slides from a seed it never saw (the quality figures in the README).

    python -m pipeline.evaluate [--bundle models/demo_bundle] [--seed 909] [--n 40] [--out runs/eval] [--real CMU.svs]

Tile level (patch model): per pattern, AUROC with tiles positive when >= 50 % of the tile lies
inside the pattern polygon and negative when the tile does not touch it (tiles in between are
left out). The three patterns are bands of the upper epidermis, often thinner than a 112 µm
tile, so few tiles are >= 50 % inside a polygon; the second figure (``auroc_epidermal``) counts a
tile positive when >= 50 % of the *epidermis in the tile* is inside the pattern polygon (and the
tile holds >= 5 % epidermis), negative when it does not touch the pattern. Slide level (aggregator + calibration): NME vs all other diagnoses AUROC with its 95 %
bootstrap CI, ECE, Brier, per-diagnosis mean probability. Optionally the band of real slides.
Prints one JSON line and writes ``<out>/evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis import SlideAnalyser

log = logging.getLogger(__name__)

#: tiles per model call when evaluating (any backend; ``torch-bf16-compile`` compiles for it)
EVAL_BATCH_SIZE = 64


def evaluate(
    bundle_dir: Path,
    data_root: Path,
    n: int,
    seed: int,
    size_um: tuple[float, float] | None,
    real: list[Path],
    n_boot: int = 1000,
    backend: str = "auto",
) -> dict[str, Any]:
    from models.bundle import load_bundle
    from models.patch import PATTERN_CLASSES
    from pipeline.core.runtime import resolve_device
    from pipeline.evaluation.metrics import auroc, evaluate_slides, per_group_table
    from pipeline.patch.backends import make_runner
    from pipeline.slide_model.aggregation import SlidePredictor
    from pipeline.synthetic import generate_dataset
    from pipeline.tiles.annotations import rasterise, read_annotations, tile_coverage
    from pipeline.training.config import DataConfig
    from pipeline.training.data import load_slide_table

    data_root = Path(data_root).resolve()  # the slide table resolves a relative root against its own base
    if not (data_root / "labels.csv").is_file():
        generate_dataset(data_root, n=n, seed=seed, mpp=0.5, size_um=size_um, overwrite=True)
    bundle = load_bundle(bundle_dir)
    predictor = SlidePredictor.from_bundle(bundle.contract, bundle.extra)
    runner, backend = make_runner(bundle, resolve_device("auto"), backend=backend, batch_size=EVAL_BATCH_SIZE)
    analyser = SlideAnalyser.for_bundle(bundle.contract, runner, predictor, batch_size=EVAL_BATCH_SIZE)
    classes = analyser.classes
    records = load_slide_table(DataConfig(root=data_root), data_root, require_annotations=True)
    tile_probs: dict[str, list[np.ndarray]] = {p: [] for p in PATTERN_CLASSES}
    tile_cov: dict[str, list[np.ndarray]] = {p: [] for p in PATTERN_CLASSES}
    epi_cov: list[np.ndarray] = []
    slide_p, slide_y, groups, patients = [], [], [], []
    for r in records:
        a = analyser.analyse(r.path, r.mpp, r.slide_id)
        feats, grid, mpp = a.features, a.prepared.grid, a.prepared.slide_mpp
        assert r.annotation is not None  # require_annotations=True above
        anns = read_annotations(r.annotation, classes)
        cov = tile_coverage(
            rasterise(anns, classes, a.prepared.dimensions, mpp), classes, grid.coords, grid.tile_size_l0, mpp
        )
        epi_cov.append(cov[:, classes.index("epidermis")])
        for j, c in enumerate(classes):
            if c in tile_probs:
                tile_probs[c].append(feats.probs[:, j])
                tile_cov[c].append(cov[:, j])
        if len(feats):  # every slide with tiles counts here, also those the quality gate would refuse
            slide_p.append((a.prediction or predictor.predict(feats)).probability)
            slide_y.append(int(r.flags.get("nme_pattern", 0)))
            groups.append(r.diagnosis)
            patients.append(r.patient_id)
    tile = {}
    epi = np.concatenate(epi_cov)
    for c in PATTERN_CLASSES:
        p, cv = np.concatenate(tile_probs[c]), np.concatenate(tile_cov[c])
        keep = (cv >= 0.5) | (cv == 0)
        y = (cv[keep] >= 0.5).astype(int)
        rel = np.where(epi > 0, cv / np.maximum(epi, 1e-6), 0.0)
        pos_e = (rel >= 0.5) & (epi >= 0.05)
        keep_e = pos_e | (cv == 0)
        ye = pos_e[keep_e].astype(int)
        tile[c] = {
            "auroc": auroc(p[keep], y) if 0 < y.sum() < len(y) else None,
            "n_pos": int(y.sum()),
            "n_neg": int(len(y) - y.sum()),
            "auroc_epidermal": auroc(p[keep_e], ye) if 0 < ye.sum() < len(ye) else None,
            "n_pos_epidermal": int(ye.sum()),
        }
    probs, ys = np.array(slide_p), np.array(slide_y)
    slide = evaluate_slides(probs, ys, patient_ids=patients, n_boot=n_boot, seed=0)
    table = per_group_table(probs, ys, groups, bands=predictor.bands)
    real_out = {}
    for path in real:
        real_out[str(path)] = _real_slide(path, analyser, bundle.contract.thresholds)
    return {
        "bundle": str(bundle_dir),
        "bundle_sha256": bundle.sha256,
        "label": bundle.contract.label,
        "backend": backend,
        "data": {"root": str(data_root), "seed": seed, "n_slides": len(records)},
        "tile_auroc": tile,
        "slide": {k: slide[k] for k in ("auroc", "auprc", "ece", "brier", "balanced_accuracy") if k in slide},
        "per_diagnosis": table,
        "real_slides": real_out,
    }


def _real_slide(path: Path, analyser: SlideAnalyser, thresholds: dict[str, float]) -> dict[str, Any]:
    """Status, band and pattern scores of a real slide, and its tiles above each pattern threshold."""
    a = analyser.analyse(path)
    feats = a.features
    assert analyser.predictor is not None
    pred = a.prediction or (analyser.predictor.predict(feats) if len(feats) else None)
    above = {p: int((feats.column(p) >= thresholds[p]).sum()) for p in ("pallor", "necrolysis", "parakeratosis")}
    return {
        "quality": a.quality.status,
        "probability": pred.probability if pred else None,
        "band": pred.band if pred else None,
        "n_tiles": len(feats),
        "tiles_above_threshold": above,
        "patterns": pred.patterns if pred else None,
    }


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.cli import setup_logging
    from pipeline.core.io import atomic_write_json
    from pipeline.core.paths import DEMO_BUNDLE, REPO_ROOT

    ap = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    ap.add_argument("--seed", type=int, default=909, help="synthetic seed never used in training")
    ap.add_argument("--n", type=int, default=40, help="number of synthetic slides")
    ap.add_argument("--size-um", type=float, nargs=2, default=None, metavar=("W", "H"))
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "eval")
    ap.add_argument("--real", type=Path, action="append", default=[], help="real slide(s) to report the band of")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--backend", default="auto", help="patch-model backend (see infer.py --backend)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(quiet=args.quiet)
    data_root = args.out / f"synthetic_seed{args.seed}_n{args.n}"
    res = evaluate(
        args.bundle,
        data_root,
        args.n,
        args.seed,
        tuple(args.size_um) if args.size_um else None,
        args.real,
        args.bootstrap,
        args.backend,
    )
    atomic_write_json(args.out / "evaluation.json", res)
    sys.stdout.write(
        json.dumps(
            {
                "tile_auroc": {k: v["auroc"] for k, v in res["tile_auroc"].items()},
                "tile_auroc_epidermal": {k: v["auroc_epidermal"] for k, v in res["tile_auroc"].items()},
                "tile_n_pos": {k: v["n_pos"] for k, v in res["tile_auroc"].items()},
                "slide_auroc": res["slide"]["auroc"],
                "ece": res["slide"]["ece"]["value"],
                "per_diagnosis_mean": {r.get("group"): r.get("mean_probability") for r in res["per_diagnosis"]},
                "real": {k: v["band"] for k, v in res["real_slides"].items()},
            }
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    from pipeline.core.cli import run_cli

    run_cli(main)
