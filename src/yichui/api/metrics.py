"""``GET /metrics`` (Prometheus text format), and the timing of every request.

Who may read it: with ``metrics_token`` set, a request bearing it (``Authorization: Bearer``),
from anywhere; without one, requests from loopback only. The deployment's figures (Redis
``INFO``, tasks) are read from Redis during the scrape, each call bounded by
``metrics_redis_timeout``: with Redis down the scrape still answers, ``yichui_redis_up 0``.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from yichui.api.deps import services_of
from yichui.api.errors import error_response
from yichui.api.openai.serving import CACHE_HEADER
from yichui.metrics import CONTENT_TYPE, OTHER, Metrics
from yichui.metrics_access import check_access

router = APIRouter()

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/metrics": "metrics",
}
"""Path -> the ``endpoint`` label (any other path: ``other``, so the labels stay bounded)."""
_CACHE = CACHE_HEADER.encode()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """The metrics of this process, and the deployment's figures read from Redis now."""
    services = services_of(request)
    token = services.settings.metrics_token
    client = request.client.host if request.client else None
    refusal = check_access(
        token.get_secret_value() if token else None, client, request.headers.get("authorization")
    )
    if refusal is not None:
        response = error_response(refusal.status, refusal.message, code="metrics_forbidden")
        if refusal.status == 401:
            response.headers["www-authenticate"] = "Bearer"
        return response
    snapshot = await asyncio.to_thread(services.probe.read)
    return Response(services.metrics.exposition(snapshot), media_type=CONTENT_TYPE)


STARTED = "yichui.started"
"""Scope key: when the request arrived (set by the hit fast path, which reads the body first)."""


class RequestTiming:
    """Times every HTTP request until its last byte is sent: ``yichui_request_seconds`` by
    endpoint, the cache's answer (``x-yichui-cache``, ``none`` without one) and status code.
    Liveness probes (``/health``) are not timed. Hits the fast path answers are timed there:
    they never reach this."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        started = scope.get(STARTED) or time.perf_counter()
        endpoint = ENDPOINTS.get(scope["path"], OTHER)
        status, cache = "500", "none"
        done = False

        async def timed(message: Message) -> None:
            nonlocal status, cache, done
            if message["type"] == "http.response.start":
                status = str(message["status"])
                for name, value in message.get("headers", ()):
                    if name == _CACHE:
                        cache = value.decode("latin-1")
                        break
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
                self.metrics.request_took(endpoint, cache, status, time.perf_counter() - started)

        try:
            await self.app(scope, receive, timed)
        finally:
            if not done:  # the client went away, or the app failed before its last byte
                self.metrics.request_took(endpoint, cache, status, time.perf_counter() - started)
