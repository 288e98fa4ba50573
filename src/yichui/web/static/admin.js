// Admin pages: the audit log and the API keys.
import { del, get, post, toast } from "./api.js";
import { card, confirmButton, h, replace, table, when } from "./dom.js";

export async function renderAudit(root) {
  const box = h("div", { id: "audit" });
  const more = h("button", { type: "button" }, "Older entries");
  const rows = [];
  let before = null;
  const columns = [
    { label: "When", cell: (e) => when(e.at) },
    { label: "Tenant", cell: (e) => e.tenant ?? "–" },
    { label: "Key", cell: (e) => h("span", { class: "mono" }, e.key ?? "–") },
    { label: "Action", cell: (e) => e.action },
    { label: "Target", cell: (e) => h("span", { class: "mono" }, e.target ?? "") },
    { label: "Detail", cell: (e) => (typeof e.detail === "object" && e.detail !== null ? JSON.stringify(e.detail) : e.detail ?? "") },
  ];
  async function load() {
    const page = await get("/api/audit", { limit: 50, before });
    const data = page.data || [];
    rows.push(...data);
    if (data.length) before = data[data.length - 1].id;
    more.disabled = data.length < 50;
    replace(box, table(columns, rows, { empty: "No admin actions recorded." }));
  }
  more.addEventListener("click", () => load().catch(() => {}));
  root.append(card("Audit log", box, more));
  await load();
  return null;
}

export async function renderKeys(root) {
  const box = h("div", { id: "keys" });
  const shown = h("div", { id: "new-key" });
  const form = h("form", { class: "inline", id: "key-form" },
    h("input", { name: "tenant", required: true, placeholder: "tenant", "aria-label": "tenant", pattern: "[A-Za-z0-9._\\-]+" }),
    h("select", { name: "role", "aria-label": "role" }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin")),
    h("input", { name: "name", placeholder: "name (optional)", "aria-label": "name" }),
    h("button", { type: "submit" }, "Create key"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!form.reportValidity()) return;
    const f = form.elements;
    const body = { tenant: f.tenant.value.trim(), role: f.role.value };
    if (f.name.value.trim()) body.name = f.name.value.trim();
    const r = await post("/api/keys", body).catch(() => null);
    if (!r) return;
    replace(shown, h("div", { class: "card notice" },
      h("p", {}, "The new key, shown this once (only its digest is stored):"),
      h("input", { type: "text", readOnly: true, value: r.key, class: "mono wide", "aria-label": "new key" })));
    load();
  });
  async function load() {
    const page = await get("/api/keys");
    replace(box, table([
      { label: "Id", cell: (k) => h("span", { class: "mono" }, k.id) },
      { label: "Name", cell: (k) => k.name ?? "–" },
      { label: "Tenant", cell: (k) => k.tenant },
      { label: "Role", cell: (k) => k.role },
      { label: "Created", cell: (k) => when(k.created) },
      { label: "", cell: (k) => confirmButton("Revoke", async () => {
        const r = await del(`/api/keys/${encodeURIComponent(k.id)}`).catch(() => null);
        if (r) { toast(`revoked ${k.name || k.id}`, "info"); load(); }
      }, { class: "small" }) },
    ], page.data || [], { empty: "No keys in Redis." }));
  }
  root.append(card("API keys", form, shown, box));
  await load();
  return null;
}
