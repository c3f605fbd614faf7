"""Deep Zoom tile latency through the review server (uvicorn + Starlette), as the viewer fetches them.

    python benchmarks/review_tiles.py [OUT_DIR] [--slide ID] [--n 256] [--clients 1,6] [--json]

Serves ``OUT_DIR`` (a folder ``infer.py`` wrote; without one, a synthetic slide of the default
4000 x 3000 µm at 0.5 µm/px is made in a temporary folder with a minimal ``result.json``) on a
loopback port and requests ``--n`` distinct tiles of the four finest Deep Zoom levels (seeded
sample), each once, so every request reads the slide and encodes a JPEG (no cache hit): latency per
request from the client's side (send to last byte), median / p95 / max, for 1 client on one
keep-alive connection and for ``--clients`` parallel connections (a browser opens 6).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.result import PatternScores, ResultMPP, SlideResult  # noqa: E402
from pipeline.review.server import make_server  # noqa: E402


def synthetic_output(work: Path) -> Path:
    """``work/out``: one synthetic slide (seed 7) and a result.json naming it (no model run)."""
    subprocess.run(
        [sys.executable, "-m", "pipeline.synthetic", "--out", str(work / "synth"), "--n", "1", "--seed", "7", "-q"],
        check=True,
        cwd=REPO,
    )
    slide = next((work / "synth" / "slides").glob("*.tiff"))
    d = work / "out" / slide.stem
    d.mkdir(parents=True)
    SlideResult(
        slide_id=slide.stem,
        slide_path=str(slide),
        status="ok",
        nme_probability=0.5,
        band="INDETERMINATE",
        patterns=PatternScores(pallor=0.5, necrolysis=0.5, parakeratosis=0.5),
        mpp=ResultMPP(slide=0.5, requested=0.5, effective=0.5, source="tiff resolution"),
    ).write(d)
    return work / "out"


def _get(port: int, paths: list[str]) -> list[float]:
    """Each path once over one keep-alive connection; seconds per request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    for p in paths:
        t0 = time.perf_counter()
        conn.request("GET", p, headers={"Host": f"127.0.0.1:{port}"})
        r = conn.getresponse()
        body = r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200 or body[:2] != b"\xff\xd8":
            raise SystemExit(f"error: {p}: HTTP {r.status} {body[:200]!r}")
    conn.close()
    return out


def _summary(sec: list[float], wall: float) -> dict[str, Any]:
    ms = sorted(1000 * s for s in sec)
    return {
        "tiles": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
        "max_ms": round(ms[-1], 2),
        "tiles_per_s": round(len(ms) / wall, 1),
    }


def run(out_dir: Path, slide: str | None, n: int, clients: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for c in clients:
        srv = make_server(out_dir)  # a fresh server each time: its tile cache starts empty
        key = slide or next(iter(srv.app.folder.slides))
        dz = srv.app.deepzoom(key)
        info = dz.info
        tiles = []
        for lv in range(max(0, info.max_level - 3), info.max_level + 1):
            w, h = dz.level_size(lv)
            cols, rows = -(-w // info.tile_size), -(-h // info.tile_size)
            tiles += [(lv, c_, r_) for c_ in range(cols) for r_ in range(rows)]
        rng = np.random.default_rng(0)
        pick = [tiles[i] for i in rng.choice(len(tiles), size=min(n, len(tiles)), replace=False)]
        paths = [f"/api/slides/{key}/dz/{lv}/{c_}_{r_}.jpg" for lv, c_, r_ in pick]
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            port = srv.server_address[1]
            _get(port, [f"/api/slides/{key}/dz/0/0_0.jpg"])  # open the slide, warm the connection path
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as ex:
                parts = list(ex.map(_get, [port] * c, [paths[k::c] for k in range(c)]))
            wall = time.perf_counter() - t0
        finally:
            srv.shutdown()
            srv.server_close()
        results[f"{c}_client" + ("s" if c > 1 else "")] = _summary([s for p in parts for s in p], wall)
        results["slide"] = {"id": key, "width": info.width, "height": info.height, "levels": info.max_level + 1}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path, nargs="?", help="batch output folder (default: a synthetic slide)")
    ap.add_argument("--slide", help="slide id (default: the first)")
    ap.add_argument("--n", type=int, default=256, help="distinct tiles requested")
    ap.add_argument("--clients", default="1,6", help="comma list of parallel connections")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or synthetic_output(Path(tmp))
        result = run(out, args.slide, args.n, clients)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
