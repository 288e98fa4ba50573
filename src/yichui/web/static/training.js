// Training: the LoRA form (dataset uploaded and checked line by line, or chosen), the live loss
// chart of a run, merge and evaluate from a finished run, evaluation reports as tables.
import { get, post, toast } from "./api.js";
import { lineChart } from "./chart.js";
import { badge, bytes, card, h, num, pager, progress, replace, table, updateProgress, when } from "./dom.js";
import * as live from "./live.js";
import { actions, taskLink } from "./tasks.js";

let uploadMax = 16 * 1024 * 1024; // the server says (/api/datasets max_upload_bytes); it checks again
const PAGE = 20;
const view = { runs: 0, evals: 0 };

export function render(root, params) {
  if (params[0] === "task" && params[1]) return runView(root, { taskId: params[1] });
  if (params[0] === "run" && params[1] && params[2]) return runView(root, { output: params[1], version: params[2] });
  return home(root);
}

/** "line 3: …" for the first line of `text` that is no JSON object; null when all are. */
export function checkJsonl(text) {
  const lines = text.split(/\r?\n/);
  let rows = 0;
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i].trim();
    if (!line) continue;
    let value;
    try { value = JSON.parse(line); } catch (exc) { return `line ${i + 1}: not JSON (${exc.message})`; }
    if (value === null || typeof value !== "object" || Array.isArray(value)) return `line ${i + 1}: not a JSON object`;
    rows += 1;
  }
  return rows ? null : "the file has no rows";
}

function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", { class: "field-name" }, label), input,
    hint ? h("small", { class: "muted" }, hint) : null);
}

const taskOf = (run) => run.task_id ?? run.result?.task ?? null;
const datasetOf = (d) => (d && typeof d === "object" ? d.origin ?? d.path ?? "" : d ?? "");

/** run_dir ".../runs/<output>/<version>" -> [output, version]. */
export function runKey(runDir) {
  const parts = String(runDir || "").split(/[\\/]/).filter(Boolean);
  return parts.length >= 2 ? parts.slice(-2) : null;
}

async function home(root) {
  const [models, folder] = await Promise.all([
    get("/api/models", { kind: "text", limit: 500 }).then((r) => r.data || []).catch(() => []),
    get("/api/datasets").catch(() => ({})),
  ]);
  const datasets = folder.data || [];
  uploadMax = folder.max_upload_bytes || uploadMax;
  const status = h("p", { class: "muted", id: "dataset-check", "aria-live": "polite" });
  const file = h("input", { type: "file", name: "file", accept: ".jsonl,.json,.txt,application/x-ndjson", id: "dataset-file" });
  const pick = h("select", { name: "dataset", id: "dataset-pick" }, [h("option", { value: "" }, "— upload a file instead —")]
    .concat(datasets.map((d) => h("option", { value: d.path }, `${d.name} (${bytes(d.bytes)}, ${d.source})`))));
  const number = (name, attrs) => h("input", { type: "number", name, id: `train-${name}`, ...attrs });
  const form = h("form", { id: "train-form", class: "stack" },
    field("Base model", h("select", { name: "model", id: "train-model", required: true },
      models.map((m) => h("option", { value: m.name }, m.name)))),
    field("Dataset", pick, "a JSONL file of the datasets folder, or:"),
    field("Upload JSONL", file, `one JSON object a line, at most ${bytes(uploadMax)}; checked here line by line, then by the server`),
    status,
    field("Output name", h("input", { name: "output", id: "train-output", placeholder: "<model>-lora", pattern: "[A-Za-z0-9._\\/\\-]+" })),
    h("div", { class: "fields" },
      field("Max steps", number("max_steps", { min: 1, step: 1, placeholder: "auto" })),
      field("Epochs", number("epochs", { min: 0, step: "any", placeholder: "1" })),
      field("Learning rate", number("learning_rate", { min: 0, step: "any", placeholder: "1e-4" })),
      field("LoRA r", number("lora_r", { min: 1, step: 1, placeholder: "8" })),
      field("LoRA alpha", number("lora_alpha", { min: 1, step: 1, placeholder: "16" })),
      field("Batch size", number("batch_size", { min: 1, step: 1, placeholder: "4" }))),
    h("button", { type: "submit" }, "Start fine-tuning"));
  let checked = null; // {name, text} of the chosen file once it passed the check
  file.addEventListener("change", async () => {
    checked = null;
    const f = file.files[0];
    if (!f) { status.textContent = ""; return; }
    if (f.size > uploadMax) { status.textContent = `${f.name}: ${bytes(f.size)} is over the ${bytes(uploadMax)} limit`; status.className = "error-text"; return; }
    const text = await f.text();
    const problem = checkJsonl(text);
    if (problem) { status.textContent = `${f.name}: ${problem}`; status.className = "error-text"; return; }
    checked = { name: f.name, text };
    status.textContent = `${f.name}: ${text.split(/\n/).filter((l) => l.trim()).length} rows, ready`;
    status.className = "muted";
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!form.reportValidity()) return;
    const f = form.elements;
    let dataset = pick.value;
    if (!dataset) {
      if (file.files[0] && !checked) { toast(status.textContent || "the file is not checked yet"); return; }
      if (!checked) { toast("choose a dataset or upload a JSONL file"); return; }
      const up = await post("/api/datasets", undefined, {
        raw: checked.text, contentType: "application/x-ndjson", query: { filename: checked.name },
      }).catch(() => null);
      if (!up) return;
      dataset = up.path;
    }
    const body = { model: f.model.value, dataset };
    if (f.output.value.trim()) body.output = f.output.value.trim();
    for (const k of ["max_steps", "epochs", "learning_rate", "lora_r", "lora_alpha", "batch_size"]) {
      if (f[k].value !== "") body[k] = Number(f[k].value);
    }
    const task = await post("/api/train", body).catch(() => null);
    if (task) location.hash = `#/training/task/${encodeURIComponent(task.id)}`;
  });
  const runsBox = h("div", { id: "runs" });
  const evalsBox = h("div", { id: "evals" });
  root.append(h("div", { class: "grid-2" }, card("Fine-tune (LoRA)", form), card("Runs", runsBox)), card("Evaluation reports", evalsBox));

  async function refreshRuns() {
    const page = await get("/api/runs", { limit: PAGE, offset: view.runs });
    const rows = page.data || [];
    replace(runsBox, table([
      { label: "Run", cell: (r) => {
        const key = runKey(r.run_dir);
        return key ? h("a", { href: `#/training/run/${key.map(encodeURIComponent).join("/")}` }, r.id || r.name || key.join("/")) : (r.id ?? r.name ?? "–");
      } },
      { label: "Output", cell: (r) => r.output ?? "–" },
      { label: "Base", cell: (r) => r.model ?? r.args?.model ?? "–" },
      { label: "State", cell: (r) => (r.state ? badge(r.state) : r.finished ? badge("finished") : "–") },
      { label: "Task", cell: (r) => { const id = taskOf(r); return id ? h("a", { href: `#/training/task/${encodeURIComponent(id)}`, class: "mono" }, id) : "–"; } },
      { label: "Created", cell: (r) => when(r.created) },
    ], rows, { empty: "No runs yet." }),
    pager({ offset: view.runs, limit: PAGE, total: page.total, count: rows.length }, (o) => { view.runs = o; refreshRuns(); }));
  }
  async function refreshEvals() {
    const page = await get("/api/evals", { limit: PAGE, offset: view.evals });
    replace(evalsBox, (page.data || []).length ? (page.data || []).map(reportTable) : h("p", { class: "muted" }, "No evaluation reports."),
      pager({ offset: view.evals, limit: PAGE, total: page.total, count: (page.data || []).length }, (o) => { view.evals = o; refreshEvals(); }));
  }
  await Promise.all([refreshRuns().catch(() => {}), refreshEvals().catch(() => {})]);
  const again = live.throttle(() => { refreshRuns().catch(() => {}); refreshEvals().catch(() => {}); }, 1000);
  return live.subscribe((type, data) => { if ((type === "task" && data?.state) || type === "open") again(); });
}

