// Compare: the same conversation sent to two to four panes at once, each answer streamed side by side.
// A pane is the base model, an adapter, a named blend, or a blend dialled with one slider per adapter; a
// dialled blend can be saved as a named stance (POST /v1/stances) or downloaded as one peft adapter
// (POST /v1/export-blend).

import { postAdmin, showError, showOk, clearStatus, streamChat } from "./api.js";
import { readRequest, settingsText, currentSettings } from "./request.js";
import { state, onCatalog, refreshCatalog, recipeText, fmtWeight, roundWeight, NAME_RE } from "./state.js";

const MIN_PANES = 2, MAX_PANES = 4;
const panes = [];
let paneIds = 0;
let controller = null;

/** A stream's timing for a pane: "TTFT 12 ms · 85.3 tokens/s · 64 tokens · finish: length". */
export function statsText(r) {
  const ttft = r.ttftMs === null ? "TTFT —" : r.ttftMs < 1000 ? `TTFT ${Math.round(r.ttftMs)} ms` : `TTFT ${(r.ttftMs / 1000).toFixed(2)} s`;
  const tps = r.tokensPerSecond === null ? "— tokens/s" : `${r.tokensPerSecond.toFixed(1)} tokens/s`;
  return [ttft, tps, `${r.tokens} tokens`, r.finish ? `finish: ${r.finish}` : null].filter(Boolean).join(" · ");
}

class Pane {
  constructor(kind = "base", weights = {}) {
    this.id = ++paneIds;
    this.weights = { ...weights };
    const el = document.getElementById("pane-template").content.firstElementChild.cloneNode(true);
    this.el = el;
    el.id = `pane-${this.id}`;
    const title = el.querySelector(".pane-title");
    title.id = `pane-${this.id}-title`;
    el.setAttribute("aria-labelledby", title.id);
    this.select = el.querySelector(".stance-select");
    this.select.id = `pane-${this.id}-stance`;
    el.querySelector(".stance-label").htmlFor = this.select.id;
    this.weightsBox = el.querySelector(".weights");
    this.sliders = el.querySelector(".sliders");
    this.summary = el.querySelector(".blend-summary");
    this.settings = el.querySelector(".settings");
    this.stats = el.querySelector(".stats");
    this.stats.id = `pane-${this.id}-stats`;
    this.stats.setAttribute("role", "status");
    this.output = el.querySelector(".output");
    this.output.id = `pane-${this.id}-output`;
    this.output.setAttribute("aria-label", `Answer of pane ${this.id}`);
    const name = el.querySelector(".save-name");
    name.id = `pane-${this.id}-save-name`;
    el.querySelector(".save-name-label").htmlFor = name.id;
    this.saveName = name;
    this.saveStatus = el.querySelector(".save-status");
    el.querySelector(".save-blend").addEventListener("click", () => this.save());
    el.querySelector(".download-blend").addEventListener("click", () => this.download());
    el.querySelector(".remove-pane").addEventListener("click", () => removePane(this));
    this.select.addEventListener("change", () => { this.renderWeights(); this.renderSettings(); });
    this.pendingKind = kind;
    this.renderOptions();
  }

  get kind() {
    return this.select.value;
  }

  /** The stance choices: base model, adapters, named blends, and "a blend you dial". */
  renderOptions() {
    const keep = this.pendingKind ?? this.select.value;
    this.pendingKind = null;
    this.select.replaceChildren();
    const group = (label, options) => {
      if (!options.length) return;
      const g = document.createElement("optgroup");
      g.label = label;
      for (const [value, text] of options) g.append(new Option(text, value));
      this.select.append(g);
    };
    group("Base model", [["base", `${state.base ?? "base model"} (no adapter)`]]);
    group("Adapters", state.adapters.map((a) => [`adapter:${a.name}`, a.name]));
    group("Named blends", state.blends.map((b) => [`named:${b.name}`, `${b.name} = ${recipeText(b.stances)}`]));
    group("Your blend", state.adapters.length ? [["mix", "Dial a blend with sliders"]] : []);
    const values = [...this.select.options].map((o) => o.value);
    this.select.value = values.includes(keep) ? keep : "base";
    this.renderWeights();
    this.renderSettings();
  }

