"""The deployment's figures, read from Redis when a scrape asks for them::

    probe = rt.probe()
    snapshot = probe.read()              # blocking: at most a few metrics_redis_timeout
    rt.metrics.exposition(snapshot)      # the text /metrics answers

Every Redis call of a probe has ``metrics_redis_timeout`` seconds and no retry, on clients of
its own, so a slow or dead Redis makes a scrape report it absent (``yichui_redis_up 0``) instead
of hanging it. The embedded Redis is never started by a scrape.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from yichui.errors import StateError
from yichui.metrics import REDIS_INFO, ClusterSnapshot
from yichui.state.connection import (
    REDIS_ERRORS,
    RedisTarget,
    SyncRedis,
    make_sync_client,
    parse_redis_url,
    resolve_url,
)
from yichui.state.info import info_figures
from yichui.state.task_store import TaskStore

if TYPE_CHECKING:
    from yichui.runtime import Runtime

log = logging.getLogger("yichui.metrics")

_FAULTS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, StateError, OSError, TimeoutError)


HEALTH_SUMS = (
    "used_memory",
    "used_memory_peak",
    "maxmemory",
    "instantaneous_ops_per_sec",
    "connected_clients",
)
"""The ``INFO`` figures :meth:`ClusterProbe.health` reports (summed over a cluster's primaries)."""


class ClusterProbe:
    """Built by :meth:`Runtime.probe`; keep one per process (it keeps its clients)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        s = rt.settings
        t = s.metrics_redis_timeout
        self._settings = s.model_copy(
            update={
                "redis_connect_timeout": t,
                "redis_socket_timeout": t,
                "redis_retries": 0,
                "redis_health_check_interval": 0,
            }
        )
        self._clients: dict[str, tuple[SyncRedis, RedisTarget]] = {}

    def read(self) -> ClusterSnapshot:
        snap = ClusterSnapshot()
        s = self.rt.settings
        instances = {"state": self._state_url()}
        if s.cache_redis_url and s.cache_redis_url != instances["state"]:
            instances["cache"] = s.cache_redis_url
        for name, url in instances.items():
            client = self._client(name, url)
            info = None
            if client is not None:
                try:
                    info = info_figures(client[0], client[1], REDIS_INFO)
                    info.setdefault("errorstat_OOM", 0.0)  # absent until the first one
                except _FAULTS as exc:
                    log.debug("metrics: Redis %s did not answer: %r", name, exc)
            snap.redis[name] = info
            if name == "state" and info is not None and client is not None:
                self._tasks(snap, client[0])
        return snap

    def health(self) -> dict[str, Any]:
        """The state instance now, for ``/api/redis`` and the dashboard: ``reachable``, its
        URL (no password), the error when it did not answer, and its main ``INFO`` figures."""
        url = self._state_url()
        out: dict[str, Any] = {"reachable": False, "url": None, "error": None, "info": {}}
        if url is None:
            out["error"] = "the embedded Redis is not running"
            return out
        client = self._client("state", url)
        if client is None:
            out["error"] = "no client could be built"
            return out
        out["url"] = client[1].display
        try:
            raw: Any = client[0].info()
        except _FAULTS as exc:
            out["error"] = str(exc) or type(exc).__name__
            return out
        if client[1].kind == "cluster" and raw and all(isinstance(v, dict) for v in raw.values()):
            nodes = list(raw.values())
            first: dict[str, Any] = nodes[0]
            summed = info_figures(client[0], client[1], HEALTH_SUMS)
        else:
            first, summed = raw, {k: raw.get(k) for k in HEALTH_SUMS}
        out["reachable"] = True
        out["info"] = {
            "used_memory": summed.get("used_memory"),
            "used_memory_peak": summed.get("used_memory_peak"),
            "maxmemory": summed.get("maxmemory"),
            "maxmemory_policy": first.get("maxmemory_policy"),
            "ops_per_sec": summed.get("instantaneous_ops_per_sec"),
            "connected_clients": summed.get("connected_clients"),
            "redis_version": first.get("redis_version"),
            "uptime_seconds": first.get("uptime_in_seconds"),
        }
        return out

    def close(self) -> None:
        for client, _ in self._clients.values():
            client.close()
        self._clients = {}

    def _state_url(self) -> str | None:
        try:
            return resolve_url(self.rt.settings, start=False)
        except StateError:  # the embedded server is not running: a scrape does not start it
            return None

    def _client(self, name: str, url: str | None) -> tuple[SyncRedis, RedisTarget] | None:
        if url is None:
            return None
        held = self._clients.get(name)
        if held is not None and held[1].url == url:
            return held
        try:
            target = parse_redis_url(url)
            held = (make_sync_client(target, self._settings), target)
        except _FAULTS as exc:  # a cluster client connects while it is built
            log.debug("metrics: no client for Redis %s: %r", name, exc)
            return None
        self._clients[name] = held
        return held

    def _tasks(self, snap: ClusterSnapshot, client: SyncRedis) -> None:
        rt, s = self.rt, self.rt.settings
        store = TaskStore(client, rt.keys, ttl=s.task_ttl, jitter=s.ttl_jitter)
        try:
            snap.tasks = store.counts()
            now = store.now()
            stale_after = 3 * s.task_heartbeat
            workers = []
            for w in store.workers():
                age = max(0.0, now - float(w.get("heartbeat", 0)) / 1000.0)
                if age < stale_after:
                    workers.append((str(w.get("id")), str(w.get("queue", "")), age))
            queues = sorted({s.task_queue, *(q for _, q, _ in workers if q)})
            snap.queues = {q: (store.backlog(q), store.pending(q)) for q in queues}
            snap.workers = workers
        except _FAULTS as exc:
            log.debug("metrics: task figures unavailable: %r", exc)
