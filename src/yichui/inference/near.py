"""The near cache: response bodies a server served or stored lately, kept in its memory for a
few seconds so that a repeated hit does not even reach Redis::

    near = NearCache(ttl=10.0, max_bytes=64 * 1024**2)
    near.put(key, model, body, created=time.time(), ttl=3600)
    near.get(key, max_age=None)          # the body, or None (expired, dropped, too old)

Bounded by ``max_bytes`` (least recently used out first; one body may take an eighth of it at
most). The response cache drops entries the moment any server stores or clears them.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class NearCache:
    def __init__(self, *, ttl: float, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[float, float, str, bytes]] = OrderedDict()
        """key -> (expires, monotonic; created, wall clock; model; body), oldest first."""
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, max_age: float | None) -> bytes | None:
        """The body of ``key`` if held and, with ``max_age``, created at most that long ago."""
        held = self.entry(key, max_age)
        return None if held is None else held[1]

    def entry(self, key: str, max_age: float | None) -> tuple[str, bytes] | None:
        """(model, body) of ``key``, on the terms of :meth:`get`."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, created, model, body = entry
        if expires < time.monotonic() or (max_age is not None and time.time() - created > max_age):
            self.drop(key)
            return None
        self._entries.move_to_end(key)
        return model, body

    def put(self, key: str, model: str, body: bytes, created: float, ttl: float) -> None:
        """Hold ``body`` for ``min(self.ttl, ttl)`` seconds (``ttl``: the entry's in Redis)."""
        if self.ttl <= 0 or len(body) > self.max_bytes // 8:
            return
        self.drop(key)
        self._entries[key] = (time.monotonic() + min(self.ttl, ttl), created, model, body)
        self._size += len(body)
        while self._size > self.max_bytes and self._entries:
            _, (_, _, _, old) = self._entries.popitem(last=False)
            self._size -= len(old)

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._size -= len(entry[3])

    def drop_model(self, model: str | None) -> None:
        """Forget one model's entries, or (None) every entry."""
        if model is None:
            self._entries.clear()
            self._size = 0
            return
        for key in [k for k, e in self._entries.items() if e[2] == model]:
            self.drop(key)
