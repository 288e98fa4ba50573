"""One computation's way through the response cache (:class:`CacheSession`, made by
:meth:`ResponseCache.session <yichui.inference.cache.ResponseCache.session>`): the hit, the lock
that coalesces concurrent misses across processes, waiting for another process's answer or
reading its live stream, and storing (or failing) the answer. See :mod:`yichui.inference.cache`
for the whole."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, TypeVar

from yichui.errors import CoalescedError, describe_error
from yichui.inference.breaker import Breaker
from yichui.inference.near import NearCache
from yichui.metrics import OTHER, CacheEvent, CacheResult
from yichui.state.codec import dumps, loads
from yichui.state.response_store import ANSWERED, LiveEntry, ResponseStore

T = TypeVar("T")


class SessionCache(Protocol):
    """What a session needs of its cache: a :class:`~yichui.inference.cache.ResponseCache`
    (which makes the sessions; this module cannot import it back)."""

    store: ResponseStore | None
    breaker: Breaker
    near: NearCache
    near_ttl: float
    lease_ms: int
    timeout: float
    wait: float
    max_entry_bytes: int
    waiters: dict[str, list[asyncio.Future[dict[str, Any]]]]
    """Key -> futures of the sessions waiting for another process's answer to it."""

    def count(self, name: CacheResult | CacheEvent, endpoint: str, model: str) -> None: ...
    def ttl(self, model: str) -> int: ...
    async def lookup(
        self, model: str, key: str, max_age: float | None = None, endpoint: str = OTHER
    ) -> tuple[bytes | None, bool]: ...
    async def guarded(
        self,
        op: Callable[[], Awaitable[T]],
        endpoint: str = OTHER,
        model: str = OTHER,
        *,
        timeout: float | None = None,
    ) -> tuple[bool, T | None]: ...


class CacheStatus(enum.StrEnum):
    """What happened to a request, sent back as ``x-yichui-cache``."""

    HIT = "hit"
    MISS = "miss"
    COALESCED = "coalesced"
    BYPASS = "bypass"


INTERRUPTED: dict[str, Any] = {
    "message": "the request computing this answer was interrupted",
    "status": 503,
    "retry": True,
}
"""What waiters elsewhere are told when a computation stopped without an answer or an error:
``retry`` makes them compute it themselves."""

LIVE_LOST: dict[str, Any] = {
    "message": "the stream this answer was read from broke off (its computation was "
    "interrupted, or Redis failed): ask again",
    "status": 503,
    "lost": True,
}
"""What a live reader is told when the stream it reads ends without its end entry or lost
pieces (an interrupted computation, a failing Redis, a stream evicted from a cache instance
under memory pressure); ``lost`` tells it from the computation's own error."""


def stream_lost(exc: CoalescedError) -> bool:
    """Whether ``exc`` says the live stream broke off, not that the computation failed."""
    return bool(exc.error.get("lost"))


READER_TTL = 10.0
"""Seconds a live reader's registration lasts; it is refreshed every third of that."""


