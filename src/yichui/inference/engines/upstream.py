"""An engine that forwards to OpenAI-compatible servers: vLLM, SGLang, LMDeploy, ``swift deploy``,
Ollama's ``/v1``.

Each routed model name (the ``upstreams`` setting) names a base URL up to ``/v1`` and the model's
name there. Requests go out with every generation parameter resolved, so that what the response
cache keys on is exactly what the upstream was asked. One pooled HTTP/1.1 client (keep-alive) is
shared by all routes to the same base URL::

    engine = UpstreamEngine(settings.upstreams)
    result = await engine.complete(request)
    async for chunk in engine.stream(request):
        ...
    await engine.close()

Every failure to get a whole, well-formed answer raises :class:`UpstreamError` with the HTTP
status the API should answer with: 502 (unreachable, a 5xx, a reply that is not what the OpenAI
API returns, a stream cut before ``[DONE]``), 504 (no whole answer within the route's
``timeout``), or the upstream's own 4xx with its OpenAI error body, passed through. Error bodies
in other shapes are turned into OpenAI's: the flat ``{"message", "object": "error"}`` of older
vLLM and ``swift deploy``, Ollama's ``{"error": "..."}``, FastAPI's 422 ``{"detail": [...]}``
(answered 400). What is this gateway's fault, not the client's, is 502 with a hint: the
upstream refusing our credentials (401, 403, ``swift deploy``'s 400 "API key error") or not
serving the route's model (``swift deploy``'s 400 "... is not in the model_list"). The route's
API key never appears in a message or a body passed through.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from yichui.config import UpstreamRoute
from yichui.errors import ImagesNotAcceptedError, ModelNotFoundError, UpstreamError
from yichui.inference.engine import (
    Choice,
    EngineChunk,
    EngineRequest,
    EngineResult,
    EngineServices,
    Message,
    ModelCard,
    Usage,
)

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection to an upstream."""
MAX_CONNECTIONS = 100
"""The default of a route's ``max_connections``: connections one base URL's pool keeps open
at most (requests beyond wait for one)."""
MAX_KEEPALIVE = 20
"""Idle keep-alive connections one pool keeps."""
FINGERPRINT_PREFIX = "up1-"

_ERROR_TEXT_MAX = 500
"""Characters of an upstream's non-JSON error text quoted in a message."""


