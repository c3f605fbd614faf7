"""The review loop on synthetic slides: a bundle's misses, reviews from ground truth, fine-tune, before/after.

    python benchmarks/review_loop.py [--work DIR] [--reviewed 4] [--heldout 4] [--epochs 2] [--tiles 192] [--json]

1. Synthetic NME slides (``pipeline.synthetic``), small (1400 x 1000 µm): a *replay* set (the
   fine-tune's validation and some of the old data), a *reviewed* set and a *held-out* set.
2. ``infer.py`` runs the start bundle (default the shipped demo bundle) over the reviewed set.
3. A scripted reviewer reviews every slide through the review app's own store
   (:mod:`pipeline.review.store`) from the generator's ground-truth annotations, as the review queue
   would: a tile the model called and the truth confirms is *confirmed*, one it called wrongly is a
   *false positive*, a positive tile it missed gets a *missed region* drawn over it, and the
   ``REJECT`` tiles nearest the threshold that the truth says are negative are rejected too; then
   the slide verdict (agree with a HIGH band on an NME slide, else disagree with HIGH).
4. ``train.py --config`` fine-tunes the bundle (``model.init_bundle``) on the reviewed folder
   (``reviewed:``) plus the replay set, patch model only.
5. Before/after on the reviewed (tile, pattern) labels: error rate at each bundle's own thresholds,
   mean absolute error |p - y|; and on the held-out slides (labels from the annotations, unseen):
   tile AUROC per pattern ("nothing else gets worse").

:func:`review_from_truth` and :func:`reviewed_tile_error` are used by ``tests/test_review_training.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.bundle import load_bundle  # noqa: E402
from models.patch import PATTERN_CLASSES  # noqa: E402
from pipeline.evaluation.metrics import multilabel_tile_metrics  # noqa: E402
from pipeline.outputs.batch_folder import OutputFolder, read_thresholds, read_tiles  # noqa: E402
from pipeline.review.store import load_review, save_review  # noqa: E402
from pipeline.tiles.annotations import rasterise, read_annotations, tile_coverage  # noqa: E402
from pipeline.training.config import LabelConfig, ReviewedSource  # noqa: E402
from pipeline.training.data import SlideTiles, TileDataset, index_slide, load_slide_table  # noqa: E402
from pipeline.training.patch_trainer import predict_tiles  # noqa: E402
from pipeline.training.reviewed import read_reviewed, reviewed_patch_data  # noqa: E402

log = logging.getLogger("review_loop")

SIZE = "1400x1000"
#: Ground truth: a tile is positive for a pattern at this annotated coverage (the demo config's).
TRUTH_COVERAGE = {"pallor": 0.2, "necrolysis": 0.15, "parakeratosis": 0.1}
#: Tiles below the threshold, truly negative, nearest it, that the reviewer rejects per pattern and slide.
REJECT = 3


def make_slides(root: Path, n: int, seed: int, classes: tuple[str, ...] = ("nme",)) -> Path:
    """``n`` small synthetic slides with annotations and labels.csv in ``root`` (reused when present)."""
    if (root / "labels.csv").is_file():
        return root
    subprocess.run(
        [sys.executable, "-m", "pipeline.synthetic", "--out", str(root), "--n", str(n), "--seed", str(seed)]
        + ["--size", SIZE, "--classes", *classes, "--quiet"],
        check=True,
        cwd=REPO,
    )
    return root


def run_infer(slides: Path, out: Path, bundle: Path) -> Path:
    """``infer.py`` with the reference backend (no backend verification run)."""
    if not (out / "run.json").is_file():
        subprocess.run(
            [sys.executable, str(REPO / "infer.py"), str(slides), "--out", str(out), "--model", str(bundle)]
            + ["--backend", "torch-fp32", "--quiet"],
            check=True,
            cwd=REPO,
        )
    return out


def _truth(folder: OutputFolder, key: str, truth_root: Path) -> tuple[Any, np.ndarray]:
    """The slide's stored tile table and its ground-truth labels (N, 3) from the generator's annotations."""
    entry = folder.slides[key]
    table = read_tiles(entry.folder / "tiles.geojson")
    res = entry.result
    assert res is not None and res.mpp.slide is not None and res.dimensions_level0 is not None
    anns = read_annotations(truth_root / "annotations" / f"{entry.slide_id}.geojson", [*PATTERN_CLASSES, "epidermis"])
    dims = (int(res.dimensions_level0[0]), int(res.dimensions_level0[1]))
    masks = rasterise(anns, list(PATTERN_CLASSES), dims, res.mpp.slide)
    cov = tile_coverage(masks, list(PATTERN_CLASSES), table.coords, table.size, res.mpp.slide)
    return table, cov >= np.array([TRUTH_COVERAGE[p] for p in PATTERN_CLASSES])


def review_from_truth(out_dir: Path, truth_root: Path, reviewer: str = "scripted reviewer") -> dict[str, int]:
    """Review every slide of ``out_dir`` from ground truth through the review app's store; counts of each action."""
    folder = OutputFolder.open(out_dir)
    thresholds = read_thresholds(Path(json.loads((out_dir / "run.json").read_text())["options"]["model"]))
    counts = {"confirm": 0, "false_positive": 0, "missed_region": 0, "verdicts": 0}
    labels = {r["slide_id"]: r for r in _csv(truth_root / "labels.csv")}
    for key, entry in folder.slides.items():
        table, truth = _truth(folder, key, truth_root)
        review = load_review(entry.folder, entry.slide_id)
        s = table.size
        for j, p in enumerate(PATTERN_CLASSES):
            prob = table.values[p]
            called = prob >= thresholds[p]
            near = np.argsort(np.abs(prob - thresholds[p]))
            rejects = [i for i in near if not called[i] and not truth[i, j]][:REJECT]
            for i, (x, y) in enumerate(table.coords.tolist()):
                if called[i] or i in rejects:
                    verdict = "confirm" if truth[i, j] else "false_positive"
                    review.mark_tile(p, x, y, s, verdict, reviewer, float(prob[i]))
                    counts[verdict] += 1
                elif truth[i, j]:  # missed: a region drawn just inside the tile
                    ring = [[x + 2, y + 2], [x + s - 2, y + 2], [x + s - 2, y + s - 2], [x + 2, y + s - 2]]
                    review.add_region(p, [ring], reviewer)
                    counts["missed_region"] += 1
        nme = labels[entry.slide_id]["nme_pattern"] == "1"
        band = entry.result.band if entry.result else None
        if (band == "HIGH") == nme:
            review.set_verdict("agree", None, "", reviewer)
        else:
            review.set_verdict("disagree", "HIGH" if nme else "LOW", "scripted from ground truth", reviewer)
        counts["verdicts"] += 1
        save_review(entry.folder, review)
    return counts


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _predict(bundle: Path, tiles: list[SlideTiles]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    loaded = load_bundle(bundle)
    items = np.concatenate(
        [np.stack([np.full(len(t.coords), i), np.arange(len(t.coords))], 1) for i, t in enumerate(tiles)]
    )
    ds = TileDataset(tiles, items, loaded.contract.input.tile_size_px)
    try:
        import torch

        probs, targets, mask = predict_tiles(loaded.model, ds, 32, torch.device("cpu"), "fp32", False)
    finally:
        ds.close()
    return probs, targets, mask, dict(loaded.contract.thresholds)


def reviewed_tiles_of(out_dir: Path) -> list[SlideTiles]:
    """The reviewed tiles of ``out_dir`` as training would read them (the demo tiling)."""
    from pipeline.tiles.tiling import TilingConfig

    sets = read_reviewed([ReviewedSource(output=out_dir)])
    return reviewed_patch_data(sets, [*PATTERN_CLASSES, "epidermis"], TilingConfig(), set())


def reviewed_tile_error(bundle: Path, tiles: list[SlideTiles]) -> dict[str, Any]:
    """On the reviewed (tile, pattern) labels: error rate at the bundle's thresholds and mean |p - y|, per pattern and all."""
    probs, targets, mask, thr = _predict(bundle, tiles)
    out: dict[str, Any] = {}
    wrong_all, abs_all = [], []
    for j, p in enumerate(PATTERN_CLASSES):
        m = mask[:, j]
        wrong = (probs[m, j] >= thr[p]) != (targets[m, j] > 0)
        err = np.abs(probs[m, j] - targets[m, j])
        out[p] = {"n": int(m.sum()), "error_rate": _r(wrong.mean()), "mae": _r(err.mean())}
        wrong_all.append(wrong)
        abs_all.append(err)
    w, a = np.concatenate(wrong_all), np.concatenate(abs_all)
    out["all"] = {"n": int(len(w)), "error_rate": _r(w.mean()), "mae": _r(a.mean())}
    return out


def heldout_auroc(bundle: Path, root: Path) -> dict[str, Any]:
    """Tile AUROC per pattern on annotated slides the fine-tune never saw (full labels from the annotations)."""
    from pipeline.tiles.tiling import TilingConfig

    records = load_slide_table(_data(root), REPO)
    labels = LabelConfig(positive_coverage={**TRUTH_COVERAGE, "epidermis": 0.1})
    tiles = [index_slide(r, TilingConfig(), labels) for r in records]
    probs, targets, mask, thr = _predict(bundle, tiles)
    m = multilabel_tile_metrics(probs, targets, mask, list(labels.classes), thresholds=thr)
    return {c: _r(m["per_class"][c]["auroc"]) for c in PATTERN_CLASSES} | {"tiles": int(len(probs))}


def _data(root: Path):
    from pipeline.training.config import DataConfig

    return DataConfig(root=root)


def _r(v: Any) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def finetune_config(work: Path, replay: Path, reviewed: Path, bundle: Path, epochs: int, tiles: int) -> Path:
    """The fine-tune config: start from ``bundle``, the reviewed folder (weight 20) plus the replay set."""
    cfg = {
        "task": "patch",
        "name": "nme-demo-reviewed",
        "version": "0.1.1",
        "label": "trained on synthetic slides only, not for clinical use",
        "output_dir": str(work / "run"),
        "data": {"root": str(replay)},
        "reviewed": [{"output": str(reviewed), "weight": 20}],
        "split": {"val_fraction": 0.34, "k_folds": 2},
        "model": {"backbone": "mobilenet_v3_small", "dropout": 0.2, "init_bundle": str(bundle)},
        "labels": {"positive_coverage": {**TRUTH_COVERAGE, "epidermis": 0.1}},
        "train": {
            "epochs": epochs,
            "tiles_per_epoch": tiles,
            "batch_size": 16,
            "lr": 3e-4,
            "patience": epochs,
            "max_val_tiles": 100,
            "num_workers": 0,
            "threads": 2,
            "precision": "fp32",
            "threshold_rule": "f1",
        },
    }
    path = work / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/review_loop"))
    ap.add_argument("--bundle", type=Path, default=REPO / "models" / "demo_bundle")
    ap.add_argument("--replay", type=int, default=3, help="replay slides (the fine-tune's old data + validation)")
    ap.add_argument("--reviewed", type=int, default=4, help="slides inferred and reviewed")
    ap.add_argument("--heldout", type=int, default=4, help="unseen slides for the 'nothing else gets worse' check")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=192, help="tiles per epoch")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    replay = make_slides(w / "replay", args.replay, 501)
    revs = make_slides(w / "reviewed_slides", args.reviewed, 502, ("nme", "psoriasiform"))
    held = make_slides(w / "heldout", args.heldout, 503, ("nme", "psoriasiform"))
    out = run_infer(revs / "slides", w / "out", args.bundle)
    actions = review_from_truth(out, revs)
    cfg = finetune_config(w, replay, out, args.bundle, args.epochs, args.tiles)
    t1 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg), "--quiet"], check=True, cwd=REPO)
    train_s = time.perf_counter() - t1
    new = w / "run" / "bundle"
    tiles = reviewed_tiles_of(out)
    result = {
        "review_actions": actions,
        "reviewed_before": reviewed_tile_error(args.bundle, tiles),
        "reviewed_after": reviewed_tile_error(new, tiles),
        "heldout_auroc_before": heldout_auroc(args.bundle, held),
        "heldout_auroc_after": heldout_auroc(new, held),
        "finetune_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
