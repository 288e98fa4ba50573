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
from typing import TYPE_CHECKING

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
                except _FAULTS as exc:
                    log.debug("metrics: Redis %s did not answer: %r", name, exc)
            snap.redis[name] = info
            if name == "state" and info is not None and client is not None:
                self._tasks(snap, client[0])
        return snap

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
