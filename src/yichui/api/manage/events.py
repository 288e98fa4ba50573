"""``/api/events``: the dashboard's live feed, as Server-Sent Events.

``task`` (every state change and progress report), ``model`` (pulled, imported, merged,
removed) and ``redis`` (``{"reachable": …}`` when the state Redis goes or comes back), from the
process's one :class:`~yichui.runtime.feed.EventFeed`. A user key hears its own tenant's tasks
only. A client that falls behind by ``sse_buffer`` events is dropped (it reconnects; the page
then reloads what it shows), and one that reads nothing for 30 s too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from yichui.api.auth import PrincipalDep
from yichui.api.deps import services_of
from yichui.api.manage.tasks import SSE_SEND_TIMEOUT

router = APIRouter(tags=["events"])


@router.get("/events")
async def events(request: Request, principal: PrincipalDep) -> EventSourceResponse:
    """The live feed (see the module docstring); ``ping`` events every 15 s."""
    feed = services_of(request).feed

    async def stream() -> AsyncIterator[dict[str, Any]]:
        watcher = feed.watch()
        try:
            if feed.reachable is not None:
                yield {
                    "event": "redis",
                    "data": orjson.dumps({"reachable": feed.reachable}).decode(),
                }
            while True:
                kind, data = await watcher.get()
                if kind in ("dropped", "closed"):
                    return
                if kind == "task" and not principal.may_see(data.get("tenant")):
                    continue
                yield {"event": kind, "data": orjson.dumps(data).decode()}
        finally:
            feed.unwatch(watcher)

    return EventSourceResponse(stream(), ping=15, send_timeout=SSE_SEND_TIMEOUT)
