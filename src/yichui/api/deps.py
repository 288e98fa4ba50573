"""Typed FastAPI dependencies: what a route may ask for, as type aliases::

    @router.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, tenant: TenantDep, inference: InferenceDep): ...

The services come from the composition root (:meth:`yichui.runtime.Runtime.serving`), built
once per app by :func:`yichui.api.app.create_app`: this is the one place that reads them off
the app. Every dependency is ``async``: FastAPI runs plain functions in a thread pool, a hop
per request the hit path cannot afford.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from yichui.config import Settings
from yichui.inference.router import ModelRouter
from yichui.inference.service import InferenceService
from yichui.runtime.serving import ServingServices


async def get_services(request: Request) -> ServingServices:
    services: ServingServices = request.app.state.services
    return services


ServicesDep = Annotated[ServingServices, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_inference(services: ServicesDep) -> InferenceService:
    return services.inference


async def get_router(services: ServicesDep) -> ModelRouter:
    return services.router


SettingsDep = Annotated[Settings, Depends(get_settings)]
InferenceDep = Annotated[InferenceService, Depends(get_inference)]
RouterDep = Annotated[ModelRouter, Depends(get_router)]
