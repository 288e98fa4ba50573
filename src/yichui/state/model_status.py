"""Storage of the model status cache and the model index in Redis.

``model_status:{<name>}`` holds one model's status as JSON with a jittered TTL, written with
``SET … EX`` (value and expiry in one atomic command). ``model_index`` is a hash of every model
found in the models root (name -> the same JSON), which answers listings without touching the
disk; ``model_index_meta`` says when it was last rebuilt. Events go to the ``model_events``
channel. All Redis errors surface as :class:`~yichui.errors.StateError` so callers can fall back
to the disk.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

import redis

from yichui.errors import StateError
from yichui.state.codec import dumps, jittered, loads
from yichui.state.connection import SyncRedis
from yichui.state.keys import Keys

P = ParamSpec("P")
T = TypeVar("T")

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


def _state_errors(fn: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StateError(f"Redis error: {first}") from exc

    return wrapper


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
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.ttl = ttl
        self.missing_ttl = missing_ttl
        self.jitter = jitter
        self.rng = rng or random.Random()
        self._commit = client.register_script(_COMMIT)

    def _ttl_for(self, status: Mapping[str, Any]) -> int:
        base = self.ttl if status.get("exists") else self.missing_ttl
        return jittered(base, self.jitter, self.rng)

    @_state_errors
    def get(self, name: str) -> dict[str, Any] | None:
        """The cached status (one round trip), or None on a miss."""
        raw = self.client.get(self.keys.model_status(name))
        return None if raw is None else dict(loads(raw))

    @_state_errors
    def put(self, name: str, status: Mapping[str, Any]) -> None:
        """Cache a status and keep the index in step (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.model_status(name), dumps(status), ex=self._ttl_for(status))
        self._index_ops(pipe, name, status)
        pipe.execute()

    @_state_errors
    def commit(self, name: str, token: str, status: Mapping[str, Any]) -> bool:
        """Publish a status and release ``model_lock`` atomically, if ``token`` still holds it."""
        keys = [self.keys.model_lock(name), self.keys.model_status(name)]
        ok = bool(self._commit(keys=keys, args=[token, dumps(status), self._ttl_for(status)]))
        if ok:
            pipe = self.client.pipeline(transaction=False)
            self._index_ops(pipe, name, status)
            pipe.execute()
        return ok

    def _index_ops(self, pipe: Any, name: str, status: Mapping[str, Any]) -> None:
        if status.get("exists"):
            pipe.hset(self.keys.model_index(), name, dumps(status))
        else:
            pipe.hdel(self.keys.model_index(), name)

    @_state_errors
    def replace_all(self, statuses: Iterable[Mapping[str, Any]], root: str) -> int:
        """Rebuild every entry and the index from a full scan, pipelined."""
        index = self.keys.model_index()
        found = {str(s["name"]): s for s in statuses}
        stale = set(_decode_all(self.client.hkeys(index))) - found.keys()
        pipe = self.client.pipeline(transaction=False)
        for name, status in found.items():
            raw = dumps(status)
            pipe.set(self.keys.model_status(name), raw, ex=self._ttl_for(status))
            pipe.hset(index, name, raw)
        for name in stale:
            pipe.hdel(index, name)
            pipe.delete(self.keys.model_status(name))
        pipe.set(self.keys.model_index_meta(), dumps({"built_at": time.time(), "root": root}))
        pipe.execute()
        return len(found)

    @_state_errors
    def index(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
        """Every indexed status and the index's meta (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.model_index())
        pipe.get(self.keys.model_index_meta())
        entries, meta = pipe.execute()
        parsed = {
            (k.decode() if isinstance(k, bytes) else k): dict(loads(v)) for k, v in entries.items()
        }
        return parsed, (None if meta is None else dict(loads(meta)))

    @_state_errors
    def publish(self, event: str, name: str, **fields: Any) -> None:
        payload = {"event": event, "name": name, "at": time.time(), **fields}
        self.client.publish(self.keys.model_events(), dumps(payload))

    @_state_errors
    def ttl_of(self, name: str) -> int:
        """Seconds left on a cached entry (-2 when absent): for status output and tests."""
        return int(self.client.ttl(self.keys.model_status(name)))


def _decode_all(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]
