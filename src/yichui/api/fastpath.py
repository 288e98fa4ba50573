"""The hit fast path: a request byte-identical to one already answered from the cache is
answered from memory before any parsing or validation.

Its identity is the BLAKE3 digest of the tenant, the path, the cache headers and the raw body. The
first time such a request goes the normal way (validation, model resolution, the canonical
key), and this middleware tells the inference service which cache key its whole JSON answer
carried (``x-yichui-cache-key``), unless the route marked the request as one whose bytes do
not say everything (:data:`~yichui.api.openai.router.NO_FAST_PATH`: it names a local image
file, which can change). Afterwards, while the near cache
holds that key's answer, the same bytes get it straight away with ``x-yichui-cache: hit``. A
changed model forgets every remembered digest, a store or a clear drops the answer, and
``no-cache`` requests never take this path, so it serves nothing the normal path would not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import blake3
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from yichui.api.metrics import STARTED
from yichui.api.openai.router import NO_FAST_PATH
from yichui.api.openai.serving import CACHE_HEADER, KEY_HEADER
from yichui.errors import RequestError
from yichui.inference.service import CachePolicy
from yichui.runtime.serving import ServingServices

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""The paths this takes, with their ``endpoint`` label."""
_CACHE = CACHE_HEADER.encode()
_KEY = KEY_HEADER.encode()


class HitFastPath:
    """The middleware; ``services`` are the app's (started by its lifespan)."""

    def __init__(self, app: ASGIApp, *, services: ServingServices) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ENDPOINTS:
            await self.app(scope, receive, send)
            return
        started = scope[STARTED] = time.perf_counter()  # the body is read before the timing
        headers = {
            k: v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k in (b"authorization", b"cache-control", b"x-yichui-cache-policy")
        }
        if "no-cache" in headers.get(b"cache-control", "").lower():
            await self.app(scope, receive, send)
            return
        principal = self.services.auth.principal(headers.get(b"authorization", ""))
        if principal is None or (b"authorization" not in headers and not self.services.auth.local):
            # no key, an unknown or revoked one, or a session cookie: the normal path decides
            await self.app(scope, receive, send)
            return
        tenant = principal.tenant
        # the body is hashed as it arrives (while the client still sends the rest), and only
        # the normal path joins it: a hit never copies it
        h = _hasher(scope["path"], tenant, headers)
        read: list[Message] = []
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                await self.app(scope, _replay(read, receive), send)
                return
            h.update(message.get("body", b""))
            if not message.get("more_body", False):
                break
        digest = h.hexdigest()
        endpoint = ENDPOINTS[scope["path"]]
        if await self._answer(digest, headers, send, endpoint, tenant):
            self.services.metrics.request_took(
                endpoint, "hit", "200", time.perf_counter() - started
            )
            return
        await self.app(scope, _replay(read, receive), self._remembering(scope, digest, send))

    async def _answer(
        self, digest: str, headers: dict[bytes, str], send: Send, endpoint: str, tenant: str
    ) -> bool:
        try:
            max_age = CachePolicy.from_headers(headers.get(b"cache-control"), None).max_age
        except RequestError:
            return False  # the normal path answers the error
        hit = self.services.inference.fast_hit(digest, max_age, endpoint, tenant)
        if hit is None:
            return False
        key, body = hit
        await send_json(send, 200, body, [(_CACHE, b"hit"), (_KEY, key.encode())])
        return True

    def _remembering(self, scope: Scope, digest: str, send: Send) -> Send:
        """``send``, noting which cache key a whole JSON answer to these bytes had."""
        inference = self.services.inference

        async def sending(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and message["status"] == 200
                and not scope.get(NO_FAST_PATH)
            ):
                found = dict(message.get("headers", ()))
                key = found.get(_KEY)
                if key and found.get(b"content-type") == b"application/json":
                    inference.remember(digest, key.decode())
            await send(message)

        return sending


def _hasher(path: str, tenant: str, headers: dict[bytes, str]) -> blake3.blake3:
    """The digest of a request, fed its identity; the body follows as it arrives (BLAKE3:
    twice SHA-256's speed here, and the body is the megabytes of a picture)."""
    h = blake3.blake3()
    for part in (
        path,
        tenant,
        headers.get(b"cache-control", ""),
        headers.get(b"x-yichui-cache-policy", ""),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h


async def send_json(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer with JSON bytes straight from ASGI (below FastAPI: no response object)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first hands out the messages we already read."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
