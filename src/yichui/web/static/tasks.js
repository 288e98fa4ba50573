// Tasks: the list (filter by state, pages, live progress), a task's page (live log pane), and
// the form that submits any registered task type.
import { get, isAdmin, post, toast } from "./api.js";
import { badge, card, clear, h, num, pager, progress, replace, table, updateProgress, when } from "./dom.js";
import * as live from "./live.js";
import { schemaForm } from "./schema_form.js";

export const STATES = ["queued", "running", "succeeded", "failed", "cancelled", "dead"];
const ACTIVE = new Set(["queued", "running"]);
const RETRYABLE = new Set(["failed", "cancelled", "dead"]);
const PAGE = 20;
const view = { states: [], offset: 0 };

export function render(root, params) {
  if (params[0]) return detail(root, params[0]);
  return list(root);
}

export function taskLink(id) {
  return h("a", { href: `#/tasks/${encodeURIComponent(id)}`, class: "mono" }, id);
}

export function actions(task, after) {
  const out = [];
  if (ACTIVE.has(task.state)) {
    out.push(h("button", { type: "button", class: "small", onclick: async () => {
      await post(`/api/tasks/${encodeURIComponent(task.id)}/cancel`).then(() => toast(`cancelling ${task.id}`, "info")).catch(() => {});
      after();
    } }, "Cancel"));
  }
  if (RETRYABLE.has(task.state)) {
    out.push(h("button", { type: "button", class: "small", onclick: async () => {
      await post(`/api/tasks/${encodeURIComponent(task.id)}/retry`).then(() => toast(`retrying ${task.id}`, "info")).catch(() => {});
      after();
    } }, "Retry"));
  }
  return out;
}

/** Rows of tasks with live progress cells (data-task-id on each row). */
export function taskTable(tasks, after) {
  return table([
    { label: "Task", cell: (t) => taskLink(t.id) },
    { label: "Type", cell: (t) => t.type },
    { label: "State", cell: (t) => badge(t.state) },
    { label: "Tenant", cell: (t) => t.tenant ?? "–" },
    { label: "Progress", class: "wide", cell: (t) => progress(t.progress) },
    { label: "Created", cell: (t) => when(t.created) },
    { label: "", cell: (t) => actions(t, after) },
  ], tasks, { empty: "No tasks.", rowAttrs: (t) => ({ dataset: { taskId: t.id, state: t.state } }) });
}

/** A task event's progress into the row showing that task; true when the row was there. */
export function liveProgress(container, data) {
  if (!data?.id || !data.progress) return false;
  const row = [...container.querySelectorAll("tr[data-task-id]")].find((r) => r.dataset.taskId === data.id);
  const cell = row?.querySelector(".progress");
  if (!cell) return false;
  updateProgress(cell, data.progress);
  return true;
}

async function submitForm(root) {
  const types = (await get("/api/tasks/types")).data || [];
  const select = h("select", { id: "task-type", name: "type" },
    types.map((t) => h("option", { value: t.name }, t.name)));
  const describe = h("p", { class: "muted" });
  const holder = h("div");
  let form = null;
  const pick = () => {
    const t = types.find((x) => x.name === select.value);
    describe.textContent = t?.description || "";
    form = schemaForm(t?.schema || {}, { prefix: "arg" });
    replace(holder, form.node);
  };
  select.addEventListener("change", pick);
  if (types.some((t) => t.name === "selftest")) select.value = "selftest";
  pick();
  const el = h("form", { id: "task-form", class: "stack", novalidate: false },
    h("label", { class: "field" }, h("span", { class: "field-name" }, "Type"), select),
    describe, holder, h("button", { type: "submit" }, "Submit task"));
  el.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!el.reportValidity()) return;
    let args;
    try { args = form.read(); } catch (exc) { toast(exc.message); return; }
    const task = await post("/api/tasks", { type: select.value, args }).catch(() => null);
    if (task) location.hash = `#/tasks/${encodeURIComponent(task.id)}`;
  });
  return card("New task", el);
}

async function list(root) {
  const filters = h("fieldset", { class: "filters" }, h("legend", {}, "State"),
    STATES.map((s) => h("label", { class: "check" },
      h("input", { type: "checkbox", value: s, name: "state", checked: view.states.includes(s),
        onchange: (e) => {
          view.states = e.target.checked ? [...view.states, s] : view.states.filter((x) => x !== s);
          view.offset = 0;
          refresh();
        } }), s)));
  const counts = h("p", { class: "muted", id: "task-counts" });
  const body = h("div", { id: "task-list" });
  const opener = h("form", { class: "inline" },
    h("input", { type: "text", name: "id", placeholder: "task id", "aria-label": "task id", required: true }),
    h("button", { type: "submit" }, "Open"));
  opener.addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = `#/tasks/${encodeURIComponent(opener.elements.id.value.trim())}`;
  });
  append(root, [card("Tasks", h("div", { class: "row" }, filters, opener), counts, body)]);
  async function refresh() {
    const page = await get("/api/tasks", { state: view.states, limit: PAGE, offset: view.offset });
    const c = page.counts || {};
    counts.textContent = STATES.filter((s) => c[s]).map((s) => `${s} ${c[s]}`).join(" · ") || "no tasks";
    replace(body, taskTable(page.data || [], refresh),
      pager({ offset: view.offset, limit: PAGE, total: page.total, count: (page.data || []).length },
        (o) => { view.offset = o; refresh(); }));
  }
  const again = live.throttle(() => refresh().catch(() => {}), 500);
  await refresh();
  root.append(await submitForm(root));
  return live.subscribe((type, data) => {
    if (type === "open") again();
    if (type !== "task") return;
    if (data?.state || !liveProgress(body, data)) again();
  });
}

