"""Evaluation reports in Redis: ``eval_result:<key>`` holds one report as JSON (``SET … EX``).

The key is a digest of everything that decides the result (model fingerprint, dataset hash,
parameters), so a report never goes stale: a changed model or dataset has another key. Redis
errors surface as :class:`~yichui.errors.StateError`; the caller falls back to the report file.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from yichui.state.codec import dumps, jittered, loads
from yichui.state.connection import SyncRedis, state_errors
from yichui.state.keys import Keys


class EvalResultStore:
    def __init__(self, client: SyncRedis, keys: Keys, *, ttl: int, jitter: float) -> None:
        self.client = client
        self.keys = keys
        self.ttl = ttl
        self.jitter = jitter
        self.rng = random.Random()

    @state_errors
    def get(self, key: str) -> dict[str, Any] | None:
        raw = self.client.get(self.keys.eval_result(key))
        if raw is None:
            return None
        value = loads(raw)
        return value if isinstance(value, dict) else None

    @state_errors
    def put(self, key: str, report: Mapping[str, Any]) -> None:
        ttl = jittered(self.ttl, self.jitter, self.rng)
        self.client.set(self.keys.eval_result(key), dumps(dict(report)), ex=ttl)
