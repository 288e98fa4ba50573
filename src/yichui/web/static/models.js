// Models: the table (kind, size, source, fingerprint), pull with a live byte progress bar,
// ms-swift's catalog to pick what to pull, verify and remove (admins).
import { del, get, isAdmin, namePath, post, toast } from "./api.js";
import { bytes, card, confirmButton, facts, h, pager, progress, replace, table, updateProgress, when } from "./dom.js";
import * as live from "./live.js";
import { taskLink } from "./tasks.js";

const PAGE = 50;
const CATALOG_PAGE = 20;
const view = { kind: "", q: "", offset: 0 };
const catalogView = { kind: "", search: "", offset: 0 };
const ADMIN_ONLY = "admins only";

function adminButton(label, action, confirm = false) {
  const attrs = isAdmin() ? { class: "small" } : { class: "small", disabled: true, title: ADMIN_ONLY };
  return confirm ? confirmButton(label, action, attrs) : h("button", { type: "button", ...attrs, onclick: action }, label);
}

export async function render(root) {
  const sources = await get("/api/sources").then((r) => r.data || []).catch(() => []);
  const filter = h("form", { class: "inline", id: "model-filter" },
    h("select", { name: "kind", "aria-label": "kind" }, ["", "text", "multimodal"].map((k) =>
      h("option", { value: k, selected: view.kind === k }, k || "any kind"))),
    h("input", { name: "q", type: "search", placeholder: "name contains…", value: view.q, "aria-label": "search" }),
    h("button", { type: "submit" }, "Filter"),
    isAdmin() ? h("button", { type: "button", onclick: async () => { await post("/api/models/rescan").catch(() => {}); refresh(); } }, "Rescan") : null);
  filter.addEventListener("submit", (e) => {
    e.preventDefault();
    view.kind = filter.elements.kind.value;
    view.q = filter.elements.q.value.trim();
    view.offset = 0;
    refresh();
  });
  const list = h("div", { id: "model-list" });
  const report = h("div", { id: "model-report" });
  const pulls = h("div", { id: "pulls" });
  const pull = h("form", { id: "pull-form", class: "stack" },
    h("label", { class: "field" }, h("span", { class: "field-name" }, "Model name"),
      h("input", { name: "name", required: true, placeholder: "Qwen/Qwen2.5-0.5B-Instruct", pattern: "[A-Za-z0-9._@:\\/\\-]+" })),
    h("label", { class: "field" }, h("span", { class: "field-name" }, "Source"),
      h("select", { name: "source" }, [h("option", { value: "" }, "default")].concat(
        sources.map((s) => h("option", { value: s.name, title: s.description || "" }, s.name))))),
    h("label", { class: "field" }, h("span", { class: "field-name" }, "Repository (optional)"), h("input", { name: "repo" })),
    h("label", { class: "field" }, h("span", { class: "field-name" }, "Revision (optional)"), h("input", { name: "revision" })),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "force" }), "download again even if present"),
    h("button", { type: "submit" }, "Pull"));
  pull.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!pull.reportValidity()) return;
    const f = pull.elements;
    const body = { name: f.name.value.trim() };
    for (const k of ["source", "repo", "revision"]) if (f[k].value.trim()) body[k] = f[k].value.trim();
    if (f.force.checked) body.force = true;
    const task = await post("/api/models/pull", body).catch(() => null);
    if (task) { toast(`pulling ${body.name}`, "info"); refreshPulls(); }
  });
  const catalogForm = h("form", { class: "inline", id: "catalog-form" },
    h("input", { name: "search", type: "search", placeholder: "qwen2.5 7b, glm-edge, llava…", value: catalogView.search, "aria-label": "search the catalog" }),
    h("select", { name: "kind", "aria-label": "catalog kind" }, ["", "text", "multimodal"].map((k) =>
      h("option", { value: k, selected: catalogView.kind === k }, k || "any kind"))),
    h("button", { type: "submit" }, "Search"));
  catalogForm.addEventListener("submit", (e) => {
    e.preventDefault();
    catalogView.search = catalogForm.elements.search.value.trim();
    catalogView.kind = catalogForm.elements.kind.value;
    catalogView.offset = 0;
    refreshCatalog();
  });
  const catalogList = h("div", { id: "catalog-list" });
  const catalogNote = h("p", { class: "muted", id: "catalog-note" });
  root.append(card("Models", filter, list), report,
    h("div", { class: "grid-2" }, card("Pull a model", pull), card("Downloads", pulls)),
    card("ms-swift's catalog", catalogNote, catalogForm, catalogList));

  // The pull form gets the entry's id at the chosen source (the API maps either id anyway).
  function use(entry) {
    const ms = pull.elements.source.value === "modelscope";
    pull.elements.name.value = (ms ? entry.ms_model_id || entry.hf_model_id : entry.hf_model_id || entry.ms_model_id) || "";
    pull.elements.name.focus();
  }

  async function refreshCatalog() {
    const page = await get("/api/catalog", { search: catalogView.search, kind: catalogView.kind, limit: CATALOG_PAGE, offset: catalogView.offset }).catch(() => null);
    if (!page) return;
    replace(catalogNote, `${page.total} ${page.total === 1 ? "model" : "models"} of ms-swift ${page.ms_swift}; pull one by its ModelScope or Hugging Face id.`);
    const rows = page.data || [];
    const mono = (v) => h("span", { class: "mono" }, v ?? "–");
    replace(catalogList, table([
      { label: "Model type", cell: (e) => mono(e.model_type) },
      { label: "ModelScope", cell: (e) => mono(e.ms_model_id) },
      { label: "Hugging Face", cell: (e) => mono(e.hf_model_id) },
      { label: "Kind", cell: (e) => e.kind },
      { label: "Template", cell: (e) => e.template ?? "–" },
      { label: "", cell: (e) => h("button", { type: "button", class: "small", onclick: () => use(e) }, "Use") },
    ], rows, { empty: "Nothing in the catalog matches.", rowAttrs: (e) => ({ dataset: { modelType: e.model_type } }) }),
    pager({ offset: catalogView.offset, limit: CATALOG_PAGE, total: page.total, count: rows.length }, (o) => { catalogView.offset = o; refreshCatalog(); }));
  }

  async function refresh() {
    const page = await get("/api/models", { kind: view.kind, q: view.q, limit: PAGE, offset: view.offset });
    const rows = page.data || [];
    replace(list, table([
      { label: "Name", cell: (m) => h("span", { class: "mono" }, m.name) },
      { label: "Kind", cell: (m) => m.kind ?? "–" },
      { label: "Size", cell: (m) => bytes(m.size) },
      { label: "Files", cell: (m) => m.files ?? "–" },
      { label: "Source", cell: (m) => m.source ?? "–" },
      { label: "Fingerprint", cell: (m) => h("span", { class: "mono", title: m.fingerprint || "" }, (m.fingerprint || "–").slice(0, 16)) },
      { label: "Modified", cell: (m) => when(m.modified) },
      { label: "", cell: (m) => [
        adminButton("Verify", async () => {
          const r = await post(`/api/models/${namePath(m.name)}/verify`).catch(() => null);
          if (r) showReport(m.name, r);
        }),
        adminButton("Remove", async () => {
          const r = await del(`/api/models/${namePath(m.name)}`).catch(() => null);
          if (r) { toast(`removed ${m.name}`, "info"); refresh(); }
        }, true),
      ] },
    ], rows, { empty: "No models yet: pull one below.", rowAttrs: (m) => ({ dataset: { model: m.name } }) }),
    pager({ offset: view.offset, limit: PAGE, total: page.total, count: rows.length }, (o) => { view.offset = o; refresh(); }));
  }

  function showReport(name, r) {
    const pairs = Object.entries(r).filter(([, v]) => typeof v !== "object" || v === null)
      .map(([k, v]) => [k, String(v)]);
    const nested = Object.entries(r).filter(([, v]) => v && typeof v === "object");
    replace(report, card(`Verify ${name}`, facts(pairs),
      nested.map(([k, v]) => h("details", {}, h("summary", {}, k), h("pre", {}, JSON.stringify(v, null, 2)))),
      h("button", { type: "button", class: "small", onclick: () => replace(report) }, "Close")));
  }

  async function refreshPulls() {
    const page = await get("/api/tasks", { state: ["queued", "running", "succeeded", "failed"], limit: 50 }).catch(() => null);
    const rows = (page?.data || []).filter((t) => t.type === "download").slice(0, 10);
    replace(pulls, table([
      { label: "Task", cell: (t) => taskLink(t.id) },
      { label: "Model", cell: (t) => t.args?.name ?? "–" },
      { label: "State", cell: (t) => h("span", { class: `badge state-${t.state}` }, t.state) },
      { label: "Bytes", class: "wide", cell: (t) => progress(t.progress, { bytesUnit: true }) },
    ], rows, { empty: "No downloads.", rowAttrs: (t) => ({ dataset: { taskId: t.id } }) }));
  }

  await Promise.all([refresh(), refreshPulls(), refreshCatalog()]);
  const again = live.throttle(() => { refresh().catch(() => {}); refreshPulls(); }, 700);
  return live.subscribe((type, data) => {
    if (type === "model" || type === "open") again();
    if (type === "task" && (data?.type === "download" || !data?.type)) {
      const row = data.progress && !data.state
        && [...pulls.querySelectorAll("tr[data-task-id]")].find((r) => r.dataset.taskId === data.id);
      if (row) updateProgress(row.querySelector(".progress"), data.progress, { bytesUnit: true });
      else again();
    }
  });
}
