"""The OpenAI protocol around the inference service: an OpenAI request is already an
:class:`~yichui.inference.engine.EngineRequest` (``protocol.py``); this turns the service's
:class:`~yichui.inference.service.Answer` into HTTP: the stored JSON bytes as they are, a
stored answer replayed as server-sent events, or a streamed miss as it is generated.

The cache stores the whole (non-streamed) OpenAI response body, rendered here; a streamed miss
is stored (by the service) once the stream completed, with no error and a non-empty answer.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse

from yichui.api.errors import translate
from yichui.errors import CoalescedError
from yichui.inference.engine import EngineChunk, EngineRequest, EngineResult, Usage
from yichui.inference.service import CachePolicy, InferenceService

CACHE_HEADER = "x-yichui-cache"
KEY_HEADER = "x-yichui-cache-key"


async def respond(
    inference: InferenceService,
    request: EngineRequest,
    *,
    tenant: str,
    stream: bool,
    include_usage: bool,
    policy: CachePolicy,
) -> Response:
    """Answer an OpenAI chat or text completion: JSON, or server-sent events."""
    heads: list[dict[str, Any]] = []

    def head() -> dict[str, Any]:  # made when an answer is made, not for a hit
        if not heads:
            heads.append(_head(request))
        return heads[0]

    def render(result: EngineResult) -> bytes:  # the stored body shares a stream's id
        return orjson.dumps(build_body(request, result, head=head()))

    try:
        answer = await inference.answer(
            request,
            tenant=tenant,
            policy=policy,
            stream=stream,
            render=render,
            endpoint="chat" if request.kind == "chat" else "completions",
        )
    except CoalescedError as exc:  # the computation we waited for failed: its answer is ours
        status, body = translate(exc)
        return JSONResponse(body, status_code=status, headers={CACHE_HEADER: "coalesced"})
    headers = {CACHE_HEADER: answer.status.value}
    if answer.key is not None:
        headers[KEY_HEADER] = answer.key
    if answer.body is not None:
        if stream:
            return _sse(_replay(orjson.loads(answer.body), request.kind, include_usage), headers)
        return _json(answer.body, headers)  # the stored bytes, as they are
    assert answer.chunks is not None
    return _sse(_events(answer.chunks, request, head(), include_usage), headers)


async def _events(
    chunks: AsyncGenerator[EngineChunk, None],
    request: EngineRequest,
    head: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The engine's pieces as OpenAI stream chunks; an error mid-stream as an ``error``
    event (OpenAI streams carry them so); closing this lets go of the answer."""
    usage = Usage(0, 0)
    kind = request.kind
    if kind == "chat":
        for i in range(request.params.n):
            yield _event(_chunk(head, kind, i, {"role": "assistant", "content": ""}))
    async with contextlib.aclosing(chunks):
        try:
            async for c in chunks:
                if c.usage is not None:
                    usage = c.usage
                if c.text:
                    yield _event(_chunk(head, kind, c.index, _delta(kind, c)))
                if c.finish_reason is not None:
                    yield _event(_chunk(head, kind, c.index, _delta(kind, None), c.finish_reason))
        except Exception as exc:
            yield _event(translate(exc)[1])
            return
    if include_usage:
        yield _event({**head, "choices": [], "usage": _usage(usage)})
    yield b"data: [DONE]\n\n"


def _head(request: EngineRequest) -> dict[str, Any]:
    prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
    obj = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {
        "id": f"{prefix}-{secrets.token_hex(12)}",
        "object": obj,
        "created": int(time.time()),
        "model": request.model,
    }


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def build_body(
    request: EngineRequest, result: EngineResult, *, head: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The OpenAI response body of a whole answer (what the cache stores)."""
    head = dict(head or _head(request))
    choices: list[dict[str, Any]]
    if request.kind == "chat":
        head["object"] = "chat.completion"
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for c in result.choices
        ]
    else:
        head["object"] = "text_completion"
        choices = [
            {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            for c in result.choices
        ]
    return {**head, "choices": choices, "usage": _usage(result.usage)}


def _delta(kind: str, chunk: EngineChunk | None) -> dict[str, Any]:
    text = chunk.text if chunk is not None else ""
    if kind == "chat":
        return {"content": text} if chunk is not None else {}
    return {"text": text}


def _chunk(
    head: dict[str, Any], kind: str, index: int, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    choice: dict[str, Any]
    if kind == "chat":
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {
            "index": index,
            "text": delta.get("text", ""),
            "finish_reason": finish,
            "logprobs": None,
        }
    return {**head, "choices": [choice]}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _replay(body: dict[str, Any], kind: str, include_usage: bool) -> AsyncIterator[bytes]:
    """A stored body as the SSE stream that would have produced it."""
    head = {
        "id": body["id"],
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": body["created"],
        "model": body["model"],
    }
    for choice in body["choices"]:
        i = choice["index"]
        if kind == "chat":
            yield _event(_chunk(head, kind, i, {"role": "assistant", "content": ""}))
            text = choice["message"]["content"]
            yield _event(_chunk(head, kind, i, {"content": text}))
            yield _event(_chunk(head, kind, i, {}, choice["finish_reason"]))
        else:
            yield _event(_chunk(head, kind, i, {"text": choice["text"]}))
            yield _event(_chunk(head, kind, i, {"text": ""}, choice["finish_reason"]))
    if include_usage:
        yield _event({**head, "choices": [], "usage": body.get("usage")})
    yield b"data: [DONE]\n\n"


def _json(raw: bytes, headers: dict[str, str]) -> Response:
    return Response(raw, media_type="application/json", headers=headers)


def _sse(body: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
    )
