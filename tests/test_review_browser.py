"""The review app in a real headless browser (Debian's Chromium via Playwright).

Opens the worklist, opens a slide, checks the slide image (OpenSeadragon's Deep Zoom tiles) and a
layer are drawn, toggles a layer, changes opacity and threshold, clicks a tile and reads its
values, confirms a tile and marks a false positive with the keyboard, draws a missed region,
reloads and sees them, and checks ``review.geojson``. The page must log no console error and
request nothing outside the server. Pixels are read from screenshots: what the reviewer sees,
the slide and the layer overlay together. A second test loads the viewer under its real
Content-Security-Policy (the first bypasses it for Playwright's string evaluation) and requires
no violation.

Skipped only when /usr/bin/chromium is absent (``make browser`` installs it). Set
``NME_SCREENSHOT_DIR`` to keep a screenshot of the viewer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CHROMIUM

from pipeline import DEMO_MODEL_LABEL
from pipeline.review.server import ReviewServer, make_server
from pipeline.review.store import load_review

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (install it with `make browser`)"),
]


def _load_server_tests() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_review_server_tests", Path(__file__).with_name("test_review_server.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ReviewServer, Path]]:
    out = _load_server_tests().make_output_folder(tmp_path)
    srv = make_server(out)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv, out
    finally:
        srv.shutdown()
        srv.server_close()


def _pixel(page: Any, x: int, y: int) -> list[int]:
    """RGB on screen at viewer position (``x``, ``y``) px: a 1 px screenshot (slide and layers together)."""
    import cv2
    import numpy as np

    box = page.locator("#viewer").bounding_box()
    png = page.screenshot(clip={"x": box["x"] + x, "y": box["y"] + y, "width": 1, "height": 1})
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return [int(c) for c in bgr[0, 0, ::-1]]


def _screen_of_tile(page: Any, i: int) -> tuple[float, float]:
    """Viewer position (px) of the centre of tile ``i``."""
    return tuple(
        page.evaluate(
            f"""(() => {{ const S = window.__review, T = S.tiles;
            return S.toScreen(T.x[{i}] + S.offset[0] + T.size / 2, T.y[{i}] + S.offset[1] + T.size / 2); }})()"""
        )
    )


def test_review_a_slide_in_the_browser(browser: Any, served: tuple[ReviewServer, Path]) -> None:
    srv, out = served
    # bypass_csp: Playwright's wait_for_function evaluates strings; the app itself runs under its strict CSP
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1, bypass_csp=True)
    page = ctx.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))

    # worklist: both slides, the demo label and the disclaimer, keyboard next/previous
    page.goto(srv.url)
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#worklist tbody tr").count() == 2
    page.wait_for_function("document.getElementById('model-label').textContent.includes('not for clinical use')")
    assert DEMO_MODEL_LABEL in page.inner_text("#model-label")
    assert "Decision support" in page.inner_text("#disclaimer")
    first = page.locator("#worklist tbody tr").nth(0).get_attribute("data-key")
    page.keyboard.press("j")
    assert page.locator("#worklist tbody tr.current").get_attribute("data-key") != first
    page.keyboard.press("k")
    assert page.locator("#worklist tbody tr.current").get_attribute("data-key") == first
    assert first == "S1"  # sorted by probability, highest first
    page.keyboard.press("Enter")

    # viewer: slide image drawn, layers, scale bar, label
    page.wait_for_selector("body[data-ready='1']")
    assert page.url.endswith("/slide/S1")
    assert DEMO_MODEL_LABEL in page.inner_text("#model-label")
    page.wait_for_function("window.__review.tilesLoaded > 0 && window.__review.fullyLoaded")
    page.wait_for_timeout(200)
    assert page.get_attribute("#viewer", "data-scale-bar").endswith(("µm", "mm"))
    tx, ty = _screen_of_tile(page, 0)  # pallor 0.95: drawn as a layer block
    with_layer = _pixel(page, int(tx), int(ty))
    # the slide itself is drawn: right of the last tile column (x >= 1568), the pink 'dermis' band
    sx, sy = page.evaluate("window.__review.toScreen(1585, 900)")
    dermis = _pixel(page, int(sx), int(sy))
    assert dermis[0] > dermis[1] + 40 and max(dermis) < 240, dermis  # (225, 150, 185), not the pale glass
    page.keyboard.press("1")  # pallor off
    page.wait_for_timeout(100)
    assert page.evaluate("window.__review.layers.pallor.visible") is False
    assert not page.is_checked("#layer-pallor")
    without = _pixel(page, int(tx), int(ty))
    assert with_layer != without
    page.check("#layer-pallor")
    page.fill("#opacity-pallor", "1")  # range inputs: fill sets the value and fires input
    page.locator("#opacity-pallor").dispatch_event("input")
    assert page.evaluate("window.__review.layers.pallor.opacity") == 1
    page.locator("#threshold-pallor").fill("0.99")
    page.locator("#threshold-pallor").dispatch_event("input")
    page.wait_for_timeout(100)
    assert _pixel(page, int(tx), int(ty)) == without  # 0.95 < 0.99: hidden
    page.locator("#threshold-pallor").fill("0.2")
    page.locator("#threshold-pallor").dispatch_event("input")

    # click a tile: its values
    box = page.locator("#viewer").bounding_box()
    page.mouse.click(box["x"] + tx, box["y"] + ty)
    info = page.inner_text("#tile-info")
    assert "pallor: 0.9500" in info and "x, y: 0, 224" in info

    # reviewer, then keyboard review: c confirms the selected tile, x marks the next one false positive
    page.fill("#reviewer", "Dr Test")
    page.locator("#reviewer").dispatch_event("change")
    page.locator("#viewer").focus()
    page.keyboard.press("c")
    page.wait_for_selector("body[data-saved='1']")
    page.keyboard.press("j")  # queue: nearest the threshold first
    queued = page.evaluate("window.__review.current")
    page.keyboard.press("x")
    page.wait_for_selector("body[data-saved='2']")

    # draw a missed region (parakeratosis): three clicks, Enter
    page.select_option("#region-class", "parakeratosis")
    page.locator("#viewer").focus()
    page.keyboard.press("0")
    page.keyboard.press("r")
    for dx, dy in ((0.4, 0.4), (0.6, 0.4), (0.5, 0.6)):
        page.mouse.click(box["x"] + box["width"] * dx, box["y"] + box["height"] * dy)
    page.keyboard.press("Enter")
    page.wait_for_selector("body[data-saved='3']")

    if os.environ.get("NME_SCREENSHOT_DIR"):
        Path(os.environ["NME_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["NME_SCREENSHOT_DIR"]) / "review_viewer.png"))

    # on disk: QuPath GeoJSON with the confirm, the false positive and the region
    data = json.loads((out / "S1" / "review.geojson").read_text())
    names = sorted(f["properties"]["classification"]["name"] for f in data["features"])
    assert names == ["not_pallor", "pallor", "parakeratosis"]
    assert all(f["properties"]["reviewer"] == "Dr Test" for f in data["features"])
    review = load_review(out / "S1", "S1")
    assert ("pallor", 0, 224) in review.tiles and review.tiles[("pallor", 0, 224)].verdict == "confirm"
    assert queued != 0

    # reload: the marks come back
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.evaluate("window.__review.review.tiles.length") == 2
    assert page.evaluate("window.__review.review.regions.length") == 1
    assert "parakeratosis" in page.inner_text("#regions")

    assert errors == [], errors
    outside = [u for u in requests if not u.startswith(srv.url)]
    assert outside == [], outside
    ctx.close()


def test_viewer_runs_under_its_content_security_policy(browser: Any, served: tuple[ReviewServer, Path]) -> None:
    """The vendored OpenSeadragon and the app's scripts need nothing the strict CSP refuses."""
    srv, _ = served
    ctx = browser.new_context(viewport={"width": 1200, "height": 800}, device_scale_factor=1)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    page.goto(srv.url + "slide/S1")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector(".openseadragon-canvas canvas")
    page.wait_for_timeout(500)
    assert page.evaluate("window.__review.tilesLoaded") > 0
    assert page.evaluate("window.__csp") == []
    assert errors == [], errors
    ctx.close()


def test_missing_slide_file_is_a_page_message(browser: Any, tmp_path: Path) -> None:
    """The slide moved since inference: the viewer says so (and how to fix it); the layers still show."""
    out = _load_server_tests().make_output_folder(tmp_path, n_slides=1)
    (tmp_path / "slides").rename(tmp_path / "moved")
    srv = make_server(out)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    ctx = browser.new_context(viewport={"width": 1200, "height": 800}, device_scale_factor=1, bypass_csp=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(srv.url + "slide/S1")
        page.wait_for_selector("body[data-ready='1']")
        msg = page.inner_text("#message")
        assert "slide file not found" in msg and "--slides-root" in msg and "Traceback" not in msg
        page.wait_for_timeout(300)
        tx, ty = _screen_of_tile(page, 0)  # the pallor block over the blank background
        assert _pixel(page, int(tx), int(ty)) != [244, 243, 241]
        assert errors == [], errors
    finally:
        ctx.close()
        srv.shutdown()
        srv.server_close()
