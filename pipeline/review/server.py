"""The review web app: a Starlette (ASGI) app over one batch output folder, served by uvicorn.

Pages: ``/`` (worklist) and ``/slide/<slide_id>`` (viewer); ``/static/<path>`` serves the files of
``pipeline/review/static`` listed at start-up (the vendored OpenSeadragon viewer among them, see
:mod:`pipeline.review.assets`). JSON API under ``/api/slides``; Deep Zoom: the DZI descriptor at
``/api/slides/<slide_id>/dz.dzi``, tiles at ``/api/slides/<slide_id>/dz/<level>/<col>_<row>.jpg``.

Security (a local tool holding patient images), enforced by :class:`Guard` before any route runs:

* binds 127.0.0.1 by default; the ``Host`` header must name the address served (DNS rebinding);
* clients name slides by id only: each segment of the raw URL path is percent-decoded once and
  refused (404) when it is ``.``, ``..`` or holds a slash, backslash or NUL; routes then look the
  segment up in the output folder's listing or the static listing; nothing from a URL is joined
  to a path;
* writes (POST) need the per-launch token (``X-Review-Token``, given to the pages in a meta tag),
  a JSON body of at most 1 MiB with a ``Content-Length`` and, when the browser sends ``Origin``,
  the same origin; they go only to ``OUT/<slide_id>/review.geojson`` and ``review.json`` (atomic);
* errors are one-line JSON ``{"error": ...}``; never a traceback.

Blocking work (slide reads, JPEG encoding, review files) runs in Starlette's thread pool.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import math
import re
import secrets
import socket
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote
from xml.sax.saxutils import quoteattr

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline import DEMO_MODEL_LABEL
from pipeline.core.errors import PipelineError
from pipeline.outputs._html import DECISION_SUPPORT_DISCLAIMER
from pipeline.review.assets import CONTENT_TYPES, STATIC_DIR, csp_style_hashes, static_files
from pipeline.review.catalog import LAYERS, PATTERNS, OutputFolder, SlideEntry, read_tiles, read_tissue
from pipeline.review.deepzoom import DeepZoom
from pipeline.review.store import REVIEW_CLASSES, Review, load_review, save_review

log = logging.getLogger(__name__)

__all__ = ["LOOPBACK", "MAX_BODY", "STATIC_DIR", "HttpError", "ReviewApp", "ReviewServer", "make_server"]

MAX_BODY = 1 << 20
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src {styles}; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_DZ_LEVEL, _DZ_TILE = re.compile(r"^(\d{1,2})$"), re.compile(r"^(\d{1,6})_(\d{1,6})\.jpg$")


class HttpError(Exception):
    """An answer other than 200: status and a one-line message for the client."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ReviewApp:
    """State shared by the request threads: the folder, the token, open slides, per-slide write locks.

    :attr:`asgi` is the ASGI application (Starlette routes behind :class:`Guard`).
    """

    def __init__(self, folder: OutputFolder, max_open_slides: int = 4) -> None:
        self.folder = folder
        self.token = secrets.token_urlsafe(24)
        self.static = static_files()
        # 'self' plus the hash of the one style element OpenSeadragon adds (assets.csp_style_hashes)
        self.csp = _CSP.format(styles=" ".join(["'self'", *csp_style_hashes()]))
        self._open: OrderedDict[str, DeepZoom] = OrderedDict()
        self._open_lock = threading.Lock()
        self._max_open = max_open_slides
        self._write_locks: dict[str, threading.Lock] = {k: threading.Lock() for k in folder.slides}
        self.allowed_hosts: set[str] = set()
        self.asgi: ASGIApp = Guard(_starlette(self), self)

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
            if key in self._open:  # another thread opened it meanwhile: keep that one
                dz.close()
                return self._open[key]
            self._open[key] = dz
            while len(self._open) > self._max_open:
                self._open.popitem(last=False)[1].close()
        return dz

    def dzi(self, key: str) -> str:
        """The Deep Zoom descriptor (DZI XML) of a slide; its ``Url`` points at this server's tile route."""
        info = self.deepzoom(key).info
        url = f"/api/slides/{quote(key, safe='')}/dz/"
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpg" Overlap="{info.overlap}" '
            f'TileSize="{info.tile_size}" Url={quoteattr(url)}><Size Width="{info.width}" Height="{info.height}"/></Image>\n'
        )

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
            out["image"]["dzi"] = f"/api/slides/{quote(key, safe='')}/dz.dzi"
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


