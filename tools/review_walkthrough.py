"""Review one slide in a real browser through the review app's UI, as a pathologist would, and check the files.

    python tools/review_walkthrough.py OUT_DIR [--slide ID] [--reviewer NAME] [--url URL] [--truth DIR] [--shots DIR]

Starts the command ``infer.py`` prints at the end of a run (``python -m pipeline.review OUT_DIR``,
here on a free loopback port; ``--url`` uses one you already started instead), opens Debian's
headless Chromium (Playwright, as the browser tests; ``make browser`` installs it) and, with the
keyboard wherever the app has a key:

1. worklist: ``j``/``k`` through the rows, ``Enter`` opens the first slide not yet reviewed (the list is
   sorted by probability, highest first; or ``--slide``);
2. viewer: ``2`` toggles the necrolysis layer (the overlay changes on screen), ``]`` raises its opacity;
3. the reviewer's name is typed once (the app remembers it);
4. review queue (nearest the threshold first): ``j`` walks it, ``c`` confirms a tile that shows the
   pattern, ``x`` marks one that does not as a false positive;
5. a missed region: zoom in with the mouse wheel on a tile the model scored below its threshold,
   choose the pattern under *draw region*, ``r``, click four corners, ``Enter``;
6. slide verdict: a note, then ``a`` (agree with the band) or ``d`` + your band + *save verdict*;
7. reload: the marks, the region and the verdict come back (counted on top of any earlier review);
   ``w``: the worklist says ``done``;
8. on disk: ``OUT_DIR/<slide_id>/review.geojson`` and ``review.json`` hold those marks, and
   ``pipeline.review.labels.reviewed_labels(OUT_DIR)`` turns them into the labels ``train.py`` will use.

The "pathologist's eye" is the slide generator's ground truth when the slides are synthetic
(``<slides>/../annotations/<slide_id>.geojson``, as ``make demo`` writes; or ``--truth DIR``): a tile
is confirmed only where the pattern is drawn, rejected only where it is not, and the missed region
is drawn on a tile that holds the pattern. Without annotations the choices are the queue's first
tiles (the marks are then not a diagnosis). Exit status 0 when every check passed, 1 otherwise
(one line saying which). The page must log no console error and request nothing off the server.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import CHROMIUM, CHROMIUM_ARGS  # type: ignore[import-not-found]  # noqa: E402

#: Ground truth: a tile shows a pattern at this annotated coverage (benchmarks/review_loop.py's).
TRUTH_COVERAGE = {"pallor": 0.2, "necrolysis": 0.15, "parakeratosis": 0.1}
PATTERNS = ("pallor", "necrolysis", "parakeratosis")
MAX_QUEUE_STEPS = 40  # how far down the queue the reviewer looks for a tile of each kind


class WalkthroughFailed(Exception):
    """A step of the walk-through did not do what the UI promises."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise WalkthroughFailed(what)


