"""Stain and colour statistics of real and synthetic H&E slides; augmentation coverage; stain normalisation check.

    python benchmarks/stain_stats.py [--tiles 64] [--out stain.json]              # statistics table
    python benchmarks/stain_stats.py --augment [--draws 4] [--set key=value ...]  # + augmentation coverage
    python benchmarks/stain_stats.py --epidermis [--model models/demo_bundle]     # + normalisation check

Statistics (per slide, on up to ``--tiles`` tissue tiles sampled at random from the product's tile
grid at 0.5 µm/px; the real slides of ../shared/data/slides and ``--synthetic`` slides made
once by the synthetic generator into data/synthetic/stain_stats):

* CIELAB mean and std of *tissue pixels* (OpenCV LAB in CIE units: L 0-100, a and b signed;
  tissue = summed optical density relative to the slide's glass colour >= 0.15, the threshold
  of :class:`pipeline.tiles.measurements.StainAccumulator`), pooled over the sampled tiles, and
  the 5th-95th percentiles of the per-tile means (how much colour varies within a slide);
* haematoxylin and eosin concentrations (Ruifrok-Johnston colour deconvolution,
  :func:`pipeline.training.augment.rgb_to_hed`, log10 OD units) of tissue pixels: p5/p50/p95;
* glass colour (the tissue detector's background estimate) and the mean HSV saturation (0-1)
  of tissue pixels.

``--augment``: the training augmentation (:func:`pipeline.training.augment.build_train_augmentation`)
is applied ``--draws`` times to every sampled synthetic tile, for three settings: none, the
augmentation before issue 18 (the new colour/scanner transforms off) and today's defaults (plus
any ``--set`` overrides). For each, the 5-95 % range of the augmented tiles' statistics
(tile LAB means and stds, tile H and E medians) and, per real slide, the fraction of its tiles
whose statistics lie inside that range on every channel ("covered").

``--epidermis``: the bundle's epidermis head on every tile of the real slides, with no stain
normalisation and with Reinhard normalisation (slide and tile scope) to the pooled LAB statistics
of the synthetic slides: tiles called epidermis (probability > 0.5), and normalisation cost.

``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402

import pipeline  # noqa: E402,F401 - sets NO_ALBUMENTATIONS_UPDATE
from pipeline.patch.reader import read_tiles_at  # noqa: E402
from pipeline.patch.stain_norm import (  # noqa: E402
    _lab8,
    _od_code,
    _od_code_table,
    _stats,
    pooled_lab_stats,
)
from pipeline.reading.slide import open_slide  # noqa: E402
from pipeline.tiles.measurements import STAINED_OD_MIN, tile_sharpness  # noqa: E402
from pipeline.tiles.tiling import TilingConfig, tile_slide  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "slides"
#: (name, path, mpp to pass or None = from the file)
REAL = [
    ("CMU-1-Small-Region", SHARED / "CMU-1-Small-Region.svs", None),
    ("morphea_section3", SHARED / "real_skin" / "morphea_section3.tif", 0.25),
    ("OS-1-detail", SHARED / "OS-1-detail.ome.tif", None),
]
SYNTH = {"n": 6, "seed": 5, "mpp": 0.5, "size_um": (2000.0, 1500.0)}
EPI_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------
# tiles and statistics
# --------------------------------------------------------------------------------------------
def synthetic_slides(folder: Path) -> list[tuple[str, Path, float | None]]:
    """The synthetic slides (made once, atomically, into ``folder``)."""
    from pipeline.synthetic import generate_dataset

    if not (folder / "labels.csv").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            generate_dataset(tmp, overwrite=True, **SYNTH)  # type: ignore[arg-type]
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [(p.stem, p, None) for p in sorted((folder / "slides").glob("*.tiff"))]


def sample_tiles(path: Path, mpp: float | None, n: int, seed: int) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """Up to ``n`` tissue tiles (uint8 (N, 224, 224, 3)) of the 0.5 µm/px grid, the glass colour, and the grid size."""
    with open_slide(path, mpp=mpp) as slide:
        grid, mask, _, _ = tile_slide(slide, TilingConfig())
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(grid), size=min(n, len(grid)), replace=False))
    tiles = np.stack(read_tiles_at(path, mpp, grid.coords[pick], grid.plan, grid.tile_px))
    return tiles, mask.background_rgb, len(grid)


def tile_statistics(tiles: np.ndarray, background_rgb: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Per-tile LAB mean/std and H, E medians of tissue pixels, and tissue pixels (subsampled) for percentiles."""
    from pipeline.training.augment import rgb_to_hed

    b, h, w, _ = tiles.shape
    code = _od_code(tiles, _od_code_table(background_rgb, STAINED_OD_MIN))
    means, stds, counts = _stats(_lab8(tiles), code, b)
    tissue = (code >= 100).reshape(b, h, w)
    # every 2nd pixel of every 2nd row for the pixel-level percentiles
    sub, sub_mask = tiles[:, ::2, ::2], tissue[:, ::2, ::2]
    hed = rgb_to_hed(sub)
    hsv = cv2.cvtColor(np.ascontiguousarray(sub).reshape(-1, sub.shape[2], 3), cv2.COLOR_RGB2HSV).reshape(sub.shape)
    tile_h = np.array([np.median(hed[i, ..., 0][sub_mask[i]]) if sub_mask[i].any() else np.nan for i in range(b)])
    tile_e = np.array([np.median(hed[i, ..., 1][sub_mask[i]]) if sub_mask[i].any() else np.nan for i in range(b)])
    tile_s = np.array([hsv[i, ..., 1][sub_mask[i]].mean() / 255.0 if sub_mask[i].any() else np.nan for i in range(b)])
    return {
        "sharpness": np.array([tile_sharpness(x) for x in tiles]),
        "means": means,
        "stds": stds,
        "counts": counts,
        "tile_h": tile_h,
        "tile_e": tile_e,
        "tile_sat": tile_s,
        "h": hed[..., 0][sub_mask],
        "e": hed[..., 1][sub_mask],
        "sat": hsv[..., 1][sub_mask].astype(np.float64) / 255.0,
    }


