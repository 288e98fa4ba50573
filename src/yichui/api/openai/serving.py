"""The work behind ``/v1/chat/completions`` and ``/v1/completions``: resolve the model, ask
the response cache, run the engine, build OpenAI bodies, stream as SSE.

The cache stores the whole (non-streamed) response body. A streamed request that hits is
replayed from it as proper chunks; a streamed miss is sent to its client as it is generated and
stored only once the stream completed, with no error and a non-empty answer.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse

from yichui.api.errors import APIError, translate
from yichui.inference.cache import CacheSession, CacheStatus, CoalescedError, ResponseCache
from yichui.inference.cache_key import cache_key, is_deterministic
from yichui.inference.engine import Choice, EngineChunk, EngineRequest, EngineResult, Usage
from yichui.inference.router import ModelRouter, Route

CACHE_HEADER = "x-yichui-cache"
KEY_HEADER = "x-yichui-cache-key"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What the client asked of the cache (``Cache-Control`` and ``x-yichui-cache-policy``)."""

    refresh: bool = False  # no-cache: recompute, then store the fresh answer
    store: bool = True  # no-store: do not store this answer
    max_age: float | None = None  # max-age=N: only hits younger than N seconds
    sampled: bool = False  # x-yichui-cache-policy: sampled — cache sampled answers too

    @classmethod
    def from_headers(cls, cache_control: str | None, policy: str | None) -> CachePolicy:
        refresh, store, max_age = False, True, None
        for directive in (cache_control or "").lower().split(","):
            name, _, value = directive.strip().partition("=")
            if name == "no-cache":
                refresh = True
            elif name == "no-store":
                store = False
            elif name == "max-age":
                try:
                    max_age = max(0.0, float(value.strip().strip('"')))
                except ValueError:
                    raise APIError(400, f"Cache-Control: bad max-age {value!r}") from None
        sampled = (policy or "").strip().lower() == "sampled"
        return cls(refresh, store, max_age, sampled)


