"""The review server: Host check, path safety, write guards, atomic saves, Deep Zoom tiles, bad input.

:func:`make_output_folder` builds a small batch output folder (what ``infer.py`` writes, minus the
model pass) in well under a second; tests/test_review_browser.py loads it from here.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import DEMO_MODEL_LABEL
from pipeline.core.errors import DataError
from pipeline.outputs.geojson import write_tiles_geojson, write_tissue_geojson
from pipeline.result import PatternScores, ResultModel, ResultMPP, SlideResult
from pipeline.review.deepzoom import DeepZoom
from pipeline.review.server import ReviewServer, make_server

REPO = Path(__file__).resolve().parent.parent
TILE = 224


def make_output_folder(root: Path, n_slides: int = 2) -> Path:
    """``root/out``: ``n_slides`` slides (1600x1200 px at 0.5 µm/px) with result.json, tiles and tissue GeoJSON."""
    from conftest import skin_like_image, write_pyramid_tiff

    out = root / "out"
    (root / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n_slides):
        sid = f"S{k + 1}"
        slide = write_pyramid_tiff(root / "slides" / f"{sid}.tiff", skin_like_image(1600, 1200, seed=k), mpp=0.5)
        d = out / sid
        d.mkdir(parents=True)
        coords = np.array([(x, y) for y in range(224, 1000, TILE) for x in range(0, 1600 - TILE + 1, TILE)])
        n = len(coords)
        meas = {p: rng.uniform(0, 0.6 if k else 1.0, n) for p in ("pallor", "necrolysis", "parakeratosis")}
        meas["pallor"][0] = 0.95  # tile (0, 224): clearly above the pallor threshold
        meas["attention"] = rng.dirichlet(np.ones(n))
        write_tiles_geojson(d / "tiles.geojson", coords, float(TILE), meas, slide_id=sid)
        write_tissue_geojson(
            d / "tissue.geojson", [np.array([[0, 224], [1599, 224], [1599, 1050], [0, 1050]], float)], slide_id=sid
        )
        SlideResult(
            slide_id=sid,
            slide_path=str(slide),
            status="ok",
            nme_probability=0.9 if k == 0 else 0.02,
            band="HIGH" if k == 0 else "LOW",
            patterns=PatternScores(pallor=0.7, necrolysis=0.8, parakeratosis=0.6),
            n_tiles=n,
            mpp=ResultMPP(slide=0.5, requested=0.5, effective=0.5, source="tiff resolution"),
            dimensions_level0=(1600, 1200),
            model=ResultModel(name="nme-demo", version="0.1.0", label=DEMO_MODEL_LABEL),
        ).write(d)
    (out / "run.json").write_text(
        json.dumps({"options": {"model": str(REPO / "models" / "demo_bundle")}, "model_label": DEMO_MODEL_LABEL})
    )
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output folder per module; its slides are only read."""
    return make_output_folder(tmp_path_factory.mktemp("review"))


@pytest.fixture
def out_dir(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the output folder (the slides stay shared)."""
    return Path(shutil.copytree(template, tmp_path / "out"))


@pytest.fixture
def server(out_dir: Path) -> Iterator[ReviewServer]:
    srv = make_server(out_dir)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def request(
    srv: ReviewServer, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One raw request (the path is sent byte for byte, no client-side normalisation)."""
    port = srv.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = {"Host": f"127.0.0.1:{port}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h |= {"Content-Type": "application/json", "X-Review-Token": srv.app.token}
    h |= headers or {}
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in h.items():
        conn.putheader(k, v)
    if data is not None:
        conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


TILE_BODY = {"reviewer": "dr t", "pattern": "pallor", "x": 0, "y": 224, "size": 224, "verdict": "confirm"}


def test_worklist_and_slide_metadata(server: ReviewServer) -> None:
    st, body = request(server, "GET", "/api/slides")
    rows = json.loads(body)
    assert st == 200 and [r["slide_id"] for r in rows] == ["S1", "S2"]
    assert rows[0]["band"] == "HIGH" and rows[0]["review"] == "none"
    st, body = request(server, "GET", "/api/slides/S1")
    meta = json.loads(body)
    assert st == 200
    assert meta["model_label"] == DEMO_MODEL_LABEL and "Decision support" in meta["disclaimer"]
    assert meta["image"]["width"] == 1600 and meta["image"]["mpp"] == pytest.approx(0.5)
    assert meta["tiles"]["size"] == TILE and meta["tiles"]["values"]["pallor"][0] == pytest.approx(0.95)
    assert 0 < meta["thresholds"]["pallor"] < 1 and meta["thresholds"]["pallor"] != 0.5  # from the bundle
    st, page = request(server, "GET", "/slide/S1")
    assert st == 200 and server.app.token.encode() in page


def test_deepzoom_tiles(server: ReviewServer, out_dir: Path) -> None:
    st, data = request(server, "GET", "/api/slides/S1/dz/11/0_0.jpg")
    assert st == 200 and data[:2] == b"\xff\xd8"
    st, _ = request(server, "GET", "/api/slides/S1/dz/11/99_0.jpg")
    assert st == 422  # outside the grid: a one-line error
    dz = DeepZoom(Path(json.loads((out_dir / "S1" / "result.json").read_text())["slide_path"]))
    assert dz.info.max_level == 11  # ceil(log2(1600))
    full = dz._read(11, 0, 0, 255, 255)
    assert full.shape == (255, 255, 3)
    coarse = dz._read(8, 0, 0, 200, 150)  # 1/8: read from pyramid level 2 (1/4) and resized
    assert coarse.shape == (150, 200, 3) and abs(float(coarse.mean()) - float(full.mean())) < 40
    dz.close()


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2fserver.py",
        "/static/%2e%2e/server.py",
        "/static/../server.py",
        "/slide/..%2F..%2Fetc%2Fpasswd",
        "/api/slides/..%2fS1",
        "/api/slides/S1%2f..%2f..%2frun.json",
        "/api/slides/%2e%2e",
        "/static/viewer.html",  # pages are served through their routes only (with the token)
        "/static/style.css%00.py",
        "/api/slides/S1/dz/11/..%2f0_0.jpg",
        "/etc/passwd",
        "/static/%ff%fe",
    ],
)
def test_no_url_reaches_a_file_outside(server: ReviewServer, path: str) -> None:
    st, body = request(server, "GET", path)
    assert st == 404, (path, body)
    assert b"root:" not in body and b"import" not in body


