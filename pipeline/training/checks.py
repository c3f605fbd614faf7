"""Data checks that run before training writes anything: every input accounted for, enough data
for every stage, and a run folder that can be (re)used with this config.

Each check raises one :class:`~pipeline.core.errors.DataError` / ``ConfigError`` line naming
what is missing and what to add or change; the counts they look at are returned for
``train.py --check``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from models.patch import PATTERN_CLASSES
from pipeline.core.errors import ConfigError, DataError
from pipeline.reading.slide import SLIDE_SUFFIXES, slide_id_for
from pipeline.training.config import DataConfig, RunConfig
from pipeline.training.data import SlideRecord, SlideTiles

log = logging.getLogger(__name__)

#: Files of a run folder that show something was trained there (a differing config is then an error).
TRAINED_MARKERS = ("checkpoints/last.pt", "checkpoints/best.safetensors", "bundle/bundle.json", "aggregator")


def _listing(names: Sequence[str], limit: int = 10) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def unlisted_inputs(data: DataConfig, root: Path, records: list[SlideRecord]) -> None:
    """Slide files in ``slides_dir`` and annotation files in ``annotations_dir`` without a row in the table.

    An error listing them (a slide left out of ``labels.csv`` is otherwise silently not trained
    on), or a warning with the same list when ``data.ignore_unlisted`` is true.
    """
    ids = {r.slide_id for r in records}
    used = {r.path.resolve() for r in records}
    slides_dir, ann_dir = root / data.slides_dir, root / data.annotations_dir
    slides: list[str] = []
    if slides_dir.is_dir():
        for p in sorted(slides_dir.iterdir()):
            is_slide = p.is_dir() or p.suffix.lower() in SLIDE_SUFFIXES
            if is_slide and p.resolve() not in used and slide_id_for(p) not in ids:
                slides.append(p.name)
    anns = sorted(p.name for p in ann_dir.glob("*.geojson")) if ann_dir.is_dir() else []
    anns = [a for a in anns if a[: -len(".geojson")] not in ids]
    if not slides and not anns:
        return
    table = root / data.labels_csv
    parts = []
    if slides:
        parts.append(f"{len(slides)} slide file(s) in {slides_dir} have no row: {_listing(slides)}")
    if anns:
        parts.append(f"{len(anns)} annotation file(s) in {ann_dir} name no listed slide: {_listing(anns)}")
    what = "; ".join(parts)
    if data.ignore_unlisted:
        log.warning("%s: %s (skipped: data.ignore_unlisted is true)", table, what)
        return
    raise DataError(f"{table}: {what}; add rows for them, move them out, or set data.ignore_unlisted: true")


def tile_counts(part: list[SlideTiles], classes: list[str]) -> dict[str, Any]:
    """Slides, patients, tiles and positive / negative tiles per class of one split."""
    pos = {c: int(sum(((s.targets[:, j] > 0) & s.mask[:, j]).sum() for s in part)) for j, c in enumerate(classes)}
    neg = {c: int(sum(((s.targets[:, j] == 0) & s.mask[:, j]).sum() for s in part)) for j, c in enumerate(classes)}
    return {
        "slides": len(part),
        "patients": len({s.record.patient_id for s in part}),
        "tiles": int(sum(len(s.coords) for s in part)),
        "positive_tiles": pos,
        "negative_tiles": neg,
    }


def check_patch_counts(counts: dict[str, dict[str, Any]], classes: list[str]) -> None:
    """The patch stage can train and be validated: tiles in both splits, positives of every pattern
    in training, positives and negatives of every pattern in validation (else its AUROC and
    threshold are undefined)."""
    patterns = [c for c in classes if c in PATTERN_CLASSES]
    for name in ("train", "val"):
        c = counts[name]
        if c["tiles"] == 0:
            raise DataError(f"empty {name} split: its {c['slides']} slides have no tissue tiles")
    fix = {
        "train": "add annotated slides with it or check labels.positive_coverage and labels.class_map",
        "val": "add patients with it, raise split.val_fraction, or put slides with it in validation (a 'split' "
        "column with 'val' in labels.csv)",
    }
    for name, what in (("train", "positive"), ("val", "positive"), ("val", "negative")):
        key = f"{what}_tiles"
        missing = [p for p in patterns if counts[name][key][p] == 0]
        if missing:
            c = counts[name]
            split = "training" if name == "train" else "validation"
            raise DataError(
                f"{split} split ({c['slides']} slides, {c['patients']} patients) has no {what} tile for "
                f"{', '.join(missing)}: {fix[name] if what == 'positive' else 'add slides with unaffected tissue'}"
            )


def check_aggregator_records(records: list[SlideRecord], k_folds: int) -> dict[str, Any]:
    """The aggregator's cross-validation can run: at least 2 patients with nme_pattern = 1 and 2 with 0."""
    by_class: dict[int, set[str]] = {0: set(), 1: set()}
    for r in records:
        by_class[int(r.flags.get("nme_pattern", 0))].add(r.patient_id)
    counts = {
        "slides": len(records),
        "patients_nme_pattern_1": len(by_class[1]),
        "patients_nme_pattern_0": len(by_class[0]),
        "k_folds": k_folds,
    }
    short = [f"{2 - len(v)} more patient(s) with nme_pattern={k}" for k, v in sorted(by_class.items()) if len(v) < 2]
    if short:
        raise DataError(
            f"aggregator cross-validation needs at least 2 patients of each class; have {len(by_class[1])} with "
            f"nme_pattern=1 and {len(by_class[0])} with nme_pattern=0: add {' and '.join(short)} to the "
            "aggregator's slide table"
        )
    return counts


def trained_here(run_dir: Path) -> bool:
    """Whether the run folder holds checkpoints, a bundle or aggregator outputs."""
    return any((run_dir / m).exists() for m in TRAINED_MARKERS)


def same_config(old_text: str, cfg: RunConfig) -> bool:
    """Whether a run folder's ``config.resolved.yaml`` describes ``cfg``.

    Compared after validating the old file with today's schema, so a key added to the schema
    since (at its default) does not make an old run a different one.
    """
    new = cfg.model_dump(mode="json")
    try:
        old = RunConfig.model_validate(yaml.safe_load(old_text)).model_dump(mode="json")
    except (ValidationError, yaml.YAMLError, TypeError, ValueError):
        return old_text == yaml.safe_dump(new, sort_keys=False)
    return old == new


def check_run_folder(run_dir: Path, cfg: RunConfig) -> None:
    """A run folder can take this config: empty, the same config (resume), or nothing trained yet.

    A folder whose earlier start stopped before training (an old version wrote the config
    before checking the data) is reused with a warning instead of being locked.
    """
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file() or same_config(resolved.read_text(), cfg):
        return
    if trained_here(run_dir):
        raise ConfigError(
            f"{run_dir}: holds a run with a different config; resume needs the same config "
            "(use another output_dir, or delete the folder to start over)"
        )
    log.warning("%s: its config.resolved.yaml is from a start that trained nothing; replacing it", run_dir)
