"""The async services of an API process, built from a :class:`~yichui.runtime.Runtime`::

    async with rt.serving() as services:       # started on entry, closed on exit
        services.inference          # the inference service: the one way to an answer
        services.router             # the engines, for /v1/models
        services.cache              # the response cache (counters, breaker state)
        services.metrics, .probe    # this process's metrics; the deployment's, read for a scrape
        services.auth               # who asks (API keys, roles): every request path uses it
        services.sessions           # the dashboard's sessions (cookie -> key)
        services.state              # the state instance's asyncio client

Two asyncio Redis clients: the state instance's (model events) and the cache instance's
(``cache_redis_url``, by default the same URL). Redis down at start is no failure: the API
serves uncached and the cache's circuit breaker probes until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

from yichui.access import Authenticator, SessionStore
from yichui.backoff import Backoff
from yichui.errors import RedisUnavailableError, StateError
from yichui.inference.cache import ResponseCache
from yichui.inference.router import ModelRouter
from yichui.inference.service import InferenceService
from yichui.runtime.feed import EventFeed
from yichui.runtime.fleet import FleetHeartbeat
from yichui.state import cluster
from yichui.state.connection import (
    REDIS_ERRORS,
    AsyncRedis,
    RedisTarget,
    make_async_client,
    parse_redis_url,
)
from yichui.state.events import model_events
from yichui.state.response_store import ResponseStore
from yichui.state.sentinel import AsyncSentinelWatch, check_master

if TYPE_CHECKING:
    from yichui.runtime import Runtime

log = logging.getLogger("yichui.api")

UNREACHABLE = "redis://127.0.0.1:1/0"
"""Stands for a Redis that could not be found at start: every call fails fast (bypass)."""


class ServingServices:
    """Built by :meth:`Runtime.serving`; usable between :meth:`start` and :meth:`close` (or
    inside ``async with``)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings
        self._state: AsyncRedis | None = None
        self._cache_client: AsyncRedis | None = None
        self._cache: ResponseCache | None = None
        self._router: ModelRouter | None = None
        self._inference: InferenceService | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._keys_task: asyncio.Task[None] | None = None
        self._sessions: SessionStore | None = None
        self._feed: EventFeed | None = None
        self._fleet: FleetHeartbeat | None = None
        self._sentinels: list[AsyncSentinelWatch] = []
        self._cluster_probe: asyncio.Task[None] | None = None
        self.auth: Authenticator = rt.authenticator()
        """Checks every request's key without a Redis call (its table kept fresh here)."""
        self.metrics = rt.metrics
        self.probe = rt.probe()
        """Reads the deployment's figures for ``/metrics``."""

    @property
    def state(self) -> AsyncRedis:
        if self._state is None:
            raise RuntimeError("the serving services are not started")
        return self._state

    @property
    def sessions(self) -> SessionStore:
        return _started(self._sessions)

    @property
    def feed(self) -> EventFeed:
        """Task, model and Redis events for the dashboard's streams (one subscription)."""
        return _started(self._feed)

    @property
    def cache(self) -> ResponseCache:
        return _started(self._cache)

    @property
    def router(self) -> ModelRouter:
        return _started(self._router)

    @property
    def inference(self) -> InferenceService:
        return _started(self._inference)

    async def start(self) -> None:
        s, rt = self.settings, self.rt
        try:  # start (or find) Redis; the API still serves, uncached, when it cannot
            state_url = rt.state_url()
        except StateError as exc:
            log.warning("Redis unavailable at start (%s): serving uncached", exc)
            state_url = s.redis_url or UNREACHABLE
        cache_url = s.cache_redis_url or state_url
        state_target, cache_target = parse_redis_url(state_url), parse_redis_url(cache_url)
        for target in _distinct(state_target, cache_target):
            if target.kind == "sentinel":  # an unknown master name stops us here (exit 2)
                await asyncio.to_thread(check_master, target, s)
        self._state = make_async_client(state_target, s)
        self._cache_client = make_async_client(cache_target, s)
        if state_target.kind == "cluster":  # the slots known before the first request (the
            # cache's client learns them in ResponseCache.start)
            await cluster.warm(self._state, s.redis_connect_timeout)  # type: ignore[arg-type]
        self._sessions = SessionStore(self._state, rt.keys, s.session_ttl)
        self._feed = EventFeed(self._state, rt.keys, buffer=s.sse_buffer)
        if not self.auth.local:  # the keys, before the first request is let in
            try:
                await asyncio.wait_for(
                    self.auth.table.load(self._state, rt.keys), s.redis_connect_timeout
                )
            except Exception as exc:  # refused until they load: fail closed
                log.warning("API keys not loaded at start (%r): only api_keys work until then", exc)
            self._keys_task = asyncio.create_task(
                self.auth.table.run(self._state, rt.keys), name="api-keys"
            )
        self._cache = ResponseCache(
            ResponseStore(self._cache_client, rt.keys),
            ttl_for=lambda model: s.response_ttl_by_model.get(model, s.response_ttl),
            jitter=s.ttl_jitter,
            timeout=s.cache_timeout,
            wait=s.cache_wait,
            near_ttl=s.cache_near_ttl,
            near_bytes=s.cache_near_bytes,
            max_entry_bytes=s.cache_max_entry_bytes,
            metrics=rt.metrics,
        )
        await self._cache.start(warm=s.redis_connect_timeout)
        self._router = ModelRouter(await asyncio.to_thread(rt.engines))
        self._inference = InferenceService(
            self._router, self._cache, shared=s.cache_shared, wait=s.cache_wait, metrics=rt.metrics
        )
        self._watcher = asyncio.create_task(self._watch_models(), name="model-events")
        self._follow_failovers(state_target, cache_target)
        self._fleet = FleetHeartbeat(
            s, rt.keys, self._state, self._router, self._cache, engines=rt.supervisor.states
        )
        self._fleet.start()  # what this server has loaded, for `yichui ps`

    async def __aenter__(self) -> ServingServices:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _follow_failovers(self, state: RedisTarget, cache: RedisTarget) -> None:
        """On a Sentinel's ``+switch-master``, drop the idle connections to the old master and
        close the cache's breaker at once: hits come back as soon as the replica is promoted,
        not a cooldown later (the cooldown stays the fallback). On a cluster, probe it while
        the breaker is open (:meth:`_probe_cluster`)."""
        clients = [(state, self._state), (cache, self._cache_client)]
        for target in _distinct(state, cache):
            if target.kind != "sentinel":
                continue
            mine = [c for t, c in clients if t == target and c is not None]

            async def switched(host: str, port: int, mine: list[AsyncRedis] = mine) -> None:
                for client in mine:  # a Sentinel master's client: one pool
                    pool = getattr(client, "connection_pool", None)
                    with contextlib.suppress(Exception):
                        await pool.disconnect(inuse_connections=False)  # type: ignore[union-attr]
                if self._cache is not None:
                    self._cache.breaker.reset(f"new Redis master {host}:{port}")

            self._sentinels.append(AsyncSentinelWatch(target, self.settings, on_switch=switched))
        for watch in self._sentinels:
            watch.start()
        if cache.kind == "cluster":
            self._cluster_probe = asyncio.create_task(self._probe_cluster(), name="cluster-probe")

    async def _probe_cluster(self, every: float = 0.25) -> None:
        """While the cache's breaker is open, ask the cluster every ``every`` seconds whether
        all its masters answer (a replica promoted): then close the breaker, the client's
        slots refreshed. A cluster announces no failover; the cooldown stays the fallback."""
        assert self._cache is not None and self._cache_client is not None
        breaker, client = self._cache.breaker, self._cache_client
        while True:
            await asyncio.sleep(every)
            if breaker.state == "closed":
                continue
            if await cluster.masters_answer(client, timeout=1.0):  # type: ignore[arg-type]
                breaker.reset("every Redis Cluster master answers")

    async def close(self) -> None:
        if self._fleet is not None:
            await self._fleet.close()  # first: `ps` lists no server that is shutting down
        for watch in self._sentinels:
            await watch.close()
        self._sentinels = []
        for task in (self._watcher, self._keys_task, self._cluster_probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._feed is not None:
            await self._feed.close()
        if self._inference is not None:
            await self._inference.close()
        if self._cache is not None:
            await self._cache.close()
        if self._router is not None:
            await self._router.close()
        for client in (self._state, self._cache_client):
            if client is not None:
                await client.aclose()
        await asyncio.to_thread(self.probe.close)

    async def _watch_models(self) -> None:
        """Forget a model's binding the moment it is pulled, imported, merged or removed, so
        its new fingerprint (and so new cache keys) apply at once, not after CARD_TTL."""
        assert self._state is not None and self._inference is not None
        backoff = Backoff(first=0.5, cap=10.0)
        while True:
            try:
                async for event in model_events(self._state, self.rt.keys):
                    backoff.reset()
                    name = event.get("name")
                    self._inference.model_changed(str(name) if name else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: the binding TTL still bounds staleness
                log.debug("model events: %r", exc)
            await backoff.sleep()


T = TypeVar("T")


def _distinct(*targets: RedisTarget) -> list[RedisTarget]:
    """``targets`` without repeats (a target holds a dict: not hashable)."""
    out: list[RedisTarget] = []
    for target in targets:
        if target not in out:
            out.append(target)
    return out


def _started(value: T | None) -> T:
    if value is None:
        raise RuntimeError("the serving services are not started")
    return value


@contextlib.asynccontextmanager
async def cache_store(rt: Runtime) -> AsyncIterator[ResponseStore]:
    """The response cache's store on its own client, for the CLI (``yichui cache``);
    RedisUnavailableError (one line) when the cache's Redis does not answer."""
    target = rt.cache_target()
    client = make_async_client(target, rt.settings)
    try:
        try:
            await client.ping()
        except REDIS_ERRORS as exc:
            raise RedisUnavailableError(target.display, str(exc) or type(exc).__name__) from exc
        yield ResponseStore(client, rt.keys)
    finally:
        await client.aclose()