def _segments(raw_path: bytes) -> list[str]:
    """The raw URL path's segments, each percent-decoded once; ``.``, ``..``, slashes or NUL inside one: 404."""
    try:
        text = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.NOT_FOUND, "not found") from None
    segs = []
    for s in text.split("/")[1:]:
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


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, allow_nan=False).encode(), status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


class Guard:
    """ASGI middleware in front of every route: Host check, path-segment check, security headers.

    A request passes only with an allowed ``Host`` (else 421) and a raw path whose segments decode
    cleanly (else 404); its ``path`` is then rebuilt from the decoded segments, so the routes see
    exactly the segments checked here. Every answer gets ``nosniff``, ``no-referrer``, the
    Content-Security-Policy and, unless the route set one, ``Cache-Control: no-store``.
    """

    def __init__(self, app: ASGIApp, review: ReviewApp) -> None:
        self.app = app
        self.review = review

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are not served
            return
        csp = self.review.csp.encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
                names = {k.lower() for k, _ in headers}
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", csp),
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            host = next((v for k, v in scope["headers"] if k == b"host"), b"").decode("latin-1").lower()
            if host not in self.review.allowed_hosts:
                raise HttpError(
                    HTTPStatus.MISDIRECTED_REQUEST, "unexpected Host header (this server answers its own address only)"
                )
            segs = _segments(scope.get("raw_path") or scope["path"].encode("ascii", "replace"))
        except HttpError as exc:
            await _error(exc.status, str(exc))(scope, receive, send_with_headers)
            return
        scope = {**scope, "path": "/" + "/".join(segs), "root_path": ""}
        await self.app(scope, receive, send_with_headers)


Endpoint = Callable[[ReviewApp, Request], Any]


def _endpoint(fn: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """A route handler from ``fn(app, request)``: a sync ``fn`` runs in the thread pool; errors become one-line JSON."""
    is_async = inspect.iscoroutinefunction(fn)

    async def endpoint(request: Request) -> Response:
        app: ReviewApp = request.app.state.review
        try:
            if is_async:
                result = await fn(app, request)
            else:
                result = await run_in_threadpool(fn, app, request)
            return result if isinstance(result, Response) else _json(result)
        except HttpError as exc:
            return _error(exc.status, str(exc))
        except PipelineError as exc:
            return _error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
        except Exception:  # noqa: BLE001 - one request fails, the server goes on
            log.exception("internal error on %s %s", request.method, request.url.path[:200])
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server log)")

    endpoint.__name__ = fn.__name__
    return endpoint


# -- routes -------------------------------------------------------------------------------------
def _page(app: ReviewApp, name: str) -> Response:
    text = app.static[name].read_text(encoding="utf-8").replace("{{TOKEN}}", app.token)
    return Response(text.encode(), media_type=CONTENT_TYPES[".html"])


def worklist_page(app: ReviewApp, request: Request) -> Response:
    return _page(app, "worklist.html")


def viewer_page(app: ReviewApp, request: Request) -> Response:
    app.entry(request.path_params["key"])
    return _page(app, "viewer.html")


def static_file(app: ReviewApp, request: Request) -> Response:
    rel = request.path_params["rel"]
    p = app.static.get(rel)
    if p is None or p.suffix == ".html":  # pages are served through their routes only (with the token)
        raise HttpError(HTTPStatus.NOT_FOUND, "not found")
    return Response(p.read_bytes(), media_type=CONTENT_TYPES[p.suffix], headers={"Cache-Control": "no-cache"})


def api_info(app: ReviewApp, request: Request) -> Any:
    return app.info()


def api_worklist(app: ReviewApp, request: Request) -> Any:
    return app.worklist()


def api_slide(app: ReviewApp, request: Request) -> Any:
    return app.slide(request.path_params["key"])


def api_dzi(app: ReviewApp, request: Request) -> Response:
    key = request.path_params["key"]
    app.entry(key)
    return Response(app.dzi(key).encode(), media_type="application/xml", headers={"Cache-Control": "no-cache"})


