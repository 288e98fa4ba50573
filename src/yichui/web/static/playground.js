// Playground: a streaming chat against any model of /v1/models; each answer says whether the
// cache answered it (hit), computed it (miss) or shared another request's (coalesced).
import { session, toast } from "./api.js";
import { card, h, replace } from "./dom.js";

const state = { history: [], model: "" };

async function v1(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (init.method && init.method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  return fetch(path, { ...init, headers, credentials: "same-origin" });
}

async function errorOf(response) {
  try { return (await response.json())?.error?.message || response.statusText; } catch { return response.statusText; }
}

/** The SSE body of a streamed completion: calls onDelta(text) for each content piece. */
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return usage;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
        if (chunk.usage) usage = chunk.usage;
        const piece = chunk.choices?.[0]?.delta?.content;
        if (piece) onDelta(piece);
      }
    }
  }
  return usage;
}

export async function render(root) {
  const response = await v1("/v1/models").catch(() => null);
  if (!response || !response.ok) {
    const message = response ? await errorOf(response) : "server unreachable";
    toast(`/v1/models: ${message}`);
    root.append(card("Playground", h("p", { class: "error-text" }, message)));
    return null;
  }
  const models = (await response.json()).data || [];
  if (!models.some((m) => m.id === state.model)) state.model = models[0]?.id || "";
  const select = h("select", { id: "chat-model", name: "model", required: true },
    models.map((m) => h("option", { value: m.id, selected: m.id === state.model }, m.id)));
  select.addEventListener("change", () => { state.model = select.value; });
  const log = h("div", { class: "chat", id: "chat-log", "aria-live": "polite" });
  const input = h("textarea", { id: "chat-input", name: "prompt", rows: 3, required: true, placeholder: "Ask something…" });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: "0.1", value: "0", name: "temperature" });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, step: 1, value: "32", name: "max_tokens" });
  const keep = h("input", { type: "checkbox", id: "chat-keep", name: "keep" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const form = h("form", { id: "chat-form", class: "stack" },
    h("div", { class: "fields" },
      h("label", { class: "field" }, h("span", { class: "field-name" }, "Model"), select),
      h("label", { class: "field" }, h("span", { class: "field-name" }, "Temperature"), temperature,
        h("small", { class: "muted" }, "0 (greedy) is cached")),
      h("label", { class: "field" }, h("span", { class: "field-name" }, "Max tokens"), maxTokens)),
    h("label", { class: "check" }, keep, "send the conversation so far (else each question stands alone)"),
    input,
    h("div", { class: "actions" }, send,
      h("button", { type: "button", onclick: () => { state.history = []; replace(log); } }, "Clear")));
  const paint = () => replace(log, state.history.map(bubble));
  paint();
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!form.reportValidity()) return;
    const question = input.value.trim();
    if (!question) return;
    const earlier = keep.checked
      ? state.history.filter((m) => !m.failed).map((m) => ({ role: m.role, content: m.content })) : [];
    const user = { role: "user", content: question };
    const answer = { role: "assistant", content: "", cache: "…", latency: null, first: null, model: select.value, pending: true };
    state.history.push(user, answer);
    input.value = "";
    paint();
    const answerNode = log.lastElementChild;
    send.disabled = true;
    const t0 = performance.now();
    try {
      const r = await v1("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({ model: select.value, messages: [...earlier, user], stream: true,
          temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) }),
      });
      answer.cache = r.headers.get("x-yichui-cache") || "none";
      if (!r.ok) throw new Error(`${r.status}: ${await errorOf(r)}`);
      const text = answerNode.querySelector(".bubble-text");
      await readStream(r, (piece) => {
        if (answer.first === null) answer.first = performance.now() - t0;
        answer.content += piece;
        text.textContent = answer.content;
      });
    } catch (exc) {
      answer.failed = true;
      answer.content = answer.content || String(exc.message || exc);
      toast(`chat: ${exc.message || exc}`);
    } finally {
      answer.latency = performance.now() - t0;
      answer.pending = false;
      send.disabled = false;
      paint();
    }
  });
  root.append(card("Playground", models.length ? form : h("p", { class: "muted" }, "No model is served."), log));
  return null;
}

function bubble(m) {
  const meta = [];
  if (m.role === "assistant") {
    meta.push(h("span", { class: `badge cache-${String(m.cache).replace(/[^a-z]/g, "")}`, dataset: { cache: m.cache } }, m.cache));
    if (m.latency !== null) meta.push(h("span", { class: "latency" }, `${Math.round(m.latency)} ms`));
    if (m.first !== null && m.latency !== null) meta.push(h("span", { class: "muted" }, `first token ${Math.round(m.first)} ms`));
    meta.push(h("span", { class: "muted" }, m.model));
  }
  return h("div", { class: `bubble bubble-${m.role}${m.failed ? " failed" : ""}${m.pending ? " pending" : ""}` },
    h("div", { class: "bubble-meta" }, m.role === "user" ? "you" : "model", meta),
    h("div", { class: "bubble-text" }, m.content));
}
