// Corral dashboard: one WebSocket, one JSON frame per sample, plain DOM and a canvas.
// Frames: {"snapshot": {...}, "stream": [[key, group, worker, start, stop, erred], ...]}
"use strict";

(function () {
  const WINDOW = 30;          // seconds of task stream shown
  const KEEP = 120;           // seconds of task stream kept
  const MAX_STREAM = 20000;   // entries kept at most
  const MAX_GROUPS = 40;      // progress rows shown

  const state = {
    frames: 0,                // frames received (tests read window.corralDashboard)
    connected: false,
    snapshot: null,
    stream: [],
    receivedAt: 0,
  };
  window.corralDashboard = state;

  const $ = (id) => document.getElementById(id);

  // -- helpers ---------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "title") node.title = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else if (k === "style") node.style.cssText = v;
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 2 : 1) : n.toFixed(0)) + " " + units[i];
  }

  function amount(x) {
    return Number.isInteger(x) ? String(x) : (Math.abs(x) >= 1e6 ? x.toExponential(1) : x.toFixed(2).replace(/\.?0+$/, ""));
  }

  // One colour per task group, in order of first appearance (red is kept for errors).
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
    "#9c755f", "#ff9da7", "#86bcb6", "#8cd17d", "#499894", "#d4a6c8", "#a0cbe8", "#ffbe7d"];
  const colors = new Map();
  function color(group) {
    let c = colors.get(group);
    if (c === undefined) {
      const i = colors.size;
      c = i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 137.5) % 360}, 55%, 55%)`;
      colors.set(group, c);
    }
    return c;
  }

  function replaceRows(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // -- rendering ---------------------------------------------------------------------------
  function renderHeader(s) {
    $("scheduler-address").textContent = s.scheduler.address;
    const threads = s.workers.reduce((a, w) => a + w.nthreads, 0);
    const mem = s.workers.reduce((a, w) => a + (w.memory || 0), 0);
    const items = [
      ["workers", s.workers.length],
      ["threads", threads],
      ["memory", bytes(mem)],
      ["processing", s.counts.processing],
      ["waiting", s.counts.waiting + s.counts["no-worker"]],
      ["in memory", s.counts.memory],
      ["erred", s.counts.erred],
      ["loop lag", (s.scheduler.loop_lag * 1000).toFixed(1) + " ms"],
    ];
    $("summary").replaceChildren(...items.map(([k, v]) => el("span", {}, k + " ", el("b", {}, String(v)))));
    $("footer-info").textContent =
      `scheduler ${s.scheduler.id}, pid ${s.scheduler.pid}, ${s.scheduler.clients} client(s), ` +
      `sample took ${(s.scheduler.sample_cost * 1000).toFixed(2)} ms`;
  }

  function meter(used, limit, text) {
    const frac = limit > 0 ? Math.min(1, used / limit) : 0;
    const bar = el("i", { style: `width:${(frac * 100).toFixed(1)}%;` + (frac > 0.8 ? "background:#e0a400" : "") });
    return el("div", { class: "meter", title: text }, bar, el("span", {}, text));
  }

  function renderWorkers(s) {
    const rows = s.workers
      .slice()
      .sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }))
      .map((w) => {
        const resources = Object.keys(w.resources).sort().map((r) => {
          const used = w.resources_used[r] || 0;
          return el("span", { class: "chip" + (used > 0 ? " busy" : ""), "data-resource": r },
            `${r} ${amount(used)}/${amount(w.resources[r])}`);
        });
        const envs = w.environments.map((e) => el("span", { class: "chip env", "data-environment": e }, e));
        const memText = w.memory_limit ? `${bytes(w.memory)} / ${bytes(w.memory_limit)}` : bytes(w.memory);
        return el("tr", { "data-worker": w.address },
          el("td", { class: "name" }, w.name),
          el("td", { class: "mono" }, w.address),
          el("td", { class: "num" }, w.nthreads),
          el("td", { class: "num" }, (w.cpu || 0).toFixed(0) + "%"),
          el("td", {}, meter(w.memory, w.memory_limit, memText)),
          el("td", { class: "num running" }, Math.min(w.executing, w.processing, w.nthreads)),
          el("td", { class: "num" }, w.processing),
          el("td", { class: "num" }, bytes(w.nbytes)),
          el("td", { class: "resources" }, ...(resources.length ? resources : [el("span", { class: "muted" }, "none")])),
          el("td", { class: "environments" }, ...(envs.length ? envs : [el("span", { class: "muted" }, "none")])),
          el("td", { class: "status-" + w.status }, w.status));
      });
    replaceRows(document.querySelector("#workers tbody"), rows);
    $("workers-count").textContent = `(${s.workers.length})`;
    $("no-workers").style.display = s.workers.length ? "none" : "";
  }

  function renderGroups(s) {
    const groups = s.groups.map((g) => {
      const waiting = g.waiting + g.released;
      const finished = Math.max(g.finished, g.memory);
      const total = finished + g.processing + waiting + g["no-worker"] + g.erred;
      return { g, waiting, finished, total, active: g.processing + waiting + g["no-worker"] > 0 };
    });
    groups.sort((a, b) => (b.active - a.active));
    const rows = groups.slice(0, MAX_GROUPS).map(({ g, waiting, finished, total }) => {
      const pct = (n) => (total ? (100 * n) / total : 0).toFixed(2) + "%";
      const bar = el("div", { class: "bar", title: `${finished} of ${total} finished` },
        el("i", { class: "finished", style: `width:${pct(finished)};background:${color(g.name)}` }),
        el("i", { class: "processing", style: `width:${pct(g.processing)};background:${color(g.name)}` }),
        el("i", { class: "waiting", style: `width:${pct(waiting)}` }),
        el("i", { class: "no-worker", style: `width:${pct(g["no-worker"])}` }),
        el("i", { class: "erred", style: `width:${pct(g.erred)}` }));
      return el("tr", {
          "data-group": g.name, "data-finished": finished, "data-processing": g.processing,
          "data-waiting": waiting + g["no-worker"], "data-erred": g.erred, "data-total": total,
        },
        el("td", { class: "mono" }, el("i", { class: "sw", style: `display:inline-block;width:10px;height:10px;margin-right:6px;background:${color(g.name)}` }), g.name),
        el("td", {}, bar),
        el("td", { class: "num finished" }, `${finished} / ${total}`),
        el("td", { class: "num" }, g.processing),
        el("td", { class: "num" }, waiting + g["no-worker"]),
        el("td", { class: "num" }, g.memory),
        el("td", { class: "num" + (g.erred ? " erred-count" : "") }, g.erred));
    });
    replaceRows(document.querySelector("#groups tbody"), rows);
    $("no-groups").style.display = rows.length ? "none" : "";
  }

  function renderPending(s) {
    const rows = s.pending.map((p) =>
      el("tr", { "data-key": p.key }, el("td", { class: "mono" }, p.key), el("td", {}, p.state), el("td", {}, p.reason)));
    replaceRows(document.querySelector("#pending tbody"), rows);
    const n = s.unrunnable;
    $("pending-count").textContent = n ? `(${n} cannot run now)` : "";
    $("no-pending").style.display = rows.length ? "none" : "";
  }

  function describe(msg) {
    if (msg === null || typeof msg !== "object") return String(msg);
    const parts = [];
    if (msg.action) parts.push(String(msg.action));
    for (const [k, v] of Object.entries(msg)) {
      if (k === "action" || k === "traceback" || k === "table") continue;
      parts.push(`${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
    }
    return parts.join(" ");
  }

  function renderEvents(s) {
    const rows = s.events.slice().reverse().map((e) =>
      el("tr", { "data-topic": e.topic },
        el("td", { class: "mono" }, new Date(e.time * 1000).toLocaleTimeString()),
        el("td", {}, e.topic),
        el("td", { class: "mono" }, describe(e.msg))));
    replaceRows(document.querySelector("#events tbody"), rows);
    $("no-events").style.display = rows.length ? "none" : "";
  }

  function renderStream(s) {
    const canvas = $("task-stream");
    const workers = s.workers.slice().sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
    const now = s.time;
    // The window grows with the cluster's history, up to WINDOW seconds.
    let oldest = now;
    for (const e of state.stream) { if (e[3] < oldest) oldest = e[3]; break; }
    const span = Math.max(5, Math.min(WINDOW, Math.ceil(now - oldest + 1)));
    $("stream-window").textContent = String(span);
    const t0 = now - span;
    // Rows: one per worker thread; each task goes to the first free row of its worker.
    const lanes = new Map();
    let row = 0;
    for (const w of workers) {
      lanes.set(w.address, { name: w.name, first: row, rows: Array(Math.max(1, w.nthreads)).fill(-Infinity) });
      row += Math.max(1, w.nthreads);
    }
    const rowH = row <= 8 ? 22 : row <= 24 ? 14 : 8, top = 4, left = 70, bottom = 18;
    const cssWidth = canvas.parentElement.clientWidth || 800;
    const cssHeight = top + Math.max(1, row) * rowH + bottom;
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(cssWidth * dpr);
    canvas.height = Math.round(cssHeight * dpr);
    canvas.style.height = cssHeight + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    const width = cssWidth - left - 8;
    const x = (t) => left + ((t - t0) / span) * width;
    // worker labels and lane backgrounds
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (const lane of lanes.values()) {
      ctx.fillStyle = lane.first % 2 ? "#fafbfc" : "#f3f5f8";
      ctx.fillRect(left, top + lane.first * rowH, width, lane.rows.length * rowH);
      ctx.fillStyle = "#6b7280";
      ctx.fillText("worker " + lane.name, 4, top + lane.first * rowH + (lane.rows.length * rowH) / 2);
    }
    let drawn = 0, errors = 0;
    const seen = new Set();
    for (const [, group, worker, start, stop, erred] of state.stream) {
      if (stop < t0) continue;
      const lane = lanes.get(worker);
      if (!lane) continue;
      let r = lane.rows.findIndex((end) => end <= start + 1e-6);
      if (r < 0) r = lane.rows.indexOf(Math.min(...lane.rows));
      lane.rows[r] = stop;
      const y = top + (lane.first + r) * rowH + 1;
      const x0 = Math.max(left, x(start));
      const w = Math.max(1.5, x(stop) - x0);
      ctx.fillStyle = erred ? "#d62728" : color(group);
      ctx.fillRect(x0, y, w, rowH - 2);
      if (erred) {
        ctx.strokeStyle = "#5a0d0d";
        ctx.lineWidth = 1;
        ctx.strokeRect(x0 + 0.5, y + 0.5, Math.max(1, w - 1), rowH - 3);
        errors++;
      }
      if (!erred) seen.add(group);
      drawn++;
    }
    // time axis
    ctx.fillStyle = "#6b7280";
    ctx.textBaseline = "top";
    const step = span <= 10 ? 1 : 5;
    for (let t = 0; t <= span; t += step) {
      const xx = x(now - t);
      ctx.fillRect(xx, cssHeight - bottom, 1, 4);
      ctx.fillText(t === 0 ? "now" : `-${t}s`, Math.min(xx - 8, cssWidth - 24), cssHeight - bottom + 5);
    }
    canvas.dataset.drawn = String(drawn);
    canvas.dataset.errors = String(errors);
    $("stream-legend").replaceChildren(
      ...[...seen].sort().map((g) => el("span", { "data-group": g },
        el("i", { class: "sw", style: `background:${color(g)}` }), g)),
      ...(errors ? [el("span", {}, el("i", { class: "sw erred" }), "error")] : []));
  }

  function render() {
    const s = state.snapshot;
    if (!s) return;
    renderHeader(s);
    renderWorkers(s);
    renderGroups(s);
    renderStream(s);
    renderPending(s);
    renderEvents(s);
  }

  function ingest(frame) {
    state.snapshot = frame.snapshot;
    state.receivedAt = Date.now() / 1000;
    if (frame.stream && frame.stream.length) {
      for (const e of frame.stream) state.stream.push(e);
    }
    const cutoff = frame.snapshot.time - KEEP;
    let drop = 0;
    while (drop < state.stream.length && state.stream[drop][4] < cutoff) drop++;
    if (state.stream.length - drop > MAX_STREAM) drop = state.stream.length - MAX_STREAM;
    if (drop) state.stream.splice(0, drop);
  }

  // -- the connection ---------------------------------------------------------------------
  function setConnected(on) {
    state.connected = on;
    const pill = $("connection");
    pill.textContent = on ? "live" : "offline";
    pill.className = "pill " + (on ? "on" : "off");
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws");
    ws.onopen = () => setConnected(true);
    ws.onmessage = (event) => {
      try {
        ingest(JSON.parse(event.data));
        state.frames++;
        render();
      } catch (err) {
        console.error("corral dashboard: bad frame", err);
      }
    };
    ws.onclose = () => {
      setConnected(false);
      // A refused WebSocket closes like a lost one: ask whether this browser is still let in
      // (the scheduler may have restarted with another token), else try again.
      fetch("/api/snapshot", { method: "HEAD", credentials: "same-origin", cache: "no-store" })
        .then((response) => {
          if (response.status === 401) {
            location.href = "/login?next=" + encodeURIComponent(location.pathname);
          } else {
            setTimeout(connect, 1000);
          }
        })
        .catch(() => setTimeout(connect, 1000));
    };
  }

  $("stream-window").textContent = String(WINDOW);
  window.addEventListener("resize", render);
  connect();
})();