def summarise(st: dict[str, np.ndarray]) -> dict[str, Any]:
    """JSON-safe slide summary of :func:`tile_statistics`."""
    ok = st["counts"] > 0
    mean, std = pooled_lab_stats(st["means"], st["stds"], st["counts"])

    def r(x: Any, nd: int = 2) -> Any:
        return np.round(np.asarray(x, np.float64), nd).tolist()

    return {
        "tiles_with_tissue": int(ok.sum()),
        "lab_mean": r(mean),
        "lab_std": r(std),
        "tile_lab_mean_p5": r(np.percentile(st["means"][ok], 5, axis=0)),
        "tile_lab_mean_p95": r(np.percentile(st["means"][ok], 95, axis=0)),
        "h_p5_p50_p95": r(np.percentile(st["h"], [5, 50, 95]), 3),
        "e_p5_p50_p95": r(np.percentile(st["e"], [5, 50, 95]), 3),
        "saturation_mean": round(float(st["sat"].mean()), 3),
        "tile_lab_std_p5": r(np.percentile(st["stds"][ok], 5, axis=0)),
        "tile_lab_std_p95": r(np.percentile(st["stds"][ok], 95, axis=0)),
        "sharpness_p5_p50_p95": r(np.percentile(st["sharpness"], [5, 50, 95]), 0),
    }


# --------------------------------------------------------------------------------------------
# augmentation coverage
# --------------------------------------------------------------------------------------------
#: the transforms issue 18 added (switched off, and blur back to 1 px, to reproduce the earlier augmentation)
NEW_P = ("lab_p", "gain_p", "gamma_p", "resolution_p")


def augment_tiles(tiles: np.ndarray, overrides: dict[str, Any], draws: int, seed: int) -> np.ndarray:
    from pipeline.training.augment import AugmentConfig, build_train_augmentation

    aug = build_train_augmentation(AugmentConfig(**overrides), seed=seed)
    return np.stack([aug(image=t)["image"] for _ in range(draws) for t in tiles])


def _tile_vectors(st: dict[str, np.ndarray]) -> np.ndarray:
    """(N, 9) per-tile statistics: L, a, b means, L, a, b stds, H and E medians, mean saturation (tiles with tissue)."""
    ok = st["counts"] > 0
    return np.column_stack([st["means"][ok], st["stds"][ok], st["tile_h"][ok], st["tile_e"][ok], st["tile_sat"][ok]])


