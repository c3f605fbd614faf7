"""Benchmark: slides/hour of the local engine vs the Ray engine (1 and 2 workers) on the same slides.

    python benchmarks/ray_overhead.py [--slides 6] [--size-um 2400 1800] [--model BUNDLE] [--repeat 1] [--json]

Each configuration is one ``infer.py`` run in a fresh process into a fresh output folder (no
feature cache), exactly as a user runs it: ``--engine local``, ``--engine ray --workers 1`` and
``--engine ray --workers 2`` (Ray started by the run itself, sized to this machine). Reported:

* ``wall_s``: end to end (process start to exit: imports, Ray start and shutdown, model loads,
  slides, summary) and ``slides_per_hour`` from it;
* ``in_run_s``: ``run.json``'s seconds (output lock to summary: for Ray it includes starting the
  actors and loading the model in them, ``setup_s``, but not starting Ray itself);
* ``steady_slides_per_hour``: slides / (in-run − set-up), the rate once the workers are up;
* ``overhead_per_slide_s`` = (Ray wall − local wall) / slides, everything included, and its two
  parts: ``fixed_overhead_s`` (Ray start and shutdown + worker set-up, paid once per run) and
  ``scheduling_overhead_per_slide_s`` = ((Ray in-run − set-up) − local in-run) / slides.

With ``--repeat R`` the configurations are interleaved R times and the median is reported.

The slides are synthetic (``pipeline.synthetic``), made once into a cache folder. The model is
``--model`` (default: the shipped demo bundle). Prints a table, or one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    "local": ["--engine", "local"],
    "ray_1_worker": ["--engine", "ray", "--workers", "1"],
    "ray_2_workers": ["--engine", "ray", "--workers", "2"],
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def make_slides(root: Path, n: int, size_um: tuple[float, float], seed: int) -> Path:
    from pipeline.synthetic import generate_dataset

    slides = root / "slides"
    if len(list(slides.glob("*.tiff"))) != n:
        generate_dataset(root, n=n, seed=seed, mpp=0.5, classes=["nme", "normal"], size_um=size_um, overwrite=True)
    return slides


def run_one(name: str, slides: Path, out: Path, model: Path) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "infer.py"),
        str(slides),
        "--out",
        str(out),
        "--model",
        str(model),
        "--quiet",
        *CONFIGS[name],
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"error: {name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    run = json.loads((out / "run.json").read_text())
    return {
        "wall_s": wall,
        "in_run_s": run["seconds"],
        "setup_s": run["engine"].get("setup_seconds"),
        "slides": run["counts"]["processed_this_run"],
        "tiles": run["throughput"]["tiles"],
        "failed": run["counts"]["failed"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6, help="number of synthetic slides (default 6)")
    ap.add_argument(
        "--size-um",
        type=float,
        nargs=2,
        default=(2400.0, 1800.0),
        metavar=("W", "H"),
        help="slide size in µm (default 2400 1800)",
    )
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "demo_bundle", help="model bundle (default: demo)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the median is reported")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "nme_ray_overhead_slides",
        help="where the synthetic slides are kept between runs",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    if not (args.model / "bundle.json").is_file():
        raise SystemExit(f"error: {args.model}: no model bundle (give --model)")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("error: the Ray engine needs Ray: pip install '.[ray]'") from None

    slides = make_slides(args.cache, args.slides, tuple(args.size_um), args.seed)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            for name in CONFIGS:
                runs[name].append(run_one(name, slides, Path(tmp) / f"{name}_{r}", args.model))

    def med(name: str, key: str) -> float | None:
        vals = [x[key] for x in runs[name] if x[key] is not None]
        return round(statistics.median(vals), 2) if vals else None

    n = args.slides
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before]},
        "slides": n,
        "size_um": list(args.size_um),
        "tiles": runs["local"][0]["tiles"],
        "repeat": args.repeat,
        "model": str(args.model),
    }
    for name in CONFIGS:
        wall, in_run, setup = med(name, "wall_s"), med(name, "in_run_s"), med(name, "setup_s")
        result[name] = {
            "wall_s": wall,
            "in_run_s": in_run,
            "setup_s": setup,
            "slides_per_hour": round(n / wall * 3600, 1) if wall else None,
            "steady_slides_per_hour": round(n / (in_run - (setup or 0)) * 3600, 1),
            "failed": max(x["failed"] for x in runs[name]),
        }
    local = result["local"]
    for name in ("ray_1_worker", "ray_2_workers"):
        x = result[name]
        x["overhead_per_slide_s"] = round((x["wall_s"] - local["wall_s"]) / n, 3)
        x["scheduling_overhead_per_slide_s"] = round((x["in_run_s"] - x["setup_s"] - local["in_run_s"]) / n, 3)
        x["fixed_overhead_s"] = round((x["wall_s"] - local["wall_s"]) - n * x["scheduling_overhead_per_slide_s"], 2)
        x["wall_vs_local"] = round(x["wall_s"] / local["wall_s"], 3)
        x["steady_vs_local"] = round(local["in_run_s"] / (x["in_run_s"] - x["setup_s"]), 3)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores (load before: {result['machine']['load_avg_before']})"
    )
    print(
        f"{n} synthetic slides {args.size_um[0]:g}x{args.size_um[1]:g} µm, {result['tiles']} tiles; median of {args.repeat}"
    )
    print(
        f"{'engine':<15}{'wall s':>8}{'slides/h':>10}{'in-run s':>10}{'set-up s':>10}{'steady slides/h':>17}"
        f"{'fixed s':>9}{'sched. s/slide':>16}"
    )
    for name in CONFIGS:
        x = result[name]
        print(
            f"{name:<15}{x['wall_s']:>8.1f}{x['slides_per_hour']:>10.0f}{x['in_run_s']:>10.1f}{(x['setup_s'] or 0):>10.1f}"
            f"{x['steady_slides_per_hour']:>17.0f}{x.get('fixed_overhead_s', 0):>9.1f}"
            f"{x.get('scheduling_overhead_per_slide_s', 0):>16.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