def api_tile(app: ReviewApp, request: Request) -> Response:
    p = request.path_params
    lv, cr = _DZ_LEVEL.match(p["level"]), _DZ_TILE.match(p["tile"])
    if not (lv and cr):
        raise HttpError(HTTPStatus.NOT_FOUND, "not found")
    app.entry(p["key"])
    data = app.deepzoom(p["key"]).tile(int(lv[1]), int(cr[1]), int(cr[2]))
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def api_write(app: ReviewApp, request: Request) -> Any:
    h = request.headers
    if not hmac.compare_digest((h.get("x-review-token") or "").encode(), app.token.encode()):
        raise HttpError(HTTPStatus.FORBIDDEN, "missing or wrong review token: reload the page")
    origin = h.get("origin")
    if origin is not None and origin.lower() != f"http://{h.get('host', '').lower()}":
        raise HttpError(HTTPStatus.FORBIDDEN, "cross-origin write refused")
    if h.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HttpError(HTTPStatus.FORBIDDEN, "cross-site write refused")
    if not (h.get("content-type") or "").startswith("application/json"):
        raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "writes take application/json")
    try:
        n = int(h.get("content-length") or "-1")
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_BODY:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body must be 0-{MAX_BODY} bytes with a Content-Length")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > n:
            raise HttpError(HTTPStatus.BAD_REQUEST, "body longer than its Content-Length")
    try:
        body = json.loads(bytes(raw) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HttpError(HTTPStatus.BAD_REQUEST, "body is not JSON") from None
    if not isinstance(body, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    p = request.path_params
    return await run_in_threadpool(app.write, p["key"], p["action"], body)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 (no route, wrong method) as one-line JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = "not found" if status == 404 else "method not allowed" if status == 405 else HTTPStatus(status).phrase
    headers = getattr(exc, "headers", None) or {}
    r = _error(status, message)
    r.headers.update(headers)
    return r


def _starlette(app: ReviewApp) -> Starlette:
    get = ["GET"]  # HEAD is added by Starlette
    routes = [
        Route("/", _endpoint(worklist_page), methods=get),
        Route("/index.html", _endpoint(worklist_page), methods=get),
        Route("/slide/{key}", _endpoint(viewer_page), methods=get),
        Route("/static/{rel:path}", _endpoint(static_file), methods=get),
        Route("/api/info", _endpoint(api_info), methods=get),
        Route("/api/slides", _endpoint(api_worklist), methods=get),
        Route("/api/slides/{key}", _endpoint(api_slide), methods=get),
        Route("/api/slides/{key}/dz.dzi", _endpoint(api_dzi), methods=get),
        Route("/api/slides/{key}/dz/{level}/{tile}", _endpoint(api_tile), methods=get),
        Route("/api/slides/{key}/review/{action}", _endpoint(api_write), methods=["POST"]),
    ]
    star = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    star.router.redirect_slashes = False  # the Guard already dropped a trailing slash
    star.state.review = app
    return star


# -- the server ---------------------------------------------------------------------------------
class ReviewServer:
    """uvicorn serving a :class:`ReviewApp` on a socket bound (and listening) at construction.

    The interface of the standard library's servers, which the tests and the CLI use:
    :meth:`serve_forever` (blocks; from any thread), :meth:`shutdown` (from another thread; waits
    until it returned), :meth:`server_close`, :attr:`server_address`, :attr:`url`.
    """

    def __init__(self, app: ReviewApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.socket = _listen(host, port)
        name = self.socket.getsockname()
        self.server_address: tuple[str, int] = (str(name[0]), int(name[1]))
        app.allow(host, self.server_address[1])
        config = uvicorn.Config(
            app.asgi,
            http="h11",
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,
            log_level=logging.WARNING,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
        self._uvicorn = uvicorn.Server(config)
        self._done = threading.Event()
        self._done.set()

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.server_address[1]}/"

    def serve_forever(self, poll_interval: float = 0.1) -> None:
        """Serve until :meth:`shutdown` (or, in the main thread, Ctrl-C / SIGTERM). ``poll_interval``: unused."""
        self._done.clear()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        self._done.wait(timeout=10)

    def server_close(self) -> None:
        self.socket.close()
        self.app.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``SO_REUSEADDR``, as the standard library's servers).

    Created with ``IPPROTO_TCP`` named: asyncio sets ``TCP_NODELAY`` only on connections of such a
    socket, and without it a response written as headers then body waits ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(out_dir: Path, host: str = "127.0.0.1", port: int = 0, slides_root: Path | None = None) -> ReviewServer:
    """A review server for ``out_dir`` bound to ``host:port`` (port 0: any free port); not started.

    Raises:
        DataError: ``out_dir`` is not a batch output folder.
        OSError: the address cannot be bound (a port in use).
    """
    return ReviewServer(ReviewApp(OutputFolder.open(out_dir, slides_root)), host, port)
