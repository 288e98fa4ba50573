"""The management API under ``/api`` (``docs/api.md``, *Management API*): models, tasks,
training, the cache, Redis, workers, servers, keys, the audit log and the dashboard's session
and live feed. The CLI and these routes call the same services of the composition root; the
dashboard (``/ui``) uses these routes only. Errors have the ``/v1`` shape."""

from __future__ import annotations

from fastapi import APIRouter

from yichui.api.manage import cache, catalog, events, models, session, system, tasks, training

router = APIRouter(prefix="/api")
for _module in (session, system, models, catalog, tasks, training, cache, events):
    router.include_router(_module.router)
