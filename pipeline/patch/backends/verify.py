"""Verify fast backends for *this* environment when the bundle's agreement record does not cover it.

The agreement record (:mod:`.record`) counts only for the runtime versions it was measured with;
a fresh install that resolves another torch or onnxruntime would otherwise always run the
slow reference. Here, on first use in an environment, each runnable candidate backend is run
beside ``torch-fp32`` on a fixed set of synthetic slides (:data:`VERIFICATION_SET`, generated
once into the cache with a fixed seed; every tissue tile of every slide), each slide's tile
outputs go through the bundle's slide model (aggregator, calibration, bands: the ``scorer``
the caller passes in, which this layer does not import), and the backend is judged by the same
rule as the record (:func:`.record.judge`: band agreement >= 0.99 and |slide AUROC difference|
<= 0.01). Model tiles/s of each backend and of the reference are measured on fixed batches.

Verdicts are cached in ``<cache>/verified/`` (:mod:`.cache`) under a key of everything the
outputs depend on: bundle weights sha256, torch and onnxruntime versions, the CPU's feature
flags (or the GPU's name and CUDA version), the verification set and the rule. A new runtime,
CPU or bundle is a new key, checked again; nothing else ever reuses a verdict.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.core.io import atomic_write_json
from pipeline.patch.backends import record as agreement
from pipeline.patch.backends.cache import cache_key, resolve_cache_dir
from pipeline.patch.backends.int8 import CalibrationSet, default_calibration_slides

if TYPE_CHECKING:
    import torch

    from pipeline.patch.backends import Runner
    from pipeline.patch.features import SlideFeatures

log = logging.getLogger(__name__)

VERIFY_FORMAT = 1
REFERENCE = "torch-fp32"
#: The fixed synthetic slides of the check: 2 NME and 4 non-NME (normal, psoriasiform,
#: spongiotic), ~185 tissue tiles in all at 0.5 µm/px; another seed than the int8 calibration set.
VERIFICATION_SET = CalibrationSet(
    seed=5150,
    n_slides=6,
    classes=("nme", "normal", "psoriasiform", "spongiotic"),
    size_um=(1200.0, 1000.0),
    n_tiles=0,
    version=1,
)
SPEED_ROUNDS = 2
SPEED_BATCHES = 2


class SlideOutcome(Protocol):
    """What the check reads of a slide prediction."""

    probability: float
    band: str


class SlideScorer(Protocol):
    """The bundle's slide model (e.g. :class:`pipeline.slide_model.aggregation.SlidePredictor`)."""

    def predict(self, feats: SlideFeatures) -> SlideOutcome: ...


