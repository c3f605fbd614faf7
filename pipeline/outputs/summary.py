"""Batch-level outputs: ``summary.csv`` for tools and ``index.html`` for people.

Both read the same result dicts as :mod:`pipeline.outputs.report` (``slide_id``, ``status``,
``error``, ``nme_probability``, ``band``, ``n_tiles``, ``quality.flags``, ``quality.reasons``,
``recommendations.orders[].id/priority``, ``recommendations.disclaimer``, ``model.label``);
missing keys are blank / "—". The probability and band are reported only for status ``ok``.

CSV: UTF-8 (no BOM), RFC 4180 quoting, ``\\r\\n`` line ends, one row per slide in input order.
Text cells that a spreadsheet would run as a formula (starting with ``= + - @`` or a tab/CR)
get a leading ``'`` (CSV-injection guard; slide ids and error text are untrusted).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline import __version__
from pipeline.core.io import atomic_write_text
from pipeline.outputs._html import (
    DASH,
    DECISION_SUPPORT_DISCLAIMER,
    PRIORITY_RANK,
    as_dict,
    as_float,
    as_list,
    band_class,
    esc,
    fmt_num,
    is_demo_label,
    page,
    plain_text,
    priority_class,
    status_class,
)
from pipeline.result import SlideResult

log = logging.getLogger(__name__)

#: Columns of ``summary.csv``, in order.
SUMMARY_COLUMNS = ("slide_id", "status", "nme_probability", "band", "n_tiles", "top_orders", "quality_flags", "error")

STATUSES = ("ok", "non_diagnostic", "failed")
BANDS = ("HIGH", "INDETERMINATE", "LOW")


def _is_ok(result: Mapping[str, Any]) -> bool:
    return str(result.get("status") or "").strip().lower() == "ok"


def sorted_orders(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The result's orders (dicts only), most urgent first (stat, asap, urgent, routine, other); stable."""
    orders = [o for o in as_list(as_dict(result.get("recommendations")).get("orders")) if isinstance(o, Mapping)]
    ranked = sorted(
        enumerate(orders), key=lambda io: (PRIORITY_RANK.get(str(io[1].get("priority") or "").lower(), 9), io[0])
    )
    return [dict(o) for _, o in ranked]


def format_orders(result: Mapping[str, Any]) -> str:
    """Orders as ``id(priority);id(priority)``, most urgent first, e.g. ``glucagon(urgent);cbc(routine)``."""
    parts = []
    for o in sorted_orders(result):
        oid = str(o.get("id") or o.get("display") or "?")
        prio = o.get("priority")
        parts.append(f"{oid}({prio})" if prio else oid)
    return ";".join(parts)


def _guard(text: str) -> str:
    """Neutralise spreadsheet formulas in a text cell."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def summary_row(result: SlideResult | Mapping[str, Any]) -> dict[str, str]:
    """One ``summary.csv`` row (all cells as text) for a result dict."""
    r = as_dict(result)
    ok = _is_ok(r)
    prob = as_float(r.get("nme_probability")) if ok else None
    n_tiles = as_float(r.get("n_tiles"))
    flags = as_list(as_dict(r.get("quality")).get("flags"))
    return {
        "slide_id": _guard(plain_text(r.get("slide_id"))),
        "status": _guard(plain_text(r.get("status"))),
        "nme_probability": "" if prob is None else f"{prob:.4f}",
        "band": _guard(plain_text(r.get("band"))) if ok else "",
        "n_tiles": "" if n_tiles is None else str(int(n_tiles)),
        "top_orders": _guard(format_orders(r)),
        "quality_flags": _guard(";".join(plain_text(f) for f in flags)),
        "error": _guard(" ".join(plain_text(r.get("error")).split())),
    }


def write_summary_csv(path: str | Path, results: Sequence[SlideResult | Mapping[str, Any]]) -> Path:
    """Write ``summary.csv`` (columns :data:`SUMMARY_COLUMNS`, one row per slide) atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    for result in results:
        writer.writerow(summary_row(result))
    out = atomic_write_text(path, buf.getvalue())
    log.info("wrote %s (%d slide(s))", out, len(results))
    return out


