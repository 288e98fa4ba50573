"""Storage of the model status cache and the model index in Redis.

``model_status:{<name>}`` holds one model's status as JSON with a jittered TTL, written with
``SET … EX`` (value and expiry in one atomic command). ``model_index`` is a hash of every model
found in the models root (name -> its listing row: the status less volatile fields such as
the check time); ``model_listing`` is that hash as one sorted
JSON array, rebuilt by the same Lua script that changes the hash, so a listing is one GET and one
JSON parse. The listing exists only once a full walk built the index. Events go to the
``model_events`` channel. All Redis errors surface as :class:`~yichui.errors.StateError` so
callers can fall back to the disk.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from yichui.metrics import Metrics
from yichui.state.codec import dumps, jittered, loads
from yichui.state.connection import SyncRedis, state_errors
from yichui.state.keys import Keys

# KEYS[1] lock, KEYS[2] status; ARGV[1] token, ARGV[2] status JSON, ARGV[3] TTL seconds.
# The status of a pulled model is published by the lock holder only, together with the release.
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('DEL', KEYS[1])
return 1
"""


# Rebuild the listing blob from the index hash, sorted by lower-cased name.
_REBUILD = """
local function rebuild(index, listing)
  local flat = redis.call('HGETALL', index)
  local rows = {}
  for i = 1, #flat, 2 do rows[#rows + 1] = {string.lower(flat[i]), flat[i], flat[i + 1]} end
  table.sort(rows, function(a, b)
    if a[1] == b[1] then return a[2] < b[2] end
    return a[1] < b[1]
  end)
  local values = {}
  for i, row in ipairs(rows) do values[i] = row[3] end
  redis.call('SET', listing, '[' .. table.concat(values, ',') .. ']')
end
"""
# KEYS[1] index, KEYS[2] listing; ARGV[1] name, ARGV[2] status JSON ('' removes the name).
_INDEX_SET = (
    _REBUILD
    + """
local changed = 0
if ARGV[2] == '' then
  changed = redis.call('HDEL', KEYS[1], ARGV[1])
elseif redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  changed = 1
end
if changed == 1 and redis.call('EXISTS', KEYS[2]) == 1 then rebuild(KEYS[1], KEYS[2]) end
return changed
"""
)
# KEYS[1] index, KEYS[2] listing; ARGV: name, JSON, name, JSON, … (the whole root, from a walk)
_INDEX_REPLACE = (
    _REBUILD
    + """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
rebuild(KEYS[1], KEYS[2])
return #ARGV / 2
"""
)


class ModelStatusStore:
    """Read and write model statuses; the registry above speaks to this, never to Redis."""

    def __init__(
        self,
        client: SyncRedis,
        keys: Keys,
        *,
        ttl: int,
        missing_ttl: int,
        jitter: float,
        listing_fields: Sequence[str] | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics or Metrics()
        self.keys = keys
        self.ttl = ttl
        self.missing_ttl = missing_ttl
        self.jitter = jitter
        self.rng = rng or random.Random()
        self._commit = client.register_script(_COMMIT)
        self._index_set = client.register_script(_INDEX_SET)
        self._index_replace = client.register_script(_INDEX_REPLACE)
        self._index_keys = [keys.model_index(), keys.model_listing()]
        self.listing_fields = tuple(listing_fields) if listing_fields else None
        """Fields of a status kept in the listing (all when None): fewer fields, faster lists,
        and volatile ones (check times) left out so an unchanged model never rebuilds it."""

    def _row(self, status: Mapping[str, Any]) -> bytes:
        if self.listing_fields is None:
            return dumps(status)
        return dumps({k: status.get(k) for k in self.listing_fields})

    def _ttl_for(self, status: Mapping[str, Any]) -> int:
        base = self.ttl if status.get("exists") else self.missing_ttl
        return jittered(base, self.jitter, self.rng)

    @state_errors
    def get(self, name: str) -> dict[str, Any] | None:
        """The cached status (one round trip), or None on a miss."""
        raw = self.client.get(self.keys.model_status(name))
        self.metrics.model_status_lookups.labels("miss" if raw is None else "hit").inc()
        return None if raw is None else dict(loads(raw))

    @state_errors
    def put(self, name: str, status: Mapping[str, Any]) -> None:
        """Cache a status and keep the index in step (two round trips; writes are rare).

        Scripts run outside pipelines: Redis Cluster clients refuse them inside one."""
        self.client.set(self.keys.model_status(name), dumps(status), ex=self._ttl_for(status))
        self._update_index(name, status)

    @state_errors
    def commit(self, name: str, token: str, status: Mapping[str, Any]) -> bool:
        """Publish a status and release ``model_lock`` atomically, if ``token`` still holds it."""
        keys = [self.keys.model_lock(name), self.keys.model_status(name)]
        ok = bool(self._commit(keys=keys, args=[token, dumps(status), self._ttl_for(status)]))
        if ok:
            self._update_index(name, status)
        return ok

    def _update_index(self, name: str, status: Mapping[str, Any]) -> None:
        value = self._row(status) if status.get("exists") else b""
        self._index_set(keys=self._index_keys, args=[name, value])

    @state_errors
    def replace_all(self, statuses: Iterable[Mapping[str, Any]]) -> int:
        """Rebuild every entry, the index and the listing from a full walk, pipelined."""
        found = {str(s["name"]): s for s in statuses}
        stale = set(_decode_all(self.client.hkeys(self.keys.model_index()))) - found.keys()
        pipe = self.client.pipeline(transaction=False)
        for name, status in found.items():
            pipe.set(self.keys.model_status(name), dumps(status), ex=self._ttl_for(status))
        for name in stale:
            pipe.delete(self.keys.model_status(name))
        pipe.execute()
        args = [part for name, status in found.items() for part in (name, self._row(status))]
        self._index_replace(keys=self._index_keys, args=args)
        return len(found)

    @state_errors
    def listing(self) -> list[dict[str, Any]] | None:
        """Every indexed model's listing row, sorted by name (one GET); None if never built."""
        raw = self.client.get(self.keys.model_listing())
        if raw is None:
            return None
        rows: list[dict[str, Any]] = loads(raw)
        return rows

    @state_errors
    def publish(self, event: str, name: str, **fields: Any) -> None:
        payload = {"event": event, "name": name, "at": time.time(), **fields}
        self.client.publish(self.keys.model_events(), dumps(payload))


def _decode_all(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]
