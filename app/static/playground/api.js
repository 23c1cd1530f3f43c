// The server's HTTP API, as the page uses it: JSON reads, admin calls, and streamed chat completions (SSE).
// Every URL is relative to the page (/playground/), so the page works behind a proxy that mounts the server
// under a prefix.

const ROOT = new URL("../", document.baseURI);

/** The absolute URL of an API path ("v1/models"). */
export function url(path) {
  return new URL(path.replace(/^\//, ""), ROOT).toString();
}

const KEY_STORE = "stanceserve.adminKey";
/** The shortest first-to-last-text time that times tokens/s after the first token, in milliseconds. */
const MIN_SPAN_MS = 50;

/** The admin key the user typed (kept in this tab's session storage only). */
export function adminKey() {
  try { return sessionStorage.getItem(KEY_STORE) || ""; } catch { return ""; }
}

export function setAdminKey(value) {
  try {
    if (value) sessionStorage.setItem(KEY_STORE, value); else sessionStorage.removeItem(KEY_STORE);
  } catch { /* storage disabled: the key lives until the page closes */ }
}

function adminHeaders(extra = {}) {
  const key = adminKey().trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** An error answer of the API: its HTTP status and the body's {"error": {message, type, code, param}}. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param ?? null;
    this.type = error.type || null;
  }
}

async function errorOf(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  const error = body && typeof body.error === "object" && body.error ? body.error : { message: `HTTP ${res.status} ${res.statusText}` };
  return new ApiError(res.status, error);
}

export async function getJSON(path) {
  const res = await fetch(url(path), { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

/** POST JSON to an admin route; the response (a Response) when 2xx, else ApiError. */
export async function postAdmin(path, body) {
  const res = await fetch(url(path), {
    method: "POST",
    headers: adminHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  if (!res.ok) throw await errorOf(res);
  return res;
}

/** POST a multipart form to an admin route (the adapter upload). */
export async function postForm(path, form) {
  const res = await fetch(url(path), { method: "POST", headers: adminHeaders(), body: form });
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

/**
 * Stream one chat completion. Calls onText(fullText) as text arrives; resolves to
 * {text, usage, finish, ttftMs, tokensPerSecond, elapsedMs}. Rejects with ApiError (an error answer, or an
 * error event inside the stream) or an AbortError (signal).
 */
export async function streamChat(body, { signal, onText } = {}) {
  const t0 = performance.now();
  const res = await fetch(url("v1/chat/completions"), {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!res.ok) throw await errorOf(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "", usage = null, finish = null, first = null, last = null, chunks = 0;
  const result = () => {
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    // after the first token: (tokens - 1) over the time from the first text to the last. An answer that arrives
    // in one burst (a fast server: the whole text within a few milliseconds) cannot be timed that way, so it
    // gets tokens over the request's whole time, TTFT included.
    const span = first === null ? 0 : last - first;
    const rate = chunks >= 3 && span >= MIN_SPAN_MS ? (tokens - 1) / (span / 1000)
      : tokens > 0 ? tokens / ((end - t0) / 1000) : null;
    return { text, usage, finish, tokens, ttftMs: first === null ? null : first - t0, tokensPerSecond: rate, elapsedMs: end - t0 };
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return result();
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") {
        reader.cancel().catch(() => {});
        return result();
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(200, chunk.error);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          last = performance.now();
          if (first === null) first = last;
          chunks += 1;
          text += piece;
          if (onText) onText(text);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
}

/** What to tell the user about an error, with a hint for the admin-key answers. */
export function describeError(err) {
  if (err && err.name === "AbortError") return { text: "Stopped.", detail: null };
  if (!(err instanceof ApiError)) return { text: String(err && err.message ? err.message : err), detail: null };
  let hint = null;
  if (err.status === 401) {
    hint = adminKey() ? "The admin key you entered is not the server's." : "This server asks for the admin key: enter it in “Admin key” at the top of the page.";
  }
  const detail = [err.status ? `HTTP ${err.status}` : null, err.code, err.param ? `param: ${err.param}` : null].filter(Boolean).join(" · ");
  return { text: err.message, detail, hint };
}

/** Fill a status element with an error the API returned (message as sent, then status · code · param). */
export function showError(el, err) {
  const { text, detail, hint } = describeError(err);
  el.className = el.className.replace(/\b(ok|error)\b/g, "").trim() + " error";
  el.replaceChildren();
  const msg = document.createElement("span");
  msg.className = "message";
  msg.textContent = text;
  el.append(msg);
  if (detail) {
    const code = document.createElement("span");
    code.className = "code";
    code.textContent = ` (${detail})`;
    el.append(code);
  }
  if (hint) {
    const p = document.createElement("span");
    p.className = "hint";
    p.textContent = ` ${hint}`;
    el.append(p);
  }
}

export function showOk(el, text) {
  el.className = el.className.replace(/\b(ok|error)\b/g, "").trim() + " ok";
  el.textContent = text;
}

export function clearStatus(el) {
  el.className = el.className.replace(/\b(ok|error)\b/g, "").trim();
  el.textContent = "";
}