class Serving:
    """Chat and text completions for one app."""

    MEMO_SIZE = 10_000
    """Request digests remembered for the hit fast path (see ``api/fastpath.py``)."""

    def __init__(self, router: ModelRouter, cache: ResponseCache, *, shared: bool) -> None:
        self.router = router
        self.cache = cache
        self.shared = shared
        self.memo: OrderedDict[str, str] = OrderedDict()
        """Digest of (tenant, path, cache headers, raw body) -> the cache key it resolved to."""

    def remember(self, request_digest: str | None, key: str) -> None:
        if request_digest is None:
            return
        self.memo[request_digest] = key
        self.memo.move_to_end(request_digest)
        if len(self.memo) > self.MEMO_SIZE:
            self.memo.popitem(last=False)

    def fast_hit(self, request_digest: str, max_age: float | None) -> tuple[str, bytes] | None:
        """A byte-identical request seen before whose answer this process holds in memory."""
        key = self.memo.get(request_digest)
        if key is None:
            return None
        body = self.cache.near_get(key, max_age)
        if body is None:
            return None
        self.cache.count("hit")
        self.cache.count("near_hits")
        self.cache.count("fast_hits")
        return key, body

    def forget(self) -> None:
        """After a model changed: digests may now resolve to other keys."""
        self.memo.clear()

    async def handle(
        self,
        request: EngineRequest,
        *,
        tenant: str,
        stream: bool,
        include_usage: bool,
        policy: CachePolicy,
        request_digest: str | None = None,
    ) -> Response:
        route = await self.router.resolve(request.model)
        images = [p for m in request.messages for p in m.images()]
        if images and not route.card.accepts_images:
            raise APIError(400, f"model '{request.model}' does not accept images", param="messages")
        deterministic = is_deterministic(request.params, honours_seed=route.honours_seed)
        if not (deterministic or policy.sampled):
            return await self._uncached(route, request, stream, include_usage)
        scope = "shared" if self.shared else f"tenant:{tenant}"
        key = cache_key(request, scope=scope, fingerprint=route.card.fingerprint)
        if not stream:
            self.remember(request_digest, key)
        session = self.cache.session(
            request.model,
            key,
            refresh=policy.refresh,
            store=policy.store,
            max_age=policy.max_age,
        )
        try:
            await session.__aenter__()
        except CoalescedError as exc:  # the computation we waited for failed
            status = int(exc.error.get("status") or 502)
            body = exc.error.get("body") or {
                "error": {"message": str(exc), "type": "server_error", "param": None, "code": None}
            }
            return JSONResponse(body, status_code=status, headers={CACHE_HEADER: "coalesced"})
        headers = {CACHE_HEADER: session.status.value, KEY_HEADER: key}
        if session.body is not None:
            await session.__aexit__(None, None, None)
            if stream:
                stored = orjson.loads(session.body)
                return _sse(_replay(stored, request.kind, include_usage), headers)
            return _json(session.body, headers)  # the stored bytes, as they are
        if stream:
            return _sse(self._stream_miss(route, request, session, include_usage), headers)
        try:
            result = await route.engine.complete(request)
        except BaseException as exc:
            status, body = translate(exc)
            await session.fail({"status": status, "body": body, "message": str(exc)})
            await session.__aexit__(None, None, None)
            raise
        raw = orjson.dumps(build_body(request, result))
        await session.commit(raw, cacheable=_complete(result))
        await session.__aexit__(None, None, None)
        return _json(raw, headers)

    async def _uncached(
        self, route: Route, request: EngineRequest, stream: bool, include_usage: bool
    ) -> Response:
        self.cache.count("bypass")
        headers = {CACHE_HEADER: CacheStatus.BYPASS.value}
        if stream:
            return _sse(self._stream(route, request, include_usage, None), headers)
        result = await route.engine.complete(request)
        return _json(orjson.dumps(build_body(request, result)), headers)

    async def _stream_miss(
        self, route: Route, request: EngineRequest, session: CacheSession, include_usage: bool
    ) -> AsyncIterator[bytes]:
        try:
            async for piece in self._stream(route, request, include_usage, session):
                yield piece
        finally:
            await session.__aexit__(None, None, None)

    async def _stream(
        self,
        route: Route,
        request: EngineRequest,
        include_usage: bool,
        session: CacheSession | None,
    ) -> AsyncIterator[bytes]:
        head = _head(request)
        texts = [""] * request.params.n
        finish: list[str | None] = [None] * request.params.n
        usage = Usage(0, 0)
        if request.kind == "chat":
            for i in range(request.params.n):
                yield _event(_chunk(head, request.kind, i, {"role": "assistant", "content": ""}))
        try:
            async for c in route.engine.stream(request):
                if c.usage is not None:
                    usage = c.usage
                if c.text:
                    texts[c.index] += c.text
                    yield _event(_chunk(head, request.kind, c.index, _delta(request.kind, c)))
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
                    yield _event(
                        _chunk(
                            head, request.kind, c.index, _delta(request.kind, None), c.finish_reason
                        )
                    )
        except Exception as exc:
            status, body = translate(exc)
            if session is not None:
                await session.fail({"status": status, "body": body, "message": str(exc)})
            yield _event(body)  # OpenAI streams carry errors as an `error` event
            return
        if session is not None:  # stored before the last bytes: a client gone now loses nothing
            result = EngineResult(
                tuple(
                    Choice(i, t, "length" if f == "length" else "stop")
                    for i, (t, f) in enumerate(zip(texts, finish, strict=True))
                ),
                usage,
            )
            raw = orjson.dumps(build_body(request, result, head=head))
            await session.commit(raw, cacheable=all(finish) and _complete(result))
        if include_usage:
            yield _event({**head, "choices": [], "usage": _usage(usage)})
        yield b"data: [DONE]\n\n"


def _complete(result: EngineResult) -> bool:
    """Only whole, non-empty answers are stored."""
    return bool(result.choices) and all(c.text.strip() for c in result.choices)


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