/** An evaluation report as tables: its scalar metrics, then each list of rows. */
export function reportTable(report) {
  const scalars = [];
  const tables = [];
  const walk = (obj, prefix) => {
    for (const [k, v] of Object.entries(obj || {})) {
      const name = prefix ? `${prefix}.${k}` : k;
      if (Array.isArray(v) && v.length && typeof v[0] === "object") tables.push([name, v]);
      else if (v && typeof v === "object" && !Array.isArray(v)) walk(v, name);
      else scalars.push([name, typeof v === "number" ? num(v) : (Array.isArray(v) ? JSON.stringify(v) : String(v ?? "–"))]);
    }
  };
  walk(report, "");
  return h("section", { class: "report" },
    h("h3", {}, `${report.model ?? "model"} on ${report.dataset ?? "dataset"}`),
    table([{ label: "Metric", cell: (r) => r[0] }, { label: "Value", cell: (r) => r[1] }], scalars),
    tables.map(([name, rows]) => {
      const cols = [...new Set(rows.slice(0, 50).flatMap((r) => Object.keys(r)))];
      return h("details", {}, h("summary", {}, `${name} (${rows.length})`),
        table(cols.map((c) => ({ label: c, cell: (r) => (typeof r[c] === "object" ? JSON.stringify(r[c]) : String(r[c] ?? "")) })), rows.slice(0, 200)));
    }));
}

