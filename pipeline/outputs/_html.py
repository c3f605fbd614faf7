"""Shared pieces of the self-contained HTML outputs (report and index): escaping, formatting, CSS.

Every page is one file that works offline from disk: inline CSS and JS, images as ``data:``
URIs, system fonts only, and a Content-Security-Policy that forbids any network request.
All text taken from results goes through :func:`esc` (slide ids and clinical text are untrusted).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

#: Shown on every page, whatever the rule set says.
DECISION_SUPPORT_DISCLAIMER = (
    "Decision support only, not a diagnosis. These results come from a machine-learning model "
    "and a rule layer applied to a digital slide. A qualified pathologist must review the slide "
    "itself, and the treating clinician decides on any investigation or order."
)

#: Used when a result carries no ``calibration_note``.
DEFAULT_CALIBRATION_NOTE = (
    "Calibrated on out-of-fold validation: a probability of 0.8 means that about 8 in 10 similar "
    "slides showed the pattern."
)

DASH = "\u2014"

#: No network at all: images only from data: URIs, inline style and script only.
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def esc(value: Any) -> str:
    """HTML-escape any value's text (quotes included); ``None`` and empty text become an em dash."""
    if value is None:
        return DASH
    text = str(value)
    return html.escape(text, quote=True) if text.strip() else DASH


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` as a dict: a mapping as is, a pydantic model (e.g. a :class:`~pipeline.result.SlideResult`)
    in its JSON form, anything else an empty dict (tolerates missing/None sections)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return dict(value) if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` as a list: lists/tuples as is, a single non-empty scalar wrapped, None -> []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and not value.strip():
        return []
    return [value]


