"""``/api/models``: list, inspect, pull (a ``download`` task; a name of ms-swift's catalog by
its id at the source), import, verify, remove and rescan the models of the deployment, through
the same services as ``yichui models``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from yichui.api.auth import AdminDep, PrincipalDep
from yichui.api.manage.common import Limit, Offset, audit, page, runtime_of
from yichui.errors import ModelNotFoundError, RequestError
from yichui.models.catalog import pull_target
from yichui.models.names import validate_name
from yichui.models.sources import ALIASES

router = APIRouter(tags=["models"])


@router.get("/models")
def list_models(
    request: Request,
    principal: PrincipalDep,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    source: Annotated[str | None, Query(max_length=64)] = None,
    q: Annotated[str | None, Query(max_length=256, description="Part of the name.")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Every model (from the index in Redis), by name; filters by kind, source, name part."""
    pattern = f"*{q}*" if q else None
    listing = runtime_of(request).registry.listing(kind=kind, source=source, pattern=pattern)
    out = page(listing.models, limit, offset)
    out["degraded"] = listing.degraded
    return out


@router.get("/sources")
def list_sources(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """The sources models are pulled from (``mirror`` when ``mirror_dir`` is set)."""
    rt = runtime_of(request)
    default = "mirror" if rt.settings.mirror_dir else "huggingface"
    return {
        "data": [
            {
                "name": n,
                "default": n == default,
                "configured": n != "mirror" or bool(rt.settings.mirror_dir),
            }
            for n in rt.sources.names()
        ],
        "aliases": dict(ALIASES),
    }


class Pull(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256, description="Name in the models root.")
    source: str | None = Field(default=None, max_length=64)
    repo: str | None = Field(default=None, max_length=256, description="Id at the source.")
    revision: str | None = Field(default=None, max_length=256)
    include: list[str] = Field(default_factory=list, max_length=100)
    exclude: list[str] = Field(default_factory=list, max_length=100)
    force: bool = False
    queue: str | None = None


@router.post("/models/pull", status_code=202)
def pull(body: Pull, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Queue a ``download`` task (progress in bytes) -> its status. Concurrent pulls of one
    model download it once."""
    rt = runtime_of(request)
    validate_name(body.name)
    if body.repo:
        validate_name(body.repo)
    if body.source is not None:
        name = ALIASES.get(body.source, body.source)
        if name not in rt.sources.names():
            raise RequestError(
                f"unknown source {body.source!r}: use one of {', '.join(rt.sources.names())}",
                param="source",
            )
    args = body.model_dump(exclude={"queue"})
    # a name of ms-swift's catalog: the source's id goes into the task (`/api/catalog`)
    target = pull_target(body.name, rt.sources.canonical(body.source), body.repo or None)
    if target.entry is not None:
        args.update(name=target.name, repo=target.repo)
    return rt.tasks.submit("download", args, queue=body.queue, tenant=principal.tenant)


class Import(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(max_length=4096, description="A .gguf file or a model folder on the server.")
    name: str = Field(max_length=256)
    replace: bool = False


@router.post("/models/import")
def import_model(body: Import, request: Request, principal: AdminDep) -> dict[str, Any]:
    """Import a GGUF file or model folder that is on the server (admins: it reads the
    server's disk) -> the model's status."""
    from yichui.models.importer import import_path

    rt = runtime_of(request)
    validate_name(body.name)
    if "\0" in body.path:
        raise RequestError("a path cannot hold a NUL character", param="path")
    path = Path(body.path)
    if not path.exists():
        raise RequestError(f"{body.path!r} does not exist on the server", status=404, param="path")
    result = import_path(rt.registry, path, body.name, replace=body.replace)
    audit(rt, principal, "models.import", body.name, body.path)
    return {"name": body.name, "action": result.action, "status": result.status.to_dict()}


@router.post("/models/rescan")
def rescan(request: Request, principal: AdminDep) -> dict[str, Any]:
    """Walk the models root and rebuild every cache entry and the index (admins)."""
    rt = runtime_of(request)
    listing = rt.registry.rescan()
    audit(rt, principal, "models.rescan", "*", f"{len(listing.models)} models")
    return {"data": listing.models, "total": len(listing.models), "degraded": listing.degraded}


@router.post("/models/{name:path}/verify")
def verify(name: str, request: Request, principal: AdminDep) -> dict[str, Any]:
    """Re-hash a model's files against its manifest (admins): ``ok`` false when damaged."""
    rt = runtime_of(request)
    report = rt.registry.verify(validate_name(name))
    audit(rt, principal, "models.verify", name, "ok" if report.ok else "damaged")
    return report.to_dict()


@router.delete("/models/{name:path}")
def remove(name: str, request: Request, principal: AdminDep) -> dict[str, Any]:
    """Delete a model's files and mark it missing (admins)."""
    rt = runtime_of(request)
    before = rt.registry.remove(validate_name(name))
    audit(rt, principal, "models.rm", name, f"{before.size} bytes")
    return {"removed": before.to_dict()}


@router.get("/models/{name:path}")
def status(
    name: str,
    request: Request,
    principal: PrincipalDep,
    refresh: bool = False,
) -> dict[str, Any]:
    """One model's status (from the cache in Redis; ``refresh`` rescans its folder)."""
    lookup = runtime_of(request).registry.status(validate_name(name), refresh=refresh)
    if not lookup.status.exists:
        raise ModelNotFoundError(name)
    return {**lookup.status.to_dict(), "cached": lookup.cached, "degraded": lookup.degraded}