function append(el, nodes) { for (const n of nodes) el.append(n); }

async function detail(root, id) {
  const head = h("div");
  const logs = h("pre", { class: "logs", id: "task-logs", "aria-live": "off" });
  append(root, [card(`Task ${id}`, head), card("Log", logs)]);
  let task;
  try {
    task = await get(`/api/tasks/${encodeURIComponent(id)}`);
  } catch (exc) {
    replace(head, h("p", { class: "error-text", id: "task-missing" }, exc.message));
    return null;
  }
  const bar = h("div", { class: "progress", id: "task-progress" });
  const paint = () => {
    const p = task.progress || {};
    updateProgress(bar, p);
    const facts = [
      ["State", badge(task.state)], ["Type", task.type], ["Tenant", task.tenant ?? "–"],
      ["Attempt", `${task.attempt ?? "–"} of ${task.max_attempts ?? "–"}`], ["Queue", task.queue ?? "–"],
      ["Created", when(task.created)], ["Started", when(task.started)], ["Finished", when(task.finished)],
    ];
    const dl = h("dl", { class: "facts", id: "task-facts", dataset: { state: task.state } },
      facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const extra = [];
    if (task.error) extra.push(h("p", { class: "error-text" }, `${task.error.type || "error"}: ${task.error.message || ""}`));
    if (p.metrics && Object.keys(p.metrics).length) {
      extra.push(table([{ label: "Metric", cell: (r) => r[0] }, { label: "Value", cell: (r) => num(r[1]) }],
        Object.entries(p.metrics)));
    }
    extra.push(h("details", {}, h("summary", {}, "Arguments"), h("pre", {}, JSON.stringify(task.args ?? {}, null, 2))));
    if (task.result !== undefined && task.result !== null) {
      extra.push(h("details", { open: true }, h("summary", {}, "Result"), h("pre", { id: "task-result" }, JSON.stringify(task.result, null, 2))));
    }
    replace(head, dl, bar, h("div", { class: "actions" }, actions(task, reload)), extra);
  };
  const reload = async () => {
    try { task = await get(`/api/tasks/${encodeURIComponent(id)}`, undefined, { quiet: true }); paint(); } catch { /* shown on the next try */ }
  };
  paint();
  const again = live.throttle(reload, 300);
  const lines = [];
  const stream = new EventSource(`/api/tasks/${encodeURIComponent(id)}/logs/stream`, { withCredentials: true });
  const line = (text, cls) => {
    lines.push(h("span", { class: cls }, `${text}\n`));
    if (lines.length > 2000) lines.shift().remove();
    const stick = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 20;
    logs.append(lines[lines.length - 1]);
    if (stick) logs.scrollTop = logs.scrollHeight;
  };
  const entry = (event) => { try { return JSON.parse(event.data); } catch { return null; } };
  stream.addEventListener("log", (event) => {
    const e = entry(event);
    const d = e?.data ?? {};
    line(typeof d === "string" ? d : (d.message ?? d.line ?? d.text ?? JSON.stringify(d)), `log-${d.level || "info"}`);
  });
  stream.addEventListener("progress", (event) => {
    const d = entry(event)?.data;
    const p = d?.progress ?? d;
    if (p && typeof p === "object") { task.progress = p; updateProgress(bar, p); }
  });
  stream.addEventListener("state", (event) => {
    const d = entry(event)?.data ?? {};
    line(`— ${d.state ?? "state"}${d.error?.message ? `: ${d.error.message}` : ""}`, "log-state");
    again();
  });
  stream.addEventListener("end", () => { stream.close(); again(); });
  const unsubscribe = live.subscribe((type, data) => {
    if (type === "open") again();
    if (type === "task" && data?.id === id) {
      if (data.progress && !data.state) { task.progress = data.progress; updateProgress(bar, data.progress); }
      else again();
    }
  });
  const poll = setInterval(() => { if (ACTIVE.has(task.state)) again(); }, 5000);
  return () => { stream.close(); unsubscribe(); clearInterval(poll); clear(logs); };
}