VECTOR_NAMES = ["L", "a", "b", "sd_L", "sd_a", "sd_b", "H_med", "E_med", "sat"]


def coverage(
    aug_vectors: np.ndarray, real: dict[str, np.ndarray], real_lab_mean: dict[str, list[float]] | None = None
) -> dict[str, Any]:
    """The augmented tiles' 5-95 % range per statistic, the fraction of each real slide's tiles inside it,
    and whether each real slide's (pooled) LAB mean lies inside it."""
    lo, hi = np.nanpercentile(aug_vectors, 5, axis=0), np.nanpercentile(aug_vectors, 95, axis=0)
    out: dict[str, Any] = {
        "range": {n: [round(float(a), 3), round(float(b), 3)] for n, a, b in zip(VECTOR_NAMES, lo, hi)}
    }
    for name, vec in real.items():
        inside = (vec >= lo) & (vec <= hi)
        out[name] = {
            "covered_all": round(float(inside.all(axis=1).mean()), 3),
            "covered_lab_mean": round(float(inside[:, :3].all(axis=1).mean()), 3),
            "covered_per_stat": {n: round(float(v), 3) for n, v in zip(VECTOR_NAMES, inside.mean(axis=0))},
            "slide_median_inside": bool(((np.median(vec, 0) >= lo) & (np.median(vec, 0) <= hi)).all()),
        }
        if real_lab_mean is not None:
            m = np.asarray(real_lab_mean[name])
            out[name]["slide_lab_mean_inside"] = [bool(x) for x in (m >= lo[:3]) & (m <= hi[:3])]
    return out


# --------------------------------------------------------------------------------------------
# epidermis calls with and without stain normalisation
# --------------------------------------------------------------------------------------------
ANNOTATIONS = REPO / "data" / "real_skin" / "annotations"


def epidermis_truth(name: str, prep: Any) -> np.ndarray | None:
    """Per tile of ``prep.grid``: 1 = epidermis (annotated epidermis + corneum cover >= 10 % of the tile,
    the training rule and the synthetic convention), 0 = none of it, -1 = in between (not scored);
    None for a slide without annotations in data/real_skin/annotations."""
    from pipeline.tiles.annotations import rasterise, read_annotations, tile_coverage

    path = ANNOTATIONS / f"{name}.geojson"
    if not path.is_file():
        return None
    anns = read_annotations(path, ["epidermis"], class_map={"stratum_corneum": "epidermis"}, ignore_classes=["adnexa"])
    shape = (prep.bounds_origin[0] + prep.dimensions[0], prep.bounds_origin[1] + prep.dimensions[1])
    masks = rasterise(anns, ["epidermis"], shape, prep.slide_mpp)
    cov = tile_coverage(masks, ["epidermis"], prep.grid.coords, prep.grid.tile_size_l0, prep.slide_mpp)[:, 0]
    return np.where(cov >= 0.1, 1, np.where(cov <= 0.0, 0, -1))


def _scores(called: np.ndarray, truth: np.ndarray | None) -> dict[str, Any]:
    if truth is None:
        return {}
    pos, neg = truth == 1, truth == 0
    tp, fp = int((called & pos).sum()), int((called & neg).sum())
    return {
        "true_epidermis_tiles": int(pos.sum()),
        "true_positives": tp,
        "false_positives": fp,
        "sensitivity": round(tp / max(1, int(pos.sum())), 3),
        "specificity": round(1.0 - fp / max(1, int(neg.sum())), 3),
    }