def environment_key(bundle, device: torch.device) -> dict[str, Any]:
    """Everything a verdict depends on (hashed into the cache file name)."""
    import torch

    from pipeline.core.runtime import cpu_flags

    versions = agreement.runtime_versions()
    if getattr(device, "type", "cpu") == "cuda":
        hardware = {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    else:
        flags = " ".join(sorted(cpu_flags()))
        hardware = {"cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}
    return {
        "format": VERIFY_FORMAT,
        "weights_sha256": bundle.weights_sha256,
        "torch": versions["torch"],
        "onnxruntime": versions["onnxruntime"],
        "device_type": getattr(device, "type", "cpu"),
        **hardware,
        "verification_set": VERIFICATION_SET.id,
        "rule": {"min_band_agreement": agreement.MIN_BAND_AGREEMENT, "max_auroc_diff": agreement.MAX_AUROC_DIFF},
    }


def verdict_path(bundle, device: torch.device, cache_dir: str | Path | None = None) -> Path:
    """The cache file holding this environment's verdicts for ``bundle`` (may not exist yet)."""
    key = environment_key(bundle, device)
    return resolve_cache_dir(cache_dir) / "verified" / f"{bundle.weights_sha256[:16]}-{cache_key(key)}.json"


def cached_verdicts(bundle, device: torch.device, cache_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """``{backend: entry}`` verified earlier in this environment ({} when none, or unreadable: logged)."""
    import json

    path = verdict_path(bundle, device, cache_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable backend verdicts (%s); verifying again", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("key") != environment_key(bundle, device):
        return {}
    entries = data.get("backends")
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def _store(bundle, device: torch.device, cache_dir: str | Path | None, entries: dict[str, dict[str, Any]]) -> Path:
    merged = {**cached_verdicts(bundle, device, cache_dir), **entries}
    path = verdict_path(bundle, device, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, {"key": environment_key(bundle, device), "backends": merged})


def verification_slides(bundle, cache_dir: str | Path | None = None) -> list[tuple[np.ndarray, np.ndarray, float, int]]:
    """Per slide of :data:`VERIFICATION_SET`: ``(coords (N, 2), tiles (N, H, W, 3) uint8, tile_size_l0, label)``.

    Every tissue tile of each slide on the bundle's own grid at its µm/px, read as inference
    reads them; ``label`` is the slide's ``nme_pattern``. The slides are generated into the cache
    once (:func:`pipeline.patch.backends.int8.default_calibration_slides`).
    """
    from pipeline.reading.slide import open_slide
    from pipeline.tiles.tiling import tile_slide

    inp = bundle.contract.input
    paths = default_calibration_slides(cache_dir, mpp=inp.mpp, spec=VERIFICATION_SET)
    with open(paths[0].parent.parent / "labels.csv", newline="", encoding="utf-8") as fh:
        labels = {row["slide_id"]: int(row["nme_pattern"]) for row in csv.DictReader(fh)}
    out = []
    for path in paths:
        with open_slide(path) as slide:
            grid, _, _, _ = tile_slide(slide, inp.tiling())
            if not len(grid):
                continue
            tiles = np.stack(
                [slide.read_region((int(x), int(y)), (grid.tile_px, grid.tile_px), grid.plan) for x, y in grid.coords]
            )
        out.append((grid.coords, tiles, float(grid.tile_size_l0), labels[path.stem]))
    return out


def _run(runner: Runner, tiles: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [runner(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])


def _auroc(p: list[float], y: list[int]) -> float | None:
    """Slide AUROC (ties count half), None without both classes."""
    pos = [a for a, t in zip(p, y) if t]
    neg = [a for a, t in zip(p, y) if not t]
    if not pos or not neg:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return float(wins / (len(pos) * len(neg)))


def compare(
    scorer: SlideScorer,
    classes: list[str],
    slides: list[tuple[np.ndarray, np.ndarray, float, int]],
    reference: Runner,
    candidate: Runner,
    batch_size: int,
) -> dict[str, Any]:
    """Judge ``candidate`` against ``reference`` on ``slides`` by the agreement record's rule; returns its entry."""
    from pipeline.patch.features import SlideFeatures

    ref_p: list[float] = []
    cand_p: list[float] = []
    agree: list[bool] = []
    labels: list[int] = []
    tile_max = 0.0
    n_tiles = 0
    for coords, tiles, size_l0, label in slides:
        outs = []
        for runner in (reference, candidate):
            probs, emb = _run(runner, tiles, batch_size)
            feats = SlideFeatures(coords, probs, emb, np.zeros(len(tiles), np.float32), {}, classes, size_l0)
            outs.append((probs, scorer.predict(feats)))
        (rp, ref), (cp, cand) = outs
        tile_max = max(tile_max, float(np.abs(rp.astype(np.float64) - cp).max()))
        n_tiles += len(tiles)
        ref_p.append(ref.probability)
        cand_p.append(cand.probability)
        agree.append(ref.band == cand.band)
        labels.append(label)
    band_agreement = float(np.mean(agree)) if agree else 0.0
    au, ref_au = _auroc(cand_p, labels), _auroc(ref_p, labels)
    passed, reasons = agreement.judge(band_agreement, au, ref_au)
    return {
        "passed": passed,
        "reasons": reasons,
        "band_agreement": round(band_agreement, 6),
        "slide_auroc": au,
        "auroc_diff": None if au is None or ref_au is None else round(abs(au - ref_au), 6),
        "slide_prob_abs_diff_max": float(f"{np.abs(np.subtract(cand_p, ref_p)).max():.4g}") if cand_p else None,
        "tile_prob_abs_diff_max": float(f"{tile_max:.4g}"),
        "n_slides": len(labels),
        "n_tiles": n_tiles,
    }


def verify_backends(
    bundle,
    device: torch.device,
    candidates: list[str],
    scorer: SlideScorer,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Verdicts for ``candidates`` (and the reference's speed) in this environment: ``(entries, from_cache)``.

    Cached verdicts are returned as they are; the missing ones are checked now (the
    verification slides read once, the reference run once) and added to the cache. A candidate
    that cannot be built or run here gets a failed entry naming why (not cached: it may be fixed
    by installing something). ``from_cache`` is True when nothing had to be checked now.
    """
    from pipeline.core.errors import PipelineError
    from pipeline.patch.backends import build_runner, default_batch_size
    from pipeline.patch.backends.speed import model_speeds, random_tiles

    have = cached_verdicts(bundle, device, cache_dir)
    todo = [c for c in candidates if c not in have]
    if not todo and REFERENCE in have:
        return {c: have[c] for c in [REFERENCE, *candidates]}, True
    bs = batch_size or default_batch_size(device)
    t0 = time.perf_counter()
    log.info(
        "verifying %s against %s for this environment on %d synthetic slides (once; cached in %s)",
        ", ".join(todo) or "speed",
        REFERENCE,
        VERIFICATION_SET.n_slides,
        verdict_path(bundle, device, cache_dir).parent,
    )
    slides = verification_slides(bundle, cache_dir)
    classes = list(bundle.contract.architecture.classes)
    runners: dict[str, Runner] = {REFERENCE: build_runner(bundle, device, REFERENCE, "auto", cache_dir, bs)}
    fresh: dict[str, dict[str, Any]] = {}
    unbuildable: dict[str, dict[str, Any]] = {}
    for name in todo:
        try:
            runners[name] = build_runner(bundle, device, name, "auto", cache_dir, bs)
            fresh[name] = compare(scorer, classes, slides, runners[REFERENCE], runners[name], bs)
        except (PipelineError, RuntimeError, OSError, ValueError) as exc:
            runners.pop(name, None)
            unbuildable[name] = {"passed": False, "reasons": [f"could not run here: {type(exc).__name__}: {exc}"]}
            log.warning("%s: %s", name, unbuildable[name]["reasons"][0])
    speeds = model_speeds(
        runners, random_tiles(bs, bundle.contract.input.tile_size_px), rounds=SPEED_ROUNDS, n_batches=SPEED_BATCHES
    )
    when = datetime.now(UTC).isoformat(timespec="seconds")
    for name, entry in fresh.items():
        entry.update(model_tiles_per_s=round(speeds[name], 1), batch_size=bs, verified_at=when)
    fresh[REFERENCE] = {"passed": True, "reference": True, "model_tiles_per_s": round(speeds[REFERENCE], 1)}
    path = _store(bundle, device, cache_dir, fresh)
    for name, entry in fresh.items():
        if name != REFERENCE:
            log.info(
                "%s: %s (band agreement %.3f, max |tile p diff| %.3g, %.0f tiles/s; fp32 %.0f)",
                name,
                "agrees with torch-fp32" if entry["passed"] else "FAILED: " + "; ".join(entry["reasons"]),
                entry["band_agreement"],
                entry["tile_prob_abs_diff_max"],
                entry["model_tiles_per_s"],
                speeds[REFERENCE],
            )
    log.info("backend verification took %.1f s; verdicts in %s", time.perf_counter() - t0, path)
    merged = {**have, **fresh, **unbuildable}
    return {c: merged[c] for c in [REFERENCE, *candidates] if c in merged}, False
