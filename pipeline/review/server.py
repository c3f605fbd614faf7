"""The review web app: a standard-library HTTP server over one batch output folder.

Pages: ``/`` (worklist) and ``/slide/<slide_id>`` (viewer); ``/static/<name>`` serves the files of
``pipeline/review/static`` listed at start-up. JSON API under ``/api/slides``; Deep Zoom tiles at
``/api/slides/<slide_id>/dz/<level>/<col>_<row>.jpg``.

Security (a local tool holding patient images):

* binds 127.0.0.1 by default; the ``Host`` header must name the address served (DNS rebinding);
* clients name slides by id only: a URL segment is percent-decoded once and looked up in the
  output folder's listing or the static listing; nothing from a URL is joined to a path;
* writes (POST) need the per-launch token (``X-Review-Token``, given to the pages in a meta tag),
  a JSON body of at most 1 MiB and, when the browser sends ``Origin``, the same origin; they go only
  to ``OUT/<slide_id>/review.geojson`` and ``review.json`` (atomic);
* errors are one-line JSON ``{"error": ...}``; never a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import secrets
import socket
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline import DEMO_MODEL_LABEL
from pipeline.core.errors import PipelineError
from pipeline.outputs._html import DECISION_SUPPORT_DISCLAIMER
from pipeline.review.catalog import LAYERS, PATTERNS, OutputFolder, SlideEntry, read_tiles, read_tissue
from pipeline.review.deepzoom import DeepZoom
from pipeline.review.store import REVIEW_CLASSES, Review, load_review, save_review

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
MAX_BODY = 1 << 20
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_DZ_TILE = re.compile(r"^(\d{1,2})$"), re.compile(r"^(\d{1,6})_(\d{1,6})\.jpg$")


class HttpError(Exception):
    """An answer other than 200: status and a one-line message for the client."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ReviewApp:
    """State shared by the request threads: the folder, the token, open slides, per-slide write locks."""

    def __init__(self, folder: OutputFolder, max_open_slides: int = 4) -> None:
        self.folder = folder
        self.token = secrets.token_urlsafe(24)
        self.static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _TYPES}
        self._open: OrderedDict[str, DeepZoom] = OrderedDict()
        self._open_lock = threading.Lock()
        self._max_open = max_open_slides
        self._write_locks: dict[str, threading.Lock] = {k: threading.Lock() for k in folder.slides}
        self.allowed_hosts: set[str] = set()

    def allow(self, host: str, port: int) -> None:
        """Accept ``Host`` headers naming this address (and the loopback names when bound to loopback)."""
        names = {host} | (LOOPBACK if host in LOOPBACK or host in ("", "0.0.0.0", "::") else set())
        for n in names:
            n = f"[{n}]" if ":" in n else n
            self.allowed_hosts |= {f"{n}:{port}".lower()}

    # -- slides ---------------------------------------------------------------------------------
    def entry(self, slide_id: str) -> SlideEntry:
        e = self.folder.get(slide_id)
        if e is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such slide in this output folder")
        return e

    def deepzoom(self, key: str) -> DeepZoom:
        """The open slide of listing key ``key`` (opened on first use, a few kept open)."""
        with self._open_lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        entry = self.entry(key)
        path = self.folder.slide_path(entry)
        if path is None:
            where = entry.result.slide_path if entry.result else None
            raise HttpError(
                HTTPStatus.NOT_FOUND,
                f"slide file not found ({where or 'no path recorded'}); start the review with --slides-root DIR",
            )
        mpp = entry.result.mpp.slide if entry.result and entry.result.mpp.source == "override" else None
        dz = DeepZoom(path, mpp=mpp)
        with self._open_lock:
            self._open[key] = dz
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)[1].close()
        return dz

    def info(self) -> dict[str, Any]:
        """The folder's model label (the demo model's "not for clinical use"), the disclaimer."""
        return {
            "root": str(self.folder.root),
            "model_label": self.folder.model_label,
            "demo_label": DEMO_MODEL_LABEL,
            "disclaimer": DECISION_SUPPORT_DISCLAIMER,
        }

    def worklist(self) -> list[dict[str, Any]]:
        rows = []
        for key, e in self.folder.slides.items():
            r = e.result
            try:
                state = load_review(e.folder, e.slide_id).state()
            except PipelineError:
                state = "corrupt"
            rows.append(
                {
                    "key": key,
                    "slide_id": e.slide_id,
                    "status": r.status if r else "unreadable",
                    "band": r.band if r else None,
                    "probability": r.nme_probability if r else None,
                    "flags": (r.quality.flags if r else []),
                    "n_tiles": r.n_tiles if r else 0,
                    "error": (r.error if r else e.error),
                    "review": state,
                }
            )
        return rows

    def slide(self, key: str) -> dict[str, Any]:
        e = self.entry(key)
        r = e.result
        keys = list(self.folder.slides)
        i = keys.index(key)
        out: dict[str, Any] = {
            "key": key,
            "slide_id": e.slide_id,
            "prev": keys[i - 1] if i > 0 else None,
            "next": keys[i + 1] if i + 1 < len(keys) else None,
            "status": r.status if r else "unreadable",
            "error": r.error if r else e.error,
            "band": r.band if r else None,
            "probability": r.nme_probability if r else None,
            "patterns": r.patterns.model_dump() if r and r.patterns else None,
            "flags": r.quality.flags if r else [],
            "reasons": r.quality.reasons if r else [],
            "model_label": (r.model.label if r and r.model else None) or self.folder.model_label,
            "demo_label": DEMO_MODEL_LABEL,
            "disclaimer": DECISION_SUPPORT_DISCLAIMER,
            "thresholds": self.folder.thresholds,
            "patterns_list": list(PATTERNS),
            "layers": list(LAYERS),
            "review_classes": list(REVIEW_CLASSES),
            "mpp": r.mpp.slide if r else None,
            "dimensions": list(r.dimensions_level0) if r and r.dimensions_level0 else None,
        }
        try:
            out["tiles"] = read_tiles(e.folder / "tiles.geojson").to_json()
        except PipelineError as exc:
            out["tiles"], out["tiles_error"] = None, str(exc)
        out["tissue"] = read_tissue(e.folder / "tissue.geojson")
        try:
            out["review"] = load_review(e.folder, e.slide_id).to_json()
        except PipelineError as exc:
            out["review"], out["review_error"] = None, str(exc)
        try:
            info = self.deepzoom(key).info
            out["image"] = info.__dict__
            out["mpp"] = info.mpp
        except (PipelineError, HttpError) as exc:
            out["image"], out["image_error"] = None, str(exc)
        return out

    def write(self, key: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Apply one review edit and save both files; returns the review as the viewer shows it."""
        e = self.entry(key)
        reviewer = str(body.get("reviewer") or "").strip()[:100]
        if not reviewer:
            raise HttpError(HTTPStatus.BAD_REQUEST, "reviewer name missing: enter your name first")
        with self._write_locks[key]:
            try:
                review: Review = load_review(e.folder, e.slide_id)
            except PipelineError as exc:
                raise HttpError(HTTPStatus.CONFLICT, f"{exc}; fix or move it, then reload") from None
            try:
                if action == "tile":
                    x, y, size = (_number(body, k) for k in ("x", "y", "size"))
                    verdict = body.get("verdict")
                    if verdict not in ("confirm", "false_positive", None):
                        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown tile verdict {verdict!r}")
                    prob = body.get("probability")
                    review.mark_tile(
                        str(body.get("pattern")),
                        x,
                        y,
                        size,
                        verdict,
                        reviewer,
                        float(prob) if isinstance(prob, (int, float)) else None,
                    )
                elif action == "region":
                    rings = body.get("rings")
                    if not isinstance(rings, list) or not rings:
                        raise HttpError(HTTPStatus.BAD_REQUEST, "region needs rings: [[[x, y], ...], ...]")
                    review.add_region(str(body.get("class_name")), rings, reviewer)
                elif action == "region-delete":
                    review.remove_region(str(body.get("id")), reviewer)
                elif action == "verdict":
                    review.set_verdict(
                        body.get("verdict"), body.get("band"), str(body.get("note") or "")[:5000], reviewer
                    )
                else:
                    raise HttpError(HTTPStatus.NOT_FOUND, f"unknown review action {action!r}")
            except PipelineError as exc:
                raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
            save_review(e.folder, review)
        return review.to_json()

    def close(self) -> None:
        with self._open_lock:
            for dz in self._open.values():
                dz.close()
            self._open.clear()


def _number(body: dict[str, Any], key: str) -> float:
    v = body.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{key} must be a number (level-0 px)")
    return float(v)


def _segments(raw_path: str) -> list[str]:
    """The URL path's segments, each percent-decoded once; ``.``, ``..``, slashes or NUL inside one: 404."""
    segs = []
    for s in urlsplit(raw_path).path.split("/")[1:]:
        try:
            d = unquote(s, errors="strict") if s else s
        except UnicodeDecodeError:
            raise HttpError(HTTPStatus.NOT_FOUND, "not found") from None
        if d in (".", "..") or any(c in d for c in "/\\\0"):
            raise HttpError(HTTPStatus.NOT_FOUND, "not found")
        segs.append(d)
    if segs and segs[-1] == "":
        segs.pop()
    return segs


class Handler(BaseHTTPRequestHandler):
    """One request. The :class:`ReviewApp` is the server's ``app`` attribute."""

    server: ReviewServer
    protocol_version = "HTTP/1.1"
    server_version = "nme-review"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.client_address[0], *args)

    # -- answers --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _page(self, name: str) -> None:
        app = self.server.app
        text = app.static[name].read_text(encoding="utf-8").replace("{{TOKEN}}", app.token)
        self._send(200, text.encode(), _TYPES[".html"])

    def _guard(self) -> None:
        host = (self.headers.get("Host") or "").lower()
        if host not in self.server.app.allowed_hosts:
            raise HttpError(
                HTTPStatus.MISDIRECTED_REQUEST, "unexpected Host header (this server answers its own address only)"
            )

    def _handle(self, fn: Any) -> None:
        try:
            self._guard()
            fn(_segments(self.path))
        except HttpError as exc:
            self._json({"error": str(exc)}, exc.status)
        except PipelineError as exc:
            self._json({"error": str(exc)}, HTTPStatus.UNPROCESSABLE_ENTITY)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 - one request fails, the server goes on
            log.exception("internal error on %s %s", self.command, self.path[:200])
            self._json({"error": "internal error (see the server log)"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._handle(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._post)

    # -- routes ---------------------------------------------------------------------------------
    def _get(self, seg: list[str]) -> None:
        app = self.server.app
        if seg in ([], ["index.html"]):
            return self._page("worklist.html")
        if len(seg) == 2 and seg[0] == "slide":
            app.entry(seg[1])
            return self._page("viewer.html")
        if len(seg) == 2 and seg[0] == "static" and seg[1] in app.static and not seg[1].endswith(".html"):
            p = app.static[seg[1]]
            return self._send(200, p.read_bytes(), _TYPES[p.suffix], cache="no-cache")
        if seg == ["api", "info"]:
            return self._json(app.info())
        if seg[:2] == ["api", "slides"]:
            if len(seg) == 2:
                return self._json(app.worklist())
            if len(seg) == 3:
                return self._json(app.slide(seg[2]))
            if len(seg) == 6 and seg[3] == "dz":
                lv, cr = _DZ_TILE[0].match(seg[4]), _DZ_TILE[1].match(seg[5])
                if lv and cr:
                    app.entry(seg[2])
                    data = app.deepzoom(seg[2]).tile(int(lv[1]), int(cr[1]), int(cr[2]))
                    return self._send(200, data, "image/jpeg", cache="private, max-age=3600")
        raise HttpError(HTTPStatus.NOT_FOUND, "not found")

    def _post(self, seg: list[str]) -> None:
        app = self.server.app
        token = self.headers.get("X-Review-Token") or ""
        if not hmac.compare_digest(token.encode(), app.token.encode()):
            raise HttpError(HTTPStatus.FORBIDDEN, "missing or wrong review token: reload the page")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{self.headers.get('Host', '').lower()}":
            raise HttpError(HTTPStatus.FORBIDDEN, "cross-origin write refused")
        if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise HttpError(HTTPStatus.FORBIDDEN, "cross-site write refused")
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "writes take application/json")
        try:
            n = int(self.headers.get("Content-Length") or "-1")
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body must be 0-{MAX_BODY} bytes with a Content-Length"
            )
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "body is not JSON") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        if len(seg) == 5 and seg[:2] == ["api", "slides"] and seg[3] == "review":
            return self._json(app.write(seg[2], seg[4], body))
        raise HttpError(HTTPStatus.NOT_FOUND, "not found")


class ReviewServer(ThreadingHTTPServer):
    """The threading HTTP server with its :class:`ReviewApp`."""

    daemon_threads = True

    def __init__(self, app: ReviewApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        app.allow(host, self.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.server_address[1]}/"

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


def make_server(out_dir: Path, host: str = "127.0.0.1", port: int = 0, slides_root: Path | None = None) -> ReviewServer:
    """A review server for ``out_dir`` bound to ``host:port`` (port 0: any free port); not started.

    Raises:
        DataError: ``out_dir`` is not a batch output folder.
    """
    return ReviewServer(ReviewApp(OutputFolder.open(out_dir, slides_root)), host, port)