_CSS = """
.counts{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:14px}
.count{background:#fff;border:1px solid var(--line);border-radius:10px;padding:10px 16px;min-width:120px}
.count .n{font-size:1.6rem;font-weight:700;font-variant-numeric:tabular-nums}
.count .l{font-size:.8rem;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
th.sortable{cursor:pointer;user-select:none;white-space:nowrap}
th.sortable:hover{background:#e4e8f0}
th.sortable .arrow{color:#98a2b3;margin-left:4px;font-size:.8em}
th[aria-sort=ascending] .arrow::after{content:"\\25B2"}
th[aria-sort=descending] .arrow::after{content:"\\25BC"}
th.sortable[aria-sort=none] .arrow::after{content:"\\21C5"}
td.err{max-width:360px;color:#7a1a10;font-size:.85rem}
#slides a{color:var(--accent);font-weight:600}
"""

_JS = """
(function(){
  var table = document.getElementById('slides'); if (!table) return;
  var tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.querySelectorAll('th.sortable'));
  function key(row, col, type){
    var cell = row.cells[col]; var v = cell.getAttribute('data-value');
    if (v === null) v = cell.textContent.trim();
    if (type === 'num') { if (v === '') return null; var f = parseFloat(v); return isNaN(f) ? null : f; }
    return v === '' ? null : v.toLowerCase();
  }
  function sortBy(th, dir){
    var col = th.cellIndex, type = th.getAttribute('data-type');
    var rows = Array.prototype.slice.call(tbody.rows).map(function(r, i){ return {r: r, i: i, k: key(r, col, type)}; });
    rows.sort(function(a, b){
      if (a.k === null && b.k === null) return a.i - b.i;
      if (a.k === null) return 1; if (b.k === null) return -1;   // blanks always last
      var c = a.k < b.k ? -1 : (a.k > b.k ? 1 : 0);
      return (dir === 'ascending' ? c : -c) || (a.i - b.i);
    });
    rows.forEach(function(x){ tbody.appendChild(x.r); });
    heads.forEach(function(h){ h.setAttribute('aria-sort', h === th ? dir : 'none'); });
  }
  heads.forEach(function(th){
    function go(){
      var cur = th.getAttribute('aria-sort');
      var first = th.getAttribute('data-type') === 'num' ? 'descending' : 'ascending';
      sortBy(th, cur === 'none' || !cur ? first : (cur === 'ascending' ? 'descending' : 'ascending'));
    }
    th.addEventListener('click', go);
    th.addEventListener('keydown', function(e){
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); go(); }
    });
  });
})();
"""


def _href(rel: str) -> str:
    """A safe relative link: percent-encoded (so ``javascript:`` etc. stay plain paths), then escaped."""
    return esc(quote(str(rel).replace("\\", "/"), safe="/"))


