"""The response cache's Redis side (asyncio): entries, coalescing locks, events, counters.

Only :mod:`yichui.inference.cache` uses this; it adds the timeouts and the circuit breaker that
keep a slow or dead Redis from ever failing a request.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import unquote

from yichui.state.codec import dumps, loads
from yichui.state.connection import AsyncRedis
from yichui.state.events import subscribe
from yichui.state.keys import Keys

# KEYS[1] entry, KEYS[2] lock; ARGV[1] value, [2] ttl s, [3] token, [4] channel, [5] event
# Store the answer, release our lock and tell the waiters, in one step.
_STORE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
# KEYS[1] lock; ARGV[1] token, [2] channel, [3] event: the computation failed (nothing stored)
_FAIL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
# KEYS[1] lock; ARGV[1] token, [2] lease ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class ResponseStore:
    """An entry is a JSON line of metadata (``{"v": 2, "created": <s>}``), a newline, and the
    response body exactly as it is sent: a hit goes out without being parsed or re-encoded."""

    def __init__(self, client: AsyncRedis, keys: Keys) -> None:
        self.client: Any = client  # redis-py's async stubs are too loose to help here
        self.keys = keys
        self._store = client.register_script(_STORE)
        self._fail = client.register_script(_FAIL)
        self._renew = client.register_script(_RENEW)

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
        self, model: str, digest: str, lease_ms: int, token: str | None = None
    ) -> str | None:
        """Become the one computing this answer -> our token (``token``, or a new one), or None
        if someone else is. A caller that may be interrupted passes its token, so that it can
        still release a lock whose reply it never read."""
        token = token or secrets.token_hex(12)
        ok = await self.client.set(
            self.keys.response_lock(model, digest), token, nx=True, px=lease_ms
        )
        return token if ok else None

    async def renew(self, model: str, digest: str, token: str, lease_ms: int) -> bool:
        key = self.keys.response_lock(model, digest)
        return bool(await self._renew(keys=[key], args=[token, lease_ms]))

    async def locked(self, model: str, digest: str) -> bool:
        return bool(await self.client.exists(self.keys.response_lock(model, digest)))

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
        await self._store(
            keys=[self.keys.response(model, digest), self.keys.response_lock(model, digest)],
            args=[value, ttl, token or "", self.keys.response_events(), event],
        )

    async def fail(
        self, model: str, digest: str, token: str, error: Mapping[str, Any] | None
    ) -> None:
        """Release our lock and tell the waiters the computation failed (with its error)."""
        event = dumps({"key": digest, "ok": False, "error": error}).decode()
        await self._fail(
            keys=[self.keys.response_lock(model, digest)],
            args=[token, self.keys.response_events(), event],
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
        # one key per command: entries live in different cluster slots
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.unlink(key)
        return sum(int(n) for n in await pipe.execute())

    async def count(self, model: str | None = None) -> int:
        n = 0
        async for _ in self.client.scan_iter(match=self.keys.response_pattern(model), count=1000):
            n += 1
        return n