def as_float(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / infinite values (bools refused)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_num(value: Any, fmt: str = ".2f") -> str:
    """Format a number (already safe HTML) or an em dash when it is not a finite number."""
    f = as_float(value)
    return DASH if f is None else format(f, fmt)


def data_uri(data: bytes | None) -> str | None:
    """``data:`` URI for PNG/JPEG/GIF/WebP bytes (type sniffed from the magic number); None if empty."""
    parts = data_uri_parts(data)
    return None if parts is None else (parts[0] + parts[1]).decode("ascii")


def data_uri_parts(data: bytes | None) -> tuple[bytes, bytes] | None:
    """:func:`data_uri` as ASCII bytes in two parts, ``data:<type>;base64,`` and the base64 text.

    For writers that assemble a file's bytes: the (large) base64 text is joined in as it is, with
    no str copy of it.
    """
    if not data:
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    else:
        raise ValueError("image bytes are not PNG, JPEG, GIF or WebP")
    return f"data:{mime};base64,".encode("ascii"), base64.b64encode(data)


def plain_text(value: Any) -> str:
    """Readable one-line text of a str / list / dict value (NOT escaped)."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {plain_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(plain_text(v) for v in value)
    return str(value)


def rich_text(value: Any) -> str:
    """Escaped HTML for free text: a list becomes a bullet list, a dict ``key: value`` lines."""
    if isinstance(value, (list, tuple)):
        items = [v for v in value if v is not None and str(v).strip()]
        if not items:
            return DASH
        if len(items) == 1:
            return rich_text(items[0])
        return '<ul class="plain">' + "".join(f"<li>{rich_text(v)}</li>" for v in items) + "</ul>"
    if isinstance(value, Mapping):
        return "<br>".join(f'<span class="k">{esc(k)}:</span> {esc(plain_text(v))}' for k, v in value.items()) or DASH
    return esc(value)


#: Priority (FHIR ServiceRequest.priority) -> rank (most urgent first).
PRIORITY_RANK = {"stat": 0, "asap": 1, "urgent": 2, "routine": 3}


def priority_class(priority: Any) -> str:
    p = str(priority or "").strip().lower()
    classes = {"stat": "prio-stat", "asap": "prio-stat", "urgent": "prio-urgent", "routine": "prio-routine"}
    return classes.get(p, "prio-other")


def band_class(band: Any) -> str:
    b = str(band or "").strip().upper()
    return {"HIGH": "band-high", "INDETERMINATE": "band-ind", "LOW": "band-low"}.get(b, "band-none")


def status_class(status: Any) -> str:
    s = str(status or "").strip().lower()
    return {"ok": "st-ok", "non_diagnostic": "st-nd", "failed": "st-failed"}.get(s, "st-other")


def is_demo_label(label: Any) -> bool:
    """True for a model label that says the model must not be used clinically."""
    text = str(label or "").lower()
    return "not for clinical use" in text or "synthetic" in text


BASE_CSS = """
:root{--ink:#1d2433;--muted:#5b6475;--line:#dfe3ea;--bg:#f4f5f8;--card:#fff;--accent:#2c4a7a;
--red:#b42318;--red-bg:#fef3f2;--amber:#b54708;--amber-bg:#fffaeb;--green:#067647;--green-bg:#ecfdf3;}
*{box-sizing:border-box}
html{font-size:15px}
body{margin:0;background:var(--bg);color:var(--ink);
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif;line-height:1.45}
.mono,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.92em}
header.top{background:#1f2a3d;color:#fff;padding:14px 28px;display:flex;align-items:center;gap:18px;flex-wrap:wrap}
header.top .brand{font-size:.8rem;letter-spacing:.08em;text-transform:uppercase;color:#aeb9cc;width:100%}
header.top h1{font-size:1.45rem;margin:0;font-weight:600;word-break:break-all}
main{max-width:1320px;margin:0 auto;padding:18px 28px 40px}
.banner{border-radius:8px;padding:10px 14px;margin:0 0 12px;border:1px solid;font-size:.95rem}
.banner strong{margin-right:.35em}
.banner-danger{background:var(--red-bg);border-color:#f5b8b1;color:#7a1a10}
.banner-warn{background:var(--amber-bg);border-color:#f7d58c;color:#7a3306}
.banner-info{background:#eff4ff;border-color:#c3d4f7;color:#1f3d7a}
.banner-demo{background:var(--red);border-color:var(--red);color:#fff;font-size:1.05rem;font-weight:600}
.grid{display:grid;grid-template-columns:minmax(0,1.75fr) minmax(300px,1fr);gap:16px;align-items:start}
@media (max-width:980px){.grid{grid-template-columns:1fr}}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin-bottom:16px;
box-shadow:0 1px 2px rgba(16,24,40,.05)}
.card h2{font-size:1.05rem;margin:0 0 10px;color:var(--accent);font-weight:650}
.card h3{font-size:.95rem;margin:14px 0 8px;color:var(--ink)}
.muted{color:var(--muted)}
.small{font-size:.85rem}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;padding:7px 9px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#f0f2f6;font-weight:600;color:#344054;font-size:.85rem}
tr:last-child td{border-bottom:none}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.pill{display:inline-block;border-radius:999px;padding:2px 10px;font-size:.8rem;font-weight:650;letter-spacing:.02em;
border:1px solid transparent;white-space:nowrap}
.st-ok{background:var(--green-bg);color:var(--green);border-color:#abefc6}
.st-nd{background:var(--amber-bg);color:var(--amber);border-color:#fedf89}
.st-failed{background:var(--red-bg);color:var(--red);border-color:#fecdca}
.st-other{background:#f2f4f7;color:#344054;border-color:#d0d5dd}
.band-high{background:var(--red);color:#fff}
.band-ind{background:#f79009;color:#fff}
.band-low{background:#12b76a;color:#fff}
.band-none{background:#f2f4f7;color:#475467;border-color:#d0d5dd}
.prio-stat{background:var(--red);color:#fff}
.prio-urgent{background:#f79009;color:#fff}
.prio-routine{background:#eaecf0;color:#344054}
.prio-other{background:#f2f4f7;color:#475467}
.chip{display:inline-block;background:#f2f4f7;border:1px solid #d0d5dd;border-radius:6px;padding:1px 7px;
margin:1px 3px 1px 0;
font-size:.82rem}
.chip-warn{background:var(--amber-bg);border-color:#fedf89;color:#7a3306}
ul.plain{margin:0;padding-left:1.1em}
.k{color:var(--muted)}
footer{color:var(--muted);font-size:.8rem;text-align:center;padding:10px 0 24px}
.disclaimer{border-left:4px solid var(--amber);background:var(--amber-bg)}
@media print{body{background:#fff}.card{box-shadow:none;break-inside:avoid}header.top{background:#fff;color:#000}
header.top .brand{color:#444}}
"""


def page(title: str, body: str, css: str = "", script: str = "") -> str:
    """A complete HTML document (``title`` is escaped here; ``body``/``css``/``script`` are trusted HTML)."""
    js = f"<script>{script}</script>" if script else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{esc(title)}</title>\n<style>{BASE_CSS}{css}</style>\n</head>\n"
        f"<body>\n{body}\n{js}\n</body>\n</html>\n"
    )
