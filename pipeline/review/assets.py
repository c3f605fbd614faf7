"""The review app's browser files: ``pipeline/review/static`` and the vendored OpenSeadragon viewer.

OpenSeadragon comes from the npm registry, pinned, unmodified: ``static/vendor/openseadragon/``
holds its minified build, its button images and its licence, and ``manifest.json`` the package
version, the registry's integrity hash of the tarball and the sha256 of every file taken from it.
``python tools/update_openseadragon.py VERSION`` (``make vendor-viewer``) replaces them;
:func:`verify_vendored` checks the files against the manifest (offline, in the tests).

The server serves only the files listed here at start-up (:func:`static_files`), by their path
relative to ``static/``; nothing from a URL is joined to a path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).with_name("static")
VENDOR_DIR = STATIC_DIR / "vendor" / "openseadragon"
MANIFEST = VENDOR_DIR / "manifest.json"
#: Content types of the files the server may send; anything else in ``static/`` is never served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
}
#: OpenSeadragon adds one small ``<style>`` element of its own (a focus outline rule for touch
#: screens); the page's Content-Security-Policy allows exactly that text by its hash.
_INJECTED_STYLE = re.compile(r'"data-openseadragon-mobile-css","true"\);[A-Za-z_$][\w$]*\.textContent="([^"\\]*)"')


def static_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """Every servable file under ``root`` by its path relative to it (``/`` separated)."""
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in CONTENT_TYPES and not p.name.startswith(".")
    }


def read_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    """The vendored viewer's manifest (package, version, integrity, file hashes, CSP style hashes)."""
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def injected_style_hashes(minified_js: str) -> list[str]:
    """CSP source expressions (``'sha256-...'``) for the style text OpenSeadragon injects, if any."""
    out = []
    for text in _INJECTED_STYLE.findall(minified_js):
        digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        out.append(f"'sha256-{digest}'")
    return out


def verify_vendored(vendor_dir: Path = VENDOR_DIR) -> list[str]:
    """Problems with the vendored viewer (a file missing, changed or not in the manifest); empty when intact."""
    manifest = vendor_dir / "manifest.json"
    if not manifest.is_file():
        return [f"{manifest} missing: run `make vendor-viewer`"]
    m = read_manifest(manifest)
    problems = []
    listed: dict[str, str] = m.get("files", {})
    for rel, digest in listed.items():
        p = vendor_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest (edited by hand?)")
    extra = sorted(
        p.relative_to(vendor_dir).as_posix()
        for p in vendor_dir.rglob("*")
        if p.is_file() and p.name != "manifest.json" and p.relative_to(vendor_dir).as_posix() not in listed
    )
    problems += [f"{rel}: not in the manifest" for rel in extra]
    js = vendor_dir / "openseadragon.min.js"
    if js.is_file() and injected_style_hashes(js.read_text(encoding="utf-8")) != m.get("csp_style_hashes", []):
        problems.append("csp_style_hashes: differ from the style text in openseadragon.min.js")
    return problems


def csp_style_hashes() -> list[str]:
    """The manifest's CSP hashes for OpenSeadragon's own style element ([] when nothing is vendored)."""
    try:
        return list(read_manifest().get("csp_style_hashes", []))
    except (OSError, ValueError):
        return []
