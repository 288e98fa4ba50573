"""The OpenAI-compatible routes: thin, the work is in ``serving``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from yichui.api.auth import TenantDep
from yichui.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from yichui.api.openai.serving import CachePolicy, Serving
from yichui.inference.engine import ModelCard

router = APIRouter(prefix="/v1")

CacheControl = Annotated[str | None, Header(alias="cache-control")]
CachePolicyHeader = Annotated[str | None, Header(alias="x-yichui-cache-policy")]


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


def _model(card: ModelCard) -> dict[str, Any]:
    return {"id": card.id, "object": "model", "created": card.created, "owned_by": card.owned_by}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    tenant: TenantDep,
    cache_control: CacheControl = None,
    cache_policy: CachePolicyHeader = None,
) -> Response:
    """Chat completions, streamed or not, through the response cache."""
    engine_request = body.to_engine(request.app.state.settings.image_file_roots)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _serving(request).handle(
        engine_request,
        tenant=tenant,
        stream=body.stream,
        include_usage=include_usage,
        policy=CachePolicy.from_headers(cache_control, cache_policy),
        request_digest=request.scope.get("yichui.request_digest"),
    )


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    tenant: TenantDep,
    cache_control: CacheControl = None,
    cache_policy: CachePolicyHeader = None,
) -> Response:
    """Text completions, streamed or not, through the response cache."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _serving(request).handle(
        body.to_engine(),
        tenant=tenant,
        stream=body.stream,
        include_usage=include_usage,
        policy=CachePolicy.from_headers(cache_control, cache_policy),
        request_digest=request.scope.get("yichui.request_digest"),
    )


@router.get("/models")
async def list_models(request: Request, tenant: TenantDep) -> dict[str, Any]:
    """Local models of the registry that can be served, and upstream routes."""
    cards = await _serving(request).router.cards()
    return {"object": "list", "data": [_model(c) for c in cards]}


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    route = await _serving(request).router.resolve(model)
    return _model(route.card)
