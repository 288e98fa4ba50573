"""``create_app(settings)``: the HTTP API of one server process.

::

    app = create_app(load_settings())          # uvicorn yichui.api.app:app --factory
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from yichui import __version__
from yichui.api.deps import services_of
from yichui.api.errors import install_handlers
from yichui.api.fastpath import HitFastPath, send_json
from yichui.api.manage import router as manage_router
from yichui.api.metrics import RequestTiming
from yichui.api.metrics import router as metrics_router
from yichui.api.openai.router import router as openai_router
from yichui.api.ui import router as ui_router
from yichui.config import Settings, load_settings
from yichui.errors import error_body
from yichui.runtime import Runtime

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


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """The app, wired to ``settings`` (built from the environment when not given), with its
    services from the composition root (``runtime``, or one of its own)."""
    rt = runtime or Runtime(settings or load_settings(), role="api")
    settings = rt.settings
    services = rt.serving()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with services:
                yield
        finally:
            if runtime is None:
                rt.close()

    app = FastAPI(
        title="yichui",
        version=__version__,
        summary="OpenAI-compatible inference with a Redis response cache, and the management API",
        lifespan=lifespan,
    )
    app.state.services = services  # read by api/deps.py only
    install_handlers(app)

    supervisor = rt.supervisor  # the engines `yichui serve` launched, if any

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness, whether the response cache reaches Redis, and the state of each engine
        this server launched (no auth needed)."""
        # no dependency to solve: the cheapest request there is (bench/cache.py's reference)
        body: dict[str, Any] = {"status": "ok", "cache": services_of(request).cache.breaker.state}
        if supervisor.engines:
            body["engines"] = supervisor.health()
        return body

    # routes are matched in order, one regex each: the busy ones first, the 40-odd of the
    # management API and the dashboard after them (a probe of /health must not pay for them)
    app.include_router(openai_router)
    app.include_router(metrics_router)
    app.include_router(manage_router)
    app.include_router(ui_router)  # the dashboard: /ui

    app.add_middleware(RequestTiming, metrics=rt.metrics)  # times what the fast path does not
    app.add_middleware(HitFastPath, services=services)
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


def app() -> FastAPI:
    """For ``uvicorn --factory yichui.api.app:app``."""
    return create_app()