def test_static_files_served(server: ReviewServer) -> None:
    st, body = request(server, "GET", "/static/viewer.js")
    assert st == 200 and b"Deep Zoom" in body


@pytest.mark.parametrize("host", ["evil.example:80", "attacker.test", "", "127.0.0.1:1"])
def test_foreign_host_header_refused(server: ReviewServer, host: str) -> None:
    st, body = request(server, "GET", "/api/slides", headers={"Host": host})
    assert st == 421 and b"Host" in body


def test_localhost_name_accepted(server: ReviewServer) -> None:
    st, _ = request(server, "GET", "/api/slides", headers={"Host": f"localhost:{server.server_address[1]}"})
    assert st == 200


def test_writes_need_token_same_origin_and_json(server: ReviewServer, out_dir: Path) -> None:
    url = "/api/slides/S1/review/tile"
    assert request(server, "POST", url, TILE_BODY, {"X-Review-Token": "wrong"})[0] == 403
    assert request(server, "POST", url, TILE_BODY, {"X-Review-Token": ""})[0] == 403
    assert request(server, "POST", url, TILE_BODY, {"Origin": "http://evil.example"})[0] == 403
    assert request(server, "POST", url, TILE_BODY, {"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert request(server, "POST", url, TILE_BODY, {"Content-Type": "text/plain"})[0] == 415
    assert not (out_dir / "S1" / "review.geojson").exists()
    port = server.server_address[1]
    st, body = request(server, "POST", url, TILE_BODY, {"Origin": f"http://127.0.0.1:{port}"})
    assert st == 200 and json.loads(body)["tiles"][0]["verdict"] == "confirm"
    assert (out_dir / "S1" / "review.geojson").is_file() and (out_dir / "S1" / "review.json").is_file()


@pytest.mark.parametrize(
    "body, status",
    [
        ({**TILE_BODY, "reviewer": ""}, 400),
        ({**TILE_BODY, "pattern": "../../x"}, 400),
        ({**TILE_BODY, "x": "1"}, 400),
        ({**TILE_BODY, "verdict": "maybe"}, 400),
    ],
)
def test_bad_writes_are_one_line_errors(server: ReviewServer, body: dict[str, Any], status: int) -> None:
    st, text = request(server, "POST", "/api/slides/S1/review/tile", body)
    assert st == status and "\n" not in json.loads(text)["error"]


def test_writes_only_to_the_listed_slide(server: ReviewServer, out_dir: Path) -> None:
    st, _ = request(server, "POST", "/api/slides/..%2f..%2ftmp/review/tile", TILE_BODY)
    assert st == 404
    st, _ = request(server, "POST", "/api/slides/S9/review/tile", TILE_BODY)
    assert st == 404
    assert sorted(p.name for p in out_dir.iterdir()) == ["S1", "S2", "run.json"]


def test_save_is_atomic_and_keeps_old_review_on_failure(
    server: ReviewServer, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert request(server, "POST", "/api/slides/S1/review/tile", TILE_BODY)[0] == 200
    before = (out_dir / "S1" / "review.geojson").read_bytes()

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.core.io.os.replace", boom)
    st, _ = request(server, "POST", "/api/slides/S1/review/tile", {**TILE_BODY, "verdict": "false_positive"})
    assert st == 500
    assert (out_dir / "S1" / "review.geojson").read_bytes() == before  # the old file, whole
    assert not [p for p in (out_dir / "S1").iterdir() if p.name.endswith(".tmp")]  # no temporary left


def test_corrupt_review_is_a_message_not_a_traceback(server: ReviewServer, out_dir: Path) -> None:
    (out_dir / "S1" / "review.geojson").write_text("{not json")
    st, body = request(server, "GET", "/api/slides/S1")
    meta = json.loads(body)
    assert st == 200 and "corrupt review file" in meta["review_error"] and meta["review"] is None
    st, body = request(server, "POST", "/api/slides/S1/review/tile", TILE_BODY)
    assert st == 409 and b"Traceback" not in body
    assert (out_dir / "S1" / "review.geojson").read_text() == "{not json"  # never overwritten
    rows = json.loads(request(server, "GET", "/api/slides")[1])
    assert rows[0]["review"] == "corrupt"


def test_moved_slide_found_under_slides_root(tmp_path: Path) -> None:
    out = make_output_folder(tmp_path, n_slides=1)
    moved = tmp_path / "archive"
    (tmp_path / "slides").rename(moved)
    srv = make_server(out)
    meta = srv.app.slide("S1")
    assert meta["image"] is None and "--slides-root" in meta["image_error"]
    srv.server_close()
    srv = make_server(out, slides_root=moved)
    assert srv.app.slide("S1")["image"]["width"] == 1600
    srv.server_close()


def test_not_a_batch_output_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a batch output folder"):
        make_server(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        make_server(tmp_path / "absent")


def test_cli_bad_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.core.cli import run_cli
    from pipeline.review.__main__ import main

    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_dzi_descriptor_points_at_the_tile_route(server: ReviewServer) -> None:
    import xml.etree.ElementTree as ET

    st, body = request(server, "GET", "/api/slides/S1/dz.dzi")
    assert st == 200
    root = ET.fromstring(body)
    assert root.tag.endswith("Image") and root.get("Url") == "/api/slides/S1/dz/" and root.get("TileSize") == "254"
    size = root[0]
    assert (size.get("Width"), size.get("Height")) == ("1600", "1200")
    assert request(server, "GET", "/api/slides/S9/dz.dzi")[0] == 404
    meta = json.loads(request(server, "GET", "/api/slides/S1")[1])
    assert meta["image"]["dzi"] == "/api/slides/S1/dz.dzi"


def test_vendored_viewer_is_intact_and_served(server: ReviewServer) -> None:
    """OpenSeadragon from npm, unmodified: every file matches manifest.json; its licence ships and is served."""
    from pipeline.review.assets import VENDOR_DIR, read_manifest, verify_vendored

    assert verify_vendored() == []
    m = read_manifest()
    assert m["package"] == "openseadragon" and m["integrity"].startswith("sha512-") and m["license"] == "BSD-3-Clause"
    st, body = request(server, "GET", "/static/vendor/openseadragon/LICENSE.txt")
    assert st == 200 and b"Redistribution and use" in body
    st, body = request(server, "GET", "/static/vendor/openseadragon/openseadragon.min.js")
    assert st == 200 and body == (VENDOR_DIR / "openseadragon.min.js").read_bytes()
    assert request(server, "GET", "/static/vendor/openseadragon/images/home_rest.png")[0] == 200
    assert request(server, "GET", "/static/vendor/openseadragon/manifest.json")[0] == 404  # not a served type
    st, page = request(server, "GET", "/slide/S1")
    assert b"/static/vendor/openseadragon/openseadragon.min.js" in page and b"//cdn" not in page.lower()


def test_tile_latency(server: ReviewServer) -> None:
    """Distinct Deep Zoom tiles (each read and encoded) on one keep-alive connection: median well under 50 ms.

    Small answers must not wait for a delayed ACK (Nagle): an API call is a few ms, not ~40.
    """
    import statistics
    import time

    port = server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(path: str) -> float:
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, path
        return 1000 * (time.perf_counter() - t0)

    get("/api/slides/S1/dz/0/0_0.jpg")  # opens the slide
    tiles = [(lv, c, r) for lv in (9, 10, 11) for c in range(7) for r in range(5)]
    tiles = [(lv, c, r) for lv, c, r in tiles if c * 254 < 1600 / 2 ** (11 - lv) and r * 254 < 1200 / 2 ** (11 - lv)]
    assert len(tiles) == 4 + 12 + 35  # the grids of levels 9 (2x2), 10 (4x3) and 11 (7x5)
    ms = [get(f"/api/slides/S1/dz/{lv}/{c}_{r}.jpg") for lv, c, r in tiles]
    api = [get("/api/info") for _ in range(15)]
    conn.close()
    assert statistics.median(ms) < 50, ms
    assert statistics.median(api) < 20, api


def test_cli_serves_on_loopback_and_stops_on_ctrl_c(out_dir: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.review", str(out_dir), "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("review: http://127.0.0.1:"), line
        port = int(line.split()[1].rstrip("/").rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/slides")
        r = conn.getresponse()
        assert r.status == 200 and [row["slide_id"] for row in json.loads(r.read())] == ["S1", "S2"]
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
