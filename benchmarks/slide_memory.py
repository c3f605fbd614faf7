"""Benchmark: peak memory and time of ``infer.py`` on large but well-formed slides (issue 21, item 5).

    python benchmarks/slide_memory.py [--cases normal,large,large-flat,huge] [--backend auto]
                                      [--tissue-um 3000x1500] [--keep DIR] [--json]

Each case is one synthetic slide written cheaply: glass everywhere (one flat JPEG tile repeated)
and one synthetic H&E section (:mod:`pipeline.synthetic`, an NME biopsy of ``--tissue-um``)
pasted near its top-left corner, so the model only sees the section's tiles while the slide claims
its full size. Cases:

* ``normal``: the section on a slide of its own size plus a margin (the reference);
* ``large``: 40000 x 40000 px at 0.5 µm/px (20 x 20 mm), JPEG pyramid down to <= 1024 px;
* ``large-flat``: the same without pyramid levels (thumbnails must come from level 0);
* ``huge``: 100000 x 80000 px at 0.25 µm/px (25 x 20 mm, a 40x scan), pyramid.

For each, ``infer.py`` (local engine, demo bundle unless ``--model``) runs in a fresh subprocess
into an empty output folder; the peak resident set of its process tree is followed from
``/proc`` every 0.1 s: ``peak_rss_mb`` is the largest high-water mark (``VmHWM``) of any of its
processes (the slide worker), ``tree_peak_mb`` the largest sampled sum of their RSS. Prints a
table, or with ``--json`` one JSON line. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Tile side of every level of the written slides, px.
TILE = 512
#: Pyramid levels are added until the coarsest is at most this many px on its long side.
TOP_LEVEL_MAX = 1024


@dataclass(frozen=True)
class Case:
    """A slide to write: level-0 size, µm/px, and whether it has pyramid levels."""

    name: str
    width: int
    height: int
    mpp: float
    pyramid: bool = True


LARGE_CASES = {
    "large": Case("large", 40_000, 40_000, 0.5),
    "large-flat": Case("large-flat", 40_000, 40_000, 0.5, pyramid=False),
    "huge": Case("huge", 100_000, 80_000, 0.25),
}


def render_section(
    size_um: tuple[float, float], mpp: float, seed: int = 2121
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(RGB uint8 section of ``size_um`` at ``mpp``, glass colour) from the synthetic generator (an NME biopsy)."""
    from pipeline.synthetic.dataset import layout_for, plan_dataset
    from pipeline.synthetic.render import SlideRenderer

    plan = plan_dataset(1, seed, mpp, ["nme"])[0]
    renderer = SlideRenderer(layout_for(plan, size_um), mpp)
    out = np.empty((renderer.height, renderer.width, 3), np.uint8)
    step = 1024
    for y in range(0, renderer.height, step):
        for x in range(0, renderer.width, step):
            h, w = min(step, renderer.height - y), min(step, renderer.width - x)
            out[y : y + h, x : x + w] = renderer.render(x, y, w, h)
    r, g, b = (int(round(float(v))) for v in renderer.background)
    return out, (r, g, b)


def _halve(img: np.ndarray) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
    return cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _level_tiles(
    width: int, height: int, patch: np.ndarray, at: tuple[int, int], glass: np.ndarray
) -> Iterator[np.ndarray]:
    """Tiles of one level in row order: ``glass`` (the same array every time) except where ``patch`` (placed at ``at``) shows."""
    px, py = at
    ph, pw = patch.shape[:2]
    for ty in range(0, height, TILE):
        for tx in range(0, width, TILE):
            x0, y0, x1, y1 = max(tx, px), max(ty, py), min(tx + TILE, px + pw), min(ty + TILE, py + ph)
            if x1 > x0 and y1 > y0:
                tile = glass.copy()
                tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = patch[y0 - py : y1 - py, x0 - px : x1 - px]
                yield tile
            else:
                yield glass


def write_slide(
    path: Path, width: int, height: int, mpp: float, section: np.ndarray, glass_rgb: tuple[int, int, int], pyramid: bool
) -> list[tuple[int, int]]:
    """A JPEG-tiled (pyramidal) TIFF of ``width`` x ``height`` glass with ``section`` pasted near the top-left.

    Never holds more than one level of the section: writing a 100000 x 80000 px slide costs
    about the section's memory. The section's level-0 offset is a multiple of every level's
    downsample, so it lands on whole pixels at every level.
    """
    import tifffile

    n_levels = 1
    if pyramid:
        w, h = width, height
        while max(w, h) > TOP_LEVEL_MAX:
            w, h = math.ceil(w / 2), math.ceil(h / 2)
            n_levels += 1
    step = 2 ** (n_levels - 1)
    at = (math.ceil(2048 / step) * step, math.ceil(2048 / step) * step)
    if at[0] + section.shape[1] > width or at[1] + section.shape[0] > height:
        raise ValueError(f"section {section.shape[1]}x{section.shape[0]} px does not fit a {width}x{height} slide")
    glass = np.empty((TILE, TILE, 3), np.uint8)
    glass[:] = glass_rgb
    common: dict[str, Any] = {
        "tile": (TILE, TILE),
        "compression": "jpeg",
        "compressionargs": {"level": 85},
        "photometric": "rgb",
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    dims = []
    patch = section
    with tifffile.TiffWriter(str(path), bigtiff=width * height * 3 > 3_500_000_000) as tw:
        for k in range(n_levels):
            if k:
                patch = _halve(patch)
            lw, lh = math.ceil(width / 2**k), math.ceil(height / 2**k)
            tw.write(
                _level_tiles(lw, lh, patch, (at[0] >> k, at[1] >> k), glass),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                subfiletype=1 if k else 0,
                resolution=(1e4 / (mpp * width / lw), 1e4 / (mpp * height / lh)),
                description="slide_memory benchmark: synthetic section on glass" if k == 0 else None,
                **common,
            )
            dims.append((lw, lh))
    return dims


# ----------------------------------------------------------------------------- measuring


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line[:5]] = int(line.split()[1])
    except OSError:
        pass
    return out


