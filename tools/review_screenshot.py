"""Screenshot of the review viewer with its layers on, for the docs (``docs/review_viewer.png``).

    python tools/review_screenshot.py OUT_DIR [--slide ID] [--layers pallor,necrolysis] [--out docs/review_viewer.png]

Serves ``OUT_DIR`` (any folder ``infer.py`` wrote) with the review app on a free loopback port,
opens the slide in Debian's headless Chromium (Playwright; ``make browser`` installs it), shows the
chosen layers, selects the tile with the highest value of the first one (its values appear in the
panel) and saves a PNG. Nothing is written to ``OUT_DIR``. The docs' picture came from::

    python -m pipeline.synthetic --out /tmp/rv_demo/synth --n 1 --seed 7 --classes nme --size 3000x2000
    python infer.py /tmp/rv_demo/synth/slides --out /tmp/rv_demo/out
    python tools/review_screenshot.py /tmp/rv_demo/out
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

from pipeline.review.server import make_server  # noqa: E402

LAYERS = ["pallor", "necrolysis", "parakeratosis", "attention", "tissue"]


def screenshot(out_dir: Path, png: Path, slide: str | None, layers: list[str], size: tuple[int, int]) -> Path:
    from playwright.sync_api import sync_playwright

    srv = make_server(out_dir)
    key = slide or next(iter(srv.app.folder.slides))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": size[0], "height": size[1]}, device_scale_factor=1)
            page.goto(f"{srv.url}slide/{key}")
            page.wait_for_selector("body[data-ready='1']")
            for name in LAYERS:
                want = name in layers or name == "tissue"
                if page.is_checked(f"#layer-{name}") != want:
                    page.click(f"#layer-{name}")
            first = layers[0]
            i = page.evaluate(
                f"""(() => {{ const v = window.__review.tiles.values[{first!r}];
                let b = 0; v.forEach((x, k) => {{ if (x !== null && x > v[b]) b = k; }}); return b; }})()"""
            )
            page.select_option("#q-pattern", first)
            x, y = page.evaluate(
                f"""(() => {{ const S = window.__review, T = S.tiles;
                return S.toScreen(T.x[{i}] + S.offset[0] + T.size / 2, T.y[{i}] + S.offset[1] + T.size / 2); }})()"""
            )
            box = page.locator("#viewer").bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + x, box["y"] + y)
            page.wait_for_function("window.__review.fullyLoaded", timeout=30_000)
            page.wait_for_timeout(500)
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png))
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="batch output folder written by infer.py")
    ap.add_argument("--slide", help="slide id (default: the first listed)")
    ap.add_argument("--layers", default="pallor,necrolysis", help="comma-separated layers to show (tissue always)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "review_viewer.png")
    ap.add_argument("--size", default="1400x860", help="browser viewport WxH px")
    args = ap.parse_args(argv)
    layers = [s for s in args.layers.split(",") if s]
    bad = [s for s in layers if s not in LAYERS]
    if bad or not layers:
        raise SystemExit(f"error: --layers: unknown {bad or 'empty'} (choose from {', '.join(LAYERS)})")
    w, h = (int(v) for v in args.size.lower().split("x"))
    print(screenshot(args.out_dir, args.out, args.slide, layers, (w, h)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
