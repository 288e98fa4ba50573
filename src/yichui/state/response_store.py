"""The response cache's Redis side (asyncio): entries, coalescing locks, events, counters.

Only :mod:`yichui.inference.cache` uses this; it adds the timeouts and the circuit breaker that
keep a slow or dead Redis from ever failing a request.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import unquote

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from yichui.state import cluster
from yichui.state.codec import dumps, loads
from yichui.state.connection import AsyncRedis
from yichui.state.events import subscribe
from yichui.state.keys import Keys

# The live stream of an answer (fan-out) belongs to whoever holds the lock: its first entry
# is ``s`` = the lock's token, and only that token appends to it or ends it.
_OURS = """
local function ours(stream, token)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  return first ~= nil and first[2][1] == 's' and first[2][2] == token
end
"""
# KEYS[1] entry, KEYS[2] lock, KEYS[3] live; ARGV[1] value, [2] ttl s, [3] token, [4] channel,
# [5] event, [6] end entry, [7] linger ms
# Store the answer, release our lock, end our live stream and tell the waiters, in one step.
_STORE = (
    _OURS
    + """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if ours(KEYS[3], ARGV[3]) then
  redis.call('XADD', KEYS[3], '*', 'e', ARGV[6])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
)
# KEYS[1] lock, KEYS[2] live; ARGV[1] token, [2] channel, [3] event, [4] end entry, [5] linger
# ms: the computation ended without storing (failed, interrupted, or not to be stored)
_FAIL = (
    _OURS
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ours(KEYS[2], ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
)
# KEYS[1] lock, KEYS[2] live; ARGV[1] token, [2] lease ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], 2 * ARGV[2])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lock, KEYS[2] entry, KEYS[3] live, KEYS[4] readers; ARGV[1] token, [2] lease ms,
# [3] '1': not if the answer is stored, [4] '1': live
# Take the lock unless the answer was stored meanwhile (2), and open a fresh live stream if
# asked (an older one, and its readers, are dropped).
_LOCK = """
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('XADD', KEYS[3], '*', 's', ARGV[1])
  redis.call('PEXPIRE', KEYS[3], 2 * ARGV[2])
end
return 1
"""
# KEYS[1] live; ARGV[1] token, [2] index of the first piece, [3] pieces (JSON), [4] lease ms
_APPEND = (
    _OURS
    + """
if not ours(KEYS[1], ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'n', ARGV[2], 'c', ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * ARGV[4])
return 1
"""
)

ANSWERED = ""
"""What :meth:`ResponseStore.lock` returns when the answer was stored before it could lock."""

LIVE_LINGER_MS = 30_000
"""How long a live stream stays readable after its end entry."""

LiveEntry = tuple[bytes, dict[bytes, bytes]]
"""One entry of a live stream: its id and fields."""


class ResponseStore:
    """An entry is a JSON line of metadata (``{"v": 2, "created": <s>}``), a newline, and the
    response body exactly as it is sent: a hit goes out without being parsed or re-encoded."""

    def __init__(self, client: AsyncRedis, keys: Keys) -> None:
        self.client: Any = client  # redis-py's async stubs are too loose to help here
        self.keys = keys
        self._store = client.register_script(_STORE)
        self._fail = client.register_script(_FAIL)
        self._renew = client.register_script(_RENEW)
        self._lock = client.register_script(_LOCK)
        self._append = client.register_script(_APPEND)

    async def warm(self, timeout: float) -> None:
        """Learn a cluster's slots now (nothing for one server): a cluster client does it on
        its first command, which the cache's short timeout would cut off (a bypass)."""
        if isinstance(self.client, AsyncRedisCluster):
            await cluster.warm(self.client, timeout)

    async def get(self, model: str, digest: str) -> tuple[dict[str, Any], bytes] | None:
        """-> (metadata, body bytes), or None on a miss (or an entry of another layout)."""
        raw = await self.client.get(self.keys.response(model, digest))
        if raw is None:
            return None
        head, sep, body = bytes(raw).partition(b"\n")
        meta = loads(head) if sep else None
        if not isinstance(meta, dict) or meta.get("v") != 2:
            return None  # an older layout: recomputed and overwritten
        return meta, body

    async def lock(
        self,
        model: str,
        digest: str,
        lease_ms: int,
        token: str | None = None,
        *,
        live: bool = False,
        unless_stored: bool = False,
    ) -> str | None:
        """Become the one computing this answer -> our token (``token``, or a new one), or None
        if someone else is; with ``unless_stored``, :data:`ANSWERED` if it is stored already
        (it was computed since we looked). A caller that may be interrupted passes its token,
        so that it can still release a lock whose reply it never read. ``live``: the answer is
        streamed, and its pieces will be appended to a fresh live stream (:meth:`append`) that
        requests elsewhere read as they come (:meth:`read_live`)."""
        token = token or secrets.token_hex(12)
        keys = [self.keys.response_lock(model, digest), self.keys.response(model, digest)]
        keys += [self.keys.response_live(model, digest), self.keys.response_readers(model, digest)]
        flags = ["1" if unless_stored else "0", "1" if live else "0"]
        got = int(await self._lock(keys=keys, args=[token, lease_ms, *flags]))
        return token if got == 1 else ANSWERED if got == 2 else None

    async def renew(self, model: str, digest: str, token: str, lease_ms: int) -> bool:
        keys = [self.keys.response_lock(model, digest), self.keys.response_live(model, digest)]
        return bool(await self._renew(keys=keys, args=[token, lease_ms]))

    async def locked(self, model: str, digest: str) -> bool:
        return bool(await self.client.exists(self.keys.response_lock(model, digest)))

    # -- live streams (fan-out) -----------------------------------------------------------------
    async def append(
        self, model: str, digest: str, token: str, first: int, pieces: bytes, lease_ms: int
    ) -> bool:
        """Append pieces ``first``… (a JSON list) to our live stream -> False if it is not ours
        any more (our lock lapsed and someone else computes the answer now)."""
        key = self.keys.response_live(model, digest)
        return bool(await self._append(keys=[key], args=[token, first, pieces, lease_ms]))

    async def read_live(
        self, model: str, digest: str, after: bytes, block_ms: int | None = None
    ) -> list[LiveEntry]:
        """The live stream's entries after id ``after`` (``b"0"``: all), waiting up to
        ``block_ms`` for one; [] if there are none (or no stream)."""
        key = self.keys.response_live(model, digest)
        resp = await self.client.xread({key: after}, count=1000, block=block_ms)
        return [(bytes(i), f) for _, rows in resp or () for i, f in rows]

    async def add_reader(self, model: str, digest: str, token: str, until: float) -> None:
        """A request elsewhere reads the live answer until epoch ``until`` (refreshed)."""
        key = self.keys.response_readers(model, digest)
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(key, {token: until})
        pipe.expire(key, 3600)
        await pipe.execute()

    async def drop_reader(self, model: str, digest: str, token: str) -> None:
        await self.client.zrem(self.keys.response_readers(model, digest), token)

    async def readers(self, model: str, digest: str, now: float) -> int:
        """How many requests elsewhere read the live answer (registrations fresh at ``now``)."""
        key = self.keys.response_readers(model, digest)
        return int(await self.client.zcount(key, now, "+inf"))

    async def put(
        self,
        model: str,
        digest: str,
        meta: Mapping[str, Any],
        body: bytes,
        ttl: int,
        token: str | None,
    ) -> None:
        """Store, release our lock (if we hold it) and publish ``ok`` to the waiters."""
        event = dumps({"key": digest, "ok": True}).decode()
        value = dumps(dict(meta)) + b"\n" + body
        keys = [self.keys.response(model, digest), self.keys.response_lock(model, digest)]
        keys.append(self.keys.response_live(model, digest))
        end = dumps({"ok": True, "stored": True})
        await self._store(
            keys=keys,
            args=[value, ttl, token or "", self.keys.response_events(), event, end, LIVE_LINGER_MS],
        )

    async def fail(
        self,
        model: str,
        digest: str,
        token: str,
        error: Mapping[str, Any] | None,
        *,
        end: Mapping[str, Any] | None = None,
    ) -> None:
        """Release our lock and tell the waiters the computation failed (with its error); our
        live stream ends with ``end`` (default: that error)."""
        event = dumps({"key": digest, "ok": False, "error": error}).decode()
        last = dumps(end if end is not None else {"ok": False, "error": error})
        keys = [self.keys.response_lock(model, digest), self.keys.response_live(model, digest)]
        await self._fail(
            keys=keys, args=[token, self.keys.response_events(), event, last, LIVE_LINGER_MS]
        )

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """Events of finished computations, from one subscription (ends on a Redis error)."""
        return subscribe(self.client, self.keys.response_events())

    async def add_stats(self, counts: Mapping[str, int]) -> None:
        if counts:
            pipe = self.client.pipeline(transaction=False)
            for name, n in counts.items():
                pipe.hincrby(self.keys.response_stats(), name, n)
            await pipe.execute()

    async def stats(self, tenant: str | None = None) -> dict[str, int]:
        """The fleet's counters; with ``tenant``, that tenant's answers by cache status
        (``hit``, ``miss``, ``coalesced``, ``bypass``) instead."""
        raw = await self.client.hgetall(self.keys.response_stats())
        if tenant is None:
            return {k.decode(): int(v) for k, v in raw.items() if b":" not in k}
        prefix = f"tenant:{tenant}:".encode()
        return {k[len(prefix) :].decode(): int(v) for k, v in raw.items() if k.startswith(prefix)}

    async def by_model(self, *, batch: int = 500, cap: int = 100_000) -> list[dict[str, Any]]:
        """Entries and bytes by model, from a SCAN of at most ``cap`` keys (never KEYS)."""
        sizes: dict[str, list[int]] = {}
        prefix = len(self.keys.response("", "x").split("response:", 1)[0] + "response:")
        chunk: list[bytes] = []

        async def measure() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key in chunk:
                pipe.strlen(key)
            for key, n in zip(chunk, await pipe.execute(), strict=True):
                model = unquote(key.decode()[prefix:].rsplit(":{", 1)[0])
                row = sizes.setdefault(model, [0, 0])
                row[0] += 1
                row[1] += int(n)
            chunk.clear()

        seen = 0
        async for key in self.client.scan_iter(match=self.keys.response_pattern(), count=batch):
            chunk.append(key)
            seen += 1
            if len(chunk) >= batch:
                await measure()
            if seen >= cap:
                break
        if chunk:
            await measure()
        return [{"model": m, "entries": e, "bytes": b} for m, (e, b) in sorted(sizes.items())]

    async def clear(self, model: str | None = None, *, batch: int = 500) -> int:
        """Delete every entry (of one model) with SCAN, never KEYS -> entries deleted."""
        deleted = 0
        chunk: list[bytes] = []
        async for key in self.client.scan_iter(match=self.keys.response_pattern(model), count=1000):
            chunk.append(key)
            if len(chunk) >= batch:
                deleted += await self._delete(chunk)
                chunk = []
        if chunk:
            deleted += await self._delete(chunk)
        # every server drops what it keeps in memory for these entries
        event = dumps({"clear": model or ""}).decode()
        await self.client.publish(self.keys.response_events(), event)
        return deleted

    async def _delete(self, keys: list[bytes]) -> int:
        # one key per command: entries live in different cluster slots. execute_command, not
        # pipe.unlink: redis-py's asyncio cluster pipeline makes unlink a coroutine that queues
        # nothing (clear deleted 0 entries on a cluster)
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("UNLINK", key)
        return sum(int(n) for n in await pipe.execute())

    async def count(self, model: str | None = None) -> int:
        n = 0
        async for _ in self.client.scan_iter(match=self.keys.response_pattern(model), count=1000):
            n += 1
        return n
