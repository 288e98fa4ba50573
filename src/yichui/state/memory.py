"""The state instance must never evict: queued and running tasks, model status, locks and keys
live there, and ``maxmemory-policy`` decides what Redis silently drops when memory runs out::

    check_no_eviction(client, target)    # RedisSetupError (exit code 2) on an evicting policy

Only ``noeviction`` is accepted. ``volatile-*`` is refused too: it evicts keys that carry a TTL,
and on the state instance those are the model and response locks (two pulls of one model
would then write one folder), dashboard sessions and finished tasks' records before
``task_ttl``. A policy that evicts is refused even while ``maxmemory`` is 0 (no limit): a later
``CONFIG SET maxmemory`` would start evicting without yichui knowing. The policy is read from
``INFO memory``, which a least-privilege ACL user may run (``CONFIG GET`` is an admin command).
The response cache's own instance (``cache_redis_url``) may evict: it is never checked.
"""

from __future__ import annotations

from typing import Any

from redis.cluster import RedisCluster

from yichui.errors import RedisSetupError
from yichui.state.connection import REDIS_ERRORS, RedisTarget, SyncRedis, connect_error

SAFE_POLICIES = frozenset({"noeviction"})
"""The ``maxmemory-policy`` values the state instance may have."""


def eviction_policies(client: SyncRedis, target: RedisTarget) -> set[str]:
    """Every ``maxmemory_policy`` the instance reports (each primary's, for a Cluster)."""
    if target.kind == "cluster":
        raw: Any = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
        nodes = list(raw.values()) if all(isinstance(v, dict) for v in raw.values()) else [raw]
    else:
        nodes = [client.info("memory")]
    return {str(n.get("maxmemory_policy", "unknown")) for n in nodes}


def check_no_eviction(client: SyncRedis, target: RedisTarget) -> None:
    """Refuse (:class:`RedisSetupError`) a state instance whose policy evicts keys."""
    try:
        policies = eviction_policies(client, target)
    except REDIS_ERRORS as exc:  # fail closed: NOPERM on INFO is a setup error, with the fix
        raise connect_error(target, exc) from exc
    bad = sorted(policies - SAFE_POLICIES)
    if bad:
        raise RedisSetupError(
            target.display,
            f"maxmemory-policy is {', '.join(bad)}: Redis may silently evict queued tasks, "
            "model status and locks",
            hint="set maxmemory-policy noeviction on the state instance (CONFIG SET or "
            "redis.conf); put an evicting response cache on its own cache_redis_url",
        )
