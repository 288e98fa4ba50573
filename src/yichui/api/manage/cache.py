"""``/api/cache``: the response cache's figures, and clearing it (admins)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from yichui.access import Principal
from yichui.api.auth import AdminDep, PrincipalDep
from yichui.api.deps import services_of
from yichui.api.manage.common import audit, runtime_of
from yichui.errors import RedisUnavailableError
from yichui.runtime.serving import ServingServices

router = APIRouter(tags=["cache"])

_LOOKUPS = ("hit", "miss", "coalesced", "bypass")
_TIMEOUT = 5.0


async def cache_stats(
    services: ServingServices, principal: Principal, *, by_model: bool = True
) -> dict[str, Any]:
    """The fleet's counters (a user: its own tenant's answers), the hit rate, entries and
    memory (by model for admins). ``reachable`` is false when the cache's Redis is not."""
    store = services.cache.store
    out: dict[str, Any] = {
        "reachable": False,
        "tenant": None if principal.admin else principal.tenant,
    }
    if store is None:
        return out
    try:
        async with asyncio.timeout(_TIMEOUT):
            counters = await store.stats(None if principal.admin else principal.tenant)
            rows = await store.by_model() if by_model and principal.admin else None
            entries = sum(r["entries"] for r in rows) if rows is not None else await store.count()
            info: Any = await store.client.info("memory")
    except Exception as exc:  # the cache's Redis down or slow: say so, answer the rest
        out["error"] = str(exc) or type(exc).__name__
        return out
    lookups = sum(counters.get(k, 0) for k in _LOOKUPS)
    served = counters.get("hit", 0) + counters.get("coalesced", 0)
    out.update(
        reachable=True,
        counters=counters,
        **{k: counters.get(k, 0) for k in (*_LOOKUPS, "stored", "faults", "errors")},
        hit_rate=round(served / lookups, 4) if lookups else None,
        entries=entries,
        memory=info.get("used_memory") if isinstance(info, dict) else None,
        by_model=rows,
        breaker=services.cache.breaker.state,
    )
    return out


@router.get("/cache/stats")
async def stats(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Hits, misses, coalesced, bypassed and faults (a user key: its own tenant's), the hit
    rate, entries, memory, and entries and bytes by model (admins)."""
    return await cache_stats(services_of(request), principal)


class Clear(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=512, description="Only this model's.")


@router.post("/cache/clear")
async def clear(body: Clear, request: Request, principal: AdminDep) -> dict[str, Any]:
    """Delete cached answers (all, or one model's) on every server (admins)."""
    services = services_of(request)
    store = services.cache.store
    if store is None:
        raise RedisUnavailableError("cache", "no cache store")
    removed = await store.clear(body.model)
    await asyncio.to_thread(
        audit,
        runtime_of(request),
        principal,
        "cache.clear",
        body.model or "*",
        f"{removed} removed",
    )
    return {"removed": removed, "model": body.model}