@contextmanager
def review_server(out_dir: Path, url: str | None) -> Iterator[str]:
    """The printed review command on a free port (or ``url`` as given); yields the app's URL."""
    if url:
        yield url.rstrip("/") + "/"
        return
    cmd = [sys.executable, "-m", "pipeline.review", str(out_dir), "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "review: http://127.0.0.1:PORT/  (N slide(s) in ...; Ctrl-C stops)"
        m = re.match(r"review: (http://\S+)", line)
        if not m:
            rest = proc.stdout.read() if proc.poll() is not None else ""
            raise WalkthroughFailed(f"{' '.join(cmd)} did not start: {(line + rest).strip()}")
        print(f"  server: {line.strip()}")
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def truth_of(out_dir: Path, slide_id: str, truth_dir: Path | None) -> tuple[Any, dict[str, str]] | None:
    """(N, 3) bool ground truth per stored tile and the slide's labels.csv row, or None without annotations."""
    import numpy as np

    from pipeline.outputs.batch_folder import read_tiles
    from pipeline.tiles.annotations import rasterise, read_annotations, tile_coverage

    result = json.loads((out_dir / slide_id / "result.json").read_text())
    root = truth_dir or Path(result["slide_path"]).parent.parent
    ann, table_csv = root / "annotations" / f"{slide_id}.geojson", root / "labels.csv"
    if not ann.is_file() or not table_csv.is_file():
        return None
    with open(table_csv, newline="", encoding="utf-8") as fh:
        row = next((r for r in csv.DictReader(fh) if r["slide_id"] == slide_id), None)
    if row is None:
        return None
    tiles = read_tiles(out_dir / slide_id / "tiles.geojson")
    mpp = result["mpp"]["slide"]
    dims = (int(result["dimensions_level0"][0]), int(result["dimensions_level0"][1]))
    masks = rasterise(read_annotations(ann, [*PATTERNS, "epidermis"]), list(PATTERNS), dims, mpp)
    cov = tile_coverage(masks, list(PATTERNS), tiles.coords, tiles.size, mpp)
    return cov >= np.array([TRUTH_COVERAGE[p] for p in PATTERNS]), row


def walkthrough(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from pipeline.review.store import now

    out_dir: Path = args.out_dir.resolve()
    started = now()  # marks made from here on are this walk-through's
    timings: dict[str, float] = {}
    t_last = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t_last
        now = time.perf_counter()
        timings[name] = round(now - t_last, 2)
        t_last = now
        print(f"  {name}: {timings[name]:.1f} s")

    with review_server(out_dir, args.url) as url, sync_playwright() as pw:
        step("start the review server")
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        # bypass_csp: Playwright's wait_for_function evaluates strings; tests/test_review_browser.py
        # checks the app under its real Content-Security-Policy
        ctx = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1, bypass_csp=True)
        page = ctx.new_page()
        errors: list[str] = []
        outside: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on(
            "request", lambda r: None if r.url.startswith(url) or r.url.startswith("data:") else outside.append(r.url)
        )
        if args.shots:
            args.shots.mkdir(parents=True, exist_ok=True)

        def shot(name: str) -> None:
            if args.shots:
                page.screenshot(path=str(args.shots / f"{name}.png"))

        def saved(n: int) -> None:
            page.wait_for_selector(f"body[data-saved='{n}']", timeout=15_000)

        # 1. worklist ------------------------------------------------------------------------
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        rows = page.locator("#worklist tbody tr")
        n_rows = rows.count()
        check(n_rows > 0, "the worklist lists no slide")
        check("Decision support" in page.inner_text("#disclaimer"), "no decision-support disclaimer on the worklist")
        keys = [rows.nth(i).get_attribute("data-key") or "" for i in range(n_rows)]
        states = [rows.nth(i).locator("td").last.inner_text() for i in range(n_rows)]
        unreviewed = [k for k, st in zip(keys, states, strict=True) if st == "none"]
        check(bool(args.slide or unreviewed), "every slide has a review already: choose one with --slide ID")
        slide: str = args.slide or unreviewed[0]
        check(slide in keys, f"--slide {slide}: not in the worklist ({', '.join(keys)})")
        page.keyboard.press("j")
        page.keyboard.press("k")
        for _ in range(keys.index(slide)):
            page.keyboard.press("j")
        check(page.locator("#worklist tbody tr.current").get_attribute("data-key") == slide, "j/k did not move the row")
        shot("1_worklist")
        step(f"worklist ({n_rows} slides), j/k, Enter")
        page.keyboard.press("Enter")

        # 2. viewer, layers ------------------------------------------------------------------------
        page.wait_for_selector("body[data-ready='1']")
        check(page.url.endswith(f"/slide/{slide}"), f"Enter opened {page.url}, not the slide")
        page.wait_for_function("window.__review.tilesLoaded > 0 && window.__review.fullyLoaded", timeout=60_000)
        had = page.evaluate("[window.__review.review.tiles.length, window.__review.review.regions.length]")
        msg = page.inner_text("#message")
        check("not found" not in msg and "could not" not in msg, f"viewer says: {msg}")
        summary = page.inner_text("#summary")
        band = page.evaluate("window.__review.meta.band")
        step(f"open the slide ({summary})")
        viewer = page.locator("#viewer")
        before = viewer.screenshot()
        was = page.is_checked("#layer-necrolysis")
        page.keyboard.press("2")
        page.keyboard.press("]")
        page.wait_for_timeout(200)
        check(page.is_checked("#layer-necrolysis") != was, "key 2 did not toggle the necrolysis layer")
        check(viewer.screenshot() != before, "toggling the necrolysis layer changed nothing on screen")
        shot("2_layers")
        step("toggle a layer (2), opacity (])")

        # 3. reviewer's name ---------------------------------------------------------------------------
        page.fill("#reviewer", args.reviewer)
        page.press("#reviewer", "Tab")  # change fires on leaving the field; the app remembers the name

        # 4. review queue: confirm one tile, reject one ----------------------------------------------------
        found = truth_of(out_dir, slide, args.truth)
        truth, label_row = found if found else (None, None)
        print(f"  the reviewer's eye: {'generator ground truth' if found else 'none (first queue tiles)'}")
        n_saved = 0

        def marked_before(pattern: str) -> list[int]:
            """Tiles that already carry a mark for ``pattern`` (an earlier review): not marked again."""
            return page.evaluate(
                """(p) => { const S = window.__review, T = S.tiles, out = [];
                for (const m of S.review.tiles) if (m.pattern === p) for (let i = 0; i < T.x.length; i++)
                  if (Math.round(T.x[i]) === Math.round(m.x) && Math.round(T.y[i]) === Math.round(m.y)) out.push(i);
                return out; }""",
                pattern,
            )

        thresholds = page.evaluate("window.__review.meta.thresholds")
        marks: list[tuple[str, int, str]] = []  # pattern, tile index, verdict
        for verdict, key in (("confirm", "c"), ("false_positive", "x")):
            want = verdict == "confirm"
            for j, p in enumerate(PATTERNS):
                page.select_option("#q-pattern", p)  # rebuilds the queue, from its start
                check(page.evaluate("window.__review.qpos") == -1, "choosing the queue's pattern did not restart it")
                queue = page.evaluate("window.__review.queue")[:MAX_QUEUE_STEPS]
                done = {i for q, i, _ in marks if q == p} | set(marked_before(p))
                pick = next(
                    (k for k, i in enumerate(queue) if i not in done and (truth is None or truth[i, j] == want)), -1
                )
                if pick >= 0:
                    break
            check(pick >= 0, f"no tile to {verdict} in the first {MAX_QUEUE_STEPS} of any queue")
            viewer.focus()
            for _ in range(pick + 1):
                page.keyboard.press("j")
            i = page.evaluate("window.__review.current")
            check(i == queue[pick], f"j reached tile {i}, expected {queue[pick]}")
            page.wait_for_timeout(600)  # the zoom animation: the reviewer looks at the tile
            info = page.inner_text("#tile-info")
            page.keyboard.press(key)
            n_saved += 1
            saved(n_saved)
            marks.append((p, i, verdict))
            shot(f"3_{verdict}")
            step(f"{verdict} a {p} tile (queue position {pick + 1}; {info.splitlines()[j].strip()}) with {key}")

        # 5. a missed region ---------------------------------------------------------------------------
        import numpy as np

        values = page.evaluate("window.__review.tiles.values")
        best: tuple[float, str, int] | None = None  # the missed tile nearest its threshold, relative
        marked = {(q, k) for q, k, _ in marks} | {(p, k) for p in PATTERNS for k in marked_before(p)}
        for j, p in enumerate(PATTERNS):
            prob = np.array([np.nan if x is None else x for x in values[p]], float)
            for i in np.flatnonzero(prob < thresholds[p]):
                rel = float(prob[i] / thresholds[p])
                if (truth is None or truth[i, j]) and (p, int(i)) not in marked and (best is None or rel > best[0]):
                    best = (rel, p, int(i))
        check(best is not None, "no tile below threshold that shows a pattern: nothing was missed")
        assert best is not None
        _, region_pattern, ri = best
        page.keyboard.press("0")
        page.wait_for_timeout(300)
        corner = "(() => {{ const S = window.__review, T = S.tiles; return S.toScreen(T.x[{i}] + S.offset[0] + T.size * {fx}, T.y[{i}] + S.offset[1] + T.size * {fy}); }})()"
        box = viewer.bounding_box()
        assert box is not None
        cx, cy = page.evaluate(corner.format(i=ri, fx=0.5, fy=0.5))
        page.mouse.move(box["x"] + cx, box["y"] + cy)
        for _ in range(8):
            page.mouse.wheel(0, -120)
            page.wait_for_timeout(60)
        page.wait_for_timeout(900)  # the zoom animation
        cx, cy = page.evaluate(corner.format(i=ri, fx=0.5, fy=0.5))  # drag the tile to the middle
        page.mouse.move(box["x"] + cx, box["y"] + cy)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=12)
        page.mouse.up()
        page.wait_for_timeout(900)  # the pan animation
        page.select_option("#region-class", region_pattern)
        viewer.focus()
        page.keyboard.press("r")
        for fx, fy in ((0.04, 0.04), (0.96, 0.04), (0.96, 0.96), (0.04, 0.96)):
            x, y = page.evaluate(corner.format(i=ri, fx=fx, fy=fy))
            check(0 < x < box["width"] and 0 < y < box["height"], "the tile to outline is off screen")
            page.mouse.click(box["x"] + x, box["y"] + y)
            page.wait_for_timeout(350)  # not a double-click
        page.keyboard.press("Enter")
        n_saved += 1
        saved(n_saved)
        shot("4_region")
        step(f"draw a missed {region_pattern} region (wheel zoom, r, 4 clicks, Enter)")

        # 6. slide verdict ---------------------------------------------------------------------------
        truth_band = None if label_row is None else ("HIGH" if label_row["nme_pattern"] == "1" else "LOW")
        note = args.note or (
            f"walk-through: generator diagnosis {label_row['diagnosis']}" if label_row else "walk-through review"
        )
        page.fill("#note", note)
        if truth_band is None or truth_band == band:
            viewer.focus()
            page.keyboard.press("a")
            verdict_kind, verdict_band = "agree", band
        else:
            viewer.focus()
            page.keyboard.press("d")
            page.select_option("#band", truth_band)
            page.click("#save-verdict")
            verdict_kind, verdict_band = "disagree", truth_band
        n_saved += 1
        saved(n_saved)
        shot("5_verdict")
        step(f"slide verdict: {verdict_kind} ({verdict_band}) with a note")

        # 7. reload: everything comes back; the worklist says done -----------------------------------------
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        n_tiles, n_regions = page.evaluate(
            "[window.__review.review.tiles.length, window.__review.review.regions.length]"
        )
        check(n_tiles == had[0] + 2, f"after reload: {n_tiles} tile marks, expected {had[0]} + 2")
        check(n_regions == had[1] + 1, f"after reload: {n_regions} regions, expected {had[1]} + 1")
        check(region_pattern in page.inner_text("#regions"), "after reload: the region is not listed")
        state = page.inner_text("#verdict-state")
        check(args.reviewer in state and verdict_kind in state, f"after reload the verdict reads {state!r}")
        check(page.input_value("#reviewer") == args.reviewer, "the reviewer's name was not remembered")
        check(page.input_value("#note") == note, "after reload the note is gone")
        viewer.focus()
        page.keyboard.press("w")
        page.wait_for_selector("body[data-ready='1']")
        row_state = page.inner_text(f"#worklist tbody tr[data-key='{slide}'] td:last-child")
        check(row_state == "done", f"the worklist says {row_state!r} for the reviewed slide")
        shot("6_worklist_done")
        step("reload, w: worklist says done")
        check(errors == [], f"console errors: {errors}")
        check(outside == [], f"requests off the server: {outside}")
        ctx.close()
        browser.close()

    # 8. on disk --------------------------------------------------------------------------------------
    from pipeline.review.labels import reviewed_labels

    geo = json.loads((out_dir / slide / "review.geojson").read_text())
    rj = json.loads((out_dir / slide / "review.json").read_text())
    mine_now = [f for f in geo["features"] if f["properties"].get("reviewed_at", "") >= started]
    classes = sorted(f["properties"]["classification"]["name"] for f in mine_now)
    expect = sorted([p if v == "confirm" else f"not_{p}" for p, _, v in marks] + [region_pattern])
    check(classes == expect, f"review.geojson holds {classes} from this walk-through, expected {expect}")
    check(all(f["properties"].get("reviewer") == args.reviewer for f in mine_now), "a feature lacks the reviewer")
    saved_verdict = rj.get("verdict") or {}
    check(
        saved_verdict.get("verdict") == verdict_kind and saved_verdict.get("band") == verdict_band,
        f"review.json verdict is {saved_verdict}, expected {verdict_kind} {verdict_band}",
    )
    check(
        saved_verdict.get("reviewer") == args.reviewer and saved_verdict.get("note") == note,
        "review.json verdict lacks the reviewer or the note",
    )
    labels = reviewed_labels(out_dir)
    mine = next((s for s in labels.slides if s.slide_id == slide), None)
    check(mine is not None and mine.n_labels >= 3, "reviewed_labels: the slide's tile labels are missing")
    assert mine is not None
    step("review.geojson, review.json, training labels")
    return {
        "out_dir": str(out_dir),
        "slide": slide,
        "reviewer": args.reviewer,
        "tile_marks": [{"pattern": p, "tile": i, "verdict": v} for p, i, v in marks],
        "region": region_pattern,
        "verdict": {"verdict": verdict_kind, "band": verdict_band, "note": note, "at": saved_verdict.get("at")},
        "review_geojson_classes": classes,
        "history_entries": len(rj.get("history", [])),
        "training_labels": {"tile_labels": mine.n_labels, "slide_label": mine.slide_label},
        "seconds": timings,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="batch output folder written by infer.py (e.g. demo_output)")
    ap.add_argument(
        "--slide",
        help="slide id to review (default: the first unreviewed row of the worklist, highest probability first)",
    )
    ap.add_argument("--reviewer", default="Dr Walkthrough", help="reviewer name typed into the app")
    ap.add_argument("--note", help="the verdict's note (default: says it was this walk-through)")
    ap.add_argument("--url", help="an already running review app (default: start python -m pipeline.review)")
    ap.add_argument("--truth", type=Path, help="synthetic slide set with annotations/ and labels.csv (default: found)")
    ap.add_argument("--shots", type=Path, help="save a screenshot of each step here")
    args = ap.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"error: {CHROMIUM} is absent (install it with `make browser`)", file=sys.stderr)
        return 1
    if not (args.out_dir / "run.json").is_file():
        print(f"error: {args.out_dir}: not a batch output folder (no run.json; run `make demo` first)", file=sys.stderr)
        return 1
    print(f"review walk-through of {args.out_dir}")
    try:
        report = walkthrough(args)
    except WalkthroughFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    print(f"ok: {report['slide']} reviewed in the browser; its review is in {args.out_dir / report['slide']}/review.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
