"""JSON encoding of values stored in Redis, and TTL jitter."""

from __future__ import annotations

import random
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Canonical compact JSON: sorted keys, so equal values give equal bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def loads(raw: bytes | str) -> Any:
    return orjson.loads(raw)


def jittered(ttl: float, fraction: float, rng: random.Random | None = None) -> int:
    """``ttl`` ± ``fraction`` (uniform), at least one second, so entries do not expire together."""
    r = (rng or random).uniform(-fraction, fraction)
    return max(1, round(ttl * (1.0 + r)))