class TreeMonitor(threading.Thread):
    """Samples the RSS of a process tree until stopped: per-process ``VmHWM`` and the summed ``VmRSS``."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.hwm_kb: dict[int, int] = {}
        self.sum_peak_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = 0
            for pid in _tree(self.pid):
                st = _status_kb(pid)
                total += st.get("VmRSS", 0)
                if "VmHWM" in st:
                    self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), st["VmHWM"])
            self.sum_peak_kb = max(self.sum_peak_kb, total)
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_infer(slides: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``infer.py`` on ``slides`` in a subprocess: peak RSS (MB), seconds and the slides' results."""
    cmd = [
        sys.executable,
        str(REPO / "infer.py"),
        str(slides),
        "--out",
        str(out),
        "--model",
        str(args.model),
        "--backend",
        args.backend,
        "--slide-timeout",
        "0",
        "--quiet",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mon = TreeMonitor(proc.pid)
    mon.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    mon.stop()
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    return {
        "rc": proc.returncode,
        "seconds": round(wall, 2),
        "peak_rss_mb": round(max(mon.hwm_kb.values(), default=0) / 1024, 1),
        "tree_peak_mb": round(mon.sum_peak_kb / 1024, 1),
        "results": [
            {
                "slide_id": r["slide_id"],
                "status": r["status"],
                "error": r.get("error"),
                "n_tiles": r.get("n_tiles"),
                "heatmap_mpp": r.get("heatmap_mpp"),
                "timings": r.get("timings"),
            }
            for r in results
        ],
        "stderr_tail": stderr.strip()[-600:] if proc.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases", default="normal,large,large-flat", help="comma-separated: normal, " + ", ".join(LARGE_CASES)
    )
    p.add_argument("--tissue-um", default="3000x1500", help="size of the pasted section, µm (WxH)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--model", type=Path, default=REPO / "models" / "demo_bundle")
    p.add_argument("--keep", type=Path, help="write (and reuse) the slides in this folder instead of a temporary one")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c != "normal" and c not in LARGE_CASES]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)}")
    tw_um, th_um = (float(v) for v in args.tissue_um.lower().split("x"))
    base = args.keep or Path(tempfile.mkdtemp(prefix="nme-slide-memory-"))
    base.mkdir(parents=True, exist_ok=True)
    sections: dict[float, tuple[np.ndarray, tuple[int, int, int]]] = {}
    rows = []
    try:
        for name in cases:
            case = LARGE_CASES.get(name)
            mpp = case.mpp if case else 0.5
            if mpp not in sections:
                sections[mpp] = render_section((tw_um, th_um), mpp)
            section, glass = sections[mpp]
            if case is None:  # the section with a margin, on a slide of its own size
                step = 2**3
                margin = math.ceil(2048 / step) * step
                case = Case("normal", section.shape[1] + 2 * margin, section.shape[0] + 2 * margin, mpp)
            folder = base / case.name
            slide = folder / f"{case.name}.tiff"
            t0 = time.perf_counter()
            if not slide.exists():
                folder.mkdir(parents=True, exist_ok=True)
                tmp = slide.with_suffix(".part")
                dims = write_slide(tmp, case.width, case.height, case.mpp, section, glass, case.pyramid)
                tmp.rename(slide)
                levels = len(dims)
            else:
                import tifffile

                with tifffile.TiffFile(slide) as tf:
                    levels = len(tf.series[0].levels)
            write_s = time.perf_counter() - t0
            out = base / f"{case.name}.out"
            shutil.rmtree(out, ignore_errors=True)
            run = run_infer(folder, out, args)
            rows.append(
                {
                    "case": case.name,
                    "width": case.width,
                    "height": case.height,
                    "mpp": case.mpp,
                    "levels": levels,
                    "file_mb": round(slide.stat().st_size / 1e6, 1),
                    "write_s": round(write_s, 2),
                    **run,
                }
            )
            if not args.json:
                r = rows[-1]
                res = r["results"][0] if r["results"] else {}
                print(
                    f"{r['case']:<11} {r['width']}x{r['height']} px @ {r['mpp']} µm/px, {r['levels']} level(s), "
                    f"{r['file_mb']} MB: peak RSS {r['peak_rss_mb']:.0f} MB (tree {r['tree_peak_mb']:.0f} MB), "
                    f"{r['seconds']:.1f} s, {res.get('status')} {res.get('error') or ''}",
                    flush=True,
                )
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    record = {"benchmark": "slide_memory", "backend": args.backend, "tissue_um": [tw_um, th_um], "cases": rows}
    if args.json:
        print(json.dumps(record))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
