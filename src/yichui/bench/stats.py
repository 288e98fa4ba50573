"""The figures of one arm, and the checks against the load test's targets."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from yichui.bench.client import Outcome


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``samples``, nearest rank (0.0 for none)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _dist(samples: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "mean_ms": round(sum(ms) / len(ms), 2) if ms else 0.0,
        "p50_ms": round(percentile(ms, 0.5), 2),
        "p95_ms": round(percentile(ms, 0.95), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
    }


def arm_figures(
    outcomes: Sequence[Outcome], *, upstream_calls: int, duration: float
) -> dict[str, Any]:
    """Latency and TTFT (from the scheduled time), throughput, cache headers, upstream calls,
    errors and time-outs of one arm."""
    n = len(outcomes)
    ok = [o for o in outcomes if not o.error]
    streams = [o for o in outcomes if o.stream]
    seen = Counter(o.cache or "none" for o in ok)
    hits = [o.latency for o in ok if o.cache == "hit"]
    end = max((o.done for o in outcomes), default=duration)
    errors = Counter(o.error for o in outcomes if o.error)
    return {
        "requests": n,
        "ok": len(ok),
        "errors": sum(errors.values()),
        "timeouts": errors.get("timeout", 0),
        "error_kinds": dict(errors),
        "latency": _dist([o.latency for o in outcomes]),
        "ttft": _dist([o.ttft for o in outcomes]),
        "ttft_streams": _dist([o.ttft for o in streams]),
        "throughput_per_s": round(len(ok) / max(end, duration, 1e-9), 2),
        "offered_per_s": round(n / duration, 2) if duration else 0.0,
        "cache": dict(seen),
        "hit_rate": round(seen.get("hit", 0) / n, 4) if n else 0.0,
        "coalesced_share": round(seen.get("coalesced", 0) / n, 4) if n else 0.0,
        "upstream_calls": upstream_calls,
        "no_upstream_share": round(max(0.0, 1 - upstream_calls / n), 4) if n else 0.0,
        "hits": len(hits),
        "hits_p99_ms": round(percentile(hits, 0.99) * 1000, 2) if hits else None,
    }


def over_time(outcomes: Sequence[Outcome], *, bucket: float = 1.0) -> list[dict[str, float]]:
    """Per ``bucket`` seconds of scheduled time: requests, mean and p95 latency, hit share,
    and answers completed in that second (throughput)."""
    if not outcomes:
        return []
    last = max(max(o.at for o in outcomes), max(o.done for o in outcomes))
    slots = int(last // bucket) + 1
    by_at: list[list[Outcome]] = [[] for _ in range(slots)]
    completed = [0] * slots
    for o in outcomes:
        by_at[int(o.at // bucket)].append(o)
        if not o.error:
            completed[min(slots - 1, int(o.done // bucket))] += 1
    rows = []
    for i, group in enumerate(by_at):
        lat = [o.latency for o in group]
        rows.append(
            {
                "t": i * bucket,
                "requests": len(group),
                "mean_ms": sum(lat) / len(lat) * 1000 if lat else math.nan,
                "p95_ms": percentile(lat, 0.95) * 1000 if lat else math.nan,
                "hit_share": sum(o.cache in ("hit", "coalesced") for o in group) / len(group)
                if group
                else math.nan,
                "throughput": completed[i] / bucket,
            }
        )
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def checks(
    on: dict[str, Any],
    off: dict[str, Any],
    *,
    ideal: float,
    capacity_on: float | None,
    capacity_off: float | None,
) -> dict[str, bool]:
    """The targets, PASS (True) or FAIL; capacity only when both were searched."""
    out = {
        "share answered without an upstream call >= 97% of the ideal": on["no_upstream_share"]
        >= 0.97 * ideal,
        "mean latency >= 10x lower than uncached": on["latency"]["mean_ms"] * 10
        <= off["latency"]["mean_ms"],
        "zero errors": on["errors"] == 0 and off["errors"] == 0,
        "hits p99 < 10 ms": on["hits_p99_ms"] is not None and on["hits_p99_ms"] < 10.0,
    }
    if capacity_on is not None and capacity_off is not None and ideal < 1:
        out["capacity with cache >= 0.9/(1 - share) x uncached"] = (
            capacity_on >= 0.9 / (1 - ideal) * capacity_off
        )
    return out
