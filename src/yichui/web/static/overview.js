// Overview: Redis health, the cache's hit rate over time, workers, servers, running tasks.
import { get, isAdmin } from "./api.js";
import { lineChart } from "./chart.js";
import { bytes, card, duration, facts, h, percent, replace, table, when } from "./dom.js";
import * as live from "./live.js";
import { STATES, liveProgress, taskTable } from "./tasks.js";

// hit-rate samples, kept while the page is open (not only while this route is shown)
const samples = { t: [], overall: [], recent: [] };
let last = null;
let sampler = null;
let onSample = () => {};
const MAX = 1200; // an hour at 3 s

function sample(stats) {
  const now = Date.now() / 1000;
  let recent = null;
  if (last) {
    const hits = (stats.hit ?? 0) - (last.hit ?? 0);
    const answered = hits + (stats.miss ?? 0) - (last.miss ?? 0) + (stats.coalesced ?? 0) - (last.coalesced ?? 0);
    if (answered > 0 && hits >= 0) recent = hits / answered;
  }
  last = stats;
  samples.t.push(now);
  samples.overall.push(stats.hit_rate ?? null);
  samples.recent.push(recent);
  for (const k of Object.keys(samples)) if (samples[k].length > MAX) samples[k].shift();
  onSample();
}

export function startSampling() {
  if (sampler) return;
  const tick = () => get("/api/cache/stats", undefined, { quiet: true }).then(sample).catch(() => {});
  tick();
  sampler = setInterval(tick, 3000);
}

function redisCard(r) {
  const i = r.info || {};
  return card("Redis",
    h("p", {}, r.reachable ? h("span", { class: "badge state-succeeded" }, "reachable")
      : h("span", { class: "badge state-failed" }, "unreachable"), " ", h("span", { class: "mono muted" }, r.url || "")),
    r.error ? h("p", { class: "error-text" }, r.error) : null,
    facts([
      ["Used memory", bytes(i.used_memory)], ["Peak", bytes(i.used_memory_peak)],
      ["Max memory", i.maxmemory ? bytes(i.maxmemory) : "no limit"], ["Eviction policy", i.maxmemory_policy],
      ["Ops/s", i.ops_per_sec], ["Clients", i.connected_clients], ["Version", i.redis_version],
      ["Uptime", duration(i.uptime_seconds)],
    ]));
}

function cacheCard(c, chartBox) {
  return card("Response cache",
    facts([
      ["Hit rate", percent(c.hit_rate)], ["Hits", c.hit], ["Misses", c.miss], ["Coalesced", c.coalesced],
      ["Entries", c.entries], ["Memory", bytes(c.memory)], ["Faults", c.faults],
    ]), chartBox);
}

export async function render(root) {
  startSampling();
  const chartBox = h("div", { class: "chart", id: "hit-chart" });
  let chart = null;
  const grid = h("div", { class: "grid-2" });
  const rest = h("div");
  root.append(grid, rest);
  const drawChart = () => {
    if (!chart && window.uPlot) {
      chart = lineChart(chartBox, { xLabel: "time", series: [{ label: "hit rate (all time)", stroke: "#3b82f6" },
        { label: "hit rate (last 3 s)", stroke: "#f59e0b" }], yRange: [0, 1], yLabel: "hit rate" });
    }
    chart?.set([samples.t, samples.overall, samples.recent]);
  };
  const refresh = async () => {
    const o = await get("/api/overview");
    replace(grid, redisCard(o.redis || {}), cacheCard(o.cache || {}, chartBox));
    drawChart();
    const counts = o.tasks?.counts || {};
    const workers = o.workers || [];
    const servers = o.servers || [];
    replace(rest,
      card("Running tasks", h("div", { id: "running" },
        h("p", { class: "muted" }, STATES.filter((s) => counts[s]).map((s) => `${s} ${counts[s]}`).join(" · ") || "no tasks"),
        taskTable(o.tasks?.running || [], refresh))),
      card("Workers", h("div", { id: "workers" }, table([
        { label: "Worker", cell: (w) => h("span", { class: "mono" }, w.id) },
        { label: "Host", cell: (w) => `${w.host ?? "–"} (pid ${w.pid ?? "–"})` },
        { label: "Queue", cell: (w) => w.queue ?? "–" },
        { label: "Slots", cell: (w) => `${(w.running || []).length} / ${w.slots ?? w.concurrency ?? "–"}` },
        { label: "Heartbeat", cell: (w) => when(w.heartbeat) },
        { label: "Alive", cell: (w) => (w.alive ? "yes" : "no") },
      ], workers, { empty: "No live workers." }))),
      isAdmin() ? card("Servers and loaded models", h("div", { id: "servers" }, table([
        { label: "Server", cell: (s) => h("span", { class: "mono" }, `${s.host ?? ""} ${s.url ?? ""}`) },
        { label: "Version", cell: (s) => s.version ?? "–" },
        { label: "Requests", cell: (s) => s.requests ?? 0 },
        { label: "Heartbeat", cell: (s) => when(s.heartbeat) },
        { label: "Loaded models", cell: (s) => (s.models || []).length ? h("ul", { class: "plain" }, s.models.map((m) =>
          h("li", {}, `${m.model} · ${m.engine ?? ""} · ${bytes(m.bytes)} · ${m.device ?? ""} · ${m.requests ?? 0} req · idle ${duration(m.idle_seconds)}`))) : "none" },
      ], servers, { empty: "No servers heartbeating." }))) : null);
  };
  await refresh();
  onSample = drawChart;
  const again = live.throttle(() => refresh().catch(() => {}), 1000);
  const unsubscribe = live.subscribe((type, data) => {
    if (type === "task" && data?.progress && !data.state && liveProgress(rest, data)) return;
    if (type !== "ping") again();
  });
  const timer = setInterval(again, 5000);
  return () => { onSample = () => {}; unsubscribe(); clearInterval(timer); chart?.destroy(); };
}