class CacheSession:
    """``body`` is set on entry for a hit or an answer another process computed; otherwise
    the caller computes and calls :meth:`commit` (or raises, or calls :meth:`fail`)."""

    def __init__(
        self,
        cache: SessionCache,
        model: str,
        key: str,
        *,
        refresh: bool,
        store: bool,
        max_age: float | None = None,
        looked_up: bool = False,
        reachable: bool = True,
        endpoint: str = OTHER,
        live: bool = False,
    ) -> None:
        self.cache = cache
        self.live_wanted = live
        self.endpoint = endpoint
        self.model = model
        self.key = key
        self.refresh = refresh
        self.store_allowed = store
        self.max_age = max_age
        self.looked_up = looked_up
        self.reachable = reachable
        self.body: bytes | None = None
        """The response body (JSON bytes) of a hit or a coalesced answer."""
        self.status = CacheStatus.MISS
        self._token: str | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._settled = False
        self.live: AsyncGenerator[dict[str, Any], None] | None = None
        """Set on entry when another process computes this answer and streams it: its pieces
        as they come (JSON objects of the caller's making, see :meth:`publish`), from the
        first; :attr:`body` is the stored answer once they ended (None if it was not stored).
        Ends with :class:`CoalescedError` if the computation failed or the stream broke."""
        self._pending: list[Any] = []
        """Pieces published but not yet appended to the live stream."""
        self._sent = 0
        """Pieces appended to the live stream so far."""
        self._publishing = False
        self._broken = False
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CacheSession:
        try:
            await self._enter()
        except BaseException:
            await asyncio.shield(self._release(INTERRUPTED))
            raise
        return self

    async def _enter(self) -> None:
        c = self.cache
        if not (self.refresh or self.looked_up):
            body, self.reachable = await c.lookup(self.model, self.key, self.max_age, self.endpoint)
            if body is not None:
                self._resolve(body, CacheStatus.HIT, count=False)  # lookup() counted it
                return
            self.looked_up = True
        store = c.store
        if store is None or not self.reachable or c.breaker.state == "open":
            self._bypass()
            return
        await self._acquire(store)

    async def _acquire(self, store: ResponseStore) -> None:
        c = self.cache
        deadline = time.monotonic() + c.wait
        waited = False
        skip_read = self.looked_up or self.refresh
        # a fresh answer stored since we looked is read, not computed again (not for a
        # refresh, nor when an entry may be too old for us)
        unless_stored = not self.refresh and self.max_age is None
        while True:
            if not skip_read:
                ok, entry = await c.guarded(lambda: store.get(self.model, self.key), *self._labels)
                if not ok:
                    self._bypass()
                    return
                too_old = (
                    entry is not None
                    and self.max_age is not None
                    and time.time() - float(entry[0].get("created", 0)) > self.max_age
                )
                if entry is not None and not too_old:
                    created = float(entry[0].get("created", time.time()))
                    c.near.put(self.key, self.model, entry[1], created, c.near_ttl)
                    self._resolve(entry[1], CacheStatus.COALESCED if waited else CacheStatus.HIT)
                    return
            skip_read = False
            # the token is ours before the call: if we are interrupted while Redis takes the
            # lock, the cleanup can still release it (instead of leaving it for its lease)
            token = self._token = secrets.token_hex(12)
            lock = functools.partial(
                store.lock,
                self.model,
                self.key,
                c.lease_ms,
                token,
                live=self.live_wanted,
                unless_stored=unless_stored,
            )
            taking = asyncio.ensure_future(c.guarded(lock, *self._labels))
            try:
                ok, got = await asyncio.shield(taking)
            except asyncio.CancelledError:
                # let the call land (within the cache timeout) before the cleanup releases
                # the lock: a release that overtook it would leave the lock for its lease
                await asyncio.wait([taking])
                raise
            if not ok or not got:
                self._token = None
            if not ok:
                self._bypass()
                return
            if got == ANSWERED:  # computed meanwhile: read it (once: it may be unreadable)
                unless_stored, waited = False, True
                continue
            if got is not None:
                self._renewal = asyncio.create_task(self._renew(store, token))
                self._publishing = self.live_wanted
                c.count("miss", *self._labels)
                return
            if self.live_wanted:  # is it streamed there? then read it live from the start
                ok, entries = await c.guarded(
                    lambda: store.read_live(self.model, self.key, b"0"), *self._labels
                )
                if not ok:  # a slow read: look again rather than wait for the whole answer
                    continue  # (a Redis that keeps failing fails the lookup: uncached)
                if entries:
                    me = secrets.token_hex(8)  # registered at once: the leader sees us
                    until = time.time() + READER_TTL
                    await c.guarded(
                        functools.partial(store.add_reader, self.model, self.key, me, until),
                        *self._labels,
                    )
                    head = await self._live_head(store, entries)
                    if head is None:
                        await c.guarded(
                            functools.partial(store.drop_reader, self.model, self.key, me),
                            *self._labels,
                        )
                        continue  # interrupted before its first piece: try again
                    self.status = CacheStatus.COALESCED
                    self.live = self._read_live(store, me, head)
                    c.count("coalesced", *self._labels)
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
                c.count("coalesced_errors", *self._labels)
                self._settled = True
                raise CoalescedError(event.get("error"))
            waited = True  # the answer we waited for is the fresh one

    async def _wait_remote(self, store: ResponseStore, until: float) -> dict[str, Any] | None:
        """The leader's event -> ``{"ok": …}``; None when its lock vanished without one."""
        c = self.cache
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        c.waiters.setdefault(self.key, []).append(fut)
        try:
            while time.monotonic() < until:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), 0.25)
                except TimeoutError:
                    pass
                ok, entry = await c.guarded(lambda: store.get(self.model, self.key), *self._labels)
                if ok and entry is not None:
                    return {"ok": True}
                ok, held = await c.guarded(
                    lambda: store.locked(self.model, self.key), *self._labels
                )
                if ok and not held:
                    return None
            return None
        finally:
            waiters = c.waiters.get(self.key, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                c.waiters.pop(self.key, None)

    async def _live_head(
        self, store: ResponseStore, entries: list[LiveEntry]
    ) -> list[LiveEntry] | None:
        """Read the live stream up to its first piece (or its end) -> the entries so far, or
        None when it ended before any piece without an answer worth waiting for (interrupted,
        or broken off): the caller then tries again, as the one computing it perhaps."""
        seen = 0
        while True:
            for _, fields in entries[seen:]:
                if b"c" in fields:
                    return entries
                if b"e" in fields:
                    end = loads(fields[b"e"])
                    retry = not end.get("ok") and (end.get("error") or {}).get("retry")
                    return None if retry else entries
            seen = len(entries)
            try:
                entries = entries + await self._next_live(store, entries[-1][0])
            except CoalescedError:
                return None

    async def _next_live(self, store: ResponseStore, last: bytes) -> list[LiveEntry]:
        """The live stream's next entries after ``last`` (waiting for them; [] after a second
        without any while its computation is still on). :class:`CoalescedError`
        (:data:`LIVE_LOST`) if Redis fails or the computation is gone without an end."""
        c = self.cache
        ok, got = await c.guarded(
            functools.partial(store.read_live, self.model, self.key, last, 1000),
            *self._labels,
            timeout=1.0 + 4 * c.timeout,
        )
        if not ok:
            raise CoalescedError(LIVE_LOST)
        if got:
            return got
        ok, held = await c.guarded(lambda: store.locked(self.model, self.key), *self._labels)
        if ok and not held:  # gone: did it end just now?
            ok, got = await c.guarded(
                functools.partial(store.read_live, self.model, self.key, last), *self._labels
            )
            if not got:
                raise CoalescedError(LIVE_LOST)
        return got or []

    async def _read_live(
        self, store: ResponseStore, me: str, head: list[LiveEntry]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The pieces of the live stream, from the first, each once and in order (``me``: this
        reader's registration; ``head``: the entries read already)."""
        c = self.cache
        refresher = asyncio.create_task(self._reading(store, me))
        expected, owner = 0, None
        entries = head
        try:
            while True:
                for _, fields in entries:
                    if b"s" in fields:
                        if owner is not None and fields[b"s"] != owner:
                            raise CoalescedError(LIVE_LOST)  # replaced by a new computation
                        owner = fields[b"s"]
                    elif b"c" in fields:
                        first = int(fields[b"n"])
                        if first > expected:
                            raise CoalescedError(LIVE_LOST)  # pieces missing
                        pieces = loads(fields[b"c"])
                        for piece in pieces[expected - first :]:
                            expected += 1
                            yield piece
                    elif b"e" in fields:
                        await self._ended(store, loads(fields[b"e"]))
                        return
                last = entries[-1][0] if entries else b"0"
                entries = await self._next_live(store, last)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await asyncio.shield(
                c.guarded(lambda: store.drop_reader(self.model, self.key, me), *self._labels)
            )

    async def _ended(self, store: ResponseStore, end: dict[str, Any]) -> None:
        c = self.cache
        self._settled = True
        if not end.get("ok"):
            c.count("coalesced_errors", *self._labels)
            raise CoalescedError(end.get("error") or LIVE_LOST)
        if end.get("stored"):
            ok, entry = await c.guarded(lambda: store.get(self.model, self.key), *self._labels)
            if ok and entry is not None:
                created = float(entry[0].get("created", time.time()))
                c.near.put(self.key, self.model, entry[1], created, c.near_ttl)
                self.body = entry[1]

    async def _reading(self, store: ResponseStore, me: str) -> None:
        """Keep this reader registered, so the computation goes on even without its client."""
        c = self.cache
        while True:
            await asyncio.sleep(READER_TTL / 3)
            until = time.time() + READER_TTL
            await c.guarded(
                functools.partial(store.add_reader, self.model, self.key, me, until),
                *self._labels,
            )

    async def remote_readers(self) -> int:
        """How many requests in other processes read this computation's live stream."""
        store = self.cache.store
        if store is None or not self._publishing:
            return 0
        now = time.time()
        ok, n = await self.cache.guarded(
            lambda: store.readers(self.model, self.key, now), *self._labels
        )
        return int(n or 0) if ok else 0

    @property
    def publishing(self) -> bool:
        """Whether we compute this answer and stream it to a live stream others may read."""
        return self._publishing

    def publish(self, piece: Any) -> None:
        """A piece of the answer we compute and stream (any JSON value): appended to the live
        stream in the background (pieces that come together, in one entry), if we opened one."""
        if not self._publishing:
            return
        self._pending.append(piece)
        if self._writer is None:
            self._wake = asyncio.Event()
            self._writer = asyncio.create_task(self._write(), name=f"live-{self.key[:12]}")
        assert self._wake is not None
        self._wake.set()

    async def _write(self) -> None:
        c, store, wake = self.cache, self.cache.store, self._wake
        assert store is not None and wake is not None
        failures = 0
        while True:
            await wake.wait()
            wake.clear()
            while self._pending and self._publishing:
                batch, token = list(self._pending), self._token
                if token is None:
                    return
                ok, ours = await c.guarded(
                    functools.partial(
                        store.append,
                        self.model,
                        self.key,
                        token,
                        self._sent,
                        dumps(batch),
                        c.lease_ms,
                    ),
                    *self._labels,
                )
                if not ok:  # appended or not, we do not know: resent (readers skip repeats)
                    failures += 1
                    if failures >= 5:
                        self._broken, self._publishing = True, False
                        return
                    await asyncio.sleep(0.01 * failures)
                    continue
                failures = 0
                if not ours:  # our lock lapsed, someone else computes it: nobody reads ours
                    self._publishing = False
                    return
                del self._pending[: len(batch)]
                self._sent += len(batch)

    async def _flush(self) -> None:
        """Let the live stream take every piece published (bounded by a second)."""
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while self._pending and self._publishing and not writer.done():
                    await asyncio.sleep(0.001)
        if self._pending:
            self._broken = True
        self._publishing = False
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        self._writer = None

    async def _renew(self, store: ResponseStore, token: str) -> None:
        c = self.cache
        while True:
            await asyncio.sleep(c.lease_ms / 3000)
            await c.guarded(
                lambda: store.renew(self.model, self.key, token, c.lease_ms), *self._labels
            )

    @property
    def _labels(self) -> tuple[str, str]:
        return self.endpoint, self.model

    def _bypass(self, counter: CacheResult | CacheEvent = "bypass") -> None:
        self.status = CacheStatus.BYPASS
        self.cache.count(counter, *self._labels)

    def _resolve(self, body: bytes, status: CacheStatus, *, count: bool = True) -> None:
        self.body = body
        self.status = status
        self._settled = True
        if count:
            self.cache.count(status.value, *self._labels)

    def _stop_renewal(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None

    async def commit(self, body: bytes, *, cacheable: bool = True) -> None:
        """The answer we computed: store it (when allowed) and wake the waiters elsewhere."""
        c = self.cache
        await self._flush()
        self._stop_renewal()
        store, token = c.store, self._token
        if self.store_allowed and cacheable and len(body) > c.max_entry_bytes:
            cacheable = False  # served, not stored: waiters elsewhere compute it themselves
            c.count("too_large", *self._labels)
        if store is not None and token is not None:
            if self._broken:  # its live readers did not get every piece: they must know
                message = {"message": "not stored", "retry": True}
                await c.guarded(
                    lambda: store.fail(
                        self.model, self.key, token, message, end={"ok": False, "error": LIVE_LOST}
                    ),
                    *self._labels,
                )
                if self.store_allowed and cacheable:
                    meta = {"v": 2, "created": time.time()}
                    ttl = c.ttl(self.model)
                    ok, _ = await c.guarded(
                        lambda: store.put(self.model, self.key, meta, body, ttl, None),
                        *self._labels,
                    )
            elif self.store_allowed and cacheable:
                meta = {"v": 2, "created": time.time()}
                ttl = c.ttl(self.model)
                ok, _ = await c.guarded(
                    lambda: store.put(self.model, self.key, meta, body, ttl, token), *self._labels
                )
                if ok:
                    c.count("stored", *self._labels)
                    c.near.put(self.key, self.model, body, float(meta["created"]), ttl)
            else:  # waiters elsewhere compute it themselves: there is nothing to read
                message = {"message": "not stored", "retry": True}
                end = {"ok": True, "stored": False}  # but live readers got all of it
                await c.guarded(
                    lambda: store.fail(self.model, self.key, token, message, end=end),
                    *self._labels,
                )
        self._token = None
        self._settled = True

    async def fail(self, error: Mapping[str, Any]) -> None:
        """The computation failed with ``error`` (see :func:`yichui.errors.describe_error`)."""
        self.cache.count("errors", *self._labels)
        await self._release(error)

    async def _release(self, error: Mapping[str, Any]) -> None:
        """Let the lock go and tell the waiters elsewhere (once)."""
        await self._flush()
        self._stop_renewal()
        store, token = self.cache.store, self._token
        self._token = None
        self._settled = True
        if store is not None and token is not None:
            await self.cache.guarded(
                lambda: store.fail(self.model, self.key, token, error), *self._labels
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._settled:
            return
        if exc is None or isinstance(exc, asyncio.CancelledError):
            # left without an answer or an error: an interrupted computation
            with contextlib.suppress(Exception):
                await asyncio.shield(self._release(INTERRUPTED))
            return
        self.cache.count("errors", *self._labels)
        await asyncio.shield(self._release(describe_error(exc)))
