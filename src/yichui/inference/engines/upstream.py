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
API key never appears in a message or a body passed through. How replies, error bodies and
streams are read is in ``upstream_wire.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from yichui.config import UpstreamRoute
from yichui.errors import ImagesNotAcceptedError, ModelNotFoundError, UpstreamError
from yichui.inference.engine import (
    EngineChunk,
    EngineRequest,
    EngineResult,
    EngineServices,
    Message,
    ModelCard,
)
from yichui.inference.engines.upstream_wire import (
    StreamParser,
    parse_json,
    parse_result,
    status_error,
    translated,
)

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection to an upstream."""
MAX_CONNECTIONS = 100
"""The default of a route's ``max_connections``: connections one base URL's pool keeps open
at most (requests beyond wait for one)."""
MAX_KEEPALIVE = 20
"""Idle keep-alive connections one pool keeps."""
FINGERPRINT_PREFIX = "up1-"


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
        with translated(where, route):
            async with asyncio.timeout(route.timeout):
                response = await self._client(route).post(
                    url,
                    content=orjson.dumps(body),
                    headers=_headers(route),
                    timeout=_timeout(route),
                )
                raw = await response.aread()
        if response.status_code >= 400:
            raise status_error(response.status_code, raw, where, route)
        data = parse_json(raw, where, route)
        return parse_result(data, request.kind, where, route)

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
        with translated(where, route):
            async with asyncio.timeout_at(deadline):
                response = await client.send(outgoing, stream=True)
        try:
            if response.status_code >= 400:
                with translated(where, route):
                    async with asyncio.timeout_at(deadline):
                        raw = await response.aread()
                raise status_error(response.status_code, raw, where, route)
            lines = response.aiter_lines()
            try:
                parser = StreamParser(request.kind, request.params.n, where, route)
                while True:
                    with translated(where, route):
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
