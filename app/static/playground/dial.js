// Dial: one adapter's weight swept over five to seven values in one click, the answers in a row from weight 0
// (the base model) to the top weight.

import { showError, streamChat } from "./api.js";
import { readRequest, settingsText } from "./request.js";
import { state, onCatalog, fmtWeight, roundWeight } from "./state.js";
import { statsText } from "./compare.js";

let controller = null;

/** n weights from 0 to top, evenly spaced. */
export function sweepWeights(top, n) {
  return Array.from({ length: n }, (_, i) => roundWeight((top * i) / (n - 1)));
}

function renderAdapters() {
  const select = document.getElementById("dial-adapter");
  const keep = select.value;
  select.replaceChildren(...state.adapters.map((a) => new Option(a.name, a.name)));
  if (state.adapters.some((a) => a.name === keep)) select.value = keep;
  document.getElementById("run-dial").disabled = !state.adapters.length;
  document.getElementById("dial-note").textContent = state.adapters.length
    ? "One answer per weight, from 0 (the base model) to the top weight, so you see the stance appear."
    : "No adapter is registered yet: upload one under Adapters.";
}

function card(adapter, w, top, index) {
  const el = document.createElement("li");
  el.className = "sweep-card card";
  el.id = `sweep-${index}`;
  el.dataset.weight = String(w);
  const h = document.createElement("h3");
  h.id = `sweep-${index}-title`;
  h.textContent = w === 0 ? "w = 0.00 (base)" : `w = ${fmtWeight(w)}`;
  el.setAttribute("aria-labelledby", h.id);
  const bar = document.createElement("div");
  bar.className = "weight-bar";
  bar.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.style.width = `${top === 0 ? 0 : Math.round((Math.abs(w) / Math.abs(top)) * 100)}%`;
  bar.append(fill);
  const settings = document.createElement("p");
  settings.className = "settings note";
  const stats = document.createElement("p");
  stats.className = "stats";
  stats.setAttribute("role", "status");
  const output = document.createElement("div");
  output.className = "output";
  output.tabIndex = 0;
  output.setAttribute("role", "region");
  output.setAttribute("aria-label", `Answer at ${adapter} weight ${fmtWeight(w)}`);
  el.append(h, bar, settings, stats, output);
  return { el, settings, stats, output };
}

async function runOne(c, body, signal) {
  c.stats.textContent = "Streaming…";
  c.el.dataset.state = "streaming";
  c.output.setAttribute("aria-busy", "true");
  try {
    const r = await streamChat(body, { signal, onText: (t) => { c.output.textContent = t; } });
    c.output.textContent = r.text;
    c.stats.textContent = statsText(r);
    c.el.dataset.state = "done";
  } catch (err) {
    showError(c.stats, err);
    c.el.dataset.state = "error";
  } finally {
    c.output.removeAttribute("aria-busy");
  }
}

export async function runDial() {
  const note = document.getElementById("dial-note");
  const adapter = document.getElementById("dial-adapter").value;
  const top = Number(document.getElementById("dial-top").value);
  const n = Number(document.getElementById("dial-steps").value);
  let request;
  try {
    if (!adapter) throw new Error("No adapter is registered yet: upload one under Adapters.");
    if (!Number.isFinite(top) || top === 0 || Math.abs(top) > 2) throw new Error("The top weight must be between −2 and 2, and not 0.");
    request = readRequest();
  } catch (e) {
    note.textContent = e.message;
    note.classList.add("warn");
    return;
  }
  note.classList.remove("warn");
  note.textContent = `${adapter}: ${n} weights from 0 to ${fmtWeight(top)}, ${settingsText(request.sampling)}.`;
  if (controller) controller.abort();
  controller = new AbortController();
  const row = document.getElementById("sweep");
  const weights = sweepWeights(top, n);
  const cards = weights.map((w, i) => card(adapter, w, top, i));
  row.replaceChildren(...cards.map((c) => c.el));
  const run = document.getElementById("run-dial"), stop = document.getElementById("stop-dial");
  run.disabled = true;
  stop.disabled = false;
  try {
    await Promise.all(weights.map((w, i) => {
      const fields = w === 0 ? { model: state.base } : { model: state.base, stances: { [adapter]: w } };
      cards[i].settings.textContent = settingsText(request.sampling);
      return runOne(cards[i], { ...fields, messages: request.messages, ...request.sampling }, controller.signal);
    }));
  } finally {
    run.disabled = false;
    stop.disabled = true;
    controller = null;
  }
}

export function initDial() {
  document.getElementById("run-dial").addEventListener("click", runDial);
  document.getElementById("stop-dial").addEventListener("click", () => controller && controller.abort());
  onCatalog(renderAdapters);
}
