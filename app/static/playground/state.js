// What the page knows about the server: its config, the base model, the adapters and the named blends.
// Views subscribe with onCatalog(fn) and re-render when refreshCatalog() has read the server again.

import { getJSON } from "./api.js";

export const state = {
  config: null,     // GET /playground/config.json
  base: null,       // the base model's name
  adapters: [],     // GET /v1/adapters .data
  blends: [],       // GET /v1/stances .data
};

const listeners = new Set();

export function onCatalog(fn) {
  listeners.add(fn);
}

export async function refreshCatalog() {
  const [models, adapters, blends] = await Promise.all([getJSON("v1/models"), getJSON("v1/adapters"), getJSON("v1/stances")]);
  const base = models.data.find((m) => !m.parent);
  state.base = base ? base.id : (state.config && state.config.model);
  state.adapters = adapters.data;
  state.blends = blends.data;
  for (const fn of listeners) fn(state);
  return state;
}

/** A weight as the page shows it: two decimals, a real minus sign. */
export function fmtWeight(w) {
  const s = Math.abs(w).toFixed(2);
  return w < 0 ? `−${s}` : s;
}

/** "calm 0.60 + bold −0.35" */
export function recipeText(stances) {
  return Object.entries(stances).map(([name, w]) => `${name} ${fmtWeight(w)}`).join(" + ");
}

/** Round to the sliders' grid (0.05) without float noise. */
export function roundWeight(w) {
  return Math.round(w * 10000) / 10000;
}

export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
