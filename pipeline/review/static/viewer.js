// Slide viewer: the slide as Deep Zoom tiles in OpenSeadragon (vendored, see static/vendor/openseadragon),
// tile layers from stored predictions drawn on a canvas overlay kept in step with the viewport, the review
// queue and verdicts. Coordinates: the view works in full level-0 pixels (OpenSeadragon's image
// coordinates); tiles, tissue and reviews are stored in QuPath's frame (level-0 px minus the slide's bounds
// origin `offset`), converted at the edges.
"use strict";
(function () {
  const OSD = window.OpenSeadragon;
  const TOKEN = document.querySelector('meta[name="review-token"]').content;
  const KEY = decodeURIComponent(location.pathname.split("/").pop());
  const host = document.getElementById("viewer");
  const overlay = document.createElement("canvas");
  overlay.className = "layer-overlay";
  const ctx = overlay.getContext("2d");
  const $ = (id) => document.getElementById(id);
  const LAYER_KEYS = ["pallor", "necrolysis", "parakeratosis", "attention", "tissue"];
  // one fixed colour scale for every layer and slide (0 -> 1): dark blue, teal, yellow-green, orange, red
  const STOPS = [[0, [48, 18, 59]], [0.25, [40, 140, 200]], [0.5, [120, 220, 90]], [0.75, [250, 170, 40]], [1, [180, 20, 20]]];
  const CLASS_COLOURS = { pallor: "#e6b428", necrolysis: "#c83232", parakeratosis: "#3c6ed2", exclude: "#222" };
  // a light 1 px PNG: the background when the slide file cannot be opened (the layers still show)
  const BLANK = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP48vkHAAV+ArtwOyJ+AAAAAElFTkSuQmCC";

  const S = {
    meta: null, review: null, offset: [0, 0], W: 1, H: 1, mpp: null, viewer: null, item: null,
    layers: {}, active: "pallor", tiles: null, attnMax: 1, tilesLoaded: 0, fullyLoaded: false,
    current: -1, queue: [], qpos: -1, drawing: null, dirty: true,
  };
  window.__review = S; // for tests and the console

  function colour(v) {
    for (let i = 1; i < STOPS.length; i++) {
      if (v <= STOPS[i][0]) {
        const [a, ca] = STOPS[i - 1], [b, cb] = STOPS[i];
        const t = (v - a) / (b - a);
        return "rgb(" + ca.map((c, k) => Math.round(c + (cb[k] - c) * t)).join(",") + ")";
      }
    }
    return "rgb(" + STOPS[STOPS.length - 1][1].join(",") + ")";
  }

  const LUT = Array.from({ length: 256 }, (_, k) => colour(k / 255));  // drawn per frame: no string building there
  function lut(v) { return LUT[Math.max(0, Math.min(255, Math.round(v * 255)))]; }

  function say(text, cls) {
    const m = $("message");
    m.textContent = text || "";
    m.className = "message " + (cls || "");
  }

  // ---- geometry: level-0 px <-> viewer element px, from OpenSeadragon's current (animated) viewport ----
  let view = { ox: 0, oy: 0, s: 1 };
  function updateView() {
    if (!S.item) return;
    const a = S.item.imageToViewerElementCoordinates(new OSD.Point(0, 0));
    const b = S.item.imageToViewerElementCoordinates(new OSD.Point(S.W, 0));
    view = { ox: a.x, oy: a.y, s: (b.x - a.x) / S.W };
  }
  function toScreen(x, y) { return [view.ox + x * view.s, view.oy + y * view.s]; }
  function toSlide(px, py) { return [(px - view.ox) / view.s, (py - view.oy) / view.s]; }
  S.toScreen = (x, y) => { updateView(); return toScreen(x, y); };
  function fit(immediately) { if (S.viewer) S.viewer.viewport.goHome(immediately); }
  function zoom(f) { if (S.viewer) { S.viewer.viewport.zoomBy(f); S.viewer.viewport.applyConstraints(); } }
  function pan(dx, dy) {
    if (!S.viewer) return;
    const vp = S.viewer.viewport, b = vp.getBounds();
    vp.panBy(new OSD.Point(dx * b.width * 0.2, dy * b.height * 0.2));
    vp.applyConstraints();
  }
  function showRegion(x, y, w, h) {  // level-0 px
    if (S.item) S.viewer.viewport.fitBounds(S.item.imageToViewportRectangle(x, y, w, h));
  }
  function resize() {
    const dpr = window.devicePixelRatio || 1, w = host.clientWidth, h = host.clientHeight;
    overlay.width = Math.max(1, Math.round(w * dpr)); overlay.height = Math.max(1, Math.round(h * dpr));
    overlay.style.width = w + "px"; overlay.style.height = h + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    S.dirty = true;
  }

  // ---- drawing (the overlay; the slide itself is OpenSeadragon's) ------------------------------------
  function layerValue(name, i) {
    const v = S.tiles.values[name][i];
    if (v === null || v === undefined) return null;
    return name === "attention" ? v / S.attnMax : v;
  }
  function cw() { return host.clientWidth; }
  function ch() { return host.clientHeight; }

  function drawLayers() {
    const T = S.tiles;
    const [ox, oy] = S.offset, size = T ? T.size * view.s : 0;
    for (const name of LAYER_KEYS) {
      const L = S.layers[name];
      if (!L.visible) continue;
      ctx.globalAlpha = L.opacity;
      if (name === "tissue") {
        ctx.strokeStyle = "#1a9a50"; ctx.lineWidth = 2;
        for (const ring of S.meta.tissue) {
          ctx.beginPath();
          ring.forEach(([x, y], k) => { const [px, py] = toScreen(x + ox, y + oy); k ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
          ctx.closePath(); ctx.stroke();
        }
        continue;
      }
      if (!T) continue;
      for (let i = 0; i < T.x.length; i++) {
        const v = layerValue(name, i);
        if (v === null || v < L.threshold) continue;
        const [px, py] = toScreen(T.x[i] + ox, T.y[i] + oy);
        if (px > cw() || py > ch() || px + size < 0 || py + size < 0) continue;
        ctx.fillStyle = lut(v);
        // crisp blocks: whole device pixels, edge to edge with the neighbours
        const x0 = Math.round(px), y0 = Math.round(py);
        ctx.fillRect(x0, y0, Math.max(1, Math.round(px + size) - x0), Math.max(1, Math.round(py + size) - y0));
      }
    }
    ctx.globalAlpha = 1;
  }

  function drawReview() {
    const [ox, oy] = S.offset;
    if (S.review) {
      for (const m of S.review.tiles) {
        const [px, py] = toScreen(m.x + ox, m.y + oy), s = m.size * view.s;
        ctx.lineWidth = 3;
        ctx.setLineDash(m.verdict === "confirm" ? [] : [6, 4]);
        ctx.strokeStyle = m.verdict === "confirm" ? "#0b8f3a" : "#d0021b";
        ctx.strokeRect(px + 2, py + 2, s - 4, s - 4);
      }
      ctx.setLineDash([]);
      for (const r of S.review.regions) {
        const base = r.class_name.replace(/^not_/, "");
        ctx.strokeStyle = CLASS_COLOURS[base] || "#666";
        ctx.setLineDash(r.class_name.startsWith("not_") || r.class_name === "exclude" ? [8, 5] : []);
        ctx.lineWidth = 2;
        for (const poly of r.rings) for (const ring of poly) {
          ctx.beginPath();
          ring.forEach(([x, y], k) => { const [px, py] = toScreen(x + ox, y + oy); k ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
          ctx.closePath(); ctx.stroke();
        }
      }
      ctx.setLineDash([]);
    }
    if (S.current >= 0 && S.tiles) {
      const [px, py] = toScreen(S.tiles.x[S.current] + ox, S.tiles.y[S.current] + oy), s = S.tiles.size * view.s;
      ctx.lineWidth = 2; ctx.strokeStyle = "#000"; ctx.strokeRect(px - 2, py - 2, s + 4, s + 4);
      ctx.strokeStyle = "#fff"; ctx.strokeRect(px - 4, py - 4, s + 8, s + 8);
    }
    if (S.drawing && S.drawing.length) {
      ctx.strokeStyle = "#ff00aa"; ctx.lineWidth = 2; ctx.beginPath();
      S.drawing.forEach(([x, y], k) => { const [px, py] = toScreen(x, y); k ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
      ctx.stroke();
      for (const [x, y] of S.drawing) { const [px, py] = toScreen(x, y); ctx.fillStyle = "#ff00aa"; ctx.fillRect(px - 3, py - 3, 6, 6); }
    }
  }

  function drawScaleBar() {
    if (!S.mpp || !(view.s > 0)) return;
    const umPerPx = S.mpp / view.s;
    const nice = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000];
    let um = nice[0];
    for (const n of nice) if (n / umPerPx <= 160) um = n;
    const w = um / umPerPx, x = 16, y = ch() - 20;
    ctx.fillStyle = "rgba(255,255,255,0.85)"; ctx.fillRect(x - 6, y - 22, Math.max(w, 150) + 12, 32);
    ctx.fillStyle = "#000"; ctx.fillRect(x, y, w, 5);
    ctx.font = "12px sans-serif";
    const text = um >= 1000 ? (um / 1000) + " mm" : um + " µm";
    ctx.fillText(text + "  (" + umPerPx.toFixed(2) + " µm/px)", x, y - 6);
    host.dataset.scaleBar = text;
  }

  function draw() {
    if (!S.meta) return;
    S.dirty = false;
    updateView();
    ctx.clearRect(0, 0, cw(), ch());
    drawLayers(); drawReview(); drawScaleBar();
  }
  function frame() {
    if (S.dirty) draw();
    requestAnimationFrame(frame);
  }

  function drawLegend() {
    const c = $("legend"), g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    for (let x = 0; x < c.width - 20; x++) { g.fillStyle = colour(x / (c.width - 21)); g.fillRect(x + 10, 2, 1, 14); }
    g.fillStyle = "#000"; g.font = "10px sans-serif";
    [0, 0.25, 0.5, 0.75, 1].forEach((t) => g.fillText(String(t), 10 + t * (c.width - 21) - (t ? 8 : 0), 28));
    const thr = S.layers[S.active] ? S.layers[S.active].threshold : 0;
    const tx = 10 + thr * (c.width - 21);
    g.fillRect(tx - 1, 0, 2, 18);
  }

  // ---- layers panel -------------------------------------------------------------------------
  function buildLayers() {
    const box = $("layers");
    box.textContent = "";
    LAYER_KEYS.forEach((name, k) => {
      const isPattern = S.meta.patterns_list.includes(name);
      const L = S.layers[name] = {
        visible: name === "tissue" || name === S.active,
        opacity: name === "tissue" ? 1 : 0.5,
        threshold: isPattern ? S.meta.thresholds[name] : name === "attention" ? 0.1 : 0,
      };
      const row = document.createElement("div");
      row.className = "layer";
      row.innerHTML = '<label><input type="checkbox"> <span></span></label>' +
        '<label class="small">opacity <input type="range" min="0" max="1" step="0.05" class="opacity"></label>' +
        (name === "tissue" ? "" : '<label class="small">threshold <input type="range" min="0" max="1" step="0.01" class="threshold"> <output></output></label>');
      const cb = row.querySelector("input[type=checkbox]");
      cb.id = "layer-" + name; cb.checked = L.visible;
      row.querySelector("span").textContent = (k + 1) + " " + name + (isPattern ? " (model threshold " + S.meta.thresholds[name].toFixed(2) + ")" : "");
      cb.addEventListener("change", () => { L.visible = cb.checked; S.dirty = true; });
      const op = row.querySelector(".opacity");
      op.id = "opacity-" + name; op.value = String(L.opacity);
      op.addEventListener("input", () => { L.opacity = Number(op.value); S.dirty = true; });
      const th = row.querySelector(".threshold");
      if (th) {
        th.id = "threshold-" + name; th.value = String(L.threshold);
        const out = row.querySelector("output");
        out.textContent = L.threshold.toFixed(2);
        th.addEventListener("input", () => { L.threshold = Number(th.value); out.textContent = L.threshold.toFixed(2); S.dirty = true; drawLegend(); });
      }
      row.addEventListener("click", () => { if (name !== "tissue") { S.active = name; drawLegend(); } });
      box.appendChild(row);
    });
  }
  function syncLayerControls(name) {
    const L = S.layers[name];
    $("layer-" + name).checked = L.visible;
    $("opacity-" + name).value = String(L.opacity);
    const th = $("threshold-" + name);
    if (th) { th.value = String(L.threshold); th.nextElementSibling.textContent = L.threshold.toFixed(2); }
    S.dirty = true; drawLegend();
  }

  // ---- tiles, queue -------------------------------------------------------------------------
  function tileAt(x, y) {
    const T = S.tiles;
    if (!T) return -1;
    const [ox, oy] = S.offset;
    for (let i = 0; i < T.x.length; i++) {
      if (x >= T.x[i] + ox && x < T.x[i] + ox + T.size && y >= T.y[i] + oy && y < T.y[i] + oy + T.size) return i;
    }
    return -1;
  }
  function markOf(pattern, i) {
    if (!S.review) return null;
    return S.review.tiles.find((m) => m.pattern === pattern && Math.round(m.x) === Math.round(S.tiles.x[i]) && Math.round(m.y) === Math.round(S.tiles.y[i])) || null;
  }
  function showTile(i) {
    S.current = i; S.dirty = true;
    const box = $("tile-info");
    if (i < 0) { box.textContent = "No tile here."; return; }
    const T = S.tiles, [ox, oy] = S.offset;
    const lines = [];
    for (const name of S.meta.layers) {
      const v = T.values[name][i];
      let text = name + ": " + (v === null ? "–" : v.toFixed(4));
      if (S.meta.thresholds[name] !== undefined) text += v !== null && v >= S.meta.thresholds[name] ? "  (above threshold)" : "";
      const m = S.meta.patterns_list.includes(name) ? markOf(name, i) : null;
      if (m) text += "  [" + (m.verdict === "confirm" ? "confirmed" : "false positive") + " by " + m.reviewer + "]";
      lines.push(text);
    }
    lines.push("x, y: " + T.x[i] + ", " + T.y[i] + " (QuPath px)" + (ox || oy ? "; level-0 " + (T.x[i] + ox) + ", " + (T.y[i] + oy) : ""));
    lines.push("size: " + T.size + " px" + (S.mpp ? " = " + (T.size * S.mpp).toFixed(0) + " µm" : ""));
    box.textContent = "";
    lines.forEach((l) => { const d = document.createElement("div"); d.textContent = l; box.appendChild(d); });
    box.dataset.tile = String(i);
  }
  function buildQueue() {
    const p = $("q-pattern").value, order = $("q-order").value, thr = S.meta.thresholds[p];
    const v = S.tiles ? S.tiles.values[p] : [];
    const idx = [];
    for (let i = 0; i < v.length; i++) if (v[i] !== null) idx.push(i);
    idx.sort(order === "highest" ? (a, b) => v[b] - v[a] : (a, b) => Math.abs(v[a] - thr) - Math.abs(v[b] - thr));
    S.queue = idx; S.qpos = -1; updateQueueText();
  }
  function updateQueueText() {
    const p = $("q-pattern").value;
    const done = S.review ? S.review.tiles.filter((m) => m.pattern === p).length : 0;
    $("q-pos").textContent = (S.qpos >= 0 ? "tile " + (S.qpos + 1) + " of " : "") + S.queue.length + " in queue; " + done + " reviewed for " + p;
  }
  function goQueue(step) {
    if (!S.queue.length) return;
    S.qpos = Math.max(0, Math.min(S.queue.length - 1, S.qpos + step));
    const i = S.queue[S.qpos];
    const sz = S.tiles.size;  // four tiles across the shorter side, the tile in the middle
    showRegion(S.tiles.x[i] + S.offset[0] - 1.5 * sz, S.tiles.y[i] + S.offset[1] - 1.5 * sz, 4 * sz, 4 * sz);
    const p = $("q-pattern").value;
    S.active = p;
    if (!S.layers[p].visible) { S.layers[p].visible = true; syncLayerControls(p); }
    showTile(i); updateQueueText();
  }

  // ---- writes -------------------------------------------------------------------------------
  function reviewer() {
    const name = $("reviewer").value.trim();
    if (!name) { say("Enter your name (reviewer) first.", "error"); $("reviewer").focus(); }
    return name;
  }
  async function post(action, body) {
    const who = reviewer();
    if (!who) return false;
    say("saving…");
    try {
      const r = await fetch("/api/slides/" + encodeURIComponent(KEY) + "/review/" + action, {
        method: "POST", headers: { "Content-Type": "application/json", "X-Review-Token": TOKEN },
        body: JSON.stringify(Object.assign({ reviewer: who }, body)),
      });
      const d = await r.json();
      if (!r.ok) { say(d.error || "not saved", "error"); return false; }
      S.review = d; S.dirty = true;
      say("saved " + new Date().toLocaleTimeString(), "ok");
      document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
      renderRegions(); renderVerdict(); updateQueueText();
      if (S.current >= 0) showTile(S.current);
      return true;
    } catch (e) { say("not saved: " + e, "error"); return false; }
  }
  function markCurrent(verdict) {
    if (S.current < 0) { say("Select a tile first (click it, or j for the queue).", "error"); return; }
    const p = $("q-pattern").value, i = S.current;
    post("tile", { pattern: p, x: S.tiles.x[i], y: S.tiles.y[i], size: S.tiles.size, verdict, probability: S.tiles.values[p][i] })
      .then((ok) => { if (ok && verdict && S.qpos >= 0 && S.queue[S.qpos] === i) goQueue(1); });
  }
  function finishDrawing() {
    const pts = S.drawing;
    S.drawing = null; $("draw").classList.remove("on"); S.dirty = true;
    if (!pts || pts.length < 3) { say("a region needs at least 3 corners", "error"); return; }
    const ring = pts.map(([x, y]) => [Math.round(x - S.offset[0]), Math.round(y - S.offset[1])]);
    ring.push(ring[0]);
    post("region", { class_name: $("region-class").value, rings: [ring] });
  }
  function renderRegions() {
    const box = $("regions");
    box.textContent = "";
    (S.review ? S.review.regions : []).forEach((r) => {
      const d = document.createElement("div");
      d.textContent = r.class_name + " (" + (r.reviewer || "QuPath") + ") ";
      const b = document.createElement("button");
      b.textContent = "delete";
      b.addEventListener("click", () => post("region-delete", { id: r.id }));
      d.appendChild(b); box.appendChild(d);
    });
  }
  function renderVerdict() {
    const v = S.review && S.review.verdict;
    $("verdict-state").textContent = v ? v.verdict + (v.band ? " (" + v.band + ")" : "") + " by " + v.reviewer + ", " + v.at : "no slide verdict yet";
    if (v) { $("band").value = v.band || ""; $("note").value = v.note || ""; }
  }
  function saveVerdict(verdict) {
    const band = $("band").value || null;
    post("verdict", { verdict, band: verdict === "agree" ? S.meta.band : band, note: $("note").value });
  }

  // ---- input: OpenSeadragon pans (drag) and zooms (wheel); a click selects a tile or adds a corner ----
  function setDrawing(on) { S.drawing = on ? [] : null; $("draw").classList.toggle("on", !!S.drawing); S.dirty = true; }
  function onClick(ev) {
    if (!ev.quick) return;  // a drag (pan), not a click
    const [x, y] = toSlide(ev.position.x, ev.position.y);
    if (S.drawing) { S.drawing.push([x, y]); S.dirty = true; } else showTile(tileAt(x, y));
    host.focus();
  }
  function onDoubleClick() { if (S.drawing) { S.drawing.pop(); finishDrawing(); } }

  function nudge(name, key, delta) {
    const L = S.layers[name];
    L[key] = Math.max(0, Math.min(1, Math.round((L[key] + delta) * 100) / 100));
    syncLayerControls(name);
  }
  // capture phase: the review keys win over OpenSeadragon's own (its keyboard navigation is off)
  document.addEventListener("keydown", (ev) => {
    const tag = ev.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || ev.ctrlKey || ev.metaKey || ev.altKey || !S.meta) return;
    const k = ev.key;
    if (k >= "1" && k <= "5") {
      const name = LAYER_KEYS[Number(k) - 1];
      S.layers[name].visible = !S.layers[name].visible;
      if (name !== "tissue") S.active = name;
      syncLayerControls(name);
    } else if (k === "[" || k === "]") nudge(S.active, "opacity", k === "]" ? 0.1 : -0.1);
    else if (k === ";" || k === "'") nudge(S.active, "threshold", k === "'" ? 0.05 : -0.05);
    else if (k === "+" || k === "=") zoom(1.5);
    else if (k === "-") zoom(1 / 1.5);
    else if (k === "0") fit(true);
    else if (k === "ArrowLeft") pan(-1, 0);
    else if (k === "ArrowRight") pan(1, 0);
    else if (k === "ArrowUp") pan(0, -1);
    else if (k === "ArrowDown") pan(0, 1);
    else if (k === "j") goQueue(1);
    else if (k === "k") goQueue(-1);
    else if (k === "c") markCurrent("confirm");
    else if (k === "x") markCurrent("false_positive");
    else if (k === "u") markCurrent(null);
    else if (k === "r") setDrawing(!S.drawing);
    else if (k === "Enter" && S.drawing) finishDrawing();
    else if (k === "Escape") setDrawing(false);
    else if (k === "a") saveVerdict("agree");
    else if (k === "d") { $("band").focus(); say("Choose your band, add a note, then save the verdict."); }
    else if (k === "n" && S.meta.next) location.href = "/slide/" + encodeURIComponent(S.meta.next);
    else if (k === "p" && S.meta.prev) location.href = "/slide/" + encodeURIComponent(S.meta.prev);
    else if (k === "w") location.href = "/";
    else return;
    ev.preventDefault();
    ev.stopPropagation();
  }, true);

  // ---- start --------------------------------------------------------------------------------
  function openViewer(m) {
    const source = m.image ? m.image.dzi : {
      width: S.W, height: S.H, tileSize: 1024, tileOverlap: 0, minLevel: 0, maxLevel: 0,
      getTileUrl: () => BLANK,
    };
    const v = S.viewer = OSD({
      element: host,
      prefixUrl: "/static/vendor/openseadragon/images/",
      tileSources: source,
      drawer: "canvas",
      showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", navigatorAutoFade: false,
      showFullPageControl: false, showRotationControl: false, navigationControlAnchor: OSD.ControlAnchor.TOP_RIGHT,
      keyboardNavEnabled: false,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: false, scrollToZoom: true, dragToPan: true },
      gestureSettingsTouch: { clickToZoom: false, dblClickToZoom: false },
      minZoomImageRatio: 0.25, maxZoomPixelRatio: 4, visibilityRatio: 0.2,
      animationTime: 0.5, zoomPerScroll: 1.25,
      placeholderFillStyle: "#f4f3f1",
    });
    v.canvas.appendChild(overlay);
    v.addHandler("open", () => {
      S.item = v.world.getItemAt(0);
      S.fullyLoaded = S.item.getFullyLoaded();
      S.item.addHandler("fully-loaded-change", (e) => { S.fullyLoaded = e.fullyLoaded; });
      resize(); draw();
      document.body.dataset.ready = "1";
    });
    v.addHandler("open-failed", (e) => { say("the slide could not be shown: " + (e.message || "unknown error"), "error"); document.body.dataset.ready = "1"; });
    v.addHandler("tile-loaded", () => { S.tilesLoaded += 1; });
    v.addHandler("tile-load-failed", () => { say("a slide tile could not be read", "error"); });
    v.addHandler("update-viewport", draw);  // in step with every frame OpenSeadragon draws
    v.addHandler("resize", resize);
    v.addHandler("canvas-click", onClick);
    v.addHandler("canvas-double-click", onDoubleClick);
  }

  function setup(m) {
    S.meta = m;
    sessionStorage.setItem("wl-last", m.key);
    document.title = "NME review: " + m.slide_id;
    $("slide-id").textContent = m.slide_id;
    $("summary").textContent = m.status + (m.band ? " · " + m.band : "") + (m.probability !== null ? " · p = " + m.probability.toFixed(3) : "") +
      (m.flags.length ? " · flags: " + m.flags.join(", ") : "") + (m.error ? " · " + m.error : "");
    $("model-label").textContent = "Model: " + (m.model_label || "no intended-use label recorded");
    $("disclaimer").textContent = m.disclaimer;
    for (const [id, target] of [["prev", m.prev], ["next", m.next]]) {
      if (target) $(id).href = "/slide/" + encodeURIComponent(target); else $(id).classList.add("disabled");
    }
    S.offset = m.image ? m.image.offset : [0, 0];
    const dims = m.image ? [m.image.width, m.image.height] : m.dimensions || [1000, 1000];
    S.W = dims[0]; S.H = dims[1]; S.mpp = m.mpp;
    S.tiles = m.tiles;
    if (S.tiles) {
      const a = S.tiles.values.attention.filter((v) => v !== null);
      S.attnMax = Math.max(1e-9, ...a, 0);
    }
    S.review = m.review;
    const errs = [m.image_error, m.tiles_error, m.review_error].filter(Boolean);
    if (errs.length) say(errs.join(" · "), "error");
    if (m.review_error) document.querySelectorAll("#panel button").forEach((b) => { b.disabled = true; });
    for (const p of m.patterns_list) { const o = document.createElement("option"); o.textContent = p; $("q-pattern").appendChild(o); }
    for (const c of m.review_classes) { const o = document.createElement("option"); o.value = c; o.textContent = c === "exclude" ? "exclude (not for training)" : c.startsWith("not_") ? c + " (negative)" : c + " (missed)"; $("region-class").appendChild(o); }
    buildLayers(); drawLegend(); buildQueue(); renderRegions(); renderVerdict();
    $("reviewer").value = localStorage.getItem("nme-reviewer") || "";
    $("reviewer").addEventListener("change", () => localStorage.setItem("nme-reviewer", $("reviewer").value.trim()));
    $("q-pattern").addEventListener("change", () => { S.active = $("q-pattern").value; buildQueue(); drawLegend(); });
    $("q-order").addEventListener("change", buildQueue);
    $("q-next").addEventListener("click", () => goQueue(1));
    $("q-prev").addEventListener("click", () => goQueue(-1));
    $("confirm").addEventListener("click", () => markCurrent("confirm"));
    $("false-positive").addEventListener("click", () => markCurrent("false_positive"));
    $("clear-mark").addEventListener("click", () => markCurrent(null));
    $("draw").addEventListener("click", () => { setDrawing(!S.drawing); host.focus(); });
    $("agree").addEventListener("click", () => saveVerdict("agree"));
    $("disagree").addEventListener("click", () => saveVerdict("disagree"));
    $("save-verdict").addEventListener("click", () => saveVerdict($("band").value && $("band").value !== m.band ? "disagree" : "agree"));
    openViewer(m);
  }

  if (!OSD) { say("the viewer library did not load (static/vendor/openseadragon)", "error"); return; }
  fetch("/api/slides/" + encodeURIComponent(KEY)).then((r) => r.json().then((d) => ({ ok: r.ok, d }))).then(({ ok, d }) => {
    if (!ok) { say(d.error || "could not load the slide", "error"); return; }
    setup(d);
  }).catch((e) => say("could not load the slide: " + e, "error"));
  requestAnimationFrame(frame);
})();
