// The dashboard's shell: session and sign-in, hash routes, the live feed, the banners.
import { ApiError, get, isAdmin, loadSession, on, session, signIn, signOut, toast } from "./api.js";
import { h, replace } from "./dom.js";
import * as live from "./live.js";
import * as overview from "./overview.js";
import * as models from "./models.js";
import * as tasks from "./tasks.js";
import * as training from "./training.js";
import * as playground from "./playground.js";
import * as cache from "./cache.js";
import * as admin from "./admin.js";

const routes = {
  overview: overview.render,
  models: models.render,
  tasks: tasks.render,
  training: training.render,
  playground: playground.render,
  cache: cache.render,
  audit: admin.renderAudit,
  keys: admin.renderKeys,
};

const main = document.getElementById("main");
let cleanup = null;
let rendering = 0;

function parseHash() {
  const parts = (location.hash.replace(/^#\/?/, "") || "overview").split("/");
  const name = routes[parts[0]] ? parts[0] : "overview";
  return { name, params: parts.slice(1).map(decodeURIComponent) };
}

async function show() {
  if (!session.principal) return;
  const { name, params } = parseHash();
  const mine = ++rendering;
  if (cleanup) { try { cleanup(); } catch { /* the old page is gone anyway */ } }
  cleanup = null;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.route === name);
    if (a.dataset.route === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const root = h("div", { class: "page", id: `page-${name}` });
  replace(main, root);
  document.title = `yichui · ${name}`;
  try {
    const done = await routes[name](root, params);
    if (mine !== rendering) { if (typeof done === "function") done(); return; }
    cleanup = typeof done === "function" ? done : null;
  } catch (exc) {
    if (!(exc instanceof ApiError)) {
      console.warn(exc);
      toast(`This page failed: ${exc.message}`);
    }
  }
}

// --- banners: the API or Redis unreachable, and the recovery
const down = { server: false, redis: false };
let probe = null;

function setReachable(what, ok) {
  if (down[what] === !ok) return;
  down[what] = !ok;
  const banner = document.getElementById("banner");
  const text = down.server ? "server unreachable — retrying"
    : down.redis ? "Redis unreachable — retrying" : "";
  banner.textContent = text;
  banner.hidden = !text;
  if (text && !probe) probe = setInterval(checkHealth, 3000);
  if (!text && probe) {
    clearInterval(probe);
    probe = null;
    show(); // back: what the page shows may have changed meanwhile
  }
}

async function checkHealth() {
  try {
    const r = await get("/api/redis", undefined, { quiet: true });
    setReachable("server", true);
    setReachable("redis", Boolean(r.reachable));
  } catch (exc) {
    if (exc instanceof ApiError && exc.status !== 0) {
      setReachable("server", true);
      if (exc.status === 503) setReachable("redis", false);
    }
  }
}

on("reachability", setReachable);
live.onStatus(setReachable);

// --- session and sign-in
function showSignIn() {
  live.stop();
  session.principal = null;
  replace(main);
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-key").focus();
}

on("unauthorized", () => {
  if (session.principal) toast("Your session ended: sign in again.");
  showSignIn();
});

function started() {
  document.getElementById("signin").hidden = true;
  const p = session.principal || {};
  document.getElementById("whoami").textContent =
    session.auth === "keys" ? `${p.name || p.key_id || "key"} · ${p.tenant} · ${p.role}` : `local · ${p.role}`;
  document.getElementById("signout").hidden = session.auth !== "keys";
  for (const a of document.querySelectorAll(".admin-only")) a.hidden = !isAdmin();
  live.start();
  show();
}

document.getElementById("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("signin-key");
  try {
    await signIn(input.value.trim());
    input.value = "";
    started();
  } catch (exc) {
    toast(exc.status === 401 ? "That key was refused." : `Sign-in failed: ${exc.message}`);
  }
});

document.getElementById("signout").addEventListener("click", async () => {
  await signOut().catch(() => {});
  showSignIn();
});

window.addEventListener("hashchange", show);

async function boot() {
  try {
    await loadSession();
    started();
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 401) {
      showSignIn();
      return;
    }
    setReachable(exc.status === 503 ? "redis" : "server", false);
    replace(main, h("p", { class: "muted" }, "Waiting for the server…"));
    setTimeout(boot, 3000);
  }
}

boot();
