"""The OpenAI-compatible routes: thin; the protocol is in ``protocol``, HTTP in ``serving``,
the work in the inference service."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from yichui.api.auth import CallerDep, TenantDep
from yichui.api.deps import RouterDep
from yichui.api.openai.body import ImageBodyRoute
from yichui.api.openai.protocol import ChatCompletionRequest, CompletionRequest, has_images
from yichui.api.openai.serving import respond
from yichui.inference.engine import EngineRequest, ModelCard
from yichui.inference.service import CachePolicy
from yichui.ml.images import ImageLimits

NO_FAST_PATH = "yichui.no_fast_path"
"""Set in the ASGI scope by a route whose answer must not be remembered for the hit fast path
(``api/fastpath.py``): a request naming a local image file (the file can change under the
same request bytes)."""

router = APIRouter(prefix="/v1", route_class=ImageBodyRoute)  # images cut out before parsing

CacheControl = Annotated[str | None, Header(alias="cache-control")]
CachePolicyHeader = Annotated[str | None, Header(alias="x-yichui-cache-policy")]


def _model(card: ModelCard) -> dict[str, Any]:
    return {"id": card.id, "object": "model", "created": card.created, "owned_by": card.owned_by}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    caller: CallerDep,
    request: Request,
    cache_control: CacheControl = None,
    cache_policy: CachePolicyHeader = None,
) -> Response:
    """Chat completions, streamed or not, through the response cache."""
    services = caller.services
    settings = services.settings
    engine_request: EngineRequest
    if has_images(body):  # decoding takes milliseconds: not on the event loop
        limits = ImageLimits.from_settings(settings)
        started = time.perf_counter()
        engine_request = await asyncio.to_thread(body.to_engine, settings.image_file_roots, limits)
        services.metrics.images_took("chat", time.perf_counter() - started)
        if any(p.source == "file" for m in engine_request.messages for p in m.images()):
            request.scope[NO_FAST_PATH] = True
    else:
        engine_request = body.to_engine(settings.image_file_roots)
    return await respond(
        services.inference,
        engine_request,
        tenant=caller.tenant,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        policy=CachePolicy.from_headers(cache_control, cache_policy),
    )


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    caller: CallerDep,
    cache_control: CacheControl = None,
    cache_policy: CachePolicyHeader = None,
) -> Response:
    """Text completions, streamed or not, through the response cache."""
    return await respond(
        caller.services.inference,
        body.to_engine(),
        tenant=caller.tenant,
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        policy=CachePolicy.from_headers(cache_control, cache_policy),
    )


@router.get("/models")
async def list_models(tenant: TenantDep, models: RouterDep) -> dict[str, Any]:
    """Local models of the registry that can be served, and upstream routes."""
    return {"object": "list", "data": [_model(c) for c in await models.cards()]}


@router.get("/models/{model:path}")
async def get_model(model: str, tenant: TenantDep, models: RouterDep) -> dict[str, Any]:
    return _model((await models.resolve(model)).card)