def epidermis_check(
    model: Path, target_mean: list[float], target_std: list[float], backend: str, batch_size: int
) -> dict[str, Any]:
    import torch

    from models.bundle import StainNormalisationSpec, load_bundle
    from pipeline.analysis import SlideAnalyser
    from pipeline.patch.backends import make_runner
    from pipeline.patch.features import extract_features
    from pipeline.patch.stain_norm import normaliser_for
    from pipeline.slide_model.aggregation import SlidePredictor

    torch.set_num_threads(2)
    bundle = load_bundle(model, device="cpu")
    runner, _ = make_runner(bundle, torch.device("cpu"), backend=backend, batch_size=batch_size)
    predictor = SlidePredictor.from_bundle(bundle.contract, bundle.extra) if bundle.contract.aggregator else None
    analyser = SlideAnalyser.for_bundle(bundle.contract, runner, predictor, batch_size=batch_size)
    out: dict[str, Any] = {"model": str(model), "backend": backend, "threshold": EPI_THRESHOLD}
    settings: list[tuple[str, StainNormalisationSpec | None]] = [("none", None)] + [
        (scope, StainNormalisationSpec(target_lab_mean=target_mean, target_lab_std=target_std, scope=scope))  # type: ignore[arg-type]
        for scope in ("slide", "tile")
    ]
    for name, path, mpp in REAL:
        prep = analyser.prepare(path, mpp)
        grid = prep.grid
        truth = epidermis_truth(name, prep)
        row: dict[str, Any] = {"tiles": len(grid)}
        for label, spec in settings:
            t = time.perf_counter()
            norm = normaliser_for(spec, path, mpp, grid.coords, grid.plan, grid.tile_px, prep.mask.background_rgb)
            fit_s = time.perf_counter() - t
            feats = extract_features(
                path,
                mpp,
                grid.coords,
                grid.plan,
                grid.tile_px,
                grid.tile_size_l0,
                runner,
                analyser.classes,
                batch_size=batch_size,
                background_rgb=prep.mask.background_rgb,
                normalise=norm,
            )
            epi = feats.column("epidermis")
            pred = predictor.predict(feats) if predictor is not None and len(feats) else None
            row[label] = {
                "slide_probability": None if pred is None else round(pred.probability, 3),
                "slide_band": None if pred is None else pred.band,
                "epidermis_tiles": int((epi > EPI_THRESHOLD).sum()),
                **_scores(epi > EPI_THRESHOLD, truth),
                "epidermis_tiles_at_bundle_threshold": int((epi > bundle.contract.thresholds["epidermis"]).sum()),
                "epidermis_prob_p90": round(float(np.percentile(epi, 90)), 3) if len(epi) else None,
                "pattern_tile_max": {
                    c: round(float(feats.column(c).max()), 3) for c in ("pallor", "necrolysis", "parakeratosis")
                }
                if len(epi)
                else {},
                "pattern_tiles_at_bundle_threshold": {
                    c: int((feats.column(c) > bundle.contract.thresholds[c]).sum())
                    for c in ("pallor", "necrolysis", "parakeratosis")
                },
                "normalise_ms_per_tile": round(1e3 * feats.meta.get("normalise_seconds", 0.0) / max(1, len(epi)), 3),
                "model_ms_per_tile": round(1e3 * feats.meta["model_seconds"] / max(1, len(epi)), 3),
                "fit_seconds": round(fit_s, 3),
            }
        out[name] = row
        print(
            f"{name:22s} tiles {len(grid):5d}"
            + ("" if truth is None else f" (annotated epidermis {int((truth == 1).sum())})")
            + "  "
            + "  ".join(
                f"{k}: {row[k]['epidermis_tiles']:4d}"
                + (f" (TP {row[k]['true_positives']}, FP {row[k]['false_positives']})" if truth is not None else "")
                for k, _ in settings
            )
        )
    return out


# --------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    from pipeline.core.runtime import cpu_description

    return {"cpu": cpu_description(), "python": platform.python_version(), "opencv": cv2.__version__}


