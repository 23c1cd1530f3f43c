// Adapters: the registered adapters (version, rank, targets, size) and named blends, and the upload form
// (drag and drop, or a file chooser). The server's validation errors are shown as the API returns them.

import { postForm, showError, showOk, clearStatus } from "./api.js";
import { state, onCatalog, refreshCatalog, recipeText, NAME_RE } from "./state.js";

function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB"];
  let v = n, u = -1;
  do { v /= 1024; u += 1; } while (v >= 1024 && u < units.length - 1);
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

function when(seconds) {
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderTables() {
  const body = document.querySelector("#adapters-table tbody");
  body.replaceChildren(...state.adapters.map((a) => {
    const tr = document.createElement("tr");
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = a.name;
    tr.append(name, cell(String(a.version), "num"), cell(String(a.rank), "num"), cell(String(a.alpha), "num"),
      cell(a.target_modules.join(", ")), cell(bytes(a.size_bytes), "num"), cell(when(a.created)), cell(a.description || ""));
    return tr;
  }));
  if (!state.adapters.length) {
    const tr = document.createElement("tr");
    const td = cell("No adapter is registered yet: upload one below.");
    td.colSpan = 8;
    tr.append(td);
    body.append(tr);
  }
  const blends = document.querySelector("#blends-table tbody");
  blends.replaceChildren(...state.blends.map((b) => {
    const tr = document.createElement("tr");
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = b.name;
    tr.append(name, cell(recipeText(b.stances)), cell(String(b.version), "num"), cell(when(b.created)));
    return tr;
  }));
  if (!state.blends.length) {
    const tr = document.createElement("tr");
    const td = cell("None yet: dial a blend in Compare and save it.");
    td.colSpan = 4;
    tr.append(td);
    blends.append(tr);
  }
}

let chosen = [];

function setFiles(files) {
  chosen = [...files];
  const note = document.getElementById("upload-chosen");
  note.textContent = chosen.length ? `Chosen: ${chosen.map((f) => `${f.name} (${bytes(f.size)})`).join(", ")}` : "No file chosen.";
  const name = document.getElementById("upload-name");
  if (!name.value && chosen.length === 1 && /\.(zip|tar\.gz|tgz|tar)$/i.test(chosen[0].name)) {
    const guess = chosen[0].name.replace(/\.(zip|tar\.gz|tgz|tar)$/i, "").replace(/[^A-Za-z0-9._-]/g, "-");
    if (NAME_RE.test(guess)) name.value = guess;
  }
}

async function upload(event) {
  event.preventDefault();
  const status = document.getElementById("upload-status");
  clearStatus(status);
  const name = document.getElementById("upload-name").value.trim();
  const description = document.getElementById("upload-description").value.trim();
  const replace = document.getElementById("upload-replace").checked;
  if (!NAME_RE.test(name)) {
    showError(status, new Error("Give the adapter a name: letters, digits, . _ - (at most 64), starting with a letter or digit."));
    document.getElementById("upload-name").focus();
    return;
  }
  if (!chosen.length) {
    showError(status, new Error("Choose or drop the adapter's files first."));
    document.getElementById("upload-files").focus();
    return;
  }
  const form = new FormData();
  form.append("name", name);
  if (description) form.append("description", description);
  for (const f of chosen) form.append("files", f, f.name);
  const button = document.getElementById("upload-submit");
  button.disabled = true;
  status.textContent = "Uploading…";
  try {
    const rec = await postForm(`v1/adapters${replace ? "?replace=true" : ""}`, form);
    await refreshCatalog();
    showOk(status, `Registered “${rec.name}” (version ${rec.version}, rank ${rec.rank}, ${rec.target_modules.length} target modules): it can answer now.`);
  } catch (err) {
    showError(status, err);
  } finally {
    button.disabled = false;
  }
}

export function initAdapters() {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("upload-files");
  input.addEventListener("change", () => setFiles(input.files));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) setFiles(e.dataTransfer.files);
  });
  document.getElementById("upload-form").addEventListener("submit", upload);
  onCatalog(renderTables);
}
