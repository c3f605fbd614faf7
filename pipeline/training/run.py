"""One training run from a validated :class:`~pipeline.training.config.RunConfig`.

``task: patch`` → patch bundle; ``task: aggregator`` → aggregator + calibration on an existing
patch bundle; ``task: pipeline`` → both, one bundle. Everything is written into the run folder;
an interrupted run resumes when started again with the same config.

Under ``torchrun`` the patch model trains data-parallel on every rank (see
:mod:`pipeline.training.distributed`); rank 0 alone prepares the data, writes the run folder's
files, trains the aggregator and writes the bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

import pipeline
from models.bundle import (
    AggregatorSpec,
    ArchitectureSpec,
    BundleContract,
    InputSpec,
    TrainingSpec,
    load_bundle,
    save_bundle,
)
from models.patch import PATTERN_CLASSES, PatchClassifier
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from pipeline.analysis import SlideAnalyser
from pipeline.core.config import config_hash
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.paths import REPO_ROOT
from pipeline.core.runtime import resolve_device, resolve_precision
from pipeline.patch.backends.torch_runner import PatchRunner
from pipeline.patch.features import SlideFeatures
from pipeline.training import distributed
from pipeline.training.aggregator_trainer import SlideExample, train_aggregator
from pipeline.training.config import DataConfig, ExtraDataConfig, RunConfig
from pipeline.training.data import SlideRecord, index_slide, load_or_make_splits, load_slide_table, make_splits

log = logging.getLogger(__name__)


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        commit = rev.stdout.strip() if rev.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{pipeline.__version__}+{commit}" if commit else pipeline.__version__


def _resolve(p: Path) -> Path:
    return p if p.is_absolute() else REPO_ROOT / p


def ensure_synthetic(data: DataConfig) -> None:
    """Generate the configured synthetic set into ``data.root`` unless it is already there."""
    if data.synthetic is None:
        return
    root = _resolve(data.root)
    s = data.synthetic
    if (root / data.labels_csv).is_file():
        manifest = root / "manifest.json"
        made = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if _same_synthetic_set(made, s):
            return
        log.info(
            "%s holds another synthetic set (n=%s, seed=%s, mpp=%s); regenerating n=%d seed=%d mpp=%s",
            root,
            made.get("n"),
            made.get("seed"),
            made.get("mpp"),
            s.n,
            s.seed,
            s.mpp,
        )
    from pipeline.synthetic import generate_dataset

    log.info("generating %d synthetic slides (seed %d) into %s", s.n, s.seed, root)
    generate_dataset(root, n=s.n, seed=s.seed, mpp=s.mpp, classes=s.classes, size_um=s.size_um, overwrite=True)


def _same_synthetic_set(made: dict[str, Any], s) -> bool:
    """Whether a generator ``manifest.json`` matches the configured set (unset options: any value)."""
    same = made.get("n") == s.n and made.get("seed") == s.seed and made.get("mpp") in ([s.mpp], s.mpp)
    if s.size_um is not None:
        same = same and list(made.get("size_um") or []) == list(s.size_um)
    if s.classes is not None:
        same = same and list(made.get("classes") or []) == list(s.classes)
    return same


def _prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = _resolve(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.resolved.yaml"
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if resolved.is_file() and resolved.read_text() != text:
        raise ConfigError(
            f"{run_dir}: holds a run with a different config; resume needs the same config "
            "(use another output_dir, or delete the folder to start over)"
        )
    atomic_write_text(resolved, text)
    return run_dir


def _contract(
    cfg: RunConfig, model: PatchClassifier, thresholds: dict[str, float], metrics: dict[str, float]
) -> BundleContract:
    return BundleContract(
        name=cfg.name,
        version=cfg.version,
        label=cfg.label,
        architecture=ArchitectureSpec.of(model),
        input=InputSpec.from_tiling(cfg.tiling),
        thresholds={c: float(thresholds.get(c, 0.5)) for c in model.classes},
        training=TrainingSpec.from_config(cfg, code_version=code_version(), metrics=metrics),
    )


def _flat_metrics(patch_metrics: dict[str, Any], slide_metrics: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for c, m in patch_metrics.get("validation", {}).get("per_class", {}).items():
        for k in ("auroc", "auprc", "f1"):
            if isinstance(m.get(k), (int, float)):
                out[f"tile_val_{k}_{c}"] = float(m[k])
    for k in ("auroc", "auprc", "balanced_accuracy", "ece", "brier"):
        v = (slide_metrics or {}).get(k)
        if isinstance(v, dict) and isinstance(v.get("value"), (int, float)):
            out[f"slide_oof_{k}"] = float(v["value"])
    return out


def patch_data(cfg: RunConfig, run_dir: Path) -> tuple[list, list]:
    """Slide table → splits → tiles with labels: (train, val) lists of SlideTiles."""
    ensure_synthetic(cfg.data)
    records = load_slide_table(cfg.data, REPO_ROOT, require_annotations=True)
    splits = load_or_make_splits(run_dir / cfg.split.file, records, cfg.split)
    by_id = {r.slide_id: r for r in records}
    indexed = {}
    for r in tqdm(records, desc="tiling + labels", leave=False, disable=None):
        indexed[r.slide_id] = index_slide(r, cfg.tiling, cfg.labels)
    train = [indexed[s] for s in splits["train"]]
    val = [indexed[s] for s in splits["val"]]
    seen = set(indexed)
    for extra in cfg.extra_data:
        ex_train, ex_val = extra_patch_data(extra, cfg, seen)
        train += ex_train
        val += ex_val
    for name, part in (("train", train), ("val", val)):
        n_tiles = sum(len(s.coords) for s in part)
        if n_tiles == 0:
            raise DataError(f"empty {name} split: its {len(part)} slides have no tissue tiles")
        n_pos = {
            c: int(sum(((s.targets[:, j] > 0) & s.mask[:, j]).sum() for s in part))
            for j, c in enumerate(cfg.labels.classes)
        }
        log.info("%s: %d slides, %d tiles, positives %s", name, len(part), n_tiles, n_pos)
        if name == "train" and not any(n_pos[c] for c in PATTERN_CLASSES if c in n_pos):
            raise DataError(
                "training split has no tile positive for any pattern; check the annotations and labels.positive_coverage"
            )
    del by_id
    return train, val


def extra_patch_data(extra: ExtraDataConfig, cfg: RunConfig, seen: set[str]) -> tuple[list, list]:
    """(train, val) tiles of one extra slide set, each tile with the set's sampling weight.

    Its slides are split by the set's ``split`` (auto: a 'split' column, else patient-level as the
    main data); ``seen`` holds the slide ids taken so far (an id in two sets is an error).
    """
    ensure_painted(extra)
    ensure_synthetic(extra)
    records = load_slide_table(extra, REPO_ROOT, require_annotations=True)
    clash = sorted(seen & {r.slide_id for r in records})
    if clash:
        raise DataError(f"{extra.root}: slide ids already used by another data set: {', '.join(clash[:5])}")
    seen.update(r.slide_id for r in records)
    labels = cfg.labels.model_copy(update={"class_map": {**cfg.labels.class_map, **extra.class_map}})
    part: dict[str, str] = {}
    if extra.split != "auto":
        part.update(dict.fromkeys((r.slide_id for r in records), str(extra.split)))
    else:
        part.update({r.slide_id: r.split for r in records if r.split})
        rest = [r for r in records if not r.split]
        if len({r.patient_id for r in rest}) >= 2:
            auto = make_splits(rest, cfg.split)
            part.update({s: name for name in ("train", "val", "test") for s in auto[name]})
        else:
            part.update(dict.fromkeys((r.slide_id for r in rest), "train"))
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for r in tqdm(records, desc=f"tiling + labels ({Path(extra.root).name})", leave=False, disable=None):
        tiles = index_slide(r, cfg.tiling, labels)
        tiles.weight = extra.weight
        out[part[r.slide_id]].append(tiles)
    log.info(
        "%s: %d train / %d val / %d test slides (weight %g)",
        extra.root,
        len(out["train"]),
        len(out["val"]),
        len(out["test"]),
        extra.weight,
    )
    return out["train"], out["val"]


def ensure_painted(data: ExtraDataConfig) -> None:
    """Paint the configured slides into ``data.root`` unless the same set is already there."""
    if data.painted is None:
        return
    root = _resolve(data.root)
    p = data.painted
    manifest = root / "manifest.json"
    if (root / data.labels_csv).is_file() and manifest.is_file():
        made = json.loads(manifest.read_text())
        if (made.get("n"), made.get("seed"), made.get("mpp")) == (p.n, p.seed, p.mpp):
            return
    from pipeline.synthetic.painted import generate_painted_dataset

    log.info("painting patterns on %d real-skin crops (seed %d) into %s", p.n, p.seed, root)
    generate_painted_dataset(root, n=p.n, seed=p.seed, sources_root=_resolve(p.sources), mpp=p.mpp, overwrite=True)


def train_patch(cfg: RunConfig, run_dir: Path):
    """Patch stage: table → splits → tile labels → training. Returns (model, thresholds, metrics).

    Distributed: rank 0 prepares the data and broadcasts it; every rank trains; rank 0 writes the metrics.
    """
    from pipeline.training.patch_trainer import train_patch_model

    train, val = distributed.run_on_main(patch_data, cfg, run_dir)
    result = train_patch_model(cfg, run_dir, train, val)
    if distributed.current().is_main:
        atomic_write_json(run_dir / "patch_metrics.json", result.metrics)
    return result.model, result.thresholds, result.metrics


def compute_features(
    records: list[SlideRecord], model: PatchClassifier, model_key: str, cfg: RunConfig, cache_dir: Path
) -> dict[str, SlideFeatures]:
    """Patch-model features of every slide (the per-slide analysis, patch model only), cached by
    slide fingerprint + model key."""
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(device, cfg.train.precision)
    runner = PatchRunner(model, IMAGENET_MEAN, IMAGENET_STD, device, precision, channels_last=cfg.train.channels_last)
    analyser = SlideAnalyser(
        input=InputSpec.from_tiling(cfg.tiling),
        classes=list(model.classes),
        runner=runner,
        model_name=cfg.name,
        model_sha256=model_key,
        batch_size=cfg.train.batch_size,
        cache_dir=cache_dir,
    )
    return {
        r.slide_id: analyser.analyse(r.path, r.mpp, r.slide_id).features
        for r in tqdm(records, desc="slide features", leave=False, disable=None)
    }


def train_slide_aggregator(
    cfg: RunConfig, run_dir: Path, model: PatchClassifier, thresholds: dict[str, float], model_key: str
):
    """Aggregator stage on ``cfg.aggregator.data`` (or the patch data). Returns (predictor, metrics)."""
    data = cfg.aggregator.data or cfg.data
    if cfg.aggregator.data is None:
        log.warning(
            "aggregator trained on the patch model's own slides: out-of-fold estimates are optimistic; "
            "set aggregator.data to a separate slide set"
        )
    ensure_synthetic(data)
    records = load_slide_table(data, REPO_ROOT, require_annotations=False)
    for extra in cfg.aggregator.extra_data:
        ensure_painted(extra)
        ensure_synthetic(extra)
        more = load_slide_table(extra, REPO_ROOT, require_annotations=False)
        clash = sorted({r.slide_id for r in records} & {r.slide_id for r in more})
        if clash:
            raise DataError(
                f"{extra.root}: slide ids already used by another aggregator data set: {', '.join(clash[:5])}"
            )
        records += more
    feats = compute_features(records, model, model_key, cfg, run_dir / "features")
    splits = make_splits(records, cfg.split)
    atomic_write_json(run_dir / "aggregator_folds.json", {"folds": splits["folds"], "patients": splits["patients"]})
    examples = [
        SlideExample(
            r.slide_id,
            r.patient_id,
            r.diagnosis,
            int(r.flags.get("nme_pattern", 0)),
            np.array([r.flags.get(p, 0) for p in PATTERN_CLASSES], np.float32),
            feats[r.slide_id],
        )
        for r in records
    ]
    return train_aggregator(
        cfg.aggregator,
        examples,
        splits["folds"],
        list(model.classes),
        thresholds,
        run_dir / "aggregator",
        seed=cfg.seed,
    )


def run_training(cfg: RunConfig) -> Path:
    """Run ``cfg``; returns the bundle directory (under torchrun: on every rank, written by rank 0)."""
    dctx = distributed.setup(cfg.train.device)
    try:
        return _run_training(cfg, dctx)
    finally:
        distributed.shutdown()


def _run_training(cfg: RunConfig, dctx: distributed.DistContext) -> Path:
    run_dir = distributed.run_on_main(_prepare_run_dir, cfg)
    slide_metrics = None
    predictor = None
    if cfg.task in ("patch", "pipeline"):
        model, thresholds, patch_metrics = train_patch(cfg, run_dir)
        model_key = f"run:{config_hash(cfg)}"
        if not dctx.is_main:
            log.info("patch stage done on this rank; rank 0 writes the bundle")
            return run_dir / "bundle"
    elif not dctx.is_main:
        log.warning(
            "task %s has no data-parallel stage: rank %d has nothing to do, rank 0 runs it", cfg.task, dctx.rank
        )
        return run_dir / "bundle"
    else:
        if cfg.aggregator.patch_bundle is None:
            raise ConfigError("task 'aggregator' needs aggregator.patch_bundle")
        loaded = load_bundle(_resolve(cfg.aggregator.patch_bundle))
        model, thresholds = loaded.model, dict(loaded.contract.thresholds)
        patch_metrics = {"from_bundle": str(cfg.aggregator.patch_bundle)}
        model_key = loaded.sha256
    if cfg.task in ("aggregator", "pipeline"):
        predictor, slide_metrics = train_slide_aggregator(cfg, run_dir, model, thresholds, model_key)
    contract = _contract(cfg, model, thresholds, _flat_metrics(patch_metrics, slide_metrics))
    extra = None
    if predictor is not None:
        params, state = predictor.to_bundle_sections()
        contract.aggregator = AggregatorSpec(
            type=predictor.kind, params=params, weights="aggregator" if state else None
        )
        contract.calibration = predictor.calibrator.to_json() if predictor.calibrator is not None else {"kind": "none"}
        contract.bands = {"low": predictor.bands.low, "high": predictor.bands.high}
        extra = {"aggregator": state} if state else None
    bundle = run_dir / "bundle"
    digest = save_bundle(bundle, model, contract, extra_tensors=extra)
    if cfg.bundle_dir is not None:
        target = _resolve(cfg.bundle_dir)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        log.info("bundle copied to %s", target)
    summary = {
        "bundle": str(bundle),
        "sha256": digest,
        "task": cfg.task,
        "patch_metrics": patch_metrics,
        "slide_metrics": slide_metrics,
    }
    if dctx.enabled:
        summary["distributed"] = dctx.describe()
    atomic_write_json(run_dir / "summary.json", summary)
    return bundle
