// Worklist: every slide of the output folder, sortable, keyboard next/previous.
"use strict";
(function () {
  const tbody = document.querySelector("#worklist tbody");
  const message = document.getElementById("message");
  let rows = [];
  let sortKey = sessionStorage.getItem("wl-sort") || "probability";
  let sortDir = Number(sessionStorage.getItem("wl-dir") || -1);
  let current = 0;

  function cmp(a, b) {
    let x = a[sortKey], y = b[sortKey];
    if (Array.isArray(x)) { x = x.join(","); y = y.join(","); }
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function render() {
    rows.sort(cmp);
    tbody.textContent = "";
    rows.forEach((r, i) => {
      const tr = document.createElement("tr");
      tr.dataset.key = r.key;
      if (i === current) tr.classList.add("current");
      const td = cell(tr, "");
      const a = document.createElement("a");
      a.href = "/slide/" + encodeURIComponent(r.key);
      a.textContent = r.slide_id;
      td.appendChild(a);
      cell(tr, r.status, "status-" + r.status);
      cell(tr, r.band || "–", r.band ? "band band-" + r.band : "");
      cell(tr, r.probability === null ? "–" : r.probability.toFixed(3), "num");
      cell(tr, (r.flags || []).join(", ") || (r.error || ""));
      cell(tr, String(r.n_tiles), "num");
      cell(tr, r.review, "review-" + r.review.replace(" ", "-"));
      tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") { current = i; render(); } });
      tbody.appendChild(tr);
    });
    document.querySelectorAll("th").forEach((th) => {
      th.classList.toggle("sorted", th.dataset.key === sortKey);
      th.dataset.dir = th.dataset.key === sortKey ? (sortDir > 0 ? "asc" : "desc") : "";
    });
    const cur = tbody.children[current];
    if (cur) cur.scrollIntoView({ block: "nearest" });
  }

  document.querySelectorAll("th").forEach((th) => th.addEventListener("click", () => {
    if (sortKey === th.dataset.key) sortDir = -sortDir; else { sortKey = th.dataset.key; sortDir = 1; }
    sessionStorage.setItem("wl-sort", sortKey);
    sessionStorage.setItem("wl-dir", String(sortDir));
    render();
  }));

  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "j" || ev.key === "ArrowDown") { current = Math.min(rows.length - 1, current + 1); render(); ev.preventDefault(); }
    else if (ev.key === "k" || ev.key === "ArrowUp") { current = Math.max(0, current - 1); render(); ev.preventDefault(); }
    else if (ev.key === "Enter" && rows[current]) { location.href = "/slide/" + encodeURIComponent(rows[current].key); }
  });

  fetch("/api/slides").then((r) => r.json().then((d) => ({ ok: r.ok, d }))).then(({ ok, d }) => {
    if (!ok) { message.textContent = d.error || "could not load the worklist"; return; }
    rows = d;
    const last = sessionStorage.getItem("wl-last");
    rows.sort(cmp);
    const i = rows.findIndex((r) => r.key === last);
    current = i >= 0 ? i : 0;
    render();
    document.body.dataset.ready = "1";
  }).catch((e) => { message.textContent = "could not load the worklist: " + e; });

  fetch("/api/info").then((r) => r.json()).then((s) => {
    document.getElementById("disclaimer").textContent = s.disclaimer;
    document.getElementById("model-label").textContent = "Model: " + (s.model_label || "no intended-use label recorded");
  }).catch(() => null);
})();
