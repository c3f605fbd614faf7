"""One training run from a validated :class:`~pipeline.training.config.RunConfig`.

``task: patch`` → patch bundle; ``task: aggregator`` → aggregator + calibration on an existing
patch bundle; ``task: pipeline`` → both, one bundle. Everything is written into the run folder;
an interrupted run resumes when started again with the same config.

Under ``torchrun`` the patch model trains data-parallel on every rank (see
:mod:`pipeline.training.distributed`); rank 0 alone prepares the data, writes the run folder's
files, trains the aggregator and writes the bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
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
from pipeline.core.errors import ConfigError, DataError, SlideError
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.paths import REPO_ROOT
from pipeline.core.runtime import resolve_device, resolve_precision
from pipeline.patch.backends.torch_runner import PatchRunner
from pipeline.patch.features import SlideFeatures
from pipeline.training import distributed
from pipeline.training.aggregator_trainer import SlideExample, train_aggregator
from pipeline.training.checks import (
    check_aggregator_records,
    check_patch_counts,
    check_run_folder,
    tile_counts,
    unlisted_inputs,
)
from pipeline.training.config import DataConfig, ExtraDataConfig, LabelConfig, RunConfig
from pipeline.training.data import (
    SlideRecord,
    SlideTiles,
    choose_splits,
    index_slide,
    load_slide_table,
    make_splits,
    write_splits,
)
from pipeline.training.init_bundle import check_init_bundle, init_provenance
from pipeline.training.resume import checkpoint_split, split_sha256
from pipeline.training.reviewed import (
    ReviewedSet,
    provenance,
    read_reviewed,
    reviewed_patch_data,
    reviewed_slide_records,
)

log = logging.getLogger(__name__)


@dataclass
class PatchData:
    """The patch stage's checked inputs: tiles of each split, the split and its hash, the counts."""

    train: list[SlideTiles]
    val: list[SlideTiles]
    splits: dict[str, Any]
    new_split: bool
    split_sha256: str
    counts: dict[str, Any]


@dataclass
class PreparedRun:
    """What :func:`prepare_run` checked and loaded (``counts``: what ``train.py --check`` prints)."""

    run_dir: Path
    patch: PatchData | None = None
    aggregator_records: list[SlideRecord] | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    reviewed: list[ReviewedSet] = field(default_factory=list)


def weights_digest(model: PatchClassifier) -> str:
    """sha256 (16 hex digits) of a model's weights: the feature cache key of a freshly trained patch model."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


def _write_run_files(run_dir: Path, cfg: RunConfig, splits: dict[str, Any] | None, new_split: bool) -> None:
    """Write the resolved config (and a new split) into the run folder: only after every check passed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.resolved.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    if splits is not None and new_split:
        write_splits(run_dir / cfg.split.file, splits)


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


def _slide_table(data: DataConfig, require_annotations: bool) -> list[SlideRecord]:
    """A data set's table, with every slide / annotation file in its folders accounted for."""
    records = load_slide_table(data, REPO_ROOT, require_annotations=require_annotations)
    unlisted_inputs(data, _resolve(data.root), records)
    return records


def _index_all(records: list[SlideRecord], cfg: RunConfig, labels: LabelConfig, desc: str) -> dict[str, SlideTiles]:
    """Tiles + labels of every slide; the problems of all slides (unknown classes, misplaced
    annotations, missing resolution) are reported together in one error."""
    out: dict[str, SlideTiles] = {}
    problems: list[str] = []
    for r in tqdm(records, desc=desc, leave=False, disable=None):
        try:
            out[r.slide_id] = index_slide(r, cfg.tiling, labels)
        except (DataError, SlideError) as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} slides cannot be used: " + " | ".join(problems))
    return out