  renderWeights() {
    const mix = this.kind === "mix";
    this.weightsBox.hidden = !mix;
    if (!mix) return;
    const names = state.adapters.map((a) => a.name);
    for (const n of Object.keys(this.weights)) if (!names.includes(n)) delete this.weights[n];
    this.sliders.replaceChildren();
    names.forEach((name, i) => {
      const row = document.createElement("div");
      row.className = "slider";
      const id = `pane-${this.id}-w-${i}`;
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = name;
      const input = document.createElement("input");
      Object.assign(input, { type: "range", id, min: "-2", max: "2", step: "0.05" });
      input.value = String(this.weights[name] ?? 0);
      input.dataset.adapter = name;
      const out = document.createElement("output");
      out.htmlFor = id;
      out.id = `${id}-value`;
      const show = () => {
        const w = roundWeight(Number(input.value));
        out.textContent = fmtWeight(w);
        input.setAttribute("aria-valuetext", `${name} weight ${fmtWeight(w)}`);
        if (w === 0) delete this.weights[name]; else this.weights[name] = w;
        this.renderSummary();
      };
      input.addEventListener("input", show);
      show();
      row.append(label, input, out);
      this.sliders.append(row);
    });
    this.renderSummary();
  }

  renderSummary() {
    const active = this.activeWeights();
    this.summary.textContent = Object.keys(active).length
      ? `Blend: ${recipeText(active)}`
      : "Every weight is 0: this pane answers as the base model.";
  }

  /** The non-zero weights, in the adapters' (sorted) order. */
  activeWeights() {
    const out = {};
    for (const { name } of state.adapters) if (this.weights[name]) out[name] = this.weights[name];
    return out;
  }

  /** "model" and maybe "stances" of this pane's request, and a label for it. */
  target() {
    const kind = this.kind;
    if (kind.startsWith("adapter:") || kind.startsWith("named:")) {
      const name = kind.slice(kind.indexOf(":") + 1);
      return { fields: { model: name }, label: name };
    }
    if (kind === "mix") {
      const stances = this.activeWeights();
      if (Object.keys(stances).length) return { fields: { model: state.base, stances }, label: recipeText(stances) };
    }
    return { fields: { model: state.base }, label: `${state.base} (base)` };
  }

  renderSettings(sampling = null) {
    this.settings.textContent = settingsText(sampling ?? currentSettings());
  }

  async run(request, signal) {
    const { fields } = this.target();
    const body = { ...fields, messages: request.messages, ...request.sampling };
    this.renderSettings(request.sampling);
    this.output.textContent = "";
    this.output.classList.remove("error");
    this.output.setAttribute("aria-busy", "true");
    this.el.classList.add("streaming");
    this.stats.textContent = "Streaming…";
    this.el.dataset.state = "streaming";
    try {
      const r = await streamChat(body, { signal, onText: (t) => { this.output.textContent = t; } });
      this.output.textContent = r.text;
      this.stats.textContent = statsText(r);
      this.el.dataset.state = "done";
    } catch (err) {
      this.stats.replaceChildren();
      const span = document.createElement("span");
      span.className = "err";
      this.stats.append(span);
      showError(span, err);
      span.className = "err";
      this.el.dataset.state = "error";
    } finally {
      this.output.removeAttribute("aria-busy");
      this.el.classList.remove("streaming");
    }
  }

  checkSave() {
    const name = this.saveName.value.trim();
    const stances = this.activeWeights();
    if (!NAME_RE.test(name)) throw new Error("Name the blend first: letters, digits, . _ - (at most 64).");
    if (!Object.keys(stances).length) throw new Error("Move at least one slider away from 0 first.");
    return { name, stances };
  }

