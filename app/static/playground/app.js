// The playground's entry point: tabs, the admin key, start-up (config, wait for the model, read the catalog).

import { adminKey, getJSON, setAdminKey } from "./api.js";
import { initAdapters } from "./adapters.js";
import { defaultPanes, initCompare, runCompare } from "./compare.js";
import { initDial, runDial } from "./dial.js";
import { initLive, showLive } from "./live.js";
import { initRequest } from "./request.js";
import { state, onCatalog, refreshCatalog } from "./state.js";

const TABS = ["compare", "dial", "adapters", "live"];
let current = "compare";

function selectTab(name, { focus = false } = {}) {
  current = name;
  for (const t of TABS) {
    const tab = document.getElementById(`tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    document.getElementById(`panel-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  // the prompt and sampling settings belong to the views that send requests
  document.getElementById("request").hidden = !(name === "compare" || name === "dial");
  showLive(name === "live");
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function initTabs() {
  for (const t of TABS) {
    const tab = document.getElementById(`tab-${t}`);
    tab.addEventListener("click", () => selectTab(t));
    tab.addEventListener("keydown", (e) => {
      const i = TABS.indexOf(t);
      const to = { ArrowRight: (i + 1) % TABS.length, ArrowLeft: (i + TABS.length - 1) % TABS.length, Home: 0, End: TABS.length - 1 }[e.key];
      if (to !== undefined) {
        e.preventDefault();
        selectTab(TABS[to], { focus: true });
      }
    });
  }
  const fromHash = location.hash.slice(1);
  selectTab(TABS.includes(fromHash) ? fromHash : "compare");
}

function renderAdminNote() {
  const note = document.getElementById("admin-note");
  const admin = state.config ? state.config.admin : null;
  note.classList.remove("warn");
  if (!admin) {
    note.textContent = "";
  } else if (admin.key_required) {
    if (adminKey()) {
      note.textContent = "Sent with save, download and upload only; kept in this tab until it closes.";
    } else {
      note.textContent = "This server asks for the admin key to save, download and upload. Comparing needs none.";
    }
  } else if (admin.allowed) {
    note.textContent = "No admin key is set on this server: save, download and upload work from this machine.";
  } else {
    note.textContent = `Save, download and upload are refused from here: ${admin.reason}.`;
    note.classList.add("warn");
  }
}

function initAdminKey() {
  const input = document.getElementById("admin-key");
  input.value = adminKey();
  document.getElementById("admin-form").addEventListener("submit", (e) => e.preventDefault());
  input.addEventListener("input", () => {
    setAdminKey(input.value.trim());
    renderAdminNote();
  });
}

function setStatus(text, kind = "") {
  const el = document.getElementById("server-status");
  el.textContent = text;
  el.className = `server-status ${kind}`.trim();
}

async function waitReady() {
  for (let i = 0; ; i++) {
    try {
      const res = await fetch(new URL("../ready", document.baseURI), { cache: "no-store" });
      if (res.ok) return res.json();
      const body = await res.json().catch(() => ({}));
      const msg = body.error ? body.error.message : `HTTP ${res.status}`;
      setStatus(`Waiting for the server: ${msg}…`);
      if (/failed/.test(msg)) { setStatus(`The server could not start: ${msg}`, "error"); return null; }
    } catch {
      setStatus("Cannot reach the server; retrying…", "error");
    }
    await new Promise((r) => setTimeout(r, Math.min(2000, 250 * (i + 1))));
  }
}

async function boot() {
  initTabs();
  initAdminKey();
  initRequest(() => (current === "dial" ? runDial() : runCompare()));
  initCompare();
  initDial();
  initAdapters();
  try {
    state.config = await getJSON("playground/config.json");
  } catch { /* older server: no config; admin note stays empty */ }
  renderAdminNote();
  const ready = await waitReady();
  if (!ready) return;
  try {
    await refreshCatalog();
  } catch (err) {
    setStatus(`Cannot read the models: ${err.message}`, "error");
    return;
  }
  defaultPanes();
  const summary = () => setStatus(
    `Ready: ${state.base} on ${ready.device} · ${state.adapters.length} adapters · ${state.blends.length} named blends`, "ready");
  summary();
  onCatalog(summary);
  document.body.dataset.ready = "true";
  initLive();
}

boot();
