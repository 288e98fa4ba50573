"""Typed FastAPI dependencies: what a route may ask for, as type aliases::

    @router.get("/models")
    async def list_models(tenant: TenantDep, models: RouterDep): ...

Routes on the hit path take ``CallerDep`` (``api/auth.py``: the tenant and the services in one).
The services come from the composition root (:meth:`yichui.runtime.Runtime.serving`), built
once per app by :func:`yichui.api.app.create_app`: :func:`services_of` is the one place that
reads them off the app.

Each dependency is ``async`` (FastAPI runs plain functions in a thread pool, a hop per request
the hit path cannot afford) and depends on the request alone: FastAPI solves every dependency
of a dependency anew, and a nested chain costs the hit path tens of microseconds per level.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from yichui.inference.router import ModelRouter
from yichui.runtime.serving import ServingServices


def services_of(request: Request) -> ServingServices:
    """The app's services (started by its lifespan)."""
    services: ServingServices = request.app.state.services
    return services


async def get_router(request: Request) -> ModelRouter:
    return services_of(request).router


RouterDep = Annotated[ModelRouter, Depends(get_router)]