def _fmt(v: list[float], nd: int = 1) -> str:
    return "/".join(f"{x:.{nd}f}" for x in v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=64, help="tissue tiles sampled per slide")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic-dir", type=Path, default=REPO / "data" / "synthetic" / "stain_stats")
    ap.add_argument("--augment", action="store_true", help="also measure the augmentation's coverage")
    ap.add_argument("--draws", type=int, default=4, help="augmented copies of each synthetic tile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="AugmentConfig override")
    ap.add_argument("--epidermis", action="store_true", help="also run the bundle with/without normalisation")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "demo_bundle")
    ap.add_argument("--backend", default="torch-fp32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)

    cv2.setNumThreads(2)
    result: dict[str, Any] = {"machine": machine(), "tiles_per_slide": args.tiles, "slides": {}}
    per_slide: dict[str, dict[str, np.ndarray]] = {}
    synth_names: list[str] = []
    synth_tiles: list[np.ndarray] = []
    slides = [(n, p, m, "real") for n, p, m in REAL if p.exists()]
    slides += [(n, p, m, "synthetic") for n, p, m in synthetic_slides(args.synthetic_dir)]
    header = (
        f"{'slide':22s} {'kind':9s} {'tiles':>5s} {'LAB mean':>17s} {'LAB std':>14s} {'tile L p5-p95':>13s} "
        f"{'H p5/p50/p95':>16s} {'E p5/p50/p95':>16s} {'glass RGB':>11s} {'sat':>5s}"
    )
    print(header)
    for name, path, mpp, kind in slides:
        tiles, bg, n_grid = sample_tiles(path, mpp, args.tiles, args.seed)
        st = tile_statistics(tiles, bg)
        per_slide[name] = st
        s = summarise(st)
        s.update({"kind": kind, "grid_tiles": n_grid, "glass_rgb": [int(v) for v in bg], "mpp": mpp})
        result["slides"][name] = s
        if kind == "synthetic":
            synth_names.append(name)
            synth_tiles.append(tiles)
        print(
            f"{name:22s} {kind:9s} {s['tiles_with_tissue']:5d} {_fmt(s['lab_mean']):>17s} {_fmt(s['lab_std']):>14s} "
            f"{s['tile_lab_mean_p5'][0]:5.1f}-{s['tile_lab_mean_p95'][0]:5.1f}   "
            f"{_fmt(s['h_p5_p50_p95'], 2):>16s} {_fmt(s['e_p5_p50_p95'], 2):>16s} {_fmt(s['glass_rgb'], 0):>11s} "
            f"{s['saturation_mean']:5.2f}"
        )
    # all synthetic slides pooled: the training distribution's statistics (normalisation target)
    pooled = {k: np.concatenate([per_slide[n][k] for n in synth_names]) for k in per_slide[synth_names[0]]}
    s = summarise(pooled)
    result["synthetic_pooled"] = s
    print(
        f"{'synthetic (pooled)':22s} {'synthetic':9s} {s['tiles_with_tissue']:5d} {_fmt(s['lab_mean']):>17s} "
        f"{_fmt(s['lab_std']):>14s} {s['tile_lab_mean_p5'][0]:5.1f}-{s['tile_lab_mean_p95'][0]:5.1f}   "
        f"{_fmt(s['h_p5_p50_p95'], 2):>16s} {_fmt(s['e_p5_p50_p95'], 2):>16s}"
    )

    if args.augment:
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        real_vec = {n: _tile_vectors(per_slide[n]) for n, _, _ in REAL if n in per_slide}
        settings = {
            "none": {"enabled": False},
            "before_issue18": {**dict.fromkeys(NEW_P, 0.0), "blur_sigma_max": 1.0, **overrides},
            "defaults": overrides,
        }
        src = np.concatenate(synth_tiles)
        bg = (250, 250, 250)
        result["augment"] = {}
        for label, ov in settings.items():
            t = time.perf_counter()
            draws = 1 if label == "none" else args.draws
            aug = augment_tiles(src, ov, draws, args.seed)
            secs = time.perf_counter() - t
            vec = _tile_vectors(tile_statistics(aug, bg))
            cov = coverage(vec, real_vec, {n: result["slides"][n]["lab_mean"] for n in real_vec})
            cov["ms_per_tile"] = round(1e3 * secs / len(aug), 2)
            result["augment"][label] = cov
            print(
                f"\naugmentation {label} ({len(aug)} tiles, {cov['ms_per_tile']} ms/tile): "
                + ", ".join(f"{k} {v[0]:.2f}..{v[1]:.2f}" for k, v in cov["range"].items())
            )
            for name in real_vec:
                c = cov[name]
                print(
                    f"  {name:22s} slide LAB mean inside (L, a, b): {c['slide_lab_mean_inside']}; "
                    f"tiles covered: all stats {c['covered_all']:.2f}, LAB mean {c['covered_lab_mean']:.2f}; "
                    + " ".join(f"{k} {v:.2f}" for k, v in c["covered_per_stat"].items())
                )

    if args.epidermis:
        target = result["synthetic_pooled"]
        print(f"\nepidermis tiles (p > {EPI_THRESHOLD}); Reinhard target {target['lab_mean']} ± {target['lab_std']}")
        result["epidermis"] = epidermis_check(
            args.model, target["lab_mean"], target["lab_std"], args.backend, args.batch_size
        )

    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