def render_index(results: Sequence[SlideResult | Mapping[str, Any]], report_relpaths: Mapping[str, str]) -> str:
    """The index page's HTML text (see :func:`write_index_html`)."""
    items = [as_dict(r) for r in results]
    statuses = Counter(str(r.get("status") or "unknown").strip().lower() for r in items)
    bands = Counter(str(r.get("band") or "").upper() for r in items if _is_ok(r))
    cards = [("Slides", len(items), "")]
    cards += [(s.replace("_", "-"), statuses.get(s, 0), s) for s in STATUSES]
    cards += [(f"{s} (other)", n, "") for s, n in statuses.items() if s not in STATUSES]
    cards += [(f"band {b}", bands.get(b, 0), "") for b in BANDS]
    counts = "".join(
        f'<div class="count" data-count="{esc(key or label)}"><div class="n">{n}</div>'
        f'<div class="l">{esc(label)}</div></div>'
        for label, n, key in cards
    )

    labels = sorted(
        {
            str(as_dict(r.get("model")).get("label")).strip()
            for r in items
            if as_dict(r.get("model")).get("label") and str(as_dict(r.get("model")).get("label")).strip()
        }
    )
    banners = "".join(
        f'<div class="banner {"banner-demo" if is_demo_label(lab) else "banner-warn"}" role="alert" '
        'data-role="model-label">'
        f"<strong>Model:</strong>{esc(lab)}</div>"
        for lab in labels
    )
    rule_disclaimers = sorted(
        {plain_text(as_dict(r.get("recommendations")).get("disclaimer")).strip() for r in items} - {""}
    )

    rows = []
    for r in items:
        sid = plain_text(r.get("slide_id"))
        rel = report_relpaths.get(sid) if sid else None
        name = f'<a href="{_href(rel)}">{esc(sid)}</a>' if rel else esc(sid)
        ok = _is_ok(r)
        prob = as_float(r.get("nme_probability")) if ok else None
        band = r.get("band") if ok else None
        orders = (
            "".join(
                f'<span class="pill {priority_class(o.get("priority"))}" style="margin:1px 3px 1px 0">'
                f"{esc(o.get('display') or o.get('id'))}</span>"
                for o in sorted_orders(r)
            )
            or DASH
        )
        flags = (
            "".join(
                f'<span class="chip chip-warn">{esc(plain_text(f))}</span>'
                for f in as_list(as_dict(r.get("quality")).get("flags"))
            )
            or DASH
        )
        reason = r.get("error")
        if not ok and not (reason and str(reason).strip()):
            reason = "; ".join(plain_text(x) for x in as_list(as_dict(r.get("quality")).get("reasons"))) or None
        status = r.get("status")
        band_td = (
            f'<td data-value="{esc(band)}"><span class="pill {band_class(band)}">{esc(band)}</span></td>'
            if band
            else f'<td data-value="" class="muted">{DASH}</td>'
        )
        reason_td = f'<td class="err">{esc(reason)}</td>' if reason else f'<td class="muted">{DASH}</td>'
        rows.append(
            f'<tr data-slide="{esc(sid)}"><td data-value="{esc(sid)}">{name}</td>'
            f'<td data-value="{esc(status)}"><span class="pill {status_class(status)}">{esc(status)}</span></td>'
            f'<td class="num" data-value="{"" if prob is None else f"{prob:.6f}"}">{fmt_num(prob, ".2f")}</td>'
            f"{band_td}<td>{orders}</td><td>{flags}</td>{reason_td}</tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="7" class="muted">No slides in this run.</td></tr>')

    def th(label: str, typ: str | None, extra: str = "") -> str:
        if typ is None:
            return f"<th{extra}>{label}</th>"
        return (
            f'<th class="sortable{" num" if typ == "num" else ""}" data-type="{typ}" aria-sort="none" tabindex="0"'
            f' title="Click to sort"{extra}>{label}<span class="arrow"></span></th>'
        )

    head = (
        th("Slide", "text")
        + th("Status", "text")
        + th("NME-pattern probability", "num", ' id="th-prob"')
        + th("Band", "text")
        + th("Proposed orders", None)
        + th("Quality flags", None)
        + th("Error / reason", None)
    )
    disc = "".join(f"<p>{esc(d)}</p>" for d in rule_disclaimers)
    body = (
        '<header class="top"><div class="brand">NME pattern analysis · batch index</div>'
        f"<h1>{len(items)} slide{'s' if len(items) != 1 else ''}</h1></header><main>"
        f"{banners}"
        f'<div class="banner banner-info">{esc(DECISION_SUPPORT_DISCLAIMER)}</div>'
        f'<div class="counts" id="counts">{counts}</div>'
        '<section class="card"><h2>Slides</h2>'
        '<p class="small muted" style="margin-top:0">Click a column header to sort (probability: highest first, '
        "click again to reverse); slides without a probability stay at the bottom. Open a slide for its report.</p>"
        f'<div style="overflow-x:auto"><table id="slides"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
        '<section class="card disclaimer" id="disclaimer"><h2>Disclaimer</h2>'
        f"<p><strong>{esc(DECISION_SUPPORT_DISCLAIMER)}</strong></p>{disc}</section>"
        f"<footer>nme-pathology {esc(__version__)} · self-contained page: opens offline, makes no network requests"
        "</footer></main>"
    )
    return page("NME pattern analysis · batch index", body, css=_CSS, script=_JS)


def write_index_html(
    path: str | Path, results: Sequence[SlideResult | Mapping[str, Any]], report_relpaths: Mapping[str, str]
) -> Path:
    """Write ``index.html``: every slide in a table sortable by probability, linking to its report.

    Args:
        path: the ``.html`` file to write.
        results: result dicts (see module docstring), shown in this order until a header is clicked.
        report_relpaths: slide_id -> report path relative to ``path``'s folder (e.g.
            ``"slides/S-001/report.html"``); slides without an entry are listed unlinked.
    """
    text = render_index(results, report_relpaths)
    out = atomic_write_text(path, text)
    log.info("wrote %s (%d slide(s))", out, len(results))
    return out
