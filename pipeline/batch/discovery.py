"""Find slides in a folder (recursively) or read them from a slide table."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import DataError, SlideError
from pipeline.reading.diagnose import file_kind
from pipeline.reading.slide import MPP_RANGE, SLIDE_SUFFIXES, slide_id_for

log = logging.getLogger(__name__)

#: Files that are parts of a multi-file slide, not slides themselves.
_COMPANION_DIRS = {".mrxs"}


@dataclass(frozen=True)
class SlideJob:
    """One slide to process."""

    slide_id: str
    path: Path
    mpp: float | None = None
    patient_id: str | None = None


def _is_dicom_folder(d: Path) -> bool:
    try:
        return any(f.suffix.lower() == ".dcm" for f in d.iterdir() if f.is_file())
    except OSError:
        return False


@dataclass(frozen=True)
class Skipped:
    """An input that is not processed, and why (logged, and listed in run.json)."""

    path: str
    reason: str


def _skip_reason(f: Path) -> str | None:
    """Why ``f`` (not a folder, not hidden) is not a slide to process; None for a slide file."""
    kind = file_kind(f)
    suffix = f.suffix.lower()
    if kind in ("broken link", "symbolic link loop"):
        return "broken symbolic link" if kind == "broken link" else kind
    if kind != "regular":
        return f"not a regular file ({kind})"
    if suffix not in SLIDE_SUFFIXES:
        return f"not a slide file type ({suffix or 'no suffix'})"
    return None


def discover(root: Path, exclude: Path | None = None, skipped: list[Skipped] | None = None) -> list[SlideJob]:
    """Slides under ``root``: files with a slide suffix and folders of DICOM files (one slide each).

    ``slide_id`` = file stem (folder name for DICOM folders). Duplicated ids are an error.
    ``skipped`` (when given) receives every other visible entry with the reason: non-regular files
    (FIFOs, sockets, devices), broken links and files that are not slides; each is logged.
    """
    skips: list[Skipped] = [] if skipped is None else skipped
    if not root.exists():
        raise DataError(f"{root}: input folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    jobs: list[SlideJob] = []
    skip_dirs: set[Path] = set()
    for d in sorted([root, *[p for p in root.rglob("*") if p.is_dir()]]):
        if exclude is not None and (d == exclude or exclude in d.parents):
            skip_dirs.add(d)
            continue
        if any(s in d.parents or s == d for s in skip_dirs):
            continue
        if (
            d != root
            and _is_dicom_folder(d)
            and not any(
                f.suffix.lower() != ".dcm" and f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES for f in d.iterdir()
            )
        ):
            jobs.append(SlideJob(d.name, d))
            skip_dirs.add(d)
            continue
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or f.is_dir():
                continue
            if (why := _skip_reason(f)) is not None:
                skips.append(Skipped(str(f), why))
                (log.info if why.startswith("not a slide file type") else log.warning)("skipped %s: %s", f, why)
                continue
            suffix = f.suffix.lower()
            if suffix in SLIDE_SUFFIXES:
                if suffix == ".dcm" and d == root:
                    jobs.append(SlideJob(slide_id_for(f), f))  # a lone DICOM file at the top level
                elif suffix != ".dcm":
                    jobs.append(SlideJob(slide_id_for(f), f))
        # MRXS companion folders hold .dat files, never slides
        for s in _COMPANION_DIRS:
            for f in d.glob(f"*{s}"):
                skip_dirs.add(f.with_suffix(""))
    seen: dict[str, Path] = {}
    for j in jobs:
        if j.slide_id in seen:
            raise DataError(f"{root}: two slides share the id {j.slide_id!r}: {seen[j.slide_id]} and {j.path}")
        seen[j.slide_id] = j.path
    return jobs


def read_slide_table(path: Path, base: Path | None = None) -> list[SlideJob]:
    """Slides from a CSV with ``path`` (or ``slide_id``) and optional ``mpp``, ``patient_id`` columns."""
    if not path.is_file():
        raise DataError(f"{path}: slide table not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        rows = list(reader)
    if "path" not in cols:
        raise DataError(f"{path}: slide table needs a 'path' column (have {sorted(cols)})")
    jobs = []
    for i, row in enumerate(rows, start=2):
        p = Path(row["path"])
        if not p.is_absolute():
            p = (base or path.parent) / p
        mpp = None
        if row.get("mpp", "").strip():
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise DataError(f"{path}: line {i}: mpp {row['mpp']!r} is not a number") from None
            lo, hi = MPP_RANGE
            if not lo <= mpp <= hi:
                raise SlideError(f"{path}: line {i}: implausible mpp {mpp} (expected {lo}-{hi} µm/px)")
        sid = (row.get("slide_id") or "").strip() or slide_id_for(p)
        jobs.append(SlideJob(sid, p, mpp, (row.get("patient_id") or "").strip() or None))
    if not jobs:
        raise DataError(f"{path}: slide table lists no slides")
    return jobs
