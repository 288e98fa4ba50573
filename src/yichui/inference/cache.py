"""The response cache: hits, coalescing of concurrent misses, and failing open.

A computation goes through a :class:`CacheSession`::

    async with cache.session(model, key) as s:
        if s.body is not None:          # hit, or another process's answer that we waited for
            return s.body, s.status     # the response body, as stored: JSON bytes
        body = await compute()          # we are the one computing it (or the cache is off)
        await s.commit(body)            # store it, wake whoever waits for it

**Coalescing.** Across processes and hosts, the first session takes a lock in Redis (``SET NX
PX``, renewed while it computes) and the others wait for its "done" event (pub/sub, with
polling as a fallback), then read the stored answer. If the computation fails, the waiters get
its error, which is not stored. A waiter gives up after ``wait`` seconds and computes the answer
itself. Within one process, identical requests share one computation before they get here: the
inference service's flights (:mod:`yichui.inference.service`).

**Near cache.** Each process keeps the bodies it served or stored lately in memory for up to
``near_ttl`` seconds (bounded by ``near_bytes``), so a repeated hit does not even reach Redis.
Every store and every ``cache clear`` is published, and each process drops the entries
concerned at once; refreshes (``no-cache``) never read it.

**Failing open.** Every Redis call has a short timeout. A failure or timeout counts as a fault;
after ``breaker_threshold`` faults in a row the breaker opens and the cache is bypassed for
``breaker_cooldown`` seconds, then one request probes Redis again. A request never fails
because of the cache: it is answered uncached (status ``bypass``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from yichui.backoff import Backoff
from yichui.inference.breaker import Breaker
from yichui.inference.near import NearCache
from yichui.inference.session import CacheSession
from yichui.metrics import OTHER, RESULTS, CacheEvent, CacheResult, Metrics
from yichui.state.connection import REDIS_ERRORS, is_denied
from yichui.state.response_store import ResponseStore

log = logging.getLogger("yichui.cache")
T = TypeVar("T")

_FAULTS: tuple[type[Exception], ...] = (TimeoutError, OSError, *REDIS_ERRORS)
"""What a Redis call of the cache may fail with; each one counts as a fault."""


class ResponseCache:
    """The cache of one server process."""

    def __init__(
        self,
        store: ResponseStore | None,
        *,
        ttl_for: Callable[[str], int],
        jitter: float = 0.1,
        timeout: float = 0.05,
        lease: float = 30.0,
        wait: float = 120.0,
        breaker: Breaker | None = None,
        near_ttl: float = 10.0,
        near_bytes: int = 64 * 1024**2,
        max_entry_bytes: int = 4 * 1024**2,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.max_entry_bytes = max_entry_bytes
        """Largest answer stored; a larger one is served, not stored (counted ``too_large``)."""
        self.metrics = metrics or Metrics()
        self.near_ttl = near_ttl
        self.near = NearCache(ttl=near_ttl, max_bytes=near_bytes)
        self.ttl_for = ttl_for
        self.jitter = jitter
        self.timeout = timeout
        self.lease_ms = int(lease * 1000)
        self.wait = wait
        self.breaker = breaker or Breaker()
        self._denied: set[str] = set()  # ACL refusals already logged
        self.counts: Counter[str] = Counter()
        """This process's counts (the labelled ones are in ``metrics``)."""
        self.metrics.watch_cache(self.breaker, self.near)
        self.waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        """Key -> futures of the sessions waiting for another process's answer to it."""
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, *, warm: float = 2.0) -> None:
        """Its listener and stats flusher; a cluster client learns the slots first (for up to
        ``warm`` seconds) so that the first requests are not bypasses."""
        if self.store is not None:
            await self.store.warm(warm)
            self._tasks = [
                asyncio.create_task(self._listen(), name="cache-events"),
                asyncio.create_task(self._flush_stats(), name="cache-stats"),
            ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            await self._flush_once()

    def near_hit(self, endpoint: str, model: str, *, fast: bool = False) -> None:
        """A hit answered from memory (``fast``: by the hit fast path)."""
        counts = self.counts
        counts["hit"] += 1
        counts["near_hits"] += 1
        if fast:
            counts["fast_hits"] += 1
        self.metrics.near_hit(endpoint, model, fast=fast)

    def count(self, name: CacheResult | CacheEvent, endpoint: str, model: str) -> None:
        """Count ``name`` for a request to ``endpoint`` of ``model`` (a bound model's name)."""
        self.counts[name] += 1
        if name in RESULTS:
            self.metrics.cache_result(endpoint, model, name)  # type: ignore[arg-type]
        else:
            self.metrics.cache_event(name, endpoint, model)  # type: ignore[arg-type]

    # -- guarded Redis calls --------------------------------------------------------------------
    async def guarded(
        self,
        op: Callable[[], Awaitable[T]],
        endpoint: str = OTHER,
        model: str = OTHER,
        *,
        timeout: float | None = None,
    ) -> tuple[bool, T | None]:
        """Run a Redis op within the timeout (``timeout``: this op's own, for a blocking read)
        -> (ok, result); faults feed the breaker (and are counted for ``endpoint`` and
        ``model``)."""
        if self.store is None or not self.breaker.allow():
            return False, None
        try:
            async with asyncio.timeout(timeout or self.timeout):  # no extra task, unlike wait_for
                result = await op()
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except _FAULTS as exc:
            self.count("faults", endpoint, model)
            self.breaker.failure()
            if is_denied(exc) and str(exc) not in self._denied:  # a setting: said once
                self._denied.add(str(exc))
                log.warning("response cache: Redis refused a command (%s); grant the user "
                            "the ACL of docs/deployment.md", exc)  # fmt: skip
            else:
                log.debug("response cache fault: %r", exc)
            return False, None
        self.breaker.success()
        return True, result

    async def clear(self, model: str | None = None) -> int:
        """Delete the stored entries (of one model) everywhere -> entries deleted in Redis."""
        self.near.drop_model(model)
        return await self.store.clear(model) if self.store is not None else 0

    def ttl(self, model: str) -> int:
        base = self.ttl_for(model)
        return max(1, round(base * (1.0 + random.uniform(-self.jitter, self.jitter))))

    async def lookup(
        self, model: str, key: str, max_age: float | None = None, endpoint: str = OTHER
    ) -> tuple[bytes | None, bool]:
        """(the stored answer, counted as a hit, or None, whether Redis answered). None on a
        miss or an entry older than ``max_age`` seconds (it is then recomputed); ``False`` on a
        fault or an open breaker: the request goes on uncached, asking Redis nothing more."""
        started = time.perf_counter()
        try:
            return await self._lookup(model, key, max_age, endpoint)
        finally:
            self.metrics.lookup_took(endpoint, time.perf_counter() - started)

    async def _lookup(
        self, model: str, key: str, max_age: float | None, endpoint: str
    ) -> tuple[bytes | None, bool]:
        near = self.near.get(key, max_age)
        if near is not None:
            self.near_hit(endpoint, model)
            return near, True
        store = self.store
        if store is None or self.breaker.state == "open":
            return None, False
        ok, entry = await self.guarded(lambda: store.get(model, key), endpoint, model)
        if not ok or entry is None:
            return None, ok
        created = float(entry[0].get("created", 0))
        if max_age is not None and time.time() - created > max_age:
            return None, True
        self.near.put(key, model, entry[1], created, self.near_ttl)
        self.count("hit", endpoint, model)
        return entry[1], True

    def session(
        self,
        model: str,
        key: str,
        *,
        refresh: bool = False,
        store: bool = True,
        max_age: float | None = None,
        looked_up: bool = False,
        reachable: bool = True,
        endpoint: str = OTHER,
        live: bool = False,
    ) -> CacheSession:
        """One computation's way through the cache (see :class:`CacheSession`). ``looked_up``:
        :meth:`lookup` just missed, so the session starts at the lock; ``reachable=False``: it
        just found Redis failing, so the session bypasses the cache at once. ``endpoint``:
        what the request asked for, a label of its counts. ``live``: the answer is streamed:
        computed, its pieces go to a live stream (:meth:`CacheSession.publish`); computed
        elsewhere and streamed there, the session reads it live (:attr:`CacheSession.live`)."""
        return CacheSession(
            self,
            model,
            key,
            refresh=refresh,
            store=store,
            max_age=max_age,
            looked_up=looked_up,
            reachable=reachable,
            endpoint=endpoint,
            live=live,
        )

    # -- waiting on other processes ------------------------------------------------------------
    async def _listen(self) -> None:
        assert self.store is not None
        backoff = Backoff(first=0.5, cap=10.0)
        while True:
            try:
                async for event in self.store.events():
                    backoff.reset()
                    if "clear" in event:
                        self.near.drop_model(event["clear"] or None)
                        continue
                    self.near.drop(str(event.get("key")))
                    for fut in self.waiters.pop(str(event.get("key")), []):
                        if not fut.done():
                            fut.set_result(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: waiters fall back to polling meanwhile
                log.debug("response cache listener: %r", exc)
            await backoff.sleep()

    async def _flush_stats(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._flush_once()

    async def _flush_once(self) -> None:
        if not self.metrics.fleet or self.store is None:
            return
        counts = self.metrics.take_fleet()
        store = self.store
        # a flush that timed out may still have been applied: never add the counts twice. It
        # is on no request's path: it gets more time than a request's lookup (lost counts
        # under load otherwise)
        await self.guarded(lambda: store.add_stats(counts), timeout=1.0 + 4 * self.timeout)