  async save() {
    clearStatus(this.saveStatus);
    let blend;
    try { blend = this.checkSave(); } catch (e) { showError(this.saveStatus, e); return; }
    try {
      const res = await postAdmin("v1/stances", { ...blend, description: "saved from the playground" });
      const saved = await res.json();
      await refreshCatalog();
      showOk(this.saveStatus, `Saved “${saved.name}” (version ${saved.version}): pick it under Named blends, or send "model": "${saved.name}".`);
    } catch (e) {
      showError(this.saveStatus, e);
    }
  }

  async download() {
    clearStatus(this.saveStatus);
    let blend;
    try { blend = this.checkSave(); } catch (e) { showError(this.saveStatus, e); return; }
    try {
      const res = await postAdmin("v1/export-blend", blend);
      const blob = await res.blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `${blend.name}.zip`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      showOk(this.saveStatus, `Downloaded ${blend.name}.zip: one peft adapter equal to ${recipeText(blend.stances)}.`);
    } catch (e) {
      showError(this.saveStatus, e);
    }
  }
}

function renumberPanes() {
  panes.forEach((p, i) => {
    p.el.querySelector(".pane-title").textContent = `Pane ${i + 1}`;
    const remove = p.el.querySelector(".remove-pane");
    remove.setAttribute("aria-label", `Remove pane ${i + 1}`);
    remove.disabled = panes.length <= MIN_PANES;
    p.output.setAttribute("aria-label", `Answer of pane ${i + 1}`);
  });
  document.getElementById("add-pane").disabled = panes.length >= MAX_PANES;
}

export function addPane(kind = "base", weights = {}) {
  if (panes.length >= MAX_PANES) return null;
  const pane = new Pane(kind, weights);
  panes.push(pane);
  document.getElementById("panes").append(pane.el);
  renumberPanes();
  return pane;
}

function removePane(pane) {
  if (panes.length <= MIN_PANES) return;
  panes.splice(panes.indexOf(pane), 1);
  pane.el.remove();
  renumberPanes();
  document.getElementById("add-pane").focus();
}

export async function runCompare() {
  const note = document.getElementById("compare-note");
  let request;
  try { request = readRequest(); } catch (e) { note.textContent = e.message; note.classList.add("warn"); return; }
  note.classList.remove("warn");
  if (controller) controller.abort();
  controller = new AbortController();
  const run = document.getElementById("run-compare"), stop = document.getElementById("stop-compare");
  run.disabled = true;
  stop.disabled = false;
  try {
    await Promise.all(panes.map((p) => p.run(request, controller.signal)));
  } finally {
    run.disabled = false;
    stop.disabled = true;
    controller = null;
  }
}

export function initCompare() {
  document.getElementById("run-compare").addEventListener("click", runCompare);
  document.getElementById("stop-compare").addEventListener("click", () => controller && controller.abort());
  document.getElementById("add-pane").addEventListener("click", () => {
    const p = addPane(state.adapters.length ? `adapter:${state.adapters[0].name}` : "base");
    if (p) p.select.focus();
  });
  for (const id of ["max-tokens", "temperature", "top-p", "top-k", "seed"]) {
    document.getElementById(id).addEventListener("input", () => panes.forEach((p) => p.renderSettings()));
  }
  onCatalog(() => panes.forEach((p) => p.renderOptions()));
}

/** The first panes a visitor sees: the base model, the first adapter, and a blend of the first two. */
export function defaultPanes() {
  const names = state.adapters.map((a) => a.name);
  addPane("base");
  addPane(names.length ? `adapter:${names[0]}` : "base");
  if (names.length) {
    const w = names.length > 1 ? { [names[0]]: 0.5, [names[1]]: 0.5 } : { [names[0]]: 0.5 };
    addPane("mix", w);
  }
}
