"""``yichui bench upstream``: an OpenAI-compatible server that behaves like a loaded GPU server.

Each request's service time is ``base + slope x in_flight`` seconds, ``in_flight`` counting the
requests being served when it arrives (itself included): the more it holds, the slower each
answer, as on a GPU server whose batches grow with the load. At arrival rate λ the mean is
``base / (1 - slope x λ)`` (Little's law), unstable past ``slope x λ = 1``.

It answers ``POST /v1/chat/completions`` and ``/v1/completions``: the words of the last user
text in reverse order, cut to ``max_tokens`` words, whole or streamed (SSE: a role event, one
event per word, the finish event, the usage event with ``stream_options.include_usage``,
``[DONE]``). A streamed answer's first word comes after :data:`FIRST_TOKEN_SHARE` of its service
time, the others evenly over the rest. Images (``image_url`` parts) are accepted and ignored.
``GET /_bench/stats`` gives the requests received; ``POST /_bench/config`` with
``{"base": s, "slope": s}`` changes the timing; ``POST /_bench/reset`` zeroes the counter.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

FIRST_TOKEN_SHARE = 0.2
"""Share of a streamed answer's service time before its first word (the prefill)."""


@dataclass
class UpstreamState:
    base: float = 0.3
    slope: float = 0.0104
    in_flight: int = 0
    received: int = 0
    peak: int = 0


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return ""


def build_app(state: UpstreamState) -> Any:
    """The Starlette app reading and counting into ``state``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def handle(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
            source = _last_user_text(body["messages"]) if chat else str(body.get("prompt", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            return JSONResponse(
                {"error": {"message": "bad request", "type": "invalid_request_error"}}, 400
            )
        state.received += 1
        state.in_flight += 1
        state.peak = max(state.peak, state.in_flight)
        service = state.base + state.slope * state.in_flight
        max_tokens = int(body.get("max_tokens") or 16)
        words = (source.split()[::-1] or ["ok"])[:max_tokens]
        finish = "length" if len(source.split()) > max_tokens else "stop"
        n_prompt = len(source.split())
        usage = {
            "prompt_tokens": n_prompt,
            "completion_tokens": len(words),
            "total_tokens": n_prompt + len(words),
        }
        model = body.get("model", "")
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            try:
                await asyncio.sleep(service)
            finally:
                state.in_flight -= 1
            text = " ".join(words)
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            choice["finish_reason"] = finish
            return JSONResponse(
                {
                    "id": "cmpl-bench",
                    "object": obj,
                    "created": 0,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            chunk = {
                "id": "cmpl-bench",
                "object": obj + ".chunk" if chat else obj,
                "created": 0,
                "model": model,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

        def delta(text: str, finish_reason: str | None = None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}
            return {"index": 0, "text": text, "finish_reason": finish_reason}

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield event(
                        [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
                    )
                await asyncio.sleep(service * FIRST_TOKEN_SHARE)
                step = service * (1 - FIRST_TOKEN_SHARE) / max(len(words), 1)
                for i, word in enumerate(words):
                    if i:
                        await asyncio.sleep(step)
                    yield event([delta(word if i == 0 else " " + word)])
                await asyncio.sleep(step)
            finally:
                state.in_flight -= 1
            yield event([delta("", finish)])
            if include_usage:
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chat_completions(request: Request) -> Response:
        return await handle(request, True)

    async def completions(request: Request) -> Response:
        return await handle(request, False)

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "requests": state.received,
                "in_flight": state.in_flight,
                "peak": state.peak,
                "base": state.base,
                "slope": state.slope,
            }
        )

    async def configure(request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        state.base = float(body.get("base", state.base))
        state.slope = float(body.get("slope", state.slope))
        return await stats(request)

    async def reset(request: Request) -> Response:
        state.received = state.peak = 0
        return await stats(request)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/_bench/stats", stats),
            Route("/_bench/config", configure, methods=["POST"]),
            Route("/_bench/reset", reset, methods=["POST"]),
        ]
    )


def serve_upstream(host: str, port: int, base: float, slope: float) -> None:
    """Serve until interrupted (uvloop and httptools when installed, no access log)."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        build_app(UpstreamState(base=base, slope=slope)),
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
        timeout_keep_alive=30,
    )
    uvicorn.Server(config).run(sockets=[sock])
