// The shared part of every request: the conversation (one prompt or a short chat) and the sampling settings.

const ROLES = ["system", "user", "assistant"];
const MAX_TURNS = 8;
const list = () => document.getElementById("messages");
let turnIds = 0;

function renumber() {
  const rows = [...list().children];
  rows.forEach((li, i) => {
    li.querySelector(".role-label").textContent = `Turn ${i + 1} role`;
    li.querySelector(".text-label").textContent = `Turn ${i + 1} text`;
    const remove = li.querySelector(".remove-turn");
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove turn ${i + 1}`);
    remove.disabled = rows.length === 1;
  });
  document.getElementById("add-message").disabled = rows.length >= MAX_TURNS;
}

export function addTurn(role = "user", text = "") {
  const id = ++turnIds;
  const li = document.createElement("li");
  li.className = "message";

  const roleField = document.createElement("div");
  roleField.className = "field";
  const roleLabel = document.createElement("label");
  roleLabel.className = "role-label";
  roleLabel.htmlFor = `turn-${id}-role`;
  const select = document.createElement("select");
  select.id = `turn-${id}-role`;
  select.className = "turn-role";
  for (const r of ROLES) select.append(new Option(r, r, r === role, r === role));
  roleField.append(roleLabel, select);

  const textField = document.createElement("div");
  textField.className = "field";
  const textLabel = document.createElement("label");
  textLabel.className = "text-label";
  textLabel.htmlFor = `turn-${id}-text`;
  const area = document.createElement("textarea");
  area.id = `turn-${id}-text`;
  area.className = "turn-text";
  area.rows = 2;
  area.value = text;
  area.setAttribute("aria-describedby", "send-hint");
  textField.append(textLabel, area);

  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "secondary small remove-turn";
  remove.addEventListener("click", () => {
    const next = li.nextElementSibling || li.previousElementSibling;
    li.remove();
    renumber();
    if (next) next.querySelector("textarea").focus();
  });

  li.append(roleField, textField, remove);
  list().append(li);
  renumber();
  return area;
}

export function initRequest(onSend) {
  addTurn("user", "Why is the sky blue? Answer in two sentences.");
  document.getElementById("add-message").addEventListener("click", () => {
    const last = [...list().querySelectorAll(".turn-role")].pop();
    addTurn(last && last.value === "user" ? "assistant" : "user").focus();
  });
  list().addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      onSend();
    }
  });
}

function num(id, { integer = false } = {}) {
  const el = document.getElementById(id);
  const raw = el.value.trim();
  if (raw === "") return null;
  const v = Number(raw);
  if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) throw new Error(`${el.labels[0].textContent} must be ${integer ? "a whole number" : "a number"}.`);
  return v;
}

/**
 * The conversation and sampling settings as request fields, with the seed of this run (the seed field's, or
 * a new random one). Throws Error with a message for the user when a field is not usable.
 */
export function readRequest() {
  const messages = [...list().children].map((li) => ({
    role: li.querySelector(".turn-role").value,
    content: li.querySelector(".turn-text").value,
  }));
  if (!messages.some((m) => m.content.trim())) throw new Error("Write a prompt first.");
  const seedField = num("seed", { integer: true });
  if (seedField !== null && (seedField < 0 || seedField > Number.MAX_SAFE_INTEGER)) {
    throw new Error(`Seed must be between 0 and ${Number.MAX_SAFE_INTEGER} here.`);
  }
  const seed = seedField ?? Math.floor(Math.random() * 2 ** 31);
  const sampling = {
    max_tokens: num("max-tokens", { integer: true }) ?? 64,
    temperature: num("temperature") ?? 0,
    top_p: num("top-p") ?? 1,
    top_k: num("top-k", { integer: true }) ?? 0,
    seed,
  };
  return { messages, sampling };
}

/** "temperature 0 · top_p 1 · top_k 0 · max_tokens 64 · seed 123" */
export function settingsText(s) {
  return [`temperature ${s.temperature}`, `top_p ${s.top_p}`, `top_k ${s.top_k}`, `max_tokens ${s.max_tokens}`,
    `seed ${s.seed ?? "new each run"}`].join(" · ");
}

/** The settings as the form says now, before a run (the seed may still be "new each run"). */
export function currentSettings() {
  const v = (id, d) => (document.getElementById(id).value.trim() === "" ? d : document.getElementById(id).value.trim());
  return { temperature: v("temperature", 0), top_p: v("top-p", 1), top_k: v("top-k", 0), max_tokens: v("max-tokens", 64), seed: v("seed", null) };
}