class UpstreamEngine:
    """The :class:`~yichui.inference.engine.Engine` for models served by OpenAI-compatible
    servers, one :class:`~yichui.config.UpstreamRoute` per model name."""

    name = "upstream"
    honours_seed = False
    """Routes differ: see :meth:`honours_seed_for`."""

    def __init__(self, routes: Mapping[str, UpstreamRoute]) -> None:
        self._routes: dict[str, UpstreamRoute] = dict(routes)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._closed = False

    # -- what is routed ---------------------------------------------------------------------

    def models(self) -> list[str]:
        """The model names this engine serves (the routed names, not the names upstream)."""
        return sorted(self._routes)

    def route(self, model: str) -> UpstreamRoute:
        """The route of ``model``; :class:`~yichui.errors.ModelNotFoundError` if none."""
        try:
            return self._routes[model]
        except KeyError:
            raise ModelNotFoundError(model) from None

    def honours_seed_for(self, model: str) -> bool:
        """Whether the same seed gives the same output at ``model``'s upstream."""
        return self.route(model).honours_seed

    def card(self, model: str) -> ModelCard:
        """``model`` as ``/v1/models`` lists it; the fingerprint changes with the URL and the
        model name at the upstream."""
        route = self.route(model)
        remote = route.model or model
        digest = hashlib.sha256(f"{_base(route.url)}|{remote}".encode()).hexdigest()
        return ModelCard(
            id=model,
            owned_by="upstream",
            fingerprint=FINGERPRINT_PREFIX + digest,
            accepts_images=route.accepts_images,
        )

    # -- the Engine protocol ------------------------------------------------------------------

    async def bind(self, model: str) -> UpstreamModel | None:
        """``model`` bound to its route; None when no route has that name."""
        if model not in self._routes:
            return None
        return UpstreamModel(self, self.card(model), self.honours_seed_for(model))

    async def cards(self) -> list[ModelCard]:
        return [self.card(m) for m in self.models()]

    # -- running a request ------------------------------------------------------------------

    async def complete(self, request: EngineRequest) -> EngineResult:
        """Ask the upstream for the whole answer."""
        route = self.route(request.model)
        url, body = self._prepare(request, route, stream=False)
        where = _display(route.url)
        with _translated(where, route):
            async with asyncio.timeout(route.timeout):
                response = await self._client(route).post(
                    url,
                    content=orjson.dumps(body),
                    headers=_headers(route),
                    timeout=_timeout(route),
                )
                raw = await response.aread()
        if response.status_code >= 400:
            raise _status_error(response.status_code, raw, where, route)
        data = _parse_json(raw, where, route)
        return _parse_result(data, request.kind, where, route)

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        """Ask the upstream for the answer as server-sent events and pass the pieces on.

        The whole stream must arrive within the route's ``timeout``; one cut before
        ``[DONE]`` raises :class:`UpstreamError` (502), so it is never taken for a whole answer.
        A consumer that stops early should ``aclose()`` the generator (``contextlib.aclosing``)
        so that the connection is let go of at once.
        """
        route = self.route(request.model)
        url, body = self._prepare(request, route, stream=True)
        where = _display(route.url)
        deadline = asyncio.get_running_loop().time() + route.timeout
        client = self._client(route)
        outgoing = client.build_request(
            "POST",
            url,
            content=orjson.dumps(body),
            headers={**_headers(route), "Accept": "text/event-stream"},
            timeout=_timeout(route),
        )
        with _translated(where, route):
            async with asyncio.timeout_at(deadline):
                response = await client.send(outgoing, stream=True)
        try:
            if response.status_code >= 400:
                with _translated(where, route):
                    async with asyncio.timeout_at(deadline):
                        raw = await response.aread()
                raise _status_error(response.status_code, raw, where, route)
            lines = response.aiter_lines()
            try:
                parser = _StreamParser(request.kind, request.params.n, where, route)
                while True:
                    with _translated(where, route):
                        async with asyncio.timeout_at(deadline):
                            line = await anext(lines, None)
                    if line is None:
                        break
                    for chunk in parser.feed(line):
                        yield chunk
                    if parser.done:
                        break
                if not parser.done:
                    raise UpstreamError(
                        f"upstream {where} closed the stream before [DONE]",
                        status=502,
                    )
                for chunk in parser.finish():
                    yield chunk
            finally:
                closer = getattr(lines, "aclose", None)
                if closer is not None:
                    await closer()
        finally:
            await response.aclose()

    async def close(self) -> None:
        """Close every pooled connection. The engine is unusable afterwards."""
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # -- internals ----------------------------------------------------------------------------

    def _client(self, route: UpstreamRoute) -> httpx.AsyncClient:
        if self._closed:
            raise RuntimeError("the upstream engine is closed")
        base = _base(route.url)
        client = self._clients.get(base)
        if client is None:
            client = httpx.AsyncClient(
                limits=httpx.Limits(
                    max_connections=route.max_connections,
                    # all of them kept alive when raised: a loaded server keeps them busy
                    max_keepalive_connections=route.max_connections
                    if route.max_connections > MAX_CONNECTIONS
                    else min(MAX_KEEPALIVE, route.max_connections),
                ),
                timeout=_timeout(route),
                follow_redirects=False,
            )
            self._clients[base] = client
        return client

    def _prepare(
        self, request: EngineRequest, route: UpstreamRoute, *, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        params = request.params
        body: dict[str, Any] = {"model": route.model or request.model}
        if request.kind == "chat":
            if not route.accepts_images and any(m.images() for m in request.messages):
                raise ImagesNotAcceptedError(request.model)
            body["messages"] = [_message(m) for m in request.messages]
            path = "/chat/completions"
        else:
            body["prompt"] = request.prompt
            path = "/completions"
        body.update(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            n=params.n,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return _base(route.url) + path, body


# -- request building -------------------------------------------------------------------------


def engines(services: EngineServices) -> list[UpstreamEngine]:
    """The capability seam: one engine for every configured upstream route (none: no
    engine)."""
    routes = services.settings.upstreams
    return [UpstreamEngine(routes)] if routes else []


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """A routed model name bound to the upstream engine."""

    engine: UpstreamEngine
    card: ModelCard
    honours_seed: bool

    async def complete(self, request: EngineRequest) -> EngineResult:
        return await self.engine.complete(request)

    def stream(self, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        return self.engine.stream(request)


def _base(url: str) -> str:
    return url.rstrip("/")


def _display(url: str) -> str:
    """The URL without any user:password, for messages."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid url>"
    if parsed.userinfo:
        parsed = parsed.copy_with(username=None, password=None)
    return _base(str(parsed))


def _headers(route: UpstreamRoute) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if route.api_key is not None and route.api_key.get_secret_value():
        headers["Authorization"] = f"Bearer {route.api_key.get_secret_value()}"
    return headers


def _timeout(route: UpstreamRoute) -> httpx.Timeout:
    return httpx.Timeout(route.timeout, connect=min(CONNECT_TIMEOUT, route.timeout))


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    images = message.images()
    if not images:
        out["content"] = message.text()
    else:
        parts: list[dict[str, Any]] = []
        assert not isinstance(message.content, str)
        for part in message.content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            else:
                b64 = base64.b64encode(part.data).decode("ascii")
                image: dict[str, Any] = {"url": f"data:{part.media_type};base64,{b64}"}
                if part.detail != "auto":
                    # auto is OpenAI's default: left out, the body is what it was before
                    # detail was passed on, for servers whose schema lacks the field
                    image["detail"] = part.detail
                parts.append({"type": "image_url", "image_url": image})
        out["content"] = parts
    if message.name is not None:
        out["name"] = message.name
    return out


# -- errors -----------------------------------------------------------------------------------


def _secrets(route: UpstreamRoute) -> list[str]:
    found = []
    if route.api_key is not None and route.api_key.get_secret_value():
        found.append(route.api_key.get_secret_value())
    try:
        parsed = httpx.URL(route.url)
        if parsed.password:
            found.append(parsed.password)
    except httpx.InvalidURL:
        pass
    return found


def _scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` (text, or JSON) with every secret replaced by ``***``."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    return value


def _fail(message: str, route: UpstreamRoute, *, status: int = 502) -> UpstreamError:
    return UpstreamError(_scrub(message, _secrets(route)), status=status)


@contextmanager
def _translated(where: str, route: UpstreamRoute) -> Iterator[None]:
    """Turn transport failures and timeouts into :class:`UpstreamError`."""
    try:
        yield
    except TimeoutError:
        raise _fail(
            f"upstream {where} did not answer within {route.timeout:g} s", route, status=504
        ) from None
    except httpx.TimeoutException as exc:
        raise _fail(f"upstream {where} timed out: {_reason(exc)}", route, status=504) from None
    except httpx.ConnectError as exc:
        raise _fail(f"upstream {where} unreachable: {_reason(exc)}", route) from None
    except httpx.TransportError as exc:  # reset, closed mid-body, protocol errors
        raise _fail(f"upstream {where} failed: {_reason(exc)}", route) from None


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _openai_error(data: Any) -> dict[str, Any] | None:
    """``data`` as an OpenAI error body ``{"error": {"message": ...}}``, if it is one: also the
    flat ``{"object": "error", "message": ...}`` of older vLLM and Ollama's ``{"error": "..."}``.
    """
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return {"error": error}
    if isinstance(error, str):
        return {"error": {"message": error, "type": "invalid_request_error"}}
    if isinstance(data.get("message"), str) and (data.get("object") == "error" or "type" in data):
        # vLLM's older servers, and `swift deploy`'s {"message": ..., "object": "error"}
        inner = {k: data[k] for k in ("message", "type", "param", "code") if k in data}
        inner.setdefault("type", "invalid_request_error")
        inner.setdefault("param", None)
        inner.setdefault("code", None)
        return {"error": inner}
    return None


def _validation_error(data: Any) -> dict[str, Any] | None:
    """FastAPI's own 422 body ``{"detail": [{"loc", "msg"}, ...]}`` (the servers built on it,
    ``swift deploy`` among them) as an OpenAI error body, the field at fault as ``param``."""
    if not isinstance(data, dict):
        return None
    detail = data.get("detail")
    if isinstance(detail, str):
        param, message = None, detail
    elif isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = [str(p) for p in detail[0].get("loc") or [] if p != "body"]
        param = ".".join(loc) or None
        message = str(detail[0].get("msg") or "invalid request")
    else:
        return None
    return {
        "error": {
            "message": f"{param}: {message}" if param else message,
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }


_KEY_REFUSED = re.compile(r"api key error", re.IGNORECASE)
"""`swift deploy`'s answer (400) to a missing or wrong API key."""
_MODEL_UNKNOWN = re.compile(r"^`.*` is not in the model_list")
"""`swift deploy`'s answer (400) to a model name it does not serve."""


def _status_error(status: int, raw: bytes, where: str, route: UpstreamRoute) -> UpstreamError:
    secrets = _secrets(route)
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    body = _openai_error(data)
    if body is None and status == 422:
        body = _validation_error(data)
    if body is not None:
        body = _scrub(body, secrets)
        detail = str(body["error"]["message"])
    else:
        detail = raw.decode("utf-8", "replace").strip()[:_ERROR_TEXT_MAX] or "(empty body)"
        detail = _scrub(detail, secrets)
    if status in (401, 403) or (status == 400 and _KEY_REFUSED.fullmatch(detail.strip())):
        # Our own credentials to the upstream: a fault of this gateway, not of the client.
        return UpstreamError(
            f"upstream {where} refused the request ({status}): {detail}",
            status=502,
            hint="check the route's api_key",
        )
    if status == 400 and _MODEL_UNKNOWN.match(detail):
        # The route's model name there: this gateway's configuration, not the client's request.
        return UpstreamError(
            f"upstream {where} does not serve the route's model: {detail}",
            status=502,
            hint="check the route's model (the name the upstream serves it under)",
        )
    if status == 422 and body is not None:
        status = 400  # the OpenAI API answers an invalid request with 400
    if 400 <= status < 500 and body is not None:
        return UpstreamError(
            f"upstream {where} rejected the request ({status}): {detail}",
            status=status,
            body=body,
        )
    return UpstreamError(f"upstream {where} answered {status}: {detail}", status=502)


def _parse_json(raw: bytes, where: str, route: UpstreamRoute) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        snippet = raw[:100].decode("utf-8", "replace")
        raise _fail(f"upstream {where} sent invalid JSON: {snippet!r}", route) from None
    if not isinstance(data, dict):
        raise _fail(f"upstream {where} sent a reply that is not a JSON object", route)
    error = _openai_error(data)
    if error is not None and "choices" not in data:
        raise _fail(f"upstream {where} failed: {error['error']['message']}", route)
    return data


# -- reply parsing ----------------------------------------------------------------------------


def _finish(value: Any) -> Literal["stop", "length"]:
    return "length" if value == "length" else "stop"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(data: Any) -> Usage:
    if not isinstance(data, dict):
        return Usage(0, 0)
    return Usage(_count(data.get("prompt_tokens")), _count(data.get("completion_tokens")))


def _choice_text(choice: dict[str, Any], kind: str, *, delta: bool) -> str:
    if kind == "chat":
        message = choice.get("delta" if delta else "message")
        content = message.get("content") if isinstance(message, dict) else None
    else:
        content = choice.get("text")
    return content if isinstance(content, str) else ""


def _parse_result(
    data: dict[str, Any], kind: str, where: str, route: UpstreamRoute
) -> EngineResult:
    raw_choices = data.get("choices")
    if not isinstance(raw_choices, list) or not all(isinstance(c, dict) for c in raw_choices):
        raise _fail(f"upstream {where} sent a reply without choices", route)
    choices = []
    for position, raw in enumerate(raw_choices):
        index = raw.get("index", position)
        if not isinstance(index, int):
            index = position
        choices.append(
            Choice(
                index=index,
                text=_choice_text(raw, kind, delta=False),
                finish_reason=_finish(raw.get("finish_reason")),
            )
        )
    choices.sort(key=lambda c: c.index)
    return EngineResult(choices=tuple(choices), usage=_usage(data.get("usage")))


class _StreamParser:
    """Server-sent events in, :class:`EngineChunk` out; ``done`` once ``[DONE]`` came."""

    def __init__(self, kind: str, n: int, where: str, route: UpstreamRoute) -> None:
        self.kind = kind
        self.n = n
        self.where = where
        self.route = route
        self.finished: set[int] = set()
        self.usage: Usage | None = None
        self.done = False

    def feed(self, line: str) -> list[EngineChunk]:
        """The chunks one line of the event stream carries (most carry one)."""
        if not line.startswith("data:"):
            return []  # blank separators, ": comments", "event:", "id:", "retry:"
        payload = line[5:].strip()
        if not payload:
            return []
        if payload == "[DONE]":
            self.done = True
            return []
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise _fail(
                f"upstream {self.where} sent an invalid stream event: {payload[:100]!r}",
                self.route,
            ) from None
        if not isinstance(event, dict):
            raise _fail(f"upstream {self.where} sent an invalid stream event", self.route)
        error = _openai_error(event)
        if error is not None and "choices" not in event:
            raise _fail(
                f"upstream {self.where} failed mid-stream: {error['error']['message']}",
                self.route,
            )
        if event.get("usage") is not None:
            self.usage = _usage(event["usage"])
        chunks: list[EngineChunk] = []
        raw_choices = event.get("choices")
        if not isinstance(raw_choices, list):
            return chunks
        for position, raw in enumerate(raw_choices):
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", position)
            if not isinstance(index, int) or index in self.finished:
                continue
            text = _choice_text(raw, self.kind, delta=True)
            if text:
                chunks.append(EngineChunk(index=index, text=text))
            reason = raw.get("finish_reason")
            if reason is not None:
                self.finished.add(index)
                chunks.append(EngineChunk(index=index, finish_reason=_finish(reason)))
        return chunks

    def finish(self) -> list[EngineChunk]:
        """After ``[DONE]``: a finish for every choice the upstream left open, then usage."""
        chunks = [
            EngineChunk(index=i, finish_reason="stop")
            for i in range(self.n)
            if i not in self.finished
        ]
        chunks.append(EngineChunk(index=0, usage=self.usage or Usage(0, 0)))
        return chunks
