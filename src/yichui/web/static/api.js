// The one way the page talks to the server: fetch with the session cookie, the CSRF token on
// every non-GET request, every error body shown as a message in the page.
import { h } from "./dom.js";

export const session = { auth: null, principal: null, csrf: null };

export function isAdmin() {
  return session.principal?.role === "admin";
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

const listeners = { unauthorized: [], reachability: [] };
export function on(name, fn) { listeners[name].push(fn); }
function emit(name, ...args) { for (const fn of listeners[name]) fn(...args); }

/** A message in the page's alert region (role=alert: read out, visible, dismissible). */
export function toast(message, kind = "error") {
  const region = document.getElementById("toasts");
  const close = h("button", { type: "button", class: "close", "aria-label": "dismiss" }, "×");
  const el = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" },
    h("span", { class: "toast-text" }, message), close);
  close.addEventListener("click", () => el.remove());
  region.append(el);
  while (region.children.length > 5) region.firstChild.remove();
  setTimeout(() => el.remove(), kind === "error" ? 12000 : 5000);
  return el;
}

async function messageOf(response) {
  try {
    const body = await response.json();
    return [body?.error?.message || `${response.status} ${response.statusText}`, body];
  } catch {
    return [`${response.status} ${response.statusText}`, null];
  }
}

/**
 * api("GET", "/api/tasks", {query, body, raw, quiet}) -> parsed JSON (null for 204).
 * Errors: ApiError, shown as a toast unless quiet. Network failures: the "server unreachable"
 * banner; 503: the "Redis unreachable" one.
 */
export async function api(method, path, { query, body, raw, contentType, quiet = false } = {}) {
  let url = path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null || v === "") continue;
      for (const item of Array.isArray(v) ? v : [v]) params.append(k, String(item));
    }
    const text = params.toString();
    if (text) url += `?${text}`;
  }
  const headers = { Accept: "application/json" };
  if (method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  let payload;
  if (raw !== undefined) {
    payload = raw;
    headers["Content-Type"] = contentType || "application/octet-stream";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(url, { method, headers, body: payload, credentials: "same-origin" });
  } catch (exc) {
    emit("reachability", "server", false);
    const err = new ApiError(0, "server unreachable", null);
    if (!quiet) toast(`${method} ${path}: server unreachable`);
    throw err;
  }
  emit("reachability", "server", true);
  if (response.status === 204) return null;
  if (!response.ok) {
    const [message, errBody] = await messageOf(response);
    if (response.status === 503) emit("reachability", "redis", false);
    if (response.status === 401 && !path.startsWith("/api/session")) emit("unauthorized");
    if (!quiet) toast(`${response.status}: ${message}`);
    throw new ApiError(response.status, message, errBody);
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export const get = (path, query, opts = {}) => api("GET", path, { query, ...opts });
export const post = (path, body, opts = {}) => api("POST", path, { body: body ?? {}, ...opts });
export const del = (path, opts = {}) => api("DELETE", path, opts);

/** A model name in a path: its "/" kept (Qwen/Qwen2.5-0.5B), everything else encoded. */
export function namePath(name) {
  return String(name).split("/").map(encodeURIComponent).join("/");
}

export async function loadSession() {
  const s = await api("GET", "/api/session", { quiet: true });
  Object.assign(session, s);
  return s;
}

export async function signIn(key) {
  const s = await api("POST", "/api/session", { body: { key }, quiet: true });
  Object.assign(session, s);
  return s;
}

export async function signOut() {
  try { await api("DELETE", "/api/session"); } finally {
    session.principal = null;
    session.csrf = null;
  }
}
