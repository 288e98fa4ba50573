"""Every error leaves the API in OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages.0",
               "code": "model_not_found"}}

Translated once, here, from yichui's exception tree (each class carries its ``status``, ``code``
and ``param``: see :mod:`yichui.errors`), FastAPI's validation errors (``param`` the field as
the client wrote it, never a union branch pydantic tried) and HTTP errors. An exception that
is not ours is a bug: a 500 with a generic message, logged with its traceback. A 5xx never
carries a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from yichui.errors import YichuiError, error_body

log = logging.getLogger("yichui.api")


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kwargs), status_code=status)


_SOURCES = ("body", "query", "header", "path", "cookie")
_SHOULD = "Input should be "


def _located(error: Mapping[str, Any], body: Any) -> tuple[list[Any], int | None]:
    """Where ``error`` is, as the client wrote the request, and the index in its ``loc`` of the
    first union label dropped (None: none).

    For a union pydantic puts a label in ``loc`` for each branch it tried (``str``,
    ``list[...]``, a tagged union's tag): ``content.str`` names no field of the request. Walking
    the body alongside tells them apart: a label is a step that leads nowhere in the body."""
    loc = list(error.get("loc", ()))
    if not loc or loc[0] not in _SOURCES:
        return loc, None
    if loc[0] != "body":
        return loc[1:], None
    out: list[Any] = []
    cut: int | None = None
    node = body
    untagged = True  # a node has one tag at most: image_url, then the field image_url
    for i, step in enumerate(loc[1:], start=1):
        last = i == len(loc) - 1
        following = None if last else loc[i + 1]
        if isinstance(node, dict) and isinstance(step, str):
            # a tag equals the discriminator's value, and may also be a key (image_url)
            tag = untagged and any(v == step for v in node.values() if isinstance(v, str))
            missing = i + 1 == len(loc) - 1 and error.get("type") == "missing"
            if tag and not last and (following in node or missing):
                cut = i if cut is None else cut
                untagged = False
                continue
            if step in node:
                out.append(step)
                node, untagged = node[step], True
                continue
            if last and error.get("type") == "missing":
                out.append(step)
                continue
        elif isinstance(node, list) and type(step) is int and 0 <= step < len(node):
            out.append(step)
            node, untagged = node[step], True
            continue
        cut = i if cut is None else cut
    return out, cut


def _message(error: Mapping[str, Any], where: list[Any]) -> tuple[list[Any], str]:
    """``error``'s message; a tagged union's missing or unknown tag is the discriminator's."""
    ctx = error.get("ctx") or {}
    quoted = str(ctx.get("discriminator", ""))  # a field name, quoted: 'type'
    field = quoted[1:-1] if quoted[:1] == quoted[-1:] == "'" else ""
    kind = error.get("type")
    if kind in ("union_tag_invalid", "union_tag_not_found") and field.isidentifier():
        if kind == "union_tag_not_found":
            return [*where, field], "Field required"
        head, sep, tail = str(ctx.get("expected_tags", "")).rpartition(", ")
        expected = f"{head} or {tail}" if sep else tail
        return [*where, field], f"unknown {field} {ctx.get('tag')!r}: expected {expected}"
    return where, str(error.get("msg", "invalid request")).removeprefix("Value error, ")


def _described(errors: Sequence[Mapping[str, Any]], body: Any) -> tuple[str | None, str]:
    """The ``param`` and message of a validation failure: its first error, or, when that one
    is in a union branch, the branch the body went furthest in (the one it meant); branches
    that fail at the same place are merged (``a valid string or a valid list``)."""
    located = [_located(e, body) for e in errors]
    (where, cut), first = located[0], errors[0]
    chosen = [(where, first)]
    if cut is not None:
        root = list(first.get("loc", ()))[:cut]
        siblings = [
            (w, e)
            for (w, c), e in zip(located, errors, strict=True)
            if c == cut and list(e.get("loc", ()))[:cut] == root
        ]
        deepest = max(len(w) for w, _ in siblings)
        chosen = [(w, e) for w, e in siblings if len(w) == deepest]
        chosen = [(w, e) for w, e in chosen if w == chosen[0][0]]
    described = [_message(e, w) for w, e in chosen]
    where = described[0][0]
    messages = list(dict.fromkeys(m for _, m in described))
    if len(messages) > 1 and all(m.startswith(_SHOULD) for m in messages):
        msg = _SHOULD + " or ".join(m.removeprefix(_SHOULD) for m in messages)
    else:
        msg = "; ".join(messages)
    return ".".join(str(p) for p in where) or None, msg


def translate(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Status and OpenAI error body for any exception (used by handlers and streams): ours
    carry both on their class; anything else is a bug, answered 500 without its text."""
    if isinstance(exc, YichuiError):
        # a body given as it is (an upstream's own 4xx, the error a coalesced leader answered)
        body = exc.body or error_body(exc.status, exc.api_message, param=exc.param, code=exc.code)
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return exc.status, body
    log.error("unexpected error", exc_info=exc)
    return 500, error_body(500, "internal error")


def retry_after(exc: BaseException) -> dict[str, str]:
    """``Retry-After`` for an error that says when to come back (a busy engine)."""
    seconds = getattr(exc, "retry_after", None)
    return {"retry-after": str(int(seconds))} if isinstance(seconds, int) else {}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors() or [{}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"invalid JSON body: {first.get('ctx', {}).get('error')}")
        param, msg = _described(errors, exc.body)
        return error_response(400, f"{param}: {msg}" if param else msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    async def _translated(request: Request, exc: Exception) -> JSONResponse:
        status, body = translate(exc)
        return JSONResponse(body, status_code=status, headers=retry_after(exc))

    # ours are answered here; the catch-all (a bug) is answered too, then re-raised by
    # Starlette's server-error middleware so that it is logged with its traceback
    app.add_exception_handler(YichuiError, _translated)
    app.add_exception_handler(Exception, _translated)
