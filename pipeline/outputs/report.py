"""One self-contained HTML report per slide, for the reviewing pathologist.

The file works offline opened from disk: inline CSS/JS, images as base64 ``data:`` URIs, system
fonts, and a Content-Security-Policy that blocks every network request. All text from the result
is HTML-escaped. A ``failed`` or ``non_diagnostic`` result renders too: the reason is shown,
the probability is not, and no overlay or tile gallery is drawn.

Result dict read by :func:`write_report` (every key optional except that a missing key renders
as "—"; unexpected types are tolerated, never a crash):

* ``slide_id`` (str), ``status`` (``ok`` | ``non_diagnostic`` | ``failed``), ``error`` (str|None)
* ``nme_probability`` (float 0-1 | None): calibrated slide NME-pattern probability
* ``band`` (``LOW`` | ``INDETERMINATE`` | ``HIGH`` | None)
* ``calibration_note`` (str, optional): replaces :data:`DEFAULT_CALIBRATION_NOTE`
* ``patterns``: ``{pallor, necrolysis, parakeratosis}`` -> slide-level score (float 0-1)
* ``n_tiles`` (int); ``mpp``: ``{slide, requested, effective, source}`` (µm/px; source = where
  the level-0 value came from)
* ``tissue`` (optional): ``{area_mm2, fraction, flags: [str]}`` — tissue flags join the quality flags
* ``reader``, ``dimensions_level0`` ([w, h] level-0 px), ``fingerprint`` (optional): slide details
* ``quality``: ``{flags: [str], reasons: [str]}``
* ``recommendations`` (the output of :func:`pipeline.clinical.rules.recommend`, or None): ``{orders: [{id,
  display, category, priority, code: {system, code, display}|None, code_verified: bool,
  additional_codes: [code], rules: [str], rationale: str|[str], note}], differential: [{entity
  or name, why: str|[str], rules}], flags: [str | {id, message, rules}], notes: [str],
  clinical_context: {field: value}, evidence: {key: citation}, disclaimer: str,
  ruleset_version: str}``. Orders are shown most urgent first; a rationale shared by several
  orders is printed once.
* ``model``: ``{name, version, sha256, label}`` — a label is shown as a banner at the top
* ``timings``: ``{stage: seconds}``; ``versions``: ``{package: version}``
* ``created_at`` (str, optional): shown in the footer when present
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core.io import atomic_write_bytes
from pipeline.outputs._html import (
    DASH,
    DECISION_SUPPORT_DISCLAIMER,
    DEFAULT_CALIBRATION_NOTE,
    PRIORITY_RANK,
    as_dict,
    as_float,
    as_list,
    band_class,
    data_uri,
    data_uri_parts,
    esc,
    fmt_num,
    is_demo_label,
    page,
    plain_text,
    priority_class,
    rich_text,
    status_class,
)
from pipeline.result import SlideResult

log = logging.getLogger(__name__)

PATTERN_ORDER = ("pallor", "necrolysis", "parakeratosis")

#: An image's ``src`` from its bytes: :func:`data_uri`, or the stand-in of :func:`write_report`; None = no image.
_ImageSrc = Callable[[Any], str | None]
#: Stands for an image's data URI in the text :func:`write_report` renders ("<" never comes out of ``esc``).
_IMAGE_MARK = "<nme-report-image>"

_CSS = """
.summary .prob{display:flex;align-items:center;gap:14px;flex-wrap:wrap}
.summary .prob-label{font-size:.85rem;color:var(--muted);width:100%;text-transform:uppercase;letter-spacing:.05em}
.summary .prob-value{font-size:2.6rem;font-weight:700;line-height:1;font-variant-numeric:tabular-nums}
.summary .band{font-size:1rem;padding:4px 14px}
.meter{position:relative;height:10px;border-radius:5px;background:linear-gradient(90deg,#e4f6ec,#fff4dc,#fde2df);
border:1px solid var(--line);margin:12px 0 4px}
.meter .mark{position:absolute;top:-5px;width:3px;height:18px;background:var(--ink);border-radius:2px}
.meter-scale{display:flex;justify-content:space-between;font-size:.75rem;color:var(--muted)}
.calib{font-size:.85rem;color:var(--muted);margin:10px 0 0}
dl.facts{display:grid;grid-template-columns:auto 1fr;gap:4px 12px;margin:12px 0 0;font-size:.9rem}
dl.facts dt{color:var(--muted)} dl.facts dd{margin:0}
.ov-buttons{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:10px}
.ov-btn{font:inherit;font-size:.88rem;border:1px solid #c4cbd8;background:#fff;color:var(--ink);border-radius:7px;
padding:5px 12px;cursor:pointer}
.ov-btn:hover{background:#f0f3f9}
.ov-btn.active{background:var(--accent);border-color:var(--accent);color:#fff}
.ov-btn:focus-visible{outline:3px solid #9db7e5;outline-offset:1px}
.ov-stage{background:#fafbfc;border:1px solid var(--line);border-radius:8px;padding:8px;text-align:center;
min-height:200px}
.ov-fig{margin:0}
.ov-fig img{max-width:100%;max-height:78vh;height:auto;display:inline-block}
.ov-fig figcaption{font-size:.82rem;color:var(--muted);margin-top:6px}
.placeholder{padding:60px 10px;color:var(--muted)}
.bar{background:#eef0f4;border-radius:4px;height:8px;min-width:80px;position:relative;overflow:hidden}
.bar>span{position:absolute;left:0;top:0;bottom:0;background:#3b5b92;border-radius:4px}
.gallery-group{margin-bottom:6px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tile{margin:0;width:150px;border:1px solid var(--line);border-radius:8px;overflow:hidden;background:#fff}
.tile img{width:150px;height:150px;object-fit:cover;display:block;background:#eee}
.tile figcaption{padding:5px 7px;font-size:.78rem;line-height:1.35}
.tile .score{font-weight:700;font-size:.9rem}
.sha{word-break:break-all}
.code+.code{margin-top:6px}
ul.flags li{margin-bottom:4px}
.kv td:first-child{color:var(--muted);width:34%}
@media print{.ov-buttons{display:none}.ov-fig[hidden]{display:block!important}}
"""

_JS = """
(function(){
  var btns = Array.prototype.slice.call(document.querySelectorAll('.ov-btn'));
  var figs = Array.prototype.slice.call(document.querySelectorAll('.ov-fig'));
  function show(key){
    btns.forEach(function(b){ var on = b.getAttribute('data-ov') === key;
      b.classList.toggle('active', on); b.setAttribute('aria-pressed', on ? 'true' : 'false'); });
    figs.forEach(function(f){ f.hidden = f.getAttribute('data-ov') !== key; });
  }
  btns.forEach(function(b){ b.addEventListener('click', function(){ show(b.getAttribute('data-ov')); }); });
  document.addEventListener('keydown', function(e){
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    var t = e.target && e.target.tagName; if (t === 'INPUT' || t === 'TEXTAREA') return;
    var i = parseInt(e.key, 10); if (i >= 1 && i <= btns.length) show(btns[i - 1].getAttribute('data-ov'));
  });
})();
"""


def _pretty(name: Any) -> str:
    text = str(name).replace("_", " ").strip()
    return text[:1].upper() + text[1:] if text else DASH


def _is_ok(result: Mapping[str, Any]) -> bool:
    return str(result.get("status") or "").strip().lower() == "ok"


def _banners(result: Mapping[str, Any]) -> str:
    parts = []
    model = as_dict(result.get("model"))
    label = model.get("label")
    if label is not None and str(label).strip():
        cls = "banner-demo" if is_demo_label(label) else "banner-warn"
        parts.append(
            f'<div class="banner {cls}" id="model-label" role="alert"><strong>Model:</strong>{esc(label)}</div>'
        )
    status = str(result.get("status") or "").strip().lower()
    if status != "ok":
        quality = as_dict(result.get("quality"))
        reasons = [r for r in as_list(quality.get("reasons")) if str(r).strip()]
        error = result.get("error")
        if status == "failed":
            head, cls = "Processing failed.", "banner-danger"
        elif status == "non_diagnostic":
            head, cls = "Non-diagnostic slide: no probability is reported.", "banner-warn"
        else:
            head, cls = f"Status {status or 'unknown'}: no probability is reported.", "banner-warn"
        detail = []
        if error is not None and str(error).strip():
            detail.append(f'<div><span class="k">Reason:</span> {esc(error)}</div>')
        if reasons:
            detail.append('<ul class="plain">' + "".join(f"<li>{esc(r)}</li>" for r in reasons) + "</ul>")
        if not detail:
            detail.append("<div>No reason was recorded.</div>")
        parts.append(
            f'<div class="banner {cls}" id="status-reason" role="alert">'
            f"<strong>{esc(head)}</strong>{''.join(detail)}</div>"
        )
    parts.append(f'<div class="banner banner-info disclaimer-top">{esc(DECISION_SUPPORT_DISCLAIMER)}</div>')
    return "\n".join(parts)


def _resolution(mpp: Mapping[str, Any]) -> str:
    """``0.5 µm/px effective (requested 0.5, slide 0.25)``; missing parts left out."""
    eff = as_float(mpp.get("effective"))
    extra = [f"{k} {fmt_num(mpp.get(k), '.4g')}" for k in ("requested", "slide") if as_float(mpp.get(k)) is not None]
    head = f"{eff:.4g} µm/px effective" if eff is not None else DASH
    return head + (f' <span class="muted">({", ".join(extra)} µm/px)</span>' if extra else "")


def _tissue(tissue: Any) -> str:
    """``12.4 mm² (4.1 % of the slide)`` from ``result["tissue"]`` = {area_mm2, fraction}; — if absent."""
    t = as_dict(tissue)
    area, frac = as_float(t.get("area_mm2")), as_float(t.get("fraction"))
    if area is None and frac is None:
        return DASH
    parts = [f"{area:.3g} mm²"] if area is not None else []
    if frac is not None:
        parts.append(f'<span class="muted">({frac * 100:.1f} % of the thumbnail)</span>')
    return " ".join(parts)


def _summary(result: Mapping[str, Any]) -> str:
    ok = _is_ok(result)
    prob = as_float(result.get("nme_probability")) if ok else None
    band = result.get("band") if ok else None
    prob_txt = fmt_num(prob, ".2f")
    meter = ""
    if prob is not None:
        pct = min(max(prob, 0.0), 1.0) * 100
        meter = (
            f'<div class="meter" aria-hidden="true">'
            f'<span class="mark" style="left:calc({pct:.1f}% - 1px)"></span></div>'
            '<div class="meter-scale"><span>0</span><span>0.5</span><span>1</span></div>'
        )
    band_txt = esc(band) if band else ("not reported" if not ok else DASH)
    note = result.get("calibration_note") or DEFAULT_CALIBRATION_NOTE
    calib = f'<p class="calib" id="calibration-note">{esc(note)}</p>' if ok else ""
    mpp = as_dict(result.get("mpp"))
    recs = as_dict(result.get("recommendations"))
    facts = [
        ("Status", f'<span class="pill {status_class(result.get("status"))}">{esc(result.get("status"))}</span>'),
        ("Tiles scored", esc(result.get("n_tiles"))),
        ("Tissue", _tissue(result.get("tissue"))),
        ("Resolution", _resolution(mpp)),
        ("Rule set", esc(recs.get("ruleset_version"))),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    return (
        '<section class="card summary" id="summary"><h2>Slide result</h2>'
        '<div class="prob"><div class="prob-label">Calibrated NME-pattern probability</div>'
        f'<div class="prob-value" id="probability">{prob_txt}</div>'
        f'<span class="pill band {band_class(band)}" id="band">{band_txt}</span></div>'
        f"{meter}{calib}"
        f'<dl class="facts">{dl}</dl></section>'
    )


def _viewer(
    result: Mapping[str, Any],
    thumbnail_png: bytes | None,
    overlays: Mapping[str, bytes],
    image_src: _ImageSrc = data_uri,
) -> str:
    ok = _is_ok(result)
    views: list[tuple[str, str, str]] = []  # (button label, data uri, caption)
    if ok:
        for name, png in (overlays or {}).items():
            uri = image_src(png)
            if uri is None:
                continue
            caption = (
                "Attention of the slide aggregator, relative within this slide (1 = most attended tile)."
                if str(name).lower().startswith("attention")
                else f"Tile probability of {_pretty(name).lower()} on a fixed 0-1 scale (same colours on every slide)."
            )
            views.append((_pretty(name), uri, caption))
    elif overlays:
        log.info("%s: status %s, overlays not shown", result.get("slide_id"), result.get("status"))
    thumb = image_src(thumbnail_png)
    if thumb is not None:
        views.append(("Slide only", thumb, "Slide thumbnail without overlay."))
    if not views:
        return (
            '<section class="card viewer" id="viewer"><h2>Slide overview</h2>'
            '<div class="ov-stage"><div class="placeholder">No image available for this slide.</div></div>'
            "</section>"
        )
    buttons, figs = [], []
    for i, (label, uri, caption) in enumerate(views):
        active = i == 0
        buttons.append(
            f'<button type="button" class="ov-btn{" active" if active else ""}" data-ov="{i}" '
            f'aria-pressed="{"true" if active else "false"}" title="Key {i + 1}">{esc(label)}</button>'
        )
        figs.append(
            f'<figure class="ov-fig" data-ov="{i}"{"" if active else " hidden"}>'
            f'<img src="{uri}" alt="{esc(label)} overlay for slide {esc(result.get("slide_id"))}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    hint = (
        '<div class="small muted" style="margin-top:6px">Switch views with the buttons or keys 1–9.</div>'
        if len(views) > 1
        else ""
    )
    return (
        '<section class="card viewer" id="viewer"><h2>Slide overview</h2>'
        f'<div class="ov-buttons" role="group" aria-label="Overlay">{"".join(buttons)}</div>'
        f'<div class="ov-stage">{"".join(figs)}</div>{hint}</section>'
    )


def _patterns(result: Mapping[str, Any]) -> str:
    ok = _is_ok(result)
    pats = as_dict(result.get("patterns"))
    names = [p for p in PATTERN_ORDER if p in pats] + [p for p in pats if p not in PATTERN_ORDER]
    if not names:
        names = list(PATTERN_ORDER)
    rows = []
    for name in names:
        raw = pats.get(name)
        if isinstance(raw, Mapping):  # tolerate {score: ..} or {probability: ..}
            raw = raw.get("score", raw.get("probability", raw.get("value")))
        v = as_float(raw) if ok else None
        bar = (
            f'<div class="bar"><span style="width:{min(max(v, 0.0), 1.0) * 100:.1f}%"></span></div>'
            if v is not None
            else ""
        )
        rows.append(
            f'<tr><td>{esc(_pretty(name))}</td><td class="num">{fmt_num(v, ".2f")}</td>'
            f'<td style="width:45%">{bar}</td></tr>'
        )
    return (
        '<section class="card" id="patterns"><h2>Pattern scores</h2><table><thead><tr><th>Pattern</th>'
        '<th class="num">Score</th><th></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
        '<p class="small muted" style="margin:8px 0 0">Slide-level scores of the three NME histological patterns '
        "(0–1).</p></section>"
    )


def _quality(result: Mapping[str, Any]) -> str:
    q = as_dict(result.get("quality"))
    flags = [f for f in as_list(q.get("flags")) if str(f).strip()]
    flags += [f for f in as_list(as_dict(result.get("tissue")).get("flags")) if str(f).strip() and f not in flags]
    reasons = [r for r in as_list(q.get("reasons")) if str(r).strip()]
    chips = _chips(flags, "chip chip-warn") or '<span class="muted">No quality flags.</span>'
    items = "".join(f"<li>{esc(plain_text(r))}</li>" for r in reasons)
    rs = f'<ul class="plain">{items}</ul>' if reasons else ""
    return f'<section class="card" id="quality"><h2>Quality</h2><div>{chips}</div>{rs}</section>'


def _one_code(code: Any) -> str:
    c = as_dict(code)
    if not c:
        return esc(code) if isinstance(code, str) and code.strip() else ""
    disp = f" <span>{esc(c.get('display'))}</span>" if c.get("display") else ""
    system = f'<div class="small muted">{esc(c.get("system"))}</div>' if c.get("system") else ""
    return f'<div class="code"><code>{esc(c.get("code"))}</code>{disp}{system}</div>'


def _codes(order: Mapping[str, Any]) -> str:
    """The order's code, its additional codes, and a warning when the code is not verified."""
    parts = [_one_code(order.get("code"))] + [_one_code(c) for c in as_list(order.get("additional_codes"))]
    html_ = "".join(p for p in parts if p) or DASH
    if order.get("code_verified") is False:
        html_ += '<span class="chip chip-warn">local code, not a verified standard code</span>'
    return html_


def _chips(items: Any, cls: str = "chip mono") -> str:
    return "".join(f'<span class="{cls}">{esc(plain_text(r))}</span>' for r in as_list(items) if str(r).strip())


def _orders(recs: Mapping[str, Any]) -> str:
    orders = [o for o in as_list(recs.get("orders")) if o is not None]
    if not orders:
        body = '<p class="muted" id="no-orders">No orders proposed.</p>'
    else:
        ranked = sorted(
            enumerate(orders),
            key=lambda io: (PRIORITY_RANK.get(str(as_dict(io[1]).get("priority", "")).lower(), 9), io[0]),
        )
        rows: list[str] = []
        seen: set[str] = set()
        for _, o in ranked:
            if not isinstance(o, Mapping):
                rows.append(f'<tr><td colspan="6">{esc(o)}</td></tr>')
                continue
            prio = o.get("priority")
            # the same rule rationale often backs several orders: print it once, then refer to it
            rationale = [r for r in as_list(o.get("rationale")) if str(r).strip()]
            fresh = [r for r in rationale if plain_text(r) not in seen]
            seen.update(plain_text(r) for r in rationale)
            rat = rich_text(fresh) if fresh else ""
            if len(fresh) < len(rationale):
                rules = esc(", ".join(map(str, as_list(o.get("rules")))))
                also = "also: " if fresh else ""
                rat += f'<div class="small muted">{also}as for the order above (rules {rules})</div>'
            category = f'<div class="small muted">{esc(o.get("category"))}</div>' if o.get("category") else ""
            rows.append(
                f'<tr data-order-id="{esc(o.get("id"))}"><td><strong>{esc(o.get("display"))}</strong>'
                f'<div class="small muted mono">{esc(o.get("id"))}</div>{category}</td>'
                f'<td><span class="pill {priority_class(prio)}">{esc(prio)}</span></td>'
                f"<td>{_codes(o)}</td><td>{_chips(o.get('rules')) or DASH}</td>"
                f"<td>{rat or DASH}</td><td>{rich_text(o.get('note'))}</td></tr>"
            )
        body = (
            '<div style="overflow-x:auto"><table id="orders-table"><thead><tr>'
            '<th style="width:17%">Order</th><th>Priority</th><th style="width:18%">Code</th><th>Rules</th>'
            '<th style="width:30%">Rationale</th><th style="width:22%">Note</th>'
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
        )
    return (
        '<section class="card" id="orders"><h2>Proposed orders</h2>'
        '<p class="small muted" style="margin-top:0">Proposals for the treating clinician, most urgent first; '
        "nothing is ordered automatically.</p>"
        f"{body}</section>"
    )


def _differential(recs: Mapping[str, Any]) -> str:
    items = [d for d in as_list(recs.get("differential")) if d is not None]
    if not items:
        body = '<p class="muted">None listed.</p>'
    else:
        rows = []
        for d in items:
            if isinstance(d, Mapping):
                entity = d.get("entity") or d.get("name") or d.get("id")
                rule_chips = f"<div>{_chips(d.get('rules'))}</div>" if d.get("rules") else ""
                rows.append(
                    f"<tr><td><strong>{esc(entity)}</strong>{rule_chips}</td><td>{rich_text(d.get('why'))}</td></tr>"
                )
            else:
                rows.append(f'<tr><td colspan="2">{esc(d)}</td></tr>')
        body = (
            '<table><thead><tr><th style="width:38%">Entity</th><th>Why consider it</th></tr></thead><tbody>'
            + "".join(rows)
            + "</tbody></table>"
        )
    return f'<section class="card" id="differential"><h2>Differential diagnosis</h2>{body}</section>'


def _flags(recs: Mapping[str, Any]) -> str:
    items = [f for f in as_list(recs.get("flags")) if f is not None and str(f).strip()]
    lis = []
    for f in items:
        if isinstance(f, Mapping):
            msg = f.get("message") or f.get("text") or f.get("id")
            tag = f'<span class="chip">{esc(f.get("id"))}</span>' if f.get("id") and f.get("message") else ""
            lis.append(f"<li>{rich_text(msg)} {tag}{_chips(f.get('rules'))}</li>")
        else:
            lis.append(f"<li>{rich_text(f)}</li>")
    body = f'<ul class="plain flags">{"".join(lis)}</ul>' if lis else '<p class="muted">No flags.</p>'
    return f'<section class="card" id="flags"><h2>Flags</h2>{body}</section>'


def _list_section(sec_id: str, title: str, items: Any, empty: str) -> str:
    vals = [v for v in as_list(items) if v is not None and str(v).strip()]
    body = (
        '<ul class="plain">' + "".join(f"<li>{rich_text(v)}</li>" for v in vals) + "</ul>"
        if vals
        else f'<p class="muted">{esc(empty)}</p>'
    )
    return f'<section class="card" id="{sec_id}"><h2>{esc(title)}</h2>{body}</section>'


def _clinical_context(recs: Mapping[str, Any]) -> str:
    if "clinical_context" not in recs:
        return ""
    ctx = as_dict(recs.get("clinical_context"))
    if not ctx:
        body = '<p class="muted">No clinical context was supplied; proposals rest on the slide alone.</p>'
    else:
        body = _kv_table(
            [
                (esc(_pretty(k)), esc(plain_text(v) if not isinstance(v, bool) else ("yes" if v else "no")))
                for k, v in ctx.items()
            ]
        )
    return f'<section class="card" id="clinical-context"><h2>Clinical context used</h2>{body}</section>'


def _evidence(recs: Mapping[str, Any]) -> str:
    ev = recs.get("evidence")
    if isinstance(ev, Mapping) and ev:
        items = "".join(
            f'<li><span class="mono muted">{esc(k)}</span> {esc(plain_text(v))}</li>' for k, v in ev.items()
        )
    elif isinstance(ev, (list, tuple)) and ev:
        items = "".join(f"<li>{esc(plain_text(v))}</li>" for v in ev)
    else:
        return ""
    return f'<h3>Sources cited by the rules</h3><ul class="plain small">{items}</ul>'


def _gallery(
    result: Mapping[str, Any], gallery: Mapping[str, list[Mapping[str, Any]]], image_src: _ImageSrc = data_uri
) -> str:
    if not _is_ok(result) or not gallery:
        return ""
    groups = []
    for name, tiles in gallery.items():
        figs = []
        for t in as_list(tiles):
            t = as_dict(t)
            uri = image_src(t.get("png"))
            if uri is None:
                continue
            x, y = as_float(t.get("x")), as_float(t.get("y"))
            xy = f"x {x:,.0f} · y {y:,.0f}" if x is not None and y is not None else DASH
            figs.append(
                f'<figure class="tile"><img src="{uri}" alt="{esc(_pretty(name))} tile at {esc(xy)}">'
                f'<figcaption><span class="score">{fmt_num(t.get("score"), ".2f")}</span>'
                f'<div class="mono muted">{xy}</div></figcaption></figure>'
            )
        if figs:
            groups.append(
                f'<div class="gallery-group"><h3>{esc(_pretty(name))}</h3>'
                f'<div class="tiles">{"".join(figs)}</div></div>'
            )
    if not groups:
        return ""
    return (
        '<section class="card" id="gallery"><h2>Highest-scoring tiles</h2>'
        '<p class="small muted" style="margin-top:0">Per pattern, the tiles with the highest scores. '
        "Coordinates are the "
        "tile's top-left corner in level-0 pixels of the slide.</p>" + "".join(groups) + "</section>"
    )


def _kv_table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{cells}</tbody></table>'


def _technical(result: Mapping[str, Any]) -> str:
    model = as_dict(result.get("model"))
    model_rows = [
        ("Name", esc(model.get("name"))),
        ("Version", esc(model.get("version"))),
        ("SHA-256", f'<span class="mono sha">{esc(model.get("sha256"))}</span>'),
        ("Label", f"<strong>{esc(model.get('label'))}</strong>"),
    ]
    timings = as_dict(result.get("timings"))
    t_rows, total = [], 0.0
    given_total = as_float(timings.get("total"))  # a recorded wall-clock total wins over the sum of stages
    for stage, sec in timings.items():
        if stage == "total" or "." in stage:  # dotted keys are sub-stages of a listed stage
            continue
        f = as_float(sec)
        total += f or 0.0
        t_rows.append((esc(stage), f"{fmt_num(f, '.2f')} s"))
    if t_rows or given_total is not None:
        shown = given_total if given_total is not None else total
        t_rows.append(("<strong>Total</strong>", f"<strong>{shown:.2f} s</strong>"))
    mpp = as_dict(result.get("mpp"))
    dims = as_list(result.get("dimensions_level0"))
    slide_rows = [
        ("Reader", esc(result.get("reader"))),
        ("Level-0 size", esc(" × ".join(str(d) for d in dims) + " px") if dims else DASH),
        (
            "Level-0 µm/px",
            fmt_num(mpp.get("slide"), ".4g")
            + (f' <span class="muted">{esc(mpp.get("source"))}</span>' if mpp.get("source") else ""),
        ),
        ("Fingerprint", f'<span class="mono sha">{esc(result.get("fingerprint"))}</span>'),
    ]
    versions = as_dict(result.get("versions"))
    v_rows = [(esc(k), f'<span class="mono">{esc(v)}</span>') for k, v in versions.items()]
    empty = '<p class="muted">Not recorded.</p>'
    return (
        '<section class="card" id="technical"><h2>Model and run details</h2>'
        '<div class="grid" style="grid-template-columns:repeat(auto-fit,minmax(260px,1fr))">'
        f"<div><h3>Model</h3>{_kv_table(model_rows)}</div>"
        f"<div><h3>Slide</h3>{_kv_table(slide_rows)}</div>"
        f"<div><h3>Timings</h3>{_kv_table(t_rows) if t_rows else empty}</div>"
        f"<div><h3>Software versions</h3>{_kv_table(v_rows) if v_rows else empty}</div>"
        "</div></section>"
    )


def _disclaimer(recs: Mapping[str, Any]) -> str:
    extra = recs.get("disclaimer")
    extra_html = f'<p id="rules-disclaimer">{rich_text(extra)}</p>' if extra is not None and str(extra).strip() else ""
    return (
        '<section class="card disclaimer" id="disclaimer"><h2>Disclaimer</h2>'
        f'<p id="fixed-disclaimer"><strong>{esc(DECISION_SUPPORT_DISCLAIMER)}</strong></p>{extra_html}'
        f"{_evidence(recs)}</section>"
    )


def render_report(
    result: SlideResult | Mapping[str, Any],
    thumbnail_png: bytes | None,
    overlays: Mapping[str, bytes] | None = None,
    gallery: Mapping[str, list[Mapping[str, Any]]] | None = None,
) -> str:
    """The report's HTML text (see :func:`write_report`)."""
    return _render(as_dict(result), thumbnail_png, overlays, gallery, data_uri)


def _render(
    result: SlideResult | Mapping[str, Any],
    thumbnail_png: bytes | None,
    overlays: Mapping[str, bytes] | None,
    gallery: Mapping[str, list[Mapping[str, Any]]] | None,
    image_src: _ImageSrc,
) -> str:
    result = as_dict(result)
    slide_id = result.get("slide_id")
    recs = as_dict(result.get("recommendations"))
    created = result.get("created_at")
    footer = (
        f"nme-pathology {esc(__version__)}"
        + (f" · generated {esc(created)}" if created else "")
        + " · self-contained report: opens offline, makes no network requests"
    )
    body = (
        '<header class="top"><div class="brand">NME pattern analysis · slide report</div>'
        f'<h1>Slide <span class="mono" id="slide-id">{esc(slide_id)}</span></h1>'
        f'<span class="pill {status_class(result.get("status"))}" id="status">{esc(result.get("status"))}</span>'
        "</header>"
        f"<main>{_banners(result)}"
        f'<div class="grid"><div>{_viewer(result, thumbnail_png, overlays or {}, image_src)}</div>'
        f"<div>{_summary(result)}{_patterns(result)}{_quality(result)}</div></div>"
        f"{_orders(recs)}"
        '<div class="grid" style="grid-template-columns:repeat(auto-fit,minmax(300px,1fr))">'
        f"<div>{_differential(recs)}</div>"
        f"<div>{_flags(recs)}{_list_section('notes', 'Notes', recs.get('notes'), 'No notes.')}"
        f"{_clinical_context(recs)}</div></div>"
        f"{_gallery(result, gallery or {}, image_src)}{_disclaimer(recs)}{_technical(result)}"
        f"<footer>{footer}</footer></main>"
    )
    title = f"NME report · {plain_text(slide_id) or 'unknown slide'}"
    return page(title, body, css=_CSS, script=_JS)


def _report_bytes(
    result: SlideResult | Mapping[str, Any],
    thumbnail_png: bytes | None,
    overlays: Mapping[str, bytes] | None,
    gallery: Mapping[str, list[Mapping[str, Any]]] | None,
) -> bytes:
    """``render_report(...).encode("utf-8")``, made without the large str: the text is rendered with
    :data:`_IMAGE_MARK` for each image, encoded (small), and the images' ASCII data URIs spliced in.
    """
    uris: list[tuple[bytes, bytes]] = []
    # by id(): the gallery tile that tops several patterns is one bytes object (kept here, so its id stays its own)
    encoded: dict[int, tuple[Any, tuple[bytes, bytes] | None]] = {}

    def mark(data: Any) -> str | None:
        if id(data) not in encoded:
            encoded[id(data)] = (data, data_uri_parts(data))
        uri = encoded[id(data)][1]
        if uri is None:
            return None
        uris.append(uri)
        return _IMAGE_MARK

    pieces = _render(result, thumbnail_png, overlays, gallery, mark).encode("utf-8").split(_IMAGE_MARK.encode())
    if len(pieces) != len(uris) + 1:  # the mark in the text itself (not from esc()): render it plainly
        return render_report(result, thumbnail_png, overlays, gallery).encode("utf-8")
    chunks = [pieces[0]]
    for (head, base64_text), piece in zip(uris, pieces[1:]):
        chunks += (head, base64_text, piece)
    return b"".join(chunks)


def write_report(
    path: str | Path,
    result: SlideResult | Mapping[str, Any],
    thumbnail_png: bytes | None,
    overlays: Mapping[str, bytes] | None = None,
    gallery: Mapping[str, list[Mapping[str, Any]]] | None = None,
) -> Path:
    """Write the slide's self-contained HTML report atomically; returns ``path``.

    The file holds exactly ``render_report(...)`` in UTF-8 (assembled as bytes, which is faster).

    Args:
        path: the ``.html`` file to write.
        result: the slide's :class:`~pipeline.result.SlideResult` (or its JSON form).
        thumbnail_png: PNG (or JPEG) bytes of the slide thumbnail; ``None``/empty for none.
        overlays: view name (``"pallor"``, ``"necrolysis"``, ``"parakeratosis"``, ``"attention"``)
            -> heatmap PNG/JPEG bytes (from :func:`pipeline.outputs.heatmap.render_heatmap`);
            one visible at a time, switched with buttons (first one shown). Only for status ``ok``.
        gallery: pattern name -> top tiles ``[{"png": bytes, "score": float, "x": int, "y": int}]``
            with ``x, y`` the tile's level-0 top-left in pixels. Only for status ``ok``.
    """
    data = _report_bytes(as_dict(result), thumbnail_png, overlays, gallery)
    out = atomic_write_bytes(path, data)
    log.info("wrote report %s (%.1f MB)", out, len(data) / 1e6)
    return out