def patch_data(cfg: RunConfig, run_dir: Path, reviewed: list[ReviewedSet] | None = None) -> PatchData:
    """Slide tables → split → tiles with labels → counts, checked; nothing is written.

    ``reviewed`` (:func:`~pipeline.training.reviewed.read_reviewed` of ``cfg.reviewed``): their
    reviewed tiles join the training split with sparse labels.
    """
    ensure_synthetic(cfg.data)
    records = _slide_table(cfg.data, require_annotations=True)
    last = run_dir / "checkpoints" / "last.pt"
    split_path = run_dir / cfg.split.file
    had_split = split_path.is_file()
    splits, new_split = choose_splits(split_path, records, cfg.split, trained=last.is_file())
    sha = split_sha256(splits)
    if last.is_file():
        recorded = checkpoint_split(last)
        if (recorded and recorded != sha) or (recorded is None and not had_split):
            raise DataError(
                f"{last}: was trained on another split than the one this run would use (splits.json "
                f"{'changed' if recorded else 'was deleted'}): resuming would train on validation slides; "
                "use a new output_dir, or delete checkpoints/ to retrain"
            )
    indexed = _index_all(records, cfg, cfg.labels, "tiling + labels")
    train = [indexed[s] for s in splits["train"]]
    val = [indexed[s] for s in splits["val"]]
    seen = set(indexed)
    for extra in cfg.extra_data:
        ex_train, ex_val = extra_patch_data(extra, cfg, seen)
        train += ex_train
        val += ex_val
    classes = list(cfg.labels.classes)
    from_reviews = reviewed_patch_data(reviewed or [], classes, cfg.tiling, seen)
    train += from_reviews
    counts = {"train": tile_counts(train, classes), "val": tile_counts(val, classes)}
    if reviewed:
        counts["reviewed"] = tile_counts(from_reviews, classes)
    for name in ("train", "val"):
        log.info(
            "%s: %d slides, %d tiles, positives %s",
            name,
            counts[name]["slides"],
            counts[name]["tiles"],
            counts[name]["positive_tiles"],
        )
    check_patch_counts(counts, classes)
    return PatchData(train, val, splits, new_split, sha, counts)


def extra_patch_data(extra: ExtraDataConfig, cfg: RunConfig, seen: set[str]) -> tuple[list, list]:
    """(train, val) tiles of one extra slide set, each tile with the set's sampling weight.

    Its slides are split by the set's ``split`` (auto: a 'split' column, else patient-level as the
    main data); ``seen`` holds the slide ids taken so far (an id in two sets is an error).
    """
    ensure_painted(extra)
    ensure_synthetic(extra)
    records = _slide_table(extra, require_annotations=True)
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
    indexed = _index_all(records, cfg, labels, f"tiling + labels ({Path(extra.root).name})")
    for r in records:
        tiles = indexed[r.slide_id]
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


def aggregator_records(cfg: RunConfig, reviewed: list[ReviewedSet] | None = None) -> list[SlideRecord]:
    """The aggregator's slides (``aggregator.data`` or the patch data, plus its extra sets and the
    reviewed slides with a verdict), checked for enough patients of each class before anything is
    trained."""
    data = cfg.aggregator.data or cfg.data
    ensure_synthetic(data)
    records = _slide_table(data, require_annotations=False)
    for extra in cfg.aggregator.extra_data:
        ensure_painted(extra)
        ensure_synthetic(extra)
        more = _slide_table(extra, require_annotations=False)
        clash = sorted({r.slide_id for r in records} & {r.slide_id for r in more})
        if clash:
            raise DataError(
                f"{extra.root}: slide ids already used by another aggregator data set: {', '.join(clash[:5])}"
            )
        records += more
    records += reviewed_slide_records(reviewed or [], {r.slide_id for r in records})
    return records


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


def train_patch(cfg: RunConfig, run_dir: Path, data: PatchData):
    """Patch stage on the prepared data (rank 0's, given to every rank). Returns (model, thresholds, metrics).

    Distributed: every rank trains; rank 0 writes the metrics.
    """
    from pipeline.training.patch_trainer import train_patch_model

    result = train_patch_model(cfg, run_dir, data.train, data.val, split_sha256=data.split_sha256)
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
    cfg: RunConfig,
    run_dir: Path,
    records: list[SlideRecord],
    model: PatchClassifier,
    thresholds: dict[str, float],
    model_key: str,
):
    """Aggregator stage on the prepared ``records``. Returns (predictor, metrics)."""
    if cfg.aggregator.data is None:
        log.warning(
            "aggregator trained on the patch model's own slides: out-of-fold estimates are optimistic; "
            "set aggregator.data to a separate slide set"
        )
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


