// bulkhead web console (docs/UI.md). Loaded from 'self' only (CSP script-src 'self'): no inline script.
"use strict";

// Sortable tables: each header becomes a button (keyboard: Tab to it, Enter/Space sorts).
function makeSortable(table) {
  const heads = table.tHead ? Array.from(table.tHead.rows[0].cells) : [];
  heads.forEach((th, col) => {
    if (th.textContent.trim() === "Actions") return;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "sort";
    b.textContent = th.textContent;
    th.textContent = "";
    th.appendChild(b);
    th.setAttribute("aria-sort", "none");
    b.addEventListener("click", () => {
      const asc = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach((h) => h.setAttribute("aria-sort", "none"));
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const key = (r) => (r.cells[col] ? r.cells[col].textContent.trim() : "");
      const num = rows.every((r) => key(r) === "" || !isNaN(Number(key(r))));
      rows.sort((a, b2) => {
        const x = key(a), y = key(b2);
        const c = num ? Number(x) - Number(y) : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
}

// Live statistics: poll the VM's stats (same RBAC as GET /v1/vms/{id}/stats), rates from deltas.
function sparkline(svg, values) {
  const max = Math.max(1, ...values);
  const pts = values.map((v, i) => `${(i * 120) / 59},${40 - (v / max) * 38}`).join(" ");
  svg.innerHTML = `<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="${pts}"/>`;
}
function fmt(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + " M";
  if (v >= 1e3) return (v / 1e3).toFixed(1) + " k";
  return v.toFixed(0);
}
function sum(x) {
  if (typeof x === "number") return x;
  if (Array.isArray(x)) return x.reduce((a, b) => a + sum(b), 0);
  if (x && typeof x === "object") return Object.values(x).reduce((a, b) => a + sum(b), 0);
  return 0;
}
function startStats(el) {
  const hist = { exits: [], blk: [], net: [] };
  let last = null;
  const tick = async () => {
    try {
      const r = await fetch(el.dataset.url, { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) throw new Error(String(r.status));
      const s = await r.json();
      const c = s.counters || {};
      const now = {
        t: s.t,
        exits: s.exits_total || 0,
        blk: sum(c.blk_read_bytes) + sum(c.blk_write_bytes) + sum(c.block_bytes || 0),
        net: sum(c.net_rx_bytes) + sum(c.net_tx_bytes) + sum(c.net_bytes || 0),
      };
      if (last && now.t > last.t) {
        const dt = now.t - last.t;
        for (const k of ["exits", "blk", "net"]) {
          const rate = Math.max(0, (now[k] - last[k]) / dt);
          hist[k].push(rate);
          if (hist[k].length > 60) hist[k].shift();
          document.getElementById("s-" + k).textContent = fmt(rate);
          sparkline(document.getElementById("c-" + k), hist[k]);
        }
      }
      last = now;
      document.getElementById("stats-note").textContent = s.available ? "live, polled every second" : "not running: no counters";
    } catch (e) {
      document.getElementById("stats-note").textContent = "statistics unavailable (" + e.message + ")";
    }
  };
  tick();
  setInterval(tick, 1000);
}

// Serial console: xterm.js over the console WebSocket (the API's, with this session's identity).
function startConsole(el) {
  const status = document.getElementById("console-status");
  const term = new Terminal({ convertEol: true, cursorBlink: true, fontSize: 15, scrollback: 5000 });
  term.open(el);
  window.bulkheadTerm = term; // the end-to-end tests read the buffer
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + el.dataset.ws;
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const dec = new TextDecoder();
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const m = JSON.parse(ev.data);
      if (m.type === "attached") status.textContent = "attached (" + m.mode + ")";
      else if (m.type === "error" || m.type === "closed") status.textContent = m.detail || m.type;
      return;
    }
    term.write(dec.decode(new Uint8Array(ev.data), { stream: true }));
  };
  ws.onclose = (ev) => { status.textContent = "closed: " + (ev.reason || ev.code); };
  term.onData((d) => { if (ws.readyState === 1) ws.send(new TextEncoder().encode(d)); });
  term.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.sortable").forEach(makeSortable);
  const stats = document.getElementById("stats");
  if (stats) startStats(stats);
  const t = document.getElementById("term");
  if (t) startConsole(t);
});
