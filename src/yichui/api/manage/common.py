"""What every management route shares: the runtime, pages, the audit log, tenant checks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request

from yichui.access import Principal
from yichui.api.deps import services_of
from yichui.errors import TaskNotFoundError
from yichui.runtime import Runtime

MAX_PAGE = 500

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Items per page.")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip.")]


def runtime_of(request: Request) -> Runtime:
    """The composition root of this API process (its sync services: registry, tasks, …)."""
    return services_of(request).rt


def page(items: list[Any], limit: int, offset: int) -> dict[str, Any]:
    """``{"data", "total", "limit", "offset"}``: the page of ``items`` at ``offset``."""
    return {
        "data": items[offset : offset + limit],
        "total": len(items),
        "limit": limit,
        "offset": offset,
    }


def audit(
    rt: Runtime, principal: Principal, action: str, target: str, detail: str | None = None
) -> None:
    """Write an admin action to the audit log (``/api/audit``)."""
    rt.audit.record(principal, action, target, detail)


def owned_task(rt: Runtime, principal: Principal, task_id: str) -> dict[str, Any]:
    """The task, if ``principal`` may see it: another tenant's task is a 404 for a user (its
    existence is not theirs to know)."""
    task = rt.tasks.get(task_id)
    if not principal.may_see(task.get("tenant")):
        raise TaskNotFoundError(task_id)
    return task
