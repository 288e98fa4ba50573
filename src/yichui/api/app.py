"""``create_app(settings)``: the HTTP API of one server process.

::

    app = create_app(load_settings())          # uvicorn yichui.api.app:app --factory
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from yichui import __version__
from yichui.api.errors import error_body, install_handlers
from yichui.api.fastpath import HitFastPath, send_json
from yichui.api.openai.router import router as openai_router
from yichui.api.openai.serving import Serving
from yichui.config import Settings, load_settings
from yichui.errors import StateError
from yichui.inference.cache import ResponseCache
from yichui.inference.router import ModelRouter
from yichui.runtime import Runtime
from yichui.state.connection import make_async_client, parse_redis_url, resolve_url
from yichui.state.response_store import ResponseStore

log = logging.getLogger("yichui.api")


class BodyLimit:
    """413 for a body over ``limit`` bytes, by Content-Length or while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _too_large(send, self.limit)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a chunked body: no Content-Length to check first
                    raise BodyTooLarge(413, f"request body over the {self.limit} byte limit")
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:  # raised while a middleware read the body (FastAPI answers its own)
            await _too_large(send, self.limit)


class BodyTooLarge(HTTPException):
    """The body passed ``max_body_bytes`` while it was being read."""


async def _too_large(send: Send, limit: int) -> None:
    body = orjson.dumps(error_body(413, f"request body over the {limit} byte limit"))
    await send_json(send, 413, body)


def _ttl_for(settings: Settings) -> Any:
    def ttl(model: str) -> int:
        return settings.response_ttl_by_model.get(model, settings.response_ttl)

    return ttl


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """The app, wired to ``settings`` (built from the environment when not given)."""
    settings = settings or load_settings()
    rt = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # start (or find) Redis; the API still serves, uncached, when it cannot
            url = resolve_url(settings)
        except StateError as exc:
            log.warning("Redis unavailable at start (%s): serving uncached", exc)
            url = settings.redis_url or "redis://127.0.0.1:1/0"
        client = make_async_client(parse_redis_url(url), settings)
        store = ResponseStore(client, rt.keys)
        cache = ResponseCache(
            store,
            ttl_for=_ttl_for(settings),
            jitter=settings.ttl_jitter,
            timeout=settings.cache_timeout,
            wait=settings.cache_wait,
            near_ttl=settings.cache_near_ttl,
            near_bytes=settings.cache_near_bytes,
        )
        await cache.start()
        local, upstream = _engines(settings, rt)
        router = ModelRouter(settings, rt.registry, local=local, upstream=upstream)
        serving = Serving(router, cache, shared=settings.cache_shared)
        watcher = asyncio.create_task(_watch_models(store, router, serving))
        app.state.settings = settings
        app.state.runtime = rt
        app.state.cache = cache
        app.state.serving = serving
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await cache.close()
            for engine in (local, upstream):
                if engine is not None:
                    await engine.close()
            await client.aclose()
            if runtime is None:
                rt.close()

    app = FastAPI(
        title="yichui",
        version=__version__,
        summary="OpenAI-compatible inference with a Redis response cache",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness, and whether the response cache reaches Redis (no auth needed)."""
        cache: ResponseCache = request.app.state.cache
        return {"status": "ok", "cache": cache.breaker.state}

    app.add_middleware(HitFastPath)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # outermost: limits all
    _openapi_errors_are_400(app)
    return app


def _openapi_errors_are_400(app: FastAPI) -> None:
    """FastAPI documents validation errors as 422; this API answers them with 400."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if "422" in responses:
                    responses["400"] = {
                        "description": "Invalid request (OpenAI error body)",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                    del responses["422"]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _watch_models(store: ResponseStore, router: ModelRouter, serving: Serving) -> None:
    """Forget a model's resolved card the moment it is pulled, imported, merged or removed,
    so its new fingerprint (and so new cache keys) apply at once, not after CARD_TTL."""
    delay = 0.5
    while True:
        try:
            async for event in store.model_events():
                delay = 0.5
                name = event.get("name")
                router.forget(str(name) if name else None)
                serving.forget()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: the card TTL still bounds staleness
            log.debug("model events: %r", exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


def _engines(settings: Settings, rt: Runtime) -> tuple[Any, Any]:
    local = upstream = None
    try:
        from yichui.inference.engines.local import LocalEngine
        from yichui.inference.pool import ModelPool

        pool = ModelPool(
            budget_bytes=settings.model_memory_budget,
            device=settings.inference_device,
            dtype=settings.inference_dtype,
        )
        local = LocalEngine(rt.registry, pool)
    except ImportError as exc:  # no [ml] extra: upstream routes only
        log.warning("local engine unavailable (%s); serving upstream routes only", exc)
    if settings.upstreams:
        from yichui.inference.engines.upstream import UpstreamEngine

        upstream = UpstreamEngine(settings.upstreams)
    return local, upstream


def app() -> FastAPI:
    """For ``uvicorn --factory yichui.api.app:app``."""
    return create_app()
