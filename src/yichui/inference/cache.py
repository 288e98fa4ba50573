"""The response cache: hits, coalescing of concurrent misses, and failing open.

One request goes through a :class:`CacheSession`::

    async with cache.session(model, key) as s:
        if s.body is not None:          # hit, or coalesced onto another request's answer
            return s.body, s.status     # the response body, as stored: JSON bytes
        body = await compute()          # we are the one computing it (or the cache is off)
        await s.commit(body)            # store it, wake whoever waits for it

**Coalescing.** Identical misses in one process wait on one asyncio future; across processes
and hosts, the first takes a lock in Redis (``SET NX PX``, renewed while it computes) and the
others wait for its "done" event (pub/sub, with polling as a fallback), then read the stored
answer. If the computation fails, the waiters get its error, which is not stored. A waiter
gives up after ``wait`` seconds and computes the answer itself.

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
import enum
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from yichui.state.connection import REDIS_ERRORS
from yichui.state.response_store import ResponseStore

log = logging.getLogger("yichui.cache")
T = TypeVar("T")

_FAULTS: tuple[type[Exception], ...] = (TimeoutError, OSError, *REDIS_ERRORS)
"""What a Redis call of the cache may fail with; each one counts as a fault."""


class CacheStatus(enum.StrEnum):
    """What happened to a request, sent back as ``x-yichui-cache``."""

    HIT = "hit"
    MISS = "miss"
    COALESCED = "coalesced"
    BYPASS = "bypass"


class CoalescedError(Exception):
    """The computation this request waited for failed; ``error`` is what it failed with."""

    def __init__(self, error: Mapping[str, Any] | None) -> None:
        super().__init__(str((error or {}).get("message", "the computation failed")))
        self.error = dict(error or {})


class Breaker:
    """Consecutive-failure circuit breaker (closed -> open -> half-open probe -> closed)."""

    def __init__(self, *, threshold: int = 3, cooldown: float = 5.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        """Whether to try Redis now (one probe at a time once the cooldown is over)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def release(self) -> None:
        """A probe that ended neither way (cancelled): let the next request probe."""
        self._probing = False

    def success(self) -> None:
        self.failures, self.opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold:
            if self.opened_at is None:
                log.warning("response cache: Redis failing, bypassing it for %.0fs", self.cooldown)
            self.opened_at = time.monotonic()


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
    ) -> None:
        self.store = store
        self.near_ttl = near_ttl
        self.near_bytes = near_bytes
        self._near: OrderedDict[str, tuple[float, float, str, bytes]] = OrderedDict()
        """key -> (expires, monotonic; created, wall clock; model; body), oldest first."""
        self._near_size = 0
        self.ttl_for = ttl_for
        self.jitter = jitter
        self.timeout = timeout
        self.lease_ms = int(lease * 1000)
        self.wait = wait
        self.breaker = breaker or Breaker()
        self.counts: Counter[str] = Counter()
        self._unflushed: Counter[str] = Counter()
        self._local: dict[str, asyncio.Future[bytes]] = {}
        self._remote: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.store is not None:
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

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n
        self._unflushed[name] += n

    # -- guarded Redis calls --------------------------------------------------------------------
    async def _call(self, op: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run a Redis op within the timeout -> (ok, result); faults feed the breaker."""
        if self.store is None or not self.breaker.allow():
            return False, None
        try:
            async with asyncio.timeout(self.timeout):  # no extra task, unlike wait_for
                result = await op()
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except _FAULTS as exc:
            self.count("faults")
            self.breaker.failure()
            log.debug("response cache fault: %r", exc)
            return False, None
        self.breaker.success()
        return True, result

    async def clear(self, model: str | None = None) -> int:
        """Delete the stored entries (of one model) everywhere -> entries deleted in Redis."""
        self.near_drop(model=model, everything=True)
        return await self.store.clear(model) if self.store is not None else 0

    # -- near cache -----------------------------------------------------------------------------
    def near_get(self, key: str, max_age: float | None) -> bytes | None:
        entry = self._near.get(key)
        if entry is None:
            return None
        expires, created, _model, body = entry
        if expires < time.monotonic() or (max_age is not None and time.time() - created > max_age):
            self.near_drop(key)
            return None
        self._near.move_to_end(key)
        return body

    def near_put(self, key: str, model: str, body: bytes, created: float, ttl: float) -> None:
        if self.near_ttl <= 0 or len(body) > self.near_bytes // 8:
            return
        self.near_drop(key)
        self._near[key] = (time.monotonic() + min(self.near_ttl, ttl), created, model, body)
        self._near_size += len(body)
        while self._near_size > self.near_bytes and self._near:
            _, (_, _, _, old) = self._near.popitem(last=False)
            self._near_size -= len(old)

    def near_drop(
        self, key: str | None = None, *, model: str | None = None, everything: bool = False
    ) -> None:
        """Forget one key, one model's entries, or (``everything``) all of them."""
        if key is not None:
            entry = self._near.pop(key, None)
            if entry is not None:
                self._near_size -= len(entry[3])
            return
        if everything and model is None:
            self._near.clear()
            self._near_size = 0
            return
        for k in [k for k, e in self._near.items() if e[2] == model]:
            self.near_drop(k)

    def ttl(self, model: str) -> int:
        base = self.ttl_for(model)
        return max(1, round(base * (1.0 + random.uniform(-self.jitter, self.jitter))))

    def session(
        self,
        model: str,
        key: str,
        *,
        refresh: bool = False,
        store: bool = True,
        max_age: float | None = None,
    ) -> CacheSession:
        """A request's way through the cache (see the module docstring)."""
        return CacheSession(self, model, key, refresh=refresh, store=store, max_age=max_age)

    # -- waiting on other processes ------------------------------------------------------------
    async def _listen(self) -> None:
        assert self.store is not None
        delay = 0.5
        while True:
            try:
                async for event in self.store.events():
                    delay = 0.5
                    if "clear" in event:
                        self.near_drop(model=event["clear"] or None, everything=True)
                        continue
                    self.near_drop(str(event.get("key")))
                    for fut in self._remote.pop(str(event.get("key")), []):
                        if not fut.done():
                            fut.set_result(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: waiters fall back to polling meanwhile
                log.debug("response cache listener: %r", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _flush_stats(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._flush_once()

    async def _flush_once(self) -> None:
        if not self._unflushed or self.store is None:
            return
        counts, self._unflushed = self._unflushed, Counter()
        store = self.store
        # a flush that timed out may still have been applied: never add the counts twice
        await self._call(lambda: store.add_stats(counts))


class CacheSession:
    """One request through the cache: ``body`` is set on entry for a hit or a coalesced
    answer; otherwise the caller computes and calls :meth:`commit` (or raises)."""

    def __init__(
        self,
        cache: ResponseCache,
        model: str,
        key: str,
        *,
        refresh: bool,
        store: bool,
        max_age: float | None = None,
    ) -> None:
        self.cache = cache
        self.max_age = max_age
        self.model = model
        self.key = key
        self.refresh = refresh
        self.store_allowed = store
        self.body: bytes | None = None
        """The response body (JSON bytes) of a hit or a coalesced answer."""
        self.status = CacheStatus.MISS
        self._token: str | None = None
        self._future: asyncio.Future[bytes] | None = None
        self._renewal: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CacheSession:
        c = self.cache
        local = c._local.get(self.key)
        if local is not None and not self.refresh:
            try:
                self.body = await asyncio.shield(local)
            except CoalescedError as exc:
                if not exc.error.get("retry"):
                    raise  # the leader's error is ours too
                self.body = None  # its client went away mid-answer: compute it ourselves
            if self.body is not None:
                self.status = CacheStatus.COALESCED
                c.count("coalesced")
                return self
        if not self.refresh:
            near = c.near_get(self.key, self.max_age)
            if near is not None:
                self.body, self.status = near, CacheStatus.HIT
                c.count("hit")
                c.count("near_hits")
                return self
        # lead this process's identical requests from here on
        self._future = asyncio.get_running_loop().create_future()
        c._local[self.key] = self._future
        store = c.store
        if store is None or c.breaker.state == "open":
            self._bypass()
            return self
        await self._acquire(store)
        return self

    async def _acquire(self, store: ResponseStore) -> None:
        c = self.cache
        deadline = time.monotonic() + c.wait
        waited = False
        while True:
            if not self.refresh:
                ok, entry = await c._call(lambda: store.get(self.model, self.key))
                if not ok:
                    self._bypass()
                    return
                too_old = (
                    entry is not None
                    and self.max_age is not None
                    and time.time() - float(entry[0].get("created", 0)) > self.max_age
                )
                if too_old:
                    self.refresh = True  # recompute, then store the fresh answer
                elif entry is not None:
                    status = CacheStatus.COALESCED if waited else CacheStatus.HIT
                    created = float(entry[0].get("created", time.time()))
                    c.near_put(self.key, self.model, entry[1], created, c.near_ttl)
                    self._resolve(entry[1], status)
                    return
            ok, token = await c._call(lambda: store.lock(self.model, self.key, c.lease_ms))
            if not ok:
                self._bypass()
                return
            if token is not None:
                self._token = token
                self._renewal = asyncio.create_task(self._renew(store, token))
                c.count("miss")
                return
            # another process computes it: wait for its event, polling as a fallback
            event = await self._wait_remote(store, min(deadline, time.monotonic() + c.wait))
            if event is None:
                if time.monotonic() >= deadline:
                    self._bypass("coalesce_timeouts")
                    return
                continue  # its lock lapsed (leader died): try again, maybe as the leader
            if not event.get("ok") and (event.get("error") or {}).get("retry"):
                continue  # its client went away mid-answer: try again, maybe as the leader
            if not event.get("ok"):
                c.count("coalesced_errors")
                error = CoalescedError(event.get("error"))
                self._settle_error(error)
                raise error
            self.refresh = False  # the answer we waited for is the fresh one
            waited = True

    async def _wait_remote(self, store: ResponseStore, until: float) -> dict[str, Any] | None:
        """The leader's event -> ``{"ok": …}``; None when its lock vanished without one."""
        c = self.cache
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        c._remote.setdefault(self.key, []).append(fut)
        try:
            while time.monotonic() < until:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), 0.25)
                except TimeoutError:
                    pass
                ok, entry = await c._call(lambda: store.get(self.model, self.key))
                if ok and entry is not None:
                    return {"ok": True}
                ok, held = await c._call(lambda: store.locked(self.model, self.key))
                if ok and not held:
                    return None
            return None
        finally:
            waiters = c._remote.get(self.key, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                c._remote.pop(self.key, None)

    async def _renew(self, store: ResponseStore, token: str) -> None:
        c = self.cache
        while True:
            await asyncio.sleep(c.lease_ms / 3000)
            await c._call(lambda: store.renew(self.model, self.key, token, c.lease_ms))

    def _bypass(self, counter: str = "bypass") -> None:
        self.status = CacheStatus.BYPASS
        self.cache.count(counter)

    def _resolve(self, body: bytes, status: CacheStatus) -> None:
        self.body = body
        self.status = status
        self.cache.count(status.value)
        self._settle(body)

    def _settle(self, body: bytes) -> None:
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(body)
        self._drop_local()

    def _settle_error(self, exc: BaseException) -> None:
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
        self._drop_local()

    def _drop_local(self) -> None:
        if self.cache._local.get(self.key) is self._future:
            del self.cache._local[self.key]

    async def commit(self, body: bytes, *, cacheable: bool = True) -> None:
        """The answer we computed: store it (when allowed) and hand it to the waiters."""
        c = self.cache
        if self._renewal is not None:
            self._renewal.cancel()
        store = c.store
        if store is not None and self._token is not None:
            if self.store_allowed and cacheable:
                meta = {"v": 2, "created": time.time()}
                ttl = c.ttl(self.model)
                ok, _ = await c._call(
                    lambda: store.put(self.model, self.key, meta, body, ttl, self._token)
                )
                if ok:
                    c.count("stored")
                    c.near_put(self.key, self.model, body, float(meta["created"]), ttl)
            elif self._token is not None:
                token = self._token
                await c._call(
                    # waiters elsewhere compute it themselves: there is nothing to read
                    lambda: store.fail(
                        self.model, self.key, token, {"message": "not stored", "retry": True}
                    )
                )
        self._token = None
        self._settle(body)

    async def fail(self, error: Mapping[str, Any]) -> None:
        """The computation failed with ``error`` (an OpenAI error body and its status)."""
        c = self.cache
        if self._renewal is not None:
            self._renewal.cancel()
        c.count("errors")
        store, token = c.store, self._token
        if store is not None and token is not None:
            await c._call(lambda: store.fail(self.model, self.key, token, error))
        self._token = None
        self._settle_error(CoalescedError(error))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._future is not None and not self._future.done():
            # left without commit or fail: an error, or an interrupted stream
            error: dict[str, Any] = {
                "message": "the request computing this answer was interrupted",
                "status": 503,
                "retry": True,
            }
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                error = {"message": f"{type(exc).__name__}: {exc}", "status": 500}
            await asyncio.shield(self.fail(error))
