"""``/api/tasks``: list, inspect, submit, cancel and retry tasks; their logs as a page or as a
Server-Sent Events stream that resumes after ``Last-Event-ID`` without a gap or a repeat.

A user key sees and acts on its own tenant's tasks only (another tenant's task is a 404 to
it); admins see every task, and their cancels and retries of other tenants' tasks go to the
audit log."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from yichui.access import Principal
from yichui.api.auth import PrincipalDep
from yichui.api.deps import services_of
from yichui.api.manage.common import Limit, Offset, audit, owned_task, runtime_of
from yichui.errors import RequestError
from yichui.runtime import Runtime
from yichui.state.task_store import TERMINAL

router = APIRouter(tags=["tasks"])

_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
SSE_SEND_TIMEOUT = 30.0
"""Seconds one event may take to reach a client; a client that reads nothing is dropped."""


@router.get("/tasks")
def list_tasks(
    request: Request,
    principal: PrincipalDep,
    state: Annotated[list[str] | None, Query(max_length=6)] = None,
    type: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    """The newest tasks (in ``state``s, of one ``type``), newest first; a user key: its own."""
    rt = runtime_of(request)
    tenant = None if principal.admin else principal.tenant
    if type is None:
        rows = rt.tasks.listing(state, limit=limit + 1, offset=offset, tenant=tenant)
    else:  # a filter after the fact: read further to fill the page
        rows = [
            t
            for t in rt.tasks.listing(state, limit=(offset + limit) * 4 + 50, tenant=tenant)
            if t.get("type") == type
        ][offset : offset + limit + 1]
    return {
        "data": rows[:limit],
        "total": None,  # not counted: ``more`` says whether a next page exists
        "limit": limit,
        "offset": offset,
        "more": len(rows) > limit,
        "counts": rt.tasks.counts() if principal.admin else None,
    }


@router.get("/tasks/types")
def task_types(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Every task type this deployment runs, with the JSON schema of its arguments."""
    types = runtime_of(request).task_types
    return {
        "data": [
            {
                "name": name,
                "description": types.get(name).description,
                "schema": types.get(name).args.model_json_schema(),
            }
            for name in types.names()
        ]
    }


class Submit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    task_id: str | None = Field(default=None, max_length=128)
    queue: str | None = Field(default=None, max_length=64)
    max_attempts: int | None = Field(default=None, ge=1, le=100)


_OWN_TYPES = {"train": "train", "merge": "merge", "evaluate": "eval", "evalscope": "eval"}
"""Types with their own routes (``/api/train``, …), which check what a bare submit cannot."""


@router.post("/tasks", status_code=202)
def submit(body: Submit, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Queue a task of any registered type, its arguments validated -> its status."""
    rt = runtime_of(request)
    if body.type in _OWN_TYPES and not principal.admin:
        raise RequestError(
            f"submit {body.type} tasks through /api/{_OWN_TYPES[body.type]}",
            param="type",
        )
    return rt.tasks.submit(
        body.type,
        body.args,
        task_id=body.task_id,
        queue=body.queue,
        max_attempts=body.max_attempts,
        tenant=principal.tenant,
    )


@router.get("/tasks/{task_id}")
def show(task_id: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """One task's status: state, progress (step/total, percent, ETA, metrics), result, error."""
    return owned_task(runtime_of(request), principal, task_id)


def _act(rt: Runtime, principal: Principal, task_id: str, action: str) -> dict[str, Any]:
    task = owned_task(rt, principal, task_id)
    done = rt.tasks.cancel(task_id) if action == "cancel" else rt.tasks.retry(task_id)
    if task.get("tenant", "local") != principal.tenant:
        audit(rt, principal, f"tasks.{action}", task_id, f"of tenant {task.get('tenant')}")
    return done


@router.post("/tasks/{task_id}/cancel")
def cancel(task_id: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Cancel: a queued task never runs; a running one stops within a heartbeat."""
    return _act(runtime_of(request), principal, task_id, "cancel")


@router.post("/tasks/{task_id}/retry")
def retry(task_id: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Run a failed, dead or cancelled task again (409 in any other state)."""
    return _act(runtime_of(request), principal, task_id, "retry")


def _entry(entry_id: Any, fields: Any) -> dict[str, Any]:
    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    f = {text(k): v for k, v in fields.items()}
    return {
        "id": text(entry_id),
        "kind": text(f.get("k", "")),
        "data": orjson.loads(f.get("d", b"{}")),
    }


def _check_after(after: str | None) -> str:
    if after is None or after == "":
        return "0-0"
    if not _ENTRY_ID.fullmatch(after) or max(int(p) for p in after.split("-")) >= 2**64:
        raise RequestError(f"invalid entry id {after!r}: use <ms>-<seq>", param="after")
    return after


@router.get("/tasks/{task_id}/logs")
async def logs(
    task_id: str,
    request: Request,
    principal: PrincipalDep,
    after: Annotated[str | None, Query(max_length=48)] = None,
    limit: Limit = 200,
) -> dict[str, Any]:
    """Log lines, progress and state changes after the entry id ``after``, oldest first."""
    rt = runtime_of(request)
    start = _check_after(after)
    await asyncio.to_thread(owned_task, rt, principal, task_id)
    state = services_of(request).state
    rows: Any = await state.xrange(rt.keys.task_log(task_id), min=f"({start}", max="+", count=limit)
    data = [_entry(i, f) for i, f in rows]
    return {"data": data, "next": data[-1]["id"] if data else start}


@router.get("/tasks/{task_id}/logs/stream")
async def log_stream(
    task_id: str,
    request: Request,
    principal: PrincipalDep,
    after: Annotated[str | None, Query(max_length=48)] = None,
    last_event_id: Annotated[str | None, Header(max_length=48)] = None,
) -> EventSourceResponse:
    """The log as Server-Sent Events (``log``, ``progress``, ``state``; ``id`` the entry id),
    then ``end`` once the task has ended. Reconnecting with ``Last-Event-ID`` (browsers do it
    by themselves) goes on after that entry: every entry once, none missed."""
    rt = runtime_of(request)
    start = _check_after(last_event_id or after)
    await asyncio.to_thread(owned_task, rt, principal, task_id)
    state = services_of(request).state
    key = rt.keys.task_log(task_id)

    async def events() -> AsyncIterator[dict[str, Any]]:
        last = start
        while True:
            rows: Any = await state.xread({key: last}, count=200, block=1000)
            if rows:
                for entry_id, fields in rows[0][1]:
                    entry = _entry(entry_id, fields)
                    last = entry["id"]
                    yield {"id": last, "event": entry["kind"], "data": orjson.dumps(entry).decode()}
                    if entry["kind"] == "state" and entry["data"].get("state") in TERMINAL:
                        yield {
                            "event": "end",
                            "data": orjson.dumps({"state": entry["data"]["state"]}).decode(),
                        }
                        return
                continue
            raw: Any = await state.hget(rt.keys.task_status(task_id), "state")
            text = raw.decode() if isinstance(raw, bytes) else (raw or "expired")
            if raw is None or text in TERMINAL:  # ended (or expired): every entry was read
                yield {"event": "end", "data": orjson.dumps({"state": text}).decode()}
                return

    return EventSourceResponse(events(), ping=15, send_timeout=SSE_SEND_TIMEOUT)
