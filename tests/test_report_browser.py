"""The HTML report and index in a real headless browser (Debian's Chromium via Playwright).

Checks what a pathologist would see: the overlay images load and are visible, the overlay buttons
switch images, the orders/disclaimer/demo label are on screen, sorting by probability works, the
pages log no console error and request nothing but file: and data: URLs. Screenshots are checked
for content (not blank; the overlay region shows the heatmap's colours).

Skipped only when /usr/bin/chromium is absent (``make browser`` installs it). Set
``NME_SCREENSHOT_DIR`` to keep the screenshots for a look.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import CHROMIUM

from pipeline import DEMO_MODEL_LABEL
from pipeline.outputs.heatmap import encode_png
from pipeline.outputs.report import write_report
from pipeline.outputs.summary import write_index_html

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (install it with `make browser`)"),
]


def _load_builders() -> Any:
    """The realistic-input builders of test_outputs.py (loaded by path: works in any import mode)."""
    spec = importlib.util.spec_from_file_location("_outputs_builders", Path(__file__).with_name("test_outputs.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _load_builders()


class Watched:
    """A page whose console errors, page errors and requests are recorded."""

    def __init__(self, browser: Any, width: int = 1400, height: int = 900) -> None:
        self.context = browser.new_context(
            viewport={"width": width, "height": height}, device_scale_factor=1, service_workers="block"
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on(
            "console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url[:80]}"))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: Path) -> Any:
        self.page.goto(path.resolve().as_uri(), wait_until="load")
        return self.page

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        outside = [u[:80] for u in self.requests if not u.startswith(("file:", "data:"))]
        assert outside == [], f"requests outside file:/data: {outside}"

    def close(self) -> None:
        self.context.close()


def _keep(path: Path) -> None:
    target = os.environ.get("NME_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def _decode(png: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img[:, :, ::-1].astype(np.float32)


def _digest(src: str | None) -> str:
    return hashlib.sha256((src or "").encode()).hexdigest()[:12]


def _visible_overlay(page: Any) -> Any:
    figs = page.locator(".ov-fig:visible")
    assert figs.count() == 1, "exactly one view is visible at a time"
    return figs.first.locator("img")


def _all_images_decoded(page: Any) -> bool:
    return page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")


def test_report_in_a_real_browser(browser: Any, tmp_path: Path) -> None:
    case = B.make_case(seed=3, slide_id="S-2024-0117 A1")
    overlays = B.render_overlays(case)
    path = write_report(
        tmp_path / "report.html",
        B.make_result(slide_id="S-2024-0117 A1"),
        encode_png(case["thumb"]),
        overlays,
        B.make_gallery(case),
    )
    w = Watched(browser)
    try:
        page = w.open(path)
        assert _all_images_decoded(page), "every embedded image decodes"

        # overlays: the first (pallor) is shown; a click shows another image and hides the first
        img = _visible_overlay(page)
        assert img.is_visible()
        box = img.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 200
        assert img.get_attribute("alt").startswith("Pallor")
        first = _digest(img.get_attribute("src"))
        page.get_by_role("button", name="Necrolysis").click()
        img2 = _visible_overlay(page)
        assert img2.get_attribute("alt").startswith("Necrolysis"), "click shows the necrolysis overlay"
        assert _digest(img2.get_attribute("src")) != first, "a different image is visible"
        assert page.get_by_role("button", name="Necrolysis").get_attribute("aria-pressed") == "true"
        page.get_by_role("button", name="Attention").click()
        assert _visible_overlay(page).get_attribute("alt").startswith("Attention")
        page.keyboard.press("1")
        assert _digest(_visible_overlay(page).get_attribute("src")) == first, "key 1 returns to the first view"

        # the overlay region of the screen shows the heatmap's colours (not the plain thumbnail)
        shot = _decode(_visible_overlay(page).screenshot())
        h, w_ = shot.shape[:2]
        expected = cv2.resize(_decode(overlays["pallor"]), (w_, h), interpolation=cv2.INTER_AREA)
        plain = cv2.resize(_decode(overlays["necrolysis"]), (w_, h), interpolation=cv2.INTER_AREA)
        err, err_other = float(np.abs(shot - expected).mean()), float(np.abs(shot - plain).mean())
        assert err < 6.0, f"on-screen overlay differs from the heatmap (mean abs {err:.1f})"
        assert err_other > err + 1.0, "the two overlays must look different on screen"

        # the clinical content is on screen
        row = page.locator("#orders-table tbody tr", has_text="Fasting plasma glucagon")
        assert row.is_visible() and "urgent" in row.inner_text()
        assert page.locator("#orders-table tbody tr").first.get_attribute("data-order-id") == "glucagon"
        assert page.locator("#fixed-disclaimer").is_visible()
        assert page.get_by_text("Rule set proposals must be confirmed").is_visible()
        label = page.locator("#model-label")
        assert label.is_visible() and DEMO_MODEL_LABEL in label.inner_text()
        lb = label.bounding_box()
        assert lb is not None and lb["y"] + lb["height"] < 900, "the demo label is visible without scrolling"
        assert page.locator("#probability").inner_text() == "0.87"
        assert page.locator("#band").inner_text() == "HIGH"
        assert page.get_by_text("8 in 10 similar slides").is_visible()
        assert page.locator("#gallery .tile").count() == 12
        assert page.get_by_text("Zinc deficiency").is_visible()
        assert page.locator("#orders-table", has_text="local code, not a verified standard code").is_visible()
        assert page.get_by_text("as for the order above").first.is_visible(), "a repeated rationale is printed once"

        full = tmp_path / "report_screenshot.png"
        page.screenshot(path=str(full), full_page=True)
        img_full = _decode(full.read_bytes())
        assert img_full.shape[0] > 900 and img_full.std() > 20, "screenshot is not blank"
        _keep(full)
        top = tmp_path / "report_top.png"
        page.screenshot(path=str(top))
        _keep(top)
        w.assert_clean()
    finally:
        w.close()


def test_failed_report_in_a_real_browser(browser: Any, tmp_path: Path) -> None:
    result = {
        "slide_id": "S-404",
        "status": "failed",
        "error": "S-404.mrxs: missing data folder S-404/",
        "nme_probability": None,
        "band": None,
        "model": {"name": "nme-patch-cnn", "version": "0.1.0", "sha256": None, "label": DEMO_MODEL_LABEL},
    }
    path = write_report(tmp_path / "failed.html", result, None, {}, {})
    w = Watched(browser)
    try:
        page = w.open(path)
        reason = page.locator("#status-reason")
        assert reason.is_visible() and "missing data folder" in reason.inner_text()
        assert page.locator(".ov-btn").count() == 0
        assert page.get_by_text("No image available").is_visible()
        assert page.locator("#probability").inner_text() == "\u2014"
        assert page.locator("#fixed-disclaimer").is_visible()
        shot = tmp_path / "failed_screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert _decode(shot.read_bytes()).std() > 10
        w.assert_clean()
    finally:
        w.close()


def test_index_sorts_by_probability_and_links_reports(browser: Any, tmp_path: Path) -> None:
    results = [
        B.make_result("S-001", prob=0.42, band="INDETERMINATE"),
        {"slide_id": "S-002", "status": "failed", "error": "unreadable", "nme_probability": None, "band": None},
        B.make_result("S-003", prob=0.91, band="HIGH"),
        B.make_result("S-004", prob=0.08, band="LOW"),
        B.make_result("S-005", status="non_diagnostic", prob=None, band=None),
    ]
    rel = {}
    case = B.make_case(seed=5)
    for r in results:
        rp = Path("slides") / r["slide_id"] / "report.html"
        write_report(tmp_path / rp, r, encode_png(case["thumb"]), {}, {})
        rel[r["slide_id"]] = rp.as_posix()
    path = write_index_html(tmp_path / "index.html", results, rel)
    w = Watched(browser, height=800)
    try:
        page = w.open(path)

        def order() -> list[str]:
            return page.locator("#slides tbody tr").evaluate_all("rs => rs.map(r => r.dataset.slide)")

        assert order() == ["S-001", "S-002", "S-003", "S-004", "S-005"]
        page.locator("#th-prob").click()
        assert order() == ["S-003", "S-001", "S-004", "S-002", "S-005"], "highest first, blanks last"
        assert page.locator("#th-prob").get_attribute("aria-sort") == "descending"
        page.locator("#th-prob").click()
        assert order() == ["S-004", "S-001", "S-003", "S-002", "S-005"], "lowest first, blanks still last"
        page.get_by_role("columnheader", name="Slide").click()
        assert order() == ["S-001", "S-002", "S-003", "S-004", "S-005"]

        assert page.locator('[data-count="failed"] .n').inner_text() == "1"
        assert page.locator('[data-count="ok"] .n').inner_text() == "3"
        assert page.locator("#disclaimer").is_visible()
        assert page.get_by_text(DEMO_MODEL_LABEL).first.is_visible()
        shot = tmp_path / "index_screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert _decode(shot.read_bytes()).std() > 10

        # every link opens an existing report, which loads cleanly
        hrefs = page.locator("#slides a").evaluate_all("as => as.map(a => a.href)")
        assert len(hrefs) == 5 and all(h.startswith("file://") for h in hrefs)
        page.locator("#slides a", has_text="S-003").click()
        page.wait_for_load_state("load")
        assert page.locator("#slide-id").inner_text() == "S-003"
        w.assert_clean()
    finally:
        w.close()
