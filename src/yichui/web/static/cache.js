// Cache: hit rate, entries and memory by model; clear (admins).
import { get, isAdmin, post, toast } from "./api.js";
import { bytes, card, confirmButton, facts, h, percent, replace, table } from "./dom.js";
import * as live from "./live.js";

export async function render(root) {
  const box = h("div");
  root.append(box);
  const clear = (model) => confirmButton(model ? "Clear" : "Clear the whole cache", async () => {
    const r = await post("/api/cache/clear", model ? { model } : {}).catch(() => null);
    if (r) { toast(`removed ${r.removed} entr${r.removed === 1 ? "y" : "ies"}`, "info"); refresh(); }
  }, isAdmin() ? { class: model ? "small" : "", id: model ? undefined : "cache-clear" }
    : { class: model ? "small" : "", disabled: true, title: "admins only", id: model ? undefined : "cache-clear" });
  async function refresh() {
    const s = await get("/api/cache/stats");
    replace(box,
      card("Response cache", facts([
        ["Hit rate", percent(s.hit_rate)], ["Hits", s.hit], ["Misses", s.miss], ["Coalesced", s.coalesced],
        ["Bypassed", s.bypass], ["Stored", s.stored], ["Faults", s.faults], ["Errors", s.errors],
        ["Entries", s.entries], ["Memory", bytes(s.memory)],
      ]), h("div", { class: "actions" }, clear(null))),
      card("By model", table([
        { label: "Model", cell: (m) => h("span", { class: "mono" }, m.model) },
        { label: "Entries", cell: (m) => m.entries },
        { label: "Memory", cell: (m) => bytes(m.bytes) },
        { label: "", cell: (m) => clear(m.model) },
      ], s.by_model || [], { empty: "The cache is empty." })));
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 5000);
  const unsubscribe = live.subscribe((type) => { if (type === "open") refresh().catch(() => {}); });
  return () => { clearInterval(timer); unsubscribe(); };
}
