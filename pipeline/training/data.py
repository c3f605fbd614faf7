"""Training data: the slide table, patient-level splits and tiles with labels read from slides.

Tiles are read straight from the slides (no tile-image dumps); every data-loader worker opens
its own slide handles (OpenSlide handles are not shared across processes).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import DataError, MPPError
from pipeline.core.io import atomic_write_json
from pipeline.reading.slide import SLIDE_SUFFIXES, ReadPlan, Slide, open_slide, slide_id_for
from pipeline.tiles.annotations import labels_from_coverage, rasterise, read_annotations, tile_coverage
from pipeline.tiles.tiling import TilingConfig, tile_slide
from pipeline.training.annotation_checks import placement_problem
from pipeline.training.augment import seed_transforms
from pipeline.training.config import DataConfig, LabelConfig, SplitConfig
from pipeline.training.resume import item_seed

log = logging.getLogger(__name__)

SLIDE_FLAGS = ("nme_pattern", "pallor", "necrolysis", "parakeratosis")


@dataclass
class SlideRecord:
    """One row of the slide table, with the files it points to."""

    slide_id: str
    patient_id: str
    path: Path
    annotation: Path | None
    flags: dict[str, int]
    diagnosis: str = ""
    mpp: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    split: str | None = None  # a 'split' column's value (train/val/test), when the table has one
    table: Path | None = None  # the labels.csv the row comes from (named in error messages)


def _flag(value: str, source: str, column: str, slide_id: str) -> int:
    v = (value or "").strip().lower()
    if v in ("1", "true", "yes"):
        return 1
    if v in ("0", "false", "no"):
        return 0
    raise DataError(f"{source}: slide {slide_id!r}: column {column!r} must be 0/1, got {value!r}")


def find_slide_file(folder: Path, slide_id: str) -> Path | None:
    """The slide file (or DICOM folder) named ``slide_id`` inside ``folder``."""
    direct = folder / slide_id
    if direct.is_dir():
        return direct
    for p in sorted(folder.glob(f"{slide_id}.*")):
        if p.suffix.lower() in SLIDE_SUFFIXES and slide_id_for(p) == slide_id:
            return p
    return None


def load_slide_table(cfg: DataConfig, repo_root: Path, require_annotations: bool = True) -> list[SlideRecord]:
    """Read ``labels.csv`` and resolve every slide and annotation file.

    Raises DataError (one line) for a missing table/column, a slide that is not there, a missing
    annotation file, bad flag values or duplicate slide ids — before any training starts.
    """
    root = cfg.root if cfg.root.is_absolute() else repo_root / cfg.root
    table = root / cfg.labels_csv
    if not table.is_file():
        raise DataError(f"{table}: slide table not found")
    with open(table, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        for need in ("slide_id", "nme_pattern"):
            if need not in cols:
                raise DataError(f"{table}: missing column {need!r} (have {sorted(cols)})")
        rows = list(reader)
    if not rows:
        raise DataError(f"{table}: no slides listed")
    slides_dir = root / cfg.slides_dir
    ann_dir = root / cfg.annotations_dir
    records: list[SlideRecord] = []
    seen: set[str] = set()
    missing: list[str] = []
    for row in rows:
        sid = (row.get("slide_id") or "").strip()
        if not sid:
            raise DataError(f"{table}: a row has an empty slide_id")
        if sid in seen:
            raise DataError(f"{table}: duplicate slide_id {sid!r}")
        seen.add(sid)
        given = (row.get("path") or "").strip()
        path: Path | None
        if given:
            path = Path(given) if Path(given).is_absolute() else (table.parent / given).resolve()
            path = path if path.exists() else None
        else:
            path = find_slide_file(slides_dir, sid)
        if path is None:
            missing.append(sid)
            continue
        ann = ann_dir / f"{sid}.geojson"
        if require_annotations and not ann.is_file():
            raise DataError(f"{ann}: annotation file for slide {sid!r} not found")
        flags = {c: _flag(row[c], str(table), c, sid) for c in SLIDE_FLAGS if c in cols}
        mpp = row.get("mpp")
        split = (row.get("split") or "").strip().lower() or None
        if split not in (None, "train", "val", "test"):
            raise DataError(f"{table}: slide {sid!r}: column 'split' must be train, val or test, got {split!r}")
        records.append(
            SlideRecord(
                slide_id=sid,
                patient_id=(row.get("patient_id") or sid).strip(),
                path=path,
                annotation=ann if ann.is_file() else None,
                flags=flags,
                diagnosis=(row.get("diagnosis") or "").strip(),
                mpp=float(mpp) if mpp not in (None, "") else None,
                extra={
                    k: v
                    for k, v in row.items()
                    if k not in ("slide_id", "patient_id", "mpp", "path", "split", *SLIDE_FLAGS)
                },
                split=split,
                table=table,
            )
        )
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        where = "at their path column" if "path" in cols else f"in {slides_dir}"
        raise DataError(f"{table}: slides listed but not found {where}: {', '.join(missing[:5])}{more}")
    return records


# ----------------------------------------------------------------------------- splits


def make_splits(records: list[SlideRecord], cfg: SplitConfig) -> dict[str, Any]:
    """Patient-level train/val/test split plus k stratified folds (by patient's NME flag / diagnosis)."""
    rng = np.random.default_rng(cfg.seed)
    by_patient: dict[str, list[SlideRecord]] = {}
    for r in records:
        by_patient.setdefault(r.patient_id, []).append(r)
    strata: dict[str, list[str]] = {}
    for pid, rs in by_patient.items():
        key = rs[0].diagnosis or str(max(r.flags.get("nme_pattern", 0) for r in rs))
        strata.setdefault(key, []).append(pid)
    assign: dict[str, str] = {}
    fold_of: dict[str, int] = {}
    counter = 0
    for key in sorted(strata):
        pids = sorted(strata[key])
        rng.shuffle(pids)
        n = len(pids)
        n_test = int(round(n * cfg.test_fraction))
        n_val = max(1, int(round(n * cfg.val_fraction))) if n >= 3 else (1 if n == 2 else 0)
        for i, pid in enumerate(pids):
            assign[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            fold_of[pid] = (counter + i) % cfg.k_folds
        counter += n
    split = {
        name: sorted(r.slide_id for r in records if assign[r.patient_id] == name) for name in ("train", "val", "test")
    }
    folds = [sorted(r.slide_id for r in records if fold_of[r.patient_id] == k) for k in range(cfg.k_folds)]
    return {**split, "folds": folds, "seed": cfg.seed, "patients": {r.slide_id: r.patient_id for r in records}}


def choose_splits(
    path: Path, records: list[SlideRecord], cfg: SplitConfig, trained: bool
) -> tuple[dict[str, Any], bool]:
    """The split to train on, without writing anything: ``(splits, is_new)``.

    ``path`` (the run folder's split file) is reused when it covers exactly these slides. When
    it does not (slides added or removed), a new split is made, unless the run folder already
    holds checkpoints (``trained``) trained on the old one: reusing them would train on what are
    now validation slides, so that is an error naming the fix. The caller writes a new split
    with :func:`write_splits` once every data check has passed.
    """
    ids = {r.slide_id for r in records}
    if path.is_file():
        splits = json.loads(path.read_text())
        listed = set(splits.get("train", [])) | set(splits.get("val", [])) | set(splits.get("test", []))
        if listed == ids and len(splits.get("folds", [])) == cfg.k_folds:
            log.info("reusing splits %s", path)
            return splits, False
        if trained:
            raise DataError(
                f"{path}: the split does not match the slide table ({len(listed ^ ids)} slides differ) and "
                f"{path.parent / 'checkpoints'} was trained on it; to train on the new data use a new output_dir, "
                "or delete checkpoints/ and splits.json"
            )
        log.warning(
            "%s: does not match the slide table (%d slides differ); nothing was trained on it, making a new split",
            path,
            len(listed ^ ids),
        )
    splits = make_splits(records, cfg)
    for name in ("train", "val"):
        if not splits[name]:
            raise DataError(
                f"empty {name} split: {len(ids)} slides from {len(set(splits['patients'].values()))} patients are too few"
            )
    return splits, True


def write_splits(path: Path, splits: dict[str, Any]) -> None:
    """Write the split file (after the data checks passed)."""
    atomic_write_json(path, splits)


# ----------------------------------------------------------------------------- tiles + labels


@dataclass
class SlideTiles:
    """Tiles of one slide with their targets."""

    record: SlideRecord
    coords: np.ndarray  # (N, 2) int64 level-0
    targets: np.ndarray  # (N, C) float32 in {0, 1}
    mask: np.ndarray  # (N, C) bool: which targets count
    coverage: np.ndarray  # (N, C) float32
    plan: ReadPlan
    tile_size_l0: float
    weight: float = 1.0  # sampling weight of each tile relative to the main data's (balanced_sample)


def open_training_slide(record: SlideRecord) -> Slide:
    """Open a slide of the table; a missing resolution names the table's ``mpp`` column (train.py has no --mpp)."""
    try:
        return open_slide(record.path, mpp=record.mpp, slide_id=record.slide_id)
    except MPPError as exc:
        table = record.table or "labels.csv"
        raise MPPError(
            f"{record.path}: slide {record.slide_id!r}: {_mpp_cause(str(exc))}; give the level-0 resolution in "
            f"the 'mpp' column of {table} (µm/px, e.g. 0.25 for 40x, 0.5 for 20x)"
        ) from None


def _mpp_cause(message: str) -> str:
    """The cause part of a reader's MPP error, without its advice about ``--mpp`` (an infer.py option)."""
    cause = message.split("; pass", 1)[0].split("pass it with", 1)[0].rstrip(" ;,(")
    return cause.split(": ", 1)[1] if ": " in cause else cause


def index_slide(record: SlideRecord, tiling: TilingConfig, labels: LabelConfig) -> SlideTiles:
    """Tile one slide and label every tile from its annotations.

    Raises DataError when the annotations lie mostly outside the slide or its tissue (see
    :mod:`pipeline.training.annotation_checks`), naming the slide and the likely cause.
    """
    with open_training_slide(record) as slide:
        grid, tissue, _, _ = tile_slide(slide, tiling)
        w, h = slide.dimensions
        mpp = slide.mpp
    classes = list(labels.classes)
    if record.annotation is not None:
        anns = read_annotations(record.annotation, classes, labels.class_map, labels.ignore_classes)
        problem = placement_problem(anns, (w, h), tissue, mpp)
        if problem is not None:
            raise DataError(f"{record.annotation}: slide {record.slide_id!r}: {problem}")
        masks = rasterise(anns, classes, (w, h), mpp)
        cov = tile_coverage(masks, classes, grid.coords, grid.tile_size_l0, mpp)
    else:
        cov = np.zeros((len(grid), len(classes)), np.float32)
    pos_at = np.array([labels.positive_coverage.get(c, 0.5) for c in classes], np.float32)
    neg_below = np.full(len(classes), labels.negative_coverage, np.float32)
    targets, mask = labels_from_coverage(
        cov,
        pos_at,
        neg_below,
        sparse=labels.mode == "sparse",
        basis=labels.basis_index(),
        min_positive=labels.min_positive_coverage,
    )
    return SlideTiles(record, grid.coords, targets, mask, cov, grid.plan, grid.tile_size_l0)


class TileDataset(Dataset):
    """(uint8 tile (H, W, 3), target (C,), mask (C,)) for a list of (slide, tile) pairs.

    Slides are opened lazily, once per process (each data-loader worker has its own handles).
    With ``seed`` set, the transform is re-seeded for every tile from (``seed``, the tile's
    position in the epoch = ``first_position + k``): its augmentation is then the same whichever
    worker reads it and wherever a resumed epoch starts (:mod:`pipeline.training.resume`).
    """

    def __init__(
        self,
        slides: list[SlideTiles],
        items: np.ndarray,
        tile_px: int,
        transform=None,
        seed: int | None = None,
        first_position: int = 0,
    ) -> None:
        self.slides = slides
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 2)  # (M, 2): slide index, tile index
        self.tile_px = tile_px
        self.transform = transform
        self.seed = seed
        self.first_position = first_position
        self._handles: dict[int, Slide] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def _slide(self, i: int) -> Slide:
        if self._pid != os.getpid():  # forked into a worker: never reuse the parent's handles
            self._handles = {}
            self._pid = os.getpid()
        s = self._handles.get(i)
        if s is None:
            rec = self.slides[i].record
            s = self._handles[i] = open_training_slide(rec)
        return s

    def read(self, si: int, ti: int) -> np.ndarray:
        st = self.slides[si]
        x, y = st.coords[ti]
        return self._slide(si).read_region((int(x), int(y)), (self.tile_px, self.tile_px), st.plan)

    def __getitem__(self, k: int):
        si, ti = self.items[k]
        tile = self.read(int(si), int(ti))
        if self.transform is not None:
            if self.seed is not None:
                seed_transforms(self.transform, item_seed(self.seed, self.first_position + k))
            tile = self.transform(image=tile)["image"]
        st = self.slides[si]
        return (
            torch.from_numpy(np.ascontiguousarray(tile)),
            torch.from_numpy(st.targets[ti]),
            torch.from_numpy(st.mask[ti]),
        )

    def close(self) -> None:
        for s in self._handles.values():
            s.close()
        self._handles = {}


def balanced_sample(
    slides: list[SlideTiles],
    n: int,
    n_patterns: int,
    seed: int,
    epidermis_col: int | None = None,
    epidermal_negative_fraction: float = 0.0,
) -> np.ndarray:
    """``n`` (slide, tile) pairs: half from tiles positive for a pattern (each pattern equally), half from the rest.

    The negative half draws ``epidermal_negative_fraction`` of its tiles from *epidermal* tiles
    that are cleanly negative for every pattern (column ``epidermis_col`` positive, every pattern
    labelled 0): normal epidermis and orthokeratotic corneum are the negatives that look most like
    the patterns, and a uniform draw over the rest (mostly dermis) rarely shows them to the model.
    Slides with a ``weight`` other than 1 (extra data sets) are drawn in proportion to it (with
    replacement). Returns an ``(n, 2)`` int array of (slide index, tile index); deterministic in
    ``seed`` (so a resumed epoch replays the same order).
    """
    rng = np.random.default_rng(seed)
    weights = np.concatenate([np.full(len(s.coords), float(s.weight)) for s in slides])
    weighted = bool(np.any(weights != 1.0))

    def draw(pool: np.ndarray, k: int) -> np.ndarray:
        if not weighted:
            return rng.choice(pool, size=k, replace=len(pool) < k)
        w = weights[pool]
        return rng.choice(pool, size=k, replace=True, p=w / w.sum())

    all_items = np.concatenate(
        [np.stack([np.full(len(s.coords), i), np.arange(len(s.coords))], 1) for i, s in enumerate(slides)]
    )
    targets = np.concatenate([s.targets for s in slides])
    masks = np.concatenate([s.mask for s in slides])
    pools = [np.nonzero((targets[:, j] > 0) & masks[:, j])[0] for j in range(n_patterns)]
    any_pos = np.zeros(len(all_items), bool)
    for p in pools:
        any_pos[p] = True
    rest = np.nonzero(~any_pos)[0]
    picks = []
    non_empty = [p for p in pools if len(p)]
    n_pos = n // 2 if non_empty else 0
    for j, p in enumerate(non_empty):
        k = n_pos // len(non_empty) + (1 if j < n_pos % len(non_empty) else 0)
        picks.append(draw(p, k))
    n_neg = n - n_pos
    if epidermis_col is not None and epidermal_negative_fraction > 0:
        clean_neg = masks[:, :n_patterns].all(axis=1) & (targets[:, :n_patterns] == 0).all(axis=1)
        epi_neg = np.nonzero(clean_neg & (targets[:, epidermis_col] > 0) & masks[:, epidermis_col])[0]
        if len(epi_neg):
            k = int(round(n_neg * epidermal_negative_fraction))
            picks.append(draw(epi_neg, k))
            n_neg -= k
    pool_rest = rest if len(rest) else np.arange(len(all_items))
    picks.append(draw(pool_rest, n_neg))
    idx = np.concatenate(picks)
    rng.shuffle(idx)
    return all_items[idx]


def collate_uint8(batch):
    """Stack (tile, target, mask) triples; tiles stay uint8 (B, H, W, 3)."""
    tiles, targets, masks = zip(*batch)
    return torch.stack(tiles), torch.stack(targets), torch.stack(masks)