async function runView(root, { taskId, output, version }) {
  const head = h("div");
  const chartBox = h("div", { class: "chart", id: "loss-chart" });
  const pointsText = h("p", { class: "muted", id: "loss-points" });
  const after = h("div", { id: "run-actions" });
  root.append(card(taskId ? `Fine-tune ${taskId}` : `Run ${output}/${version}`, head), card("Loss", chartBox, pointsText), after);
  const points = new Map(); // step -> loss
  let chart = null;
  const draw = () => {
    if (!chart && window.uPlot) chart = lineChart(chartBox, { time: false, series: [{ label: "loss", stroke: "#ef4444" }], xLabel: "step", yLabel: "loss" });
    const steps = [...points.keys()].sort((a, b) => a - b);
    chart?.set([steps, steps.map((s) => points.get(s))]);
    pointsText.textContent = steps.length ? `${steps.length} loss point${steps.length === 1 ? "" : "s"}; last: step ${steps[steps.length - 1]}, loss ${num(points.get(steps[steps.length - 1]))}` : "no loss points yet";
    pointsText.dataset.count = String(steps.length);
  };
  const addPoint = (p) => {
    const loss = p?.metrics?.loss ?? p?.loss;
    if (loss === undefined || loss === null || p.step === undefined || p.step === null) return;
    points.set(Number(p.step), Number(loss));
    draw();
  };
  let task = null;
  let key = output ? [output, version] : null;
  const bar = h("div", { class: "progress", id: "train-progress" });
  const fromRun = async () => {
    if (!key) return;
    const r = await get(`/api/runs/${key.map(encodeURIComponent).join("/")}/loss`, undefined, { quiet: Boolean(task) }).catch(() => null);
    for (const p of r?.points || []) addPoint(p);
  };
  const paint = () => {
    const parts = [];
    if (task) {
      parts.push(h("p", {}, taskLink(task.id), " ", badge(task.state), " ", task.args?.model ?? "", task.args?.output ? ` → ${task.args.output}` : ""));
      updateProgress(bar, task.progress);
      parts.push(bar, h("div", { class: "actions" }, actions(task, reload)));
      if (task.error) parts.push(h("p", { class: "error-text" }, task.error.message || ""));
    } else if (key) {
      parts.push(h("p", { class: "muted" }, `The task's status has expired; the loss comes from the run's own log (${key.join("/")}).`));
    }
    replace(head, parts);
    const done = !task || task.state === "succeeded";
    const adapter = task?.result?.output ?? task?.args?.output ?? output;
    replace(after, done && adapter ? finished(adapter, task) : null);
  };
  const reload = async () => {
    if (!taskId) return;
    try {
      task = await get(`/api/tasks/${encodeURIComponent(taskId)}`, undefined, { quiet: true });
      addPoint(task.progress);
      if (!key) key = runKey(task.args?.run_dir ?? task.run_dir ?? task.result?.run_dir);
    } catch (exc) {
      if (exc.status !== 404) return;
      task = null; // expired: find the run by its task id
      const runs = await get("/api/runs", { limit: 500 }).catch(() => ({ data: [] }));
      const run = (runs.data || []).find((r) => taskOf(r) === taskId);
      key = run ? runKey(run.run_dir) : key;
      if (!key) toast(`task ${taskId} is unknown and no run names it`);
    }
    paint();
    if (!task || !["queued", "running"].includes(task.state)) await fromRun();
  };
  await reload();
  if (!taskId) { paint(); await fromRun(); draw(); return null; }
  draw();
  const stream = new EventSource(`/api/tasks/${encodeURIComponent(taskId)}/logs/stream`, { withCredentials: true });
  stream.addEventListener("progress", (event) => {
    try { const e = JSON.parse(event.data); const p = e?.data?.progress ?? e?.data; addPoint(p); if (task) { task.progress = p; updateProgress(bar, p); } } catch { /* not ours */ }
  });
  stream.addEventListener("end", () => { stream.close(); again(); });
  stream.addEventListener("error", () => { if (!task) stream.close(); });
  const again = live.throttle(reload, 400);
  const unsubscribe = live.subscribe((type, data) => {
    if (type === "open") again();
    if (type === "task" && data?.id === taskId) {
      if (data.progress) addPoint(data.progress);
      again();
    }
  });
  return () => { stream.close(); unsubscribe(); chart?.destroy(); };
}

function finished(adapter, task) {
  const merge = h("form", { class: "inline", id: "merge-form" },
    h("input", { name: "output", placeholder: `${adapter}-merged`, "aria-label": "merged model name" }),
    h("button", { type: "submit" }, "Merge into the base"));
  merge.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = { adapter };
    if (merge.elements.output.value.trim()) body.output = merge.elements.output.value.trim();
    const t = await post("/api/merge", body).catch(() => null);
    if (t) location.hash = `#/tasks/${encodeURIComponent(t.id)}`;
  });
  const base = task?.args?.model;
  const evalForm = h("form", { class: "inline", id: "eval-form" },
    h("input", { name: "dataset", required: true, value: datasetOf(task?.args?.dataset), "aria-label": "evaluation dataset path", placeholder: "dataset path" }),
    h("button", { type: "submit" }, "Evaluate"));
  const reportBox = h("div", { id: "eval-report" });
  evalForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const model = base ? `${base}@${adapter}` : adapter;
    const r = await post("/api/eval", { model, dataset: evalForm.elements.dataset.value.trim() }).catch(() => null);
    if (!r) return;
    if (r.id && r.state) { toast(`evaluation queued: ${r.id}`, "info"); location.hash = `#/tasks/${encodeURIComponent(r.id)}`; }
    else replace(reportBox, reportTable(r));
  });
  return card("Finished run", h("p", {}, "Adapter ", h("span", { class: "mono" }, adapter)), merge, evalForm, reportBox);
}
