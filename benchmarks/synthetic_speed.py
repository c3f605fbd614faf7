"""Benchmark: time and peak memory of generating one large synthetic slide on one core.

    python benchmarks/synthetic_speed.py [--width-um 10000 --height-um 7500 --mpp 0.5 --diagnosis nme --seed 7]

Defaults give a 20000 x 15000 px slide at 0.5 µm/px (the product target: under 60 s on one
core, peak RSS under 2 GB). The slide is generated in a child process pinned to one CPU with
single-threaded OpenCV/BLAS, so the peak RSS is the generator's own (``ru_maxrss`` of the
child). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
import cv2
cv2.setNumThreads(1)
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from pipeline.synthetic.dataset import layout_for, plan_dataset, write_slide
out = Path(sys.argv[2])
w, h, mpp, dx, seed = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
t0 = time.perf_counter()
plan = plan_dataset(1, seed, mpp, [dx])[0]
layout = layout_for(plan, (w, h))
t1 = time.perf_counter()
dims = write_slide(layout, mpp, out / "slide.tiff", out / "slide.geojson")
t2 = time.perf_counter()
print(json.dumps({"layout_s": t1 - t0, "render_write_s": t2 - t1, "levels": dims,
                  "sections": len(layout.sections), "cells": int(sum(len(s.cells["x"]) for s in layout.sections))}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width-um", type=float, default=10000.0)
    p.add_argument("--height-um", type=float, default=7500.0)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--diagnosis", default="nme")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    env = dict(
        os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(REPO),
                tmp,
                str(args.width_um),
                str(args.height_um),
                str(args.mpp),
                args.diagnosis,
                str(args.seed),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        size_mb = (Path(tmp) / "slide.tiff").stat().st_size / 1e6
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    w, h = child["levels"][0]
    report = {
        "slide_px": f"{w}x{h}",
        "megapixels": round(w * h / 1e6, 1),
        "mpp": args.mpp,
        "diagnosis": args.diagnosis,
        "sections": child["sections"],
        "cells": child["cells"],
        "layout_s": round(child["layout_s"], 2),
        "render_and_write_s": round(child["render_write_s"], 2),
        "process_wall_s": round(wall, 2),
        "megapixels_per_s": round(w * h / 1e6 / child["render_write_s"], 2),
        "peak_rss_mb": round(peak_mb, 1),
        "tiff_mb": round(size_mb, 1),
        "levels": child["levels"],
        "cpu": "1 core (affinity-pinned), single-threaded OpenCV",
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
