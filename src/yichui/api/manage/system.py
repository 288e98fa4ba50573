"""``/api/overview``, ``/api/redis``, ``/api/workers``, ``/api/servers``, ``/api/keys``,
``/api/audit``: the deployment as a whole."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from yichui.api.auth import AdminDep, PrincipalDep
from yichui.api.deps import services_of
from yichui.api.manage.cache import cache_stats
from yichui.api.manage.common import Limit, audit, runtime_of
from yichui.config import TENANT_PATTERN
from yichui.errors import StateError

router = APIRouter(tags=["system"])


@router.get("/redis")
def redis_health(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """The state Redis: reachable or not, and its main ``INFO`` figures (used memory, peak,
    maxmemory and its policy, ops/s, clients)."""
    return services_of(request).probe.health()


@router.get("/workers")
def workers(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Every worker with a heartbeat in Redis, and whether it is alive."""
    return {"data": runtime_of(request).tasks.workers()}


def _servers(request: Request) -> list[dict[str, Any]]:
    rt = runtime_of(request)
    rows: list[dict[str, Any]] = rt.fleet.listing(stale_after=3 * rt.settings.server_heartbeat)
    return rows


@router.get("/servers")
def servers(request: Request, principal: AdminDep) -> dict[str, Any]:
    """Every live ``yichui serve`` process and the models it has loaded (``yichui ps``)."""
    return {"data": _servers(request)}


@router.get("/overview")
async def overview(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """What the dashboard's first page shows, in one call: Redis health, cache figures, task
    counts and running tasks, workers, servers (admins)."""
    rt = runtime_of(request)
    services = services_of(request)
    tenant = None if principal.admin else principal.tenant

    def tasks() -> dict[str, Any]:
        try:
            running = rt.tasks.listing(["running"], limit=20, tenant=tenant)
            counts = rt.tasks.counts() if principal.admin else None
            if counts is None:
                mine = rt.tasks.listing(None, limit=500, tenant=tenant)
                counts = {}
                for t in mine:
                    counts[t["state"]] = counts.get(t["state"], 0) + 1
            workers = rt.tasks.workers()
            fleet = _servers(request) if principal.admin else []
            return {"counts": counts, "running": running, "workers": workers, "servers": fleet}
        except StateError as exc:
            return {"counts": {}, "running": [], "workers": [], "servers": [], "error": str(exc)}

    health, found, cache = await asyncio.gather(
        asyncio.to_thread(services.probe.health),
        asyncio.to_thread(tasks),
        cache_stats(services, principal, by_model=False),
    )
    return {
        "redis": health,
        "cache": cache,
        "tasks": {"counts": found["counts"], "running": found["running"]},
        "workers": found["workers"],
        "servers": found["servers"],
        "principal": principal.to_dict(),
    }


# -- keys -----------------------------------------------------------------------------------------


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=f"^{TENANT_PATTERN}$")
    role: Literal["user", "admin"] = "user"
    name: str | None = Field(default=None, max_length=64)


@router.get("/keys")
def list_keys(request: Request, principal: AdminDep) -> dict[str, Any]:
    """Every API key in Redis (never a secret or a digest)."""
    rows = runtime_of(request).key_store.listing()
    return {"data": [{k: v for k, v in r.items() if k != "digest_prefix"} for r in rows]}


@router.post("/keys", status_code=201)
def create_key(body: NewKey, request: Request, principal: AdminDep) -> dict[str, Any]:
    """A new key: the answer holds it once; only its digest is stored."""
    rt = runtime_of(request)
    secret, record = rt.key_store.create(body.tenant, body.role, name=body.name)
    audit(rt, principal, "keys.create", str(record["id"]), f"{body.role} of {body.tenant}")
    return {"key": secret, "record": record}


@router.delete("/keys/{ref}")
def revoke_key(ref: str, request: Request, principal: AdminDep) -> dict[str, Any]:
    """Revoke a key (by id or name): refused by every API process within a second."""
    rt = runtime_of(request)
    record = rt.key_store.revoke(ref)
    audit(rt, principal, "keys.revoke", str(record["id"]), str(record.get("name") or ""))
    return {"revoked": record}


# -- audit ----------------------------------------------------------------------------------------


@router.get("/audit")
def audit_log(
    request: Request,
    principal: AdminDep,
    limit: Limit = 50,
    before: Annotated[str | None, Query(pattern=r"^\d+-\d+$")] = None,
) -> dict[str, Any]:
    """Admin actions, newest first; page on with ``before`` = the last entry's id."""
    rows = runtime_of(request).audit.entries(limit=limit, before=before)
    return {"data": rows, "next": rows[-1]["id"] if len(rows) == limit else None}
