// Live numbers: per stance, tokens/s and time to first token over the last five minutes, drawn from the
// server's own metrics (GET /metrics/stances, the same registry as /metrics), polled every two seconds.
// TTFT of an interval is the change of the TTFT histogram's sum over the change of its count.

import { getJSON } from "./api.js";

const POLL_MS = 2000;
const KEEP_S = 300;
const SVG = "http://www.w3.org/2000/svg";
const W = 320, H = 90, PAD_L = 46, PAD_R = 6, PAD_T = 8, PAD_B = 16;

const history = new Map(); // stance -> [{t, tps, ttft}]
const previous = new Map(); // stance -> last totals
let visible = false;

function svgEl(name, attrs = {}, text = null) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== null) el.textContent = text;
  return el;
}

function fmt(v, unit) {
  if (v === null || v === undefined) return "—";
  if (unit === "ms") return v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(2)} s`;
  return v.toFixed(1);
}

/** A line chart of points [{t, v}] (v may be null: a gap) over the last KEEP_S seconds before now. */
function chart(points, now, { cls, unit, captionId }) {
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": captionId });
  const values = points.map((p) => p.v).filter((v) => v !== null);
  const top = Math.max(1e-9, ...values) * 1.1;
  const x = (t) => PAD_L + ((t - (now - KEEP_S)) / KEEP_S) * (W - PAD_L - PAD_R);
  const y = (v) => H - PAD_B - (v / top) * (H - PAD_T - PAD_B);
  svg.append(svgEl("line", { class: "axis", x1: PAD_L, y1: H - PAD_B, x2: W - PAD_R, y2: H - PAD_B }));
  svg.append(svgEl("line", { class: "axis", x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B }));
  svg.append(svgEl("text", { class: "label", x: PAD_L - 4, y: PAD_T + 8, "text-anchor": "end" }, values.length ? fmt(top / 1.1, unit) : "0"));
  svg.append(svgEl("text", { class: "label", x: PAD_L - 4, y: H - PAD_B, "text-anchor": "end" }, "0"));
  svg.append(svgEl("text", { class: "label", x: PAD_L, y: H - 3 }, "−5 min"));
  svg.append(svgEl("text", { class: "label", x: W - PAD_R, y: H - 3, "text-anchor": "end" }, "now"));
  let run = [];
  const flush = () => {
    if (run.length > 1) svg.append(svgEl("polyline", { class: `line ${cls}`, points: run.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" ") }));
    else if (run.length === 1) svg.append(svgEl("circle", { class: "dot", cx: run[0][0], cy: run[0][1], r: 2.5 }));
    run = [];
  };
  for (const p of points) {
    if (p.v === null) flush(); else run.push([x(p.t), y(p.v)]);
  }
  flush();
  return svg;
}

function render() {
  const box = document.getElementById("charts");
  if (!history.size) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = "No request has finished yet: send something from Compare or Dial.";
    box.replaceChildren(p);
    return;
  }
  const now = Date.now() / 1000;
  const cards = [];
  for (const [stance, points] of [...history.entries()].sort(([a], [b]) => a.localeCompare(b))) {
    const safe = stance.replace(/[^A-Za-z0-9_-]/g, "_");
    const card = document.createElement("section");
    card.className = "chart-card card";
    card.dataset.stance = stance;
    const h = document.createElement("h3");
    h.id = `live-${safe}`;
    h.textContent = stance;
    card.setAttribute("aria-labelledby", h.id);
    const tps = points.map((p) => ({ t: p.t, v: p.tps }));
    const ttft = points.map((p) => ({ t: p.t, v: p.ttft }));
    const tpsValues = tps.map((p) => p.v).filter((v) => v !== null);
    const ttftValues = ttft.map((p) => p.v).filter((v) => v !== null);
    const last = (arr) => (arr.length ? arr[arr.length - 1] : null);
    const peak = tpsValues.length ? Math.max(...tpsValues) : null;
    const mean = ttftValues.length ? ttftValues.reduce((a, b) => a + b, 0) / ttftValues.length : null;
    const fig = (label, svgPoints, opts, caption) => {
      const f = document.createElement("figure");
      const c = document.createElement("figcaption");
      c.id = `live-${safe}-${opts.cls}`;
      c.textContent = caption;
      f.append(chart(svgPoints, now, { ...opts, captionId: c.id }), c);
      return f;
    };
    card.append(
      h,
      fig("tokens/s", tps, { cls: "tps", unit: "" }, `Tokens per second: now ${fmt(last(tpsValues), "")}, peak ${fmt(peak, "")} (10 s window).`),
      fig("TTFT", ttft, { cls: "ttft", unit: "ms" }, `Time to first token: last ${fmt(last(ttftValues), "ms")}, mean ${fmt(mean, "ms")}.`),
    );
    cards.push(card);
  }
  box.replaceChildren(...cards);
}

async function poll() {
  try {
    const snap = await getJSON("metrics/stances");
    for (const row of snap.data) {
      const prev = previous.get(row.stance);
      let ttft = null;
      if (prev && row.ttft_count > prev.ttft_count) {
        ttft = ((row.ttft_seconds_sum - prev.ttft_seconds_sum) / (row.ttft_count - prev.ttft_count)) * 1000;
      } else if (!prev && row.ttft_count > 0) {
        ttft = (row.ttft_seconds_sum / row.ttft_count) * 1000;
      }
      previous.set(row.stance, row);
      const points = history.get(row.stance) || [];
      points.push({ t: snap.time, tps: row.tokens_per_second, ttft });
      while (points.length && points[0].t < snap.time - KEEP_S) points.shift();
      history.set(row.stance, points);
    }
    for (const stance of [...history.keys()]) {
      if (!snap.data.some((r) => r.stance === stance)) { history.delete(stance); previous.delete(stance); }
    }
    if (visible) render();
  } catch { /* the server is away: try again at the next tick */ }
}

export function showLive(on) {
  visible = on;
  if (on) render();
}

export function initLive() {
  poll();
  setInterval(poll, POLL_MS);
}
