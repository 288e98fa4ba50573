"""Redis ``INFO`` figures, for the metrics (and ``yichui redis``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from redis.cluster import RedisCluster

from yichui.state.connection import RedisTarget, SyncRedis

_MAX = frozenset({"mem_fragmentation_ratio"})
"""Fields that are a ratio per node: a cluster reports the worst node's, not a sum."""


def info_figures(client: SyncRedis, target: RedisTarget, fields: Iterable[str]) -> dict[str, float]:
    """``fields`` of ``INFO`` as numbers (those Redis has). For a Cluster, summed over its
    primaries (memory, clients, ops/s, keys evicted), the ratios the largest of theirs."""
    wanted = tuple(fields)
    if target.kind == "cluster":
        raw: Any = client.info(target_nodes=RedisCluster.PRIMARIES)
        nodes: list[Mapping[str, Any]] = list(raw.values()) if _per_node(raw) else [raw]
    else:
        nodes = [client.info()]
    # an errorstat_<CODE> field is a dict ({"count": N}); absent until the first such error
    nodes = [{k: (v.get("count", 0) if isinstance(v, dict) else v) for k, v in n.items()}
             for n in nodes]  # fmt: skip
    out: dict[str, float] = {}
    for name in wanted:
        values = [float(n[name]) for n in nodes if _number(n.get(name))]
        if values:
            out[name] = max(values) if name in _MAX else sum(values)
    return out


def _per_node(raw: Any) -> bool:
    return isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values()) and bool(raw)


def _number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
