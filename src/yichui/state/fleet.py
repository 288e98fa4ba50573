"""The fleet: which ``yichui serve`` processes are up and what each has loaded.

Every API process writes one field of the ``servers`` hash (:meth:`Keys.servers`) every
``server_heartbeat`` seconds: its id -> a JSON record stamped with the Redis clock (``TIME``),
so hosts whose clocks disagree still agree on how old a record is::

    await beat(async_client, keys, "gpu-3:4242:8000", {"id": ..., "models": [...]})
    ServerStore(client, keys).listing(stale_after=3 * settings.server_heartbeat)

A hash field has no TTL of its own (not before Redis 7.4), so the readers prune: a record older
than ``stale_after`` is left out of a listing and deleted, but only if it is still the record
that was read (a server that beat again meanwhile keeps its entry). A server that exits cleanly
deletes its own field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from yichui.state.codec import dumps, loads
from yichui.state.connection import AsyncRedis, SyncRedis, state_errors
from yichui.state.keys import Keys

STALE_BEATS = 3
"""A server whose last heartbeat is older than this many ``server_heartbeat`` is gone: readers
pass ``stale_after=STALE_BEATS * settings.server_heartbeat``."""

# HDEL each field only while it still holds the value the reader judged stale.
_PRUNE = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


def _seconds(t: tuple[Any, Any] | list[Any]) -> float:
    seconds, micros = t
    return int(seconds) + int(micros) / 1e6


class ServerStore:
    """The readers' side of the fleet (``yichui ps``, ``GET /api/servers``)."""

    def __init__(self, client: SyncRedis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._prune = client.register_script(_PRUNE)

    def now(self) -> float:
        """The Redis clock, in seconds (heartbeats are stamped with it)."""
        return _seconds(self.client.time())

    @state_errors
    def listing(self, stale_after: float) -> list[dict[str, Any]]:
        """Every live server's record, sorted by id; records older than ``stale_after``
        seconds (a process that died without saying so) are dropped from the hash.

        Each record as its server wrote it (``id``, ``host``, ``pid``, ``url``, ``version``,
        ``started``, ``heartbeat``, ``requests``, ``budget``, ``used``, ``models``), plus
        ``age``: seconds since its heartbeat. Each model's ``idle_seconds`` is brought up to
        now (a model in use stays at 0)."""
        key = self.keys.servers()
        raw: Mapping[Any, Any] = self.client.hgetall(key)
        if not raw:
            return []
        now = self.now()
        out: list[dict[str, Any]] = []
        stale: list[Any] = []
        for field, value in raw.items():
            try:
                record = loads(value)
                age = now - float(record["heartbeat"])
            except (ValueError, TypeError, KeyError):
                stale += [field, value]  # not a record of ours: nobody will ever renew it
                continue
            if age > stale_after:
                stale += [field, value]
                continue
            age = max(0.0, age)
            record["age"] = round(age, 3)
            for model in record.get("models") or []:
                if not model.get("in_use"):
                    model["idle_seconds"] = round(float(model.get("idle_seconds", 0)) + age, 3)
            out.append(record)
        if stale:
            self._prune(keys=[key], args=stale)
        return sorted(out, key=lambda r: str(r.get("id", "")))

    @state_errors
    def remove(self, server_id: str) -> None:
        """Forget a server at once (it is shutting down)."""
        self.client.hdel(self.keys.servers(), server_id)


async def beat(
    client: AsyncRedis,
    keys: Keys,
    server_id: str,
    record: Mapping[str, Any],
    *,
    uptime: float = 0.0,
) -> float:
    """Write ``record`` as ``server_id``'s entry, stamped ``heartbeat`` with the Redis clock;
    -> that time. ``started`` (``uptime`` seconds ago) and each model's ``last_used``
    (``idle_seconds`` ago) are put on that clock too, so the records of different hosts
    compare. Redis errors are raised (the caller decides: the heartbeat loop logs them)."""
    now = _seconds(await client.time())
    models = [
        {**m, "last_used": round(now - float(m.get("idle_seconds", 0)), 3)}
        for m in record.get("models") or []
    ]
    started = round(now - uptime, 3)
    value = dumps({**record, "heartbeat": now, "started": started, "models": models})
    await client.hset(keys.servers(), server_id, value)
    return now


async def forget(client: AsyncRedis, keys: Keys, server_id: str) -> None:
    """Delete ``server_id``'s entry (a clean shutdown); Redis errors are raised."""
    await client.hdel(keys.servers(), server_id)