def prepare_run(cfg: RunConfig, write: bool = True) -> PreparedRun:
    """Every check before training: config vs run folder, slide tables, split, annotations, minimum
    data per stage. Writes the resolved config and a new split only when all passed (``write``);
    a failed start leaves the run folder as it was."""
    run_dir = _resolve(cfg.output_dir)
    check_run_folder(run_dir, cfg)
    check_init_bundle(cfg)
    prepared = PreparedRun(run_dir=run_dir, reviewed=read_reviewed(cfg.reviewed))
    if cfg.task in ("aggregator", "pipeline"):  # cheap table checks first: the patch data takes longer
        if cfg.task == "aggregator" and cfg.aggregator.patch_bundle is None:
            raise ConfigError("task 'aggregator' needs aggregator.patch_bundle")
        prepared.aggregator_records = aggregator_records(cfg, prepared.reviewed)
        prepared.counts["aggregator"] = check_aggregator_records(prepared.aggregator_records, cfg.split.k_folds)
    if cfg.task in ("patch", "pipeline"):
        prepared.patch = patch_data(cfg, run_dir, prepared.reviewed)
        prepared.counts["patch"] = prepared.patch.counts
    if write:
        p = prepared.patch
        _write_run_files(run_dir, cfg, p.splits if p else None, p.new_split if p else False)
    return prepared


def run_training(cfg: RunConfig) -> Path:
    """Run ``cfg``; returns the bundle directory (under torchrun: on every rank, written by rank 0)."""
    dctx = distributed.setup(cfg.train.device)
    try:
        return _run_training(cfg, dctx)
    finally:
        distributed.shutdown()


def _run_training(cfg: RunConfig, dctx: distributed.DistContext) -> Path:
    prepared = distributed.run_on_main(prepare_run, cfg)  # rank 0 checks; every rank gets the data
    run_dir = prepared.run_dir
    slide_metrics = None
    predictor = None
    if cfg.task in ("patch", "pipeline"):
        assert prepared.patch is not None
        model, thresholds, patch_metrics = train_patch(cfg, run_dir, prepared.patch)
        model_key = f"run:{weights_digest(model)}"
        if not dctx.is_main:
            log.info("patch stage done on this rank; rank 0 writes the bundle")
            return run_dir / "bundle"
    elif not dctx.is_main:
        log.warning(
            "task %s has no data-parallel stage: rank %d has nothing to do, rank 0 runs it", cfg.task, dctx.rank
        )
        return run_dir / "bundle"
    else:
        assert cfg.aggregator.patch_bundle is not None  # checked by prepare_run
        loaded = load_bundle(_resolve(cfg.aggregator.patch_bundle))
        model, thresholds = loaded.model, dict(loaded.contract.thresholds)
        patch_metrics = {"from_bundle": str(cfg.aggregator.patch_bundle)}
        model_key = loaded.sha256
    if cfg.task in ("aggregator", "pipeline"):
        assert prepared.aggregator_records is not None
        predictor, slide_metrics = train_slide_aggregator(
            cfg, run_dir, prepared.aggregator_records, model, thresholds, model_key
        )
    contract = _contract(cfg, model, thresholds, _flat_metrics(patch_metrics, slide_metrics))
    contract.training.reviews = provenance(prepared.reviewed, cfg.task) if prepared.reviewed else None
    contract.training.init_bundle = init_provenance(cfg) if cfg.task != "aggregator" else None
    extra = None
    if predictor is not None:
        params, state = predictor.to_bundle_sections()
        contract.aggregator = AggregatorSpec(
            type=predictor.kind, params=params, weights="aggregator" if state else None
        )
        contract.calibration = predictor.calibrator.to_json() if predictor.calibrator is not None else {"kind": "none"}
        fallback = (slide_metrics or {}).get("calibration_fallback")
        if fallback:  # the configured calibration was unusable (e.g. an inverted Platt fit): say so in the bundle
            contract.calibration = {
                **contract.calibration,
                "requested": cfg.aggregator.calibration.method,
                "fallback_reason": fallback["reason"],
            }
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
