// DOM helpers: every text from the server goes in through textContent, never as markup.

/** h("td", {class: "x", onclick: fn}, "text", node, ...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "text") {
      el.textContent = String(value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key in el && typeof value !== "string") {
      el[key] = value; // value, checked, disabled, max ...
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  return append(clear(el), children);
}

export function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(Number(seconds)));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function when(ts) {
  if (ts === null || ts === undefined || ts === "") return "–";
  const d = typeof ts === "number" ? new Date(ts * 1000) : new Date(ts);
  if (Number.isNaN(d.getTime())) return String(ts);
  return d.toLocaleString();
}

export function percent(x) {
  if (x === null || x === undefined) return "–";
  return `${(Number(x) * 100).toFixed(1)} %`;
}

export function num(x, digits = 4) {
  if (x === null || x === undefined) return "–";
  const v = Number(x);
  if (Number.isInteger(v)) return String(v);
  if (v !== 0 && Math.abs(v) < 0.01) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

/** A table: columns [{label, cell(row) -> node|text}], rows. */
export function table(columns, rows, { empty = "Nothing here.", rowAttrs } = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c.label)));
  const body = rows.length
    ? rows.map((row) => h("tr", rowAttrs ? rowAttrs(row) : {},
      columns.map((c) => h("td", { class: c.class }, c.cell(row)))))
    : [h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, empty))];
  return h("table", { class: "grid" }, h("thead", {}, head), h("tbody", {}, body));
}

/** Key/value pairs as a definition list. */
export function facts(pairs) {
  return h("dl", { class: "facts" },
    pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

export function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, children);
}

export function badge(state) {
  return h("span", { class: `badge state-${String(state).replace(/[^a-z]/g, "")}` }, state);
}

/** A progress bar of a task's progress: step/total, percent, ETA, metrics. */
export function progress(p, { bytesUnit = false } = {}) {
  const wrap = h("div", { class: "progress" });
  updateProgress(wrap, p, { bytesUnit });
  return wrap;
}

export function updateProgress(wrap, p, { bytesUnit = false } = {}) {
  p = p || {};
  const inBytes = bytesUnit || p.unit === "bytes";
  const bar = h("progress", { max: 100 });
  if (p.percent !== null && p.percent !== undefined) bar.value = Number(p.percent);
  else bar.removeAttribute("value"); // indeterminate
  const fmt = inBytes ? bytes : (x) => (x ?? "–");
  const bits = [];
  if (p.step !== undefined && p.step !== null) {
    bits.push(p.total ? `${fmt(p.step)} / ${fmt(p.total)}` : `${fmt(p.step)}`);
  }
  if (p.percent !== null && p.percent !== undefined) bits.push(`${Number(p.percent).toFixed(0)} %`);
  if (p.eta !== null && p.eta !== undefined) bits.push(`ETA ${duration(p.eta)}`);
  for (const [k, v] of Object.entries(p.metrics || {})) bits.push(`${k} ${num(v)}`);
  bar.setAttribute("aria-label", bits.join(", ") || "waiting");
  replace(wrap, bar, h("span", { class: "progress-text" }, bits.join(" · ") || "waiting"));
}

/** A button that asks "sure?" on its first press (no window.confirm: it blocks). */
export function confirmButton(label, action, attrs = {}) {
  let armed = false;
  let timer = null;
  const btn = h("button", { type: "button", ...attrs }, label);
  btn.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      btn.textContent = `Really ${label.toLowerCase()}?`;
      btn.classList.add("armed");
      timer = setTimeout(() => { armed = false; btn.textContent = label; btn.classList.remove("armed"); }, 4000);
      return;
    }
    clearTimeout(timer);
    armed = false;
    btn.textContent = label;
    btn.classList.remove("armed");
    await action();
  });
  return btn;
}

/** Pagination controls: {offset, limit, total} -> prev/next calling go(offset). */
export function pager({ offset, limit, total, count }, go) {
  const last = total !== null && total !== undefined ? offset + limit >= total : count < limit;
  return h("div", { class: "pager" },
    h("button", { type: "button", disabled: offset <= 0, onclick: () => go(Math.max(0, offset - limit)) }, "← Newer"),
    h("span", { class: "muted" },
      count ? `${offset + 1}–${offset + count}${total !== null && total !== undefined ? ` of ${total}` : ""}` : "none"),
    h("button", { type: "button", disabled: last, onclick: () => go(offset + limit) }, "Older →"));
}
