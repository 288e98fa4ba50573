// The live feed: one EventSource on /api/events (task, model, redis, ping events) for the
// whole page. Pages subscribe while shown; the feed reconnects by itself.
const subscribers = new Set();
let source = null;
let retryTimer = null;
let statusHandler = () => {};

/** subscribe(fn) -> unsubscribe; fn(type, data) for every task/model/redis event. */
export function subscribe(fn) {
  subscribers.add(fn);
  return () => subscribers.delete(fn);
}

export function onStatus(fn) { statusHandler = fn; }

function dispatch(type, event) {
  let data = null;
  try { data = JSON.parse(event.data); } catch { data = null; }
  if (type === "redis" && data) statusHandler("redis", Boolean(data.reachable));
  for (const fn of [...subscribers]) {
    try { fn(type, data); } catch (exc) { console.warn("live subscriber failed", exc); }
  }
}

export function start() {
  if (source) return;
  source = new EventSource("/api/events", { withCredentials: true });
  source.addEventListener("open", () => {
    statusHandler("server", true);
    dispatch("open", { data: "null" }); // refresh: events may have been missed while away
  });
  for (const type of ["task", "model", "redis", "ping"]) {
    source.addEventListener(type, (event) => dispatch(type, event));
  }
  source.addEventListener("error", () => {
    statusHandler("server", false);
    // the browser retries by itself while CONNECTING; a refused stream (an error status) is
    // CLOSED for good: open a new one a little later
    if (source && source.readyState === EventSource.CLOSED) {
      source = null;
      clearTimeout(retryTimer);
      retryTimer = setTimeout(start, 3000);
    }
  });
}

export function stop() {
  clearTimeout(retryTimer);
  if (source) source.close();
  source = null;
}

/** fn() at most once per `ms`, the last call always honoured. */
export function throttle(fn, ms = 400) {
  let timer = null;
  let last = 0;
  return (...args) => {
    const wait = Math.max(0, last + ms - Date.now());
    clearTimeout(timer);
    timer = setTimeout(() => { last = Date.now(); fn(...args); }, wait);
  };
}
