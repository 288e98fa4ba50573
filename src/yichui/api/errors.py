"""Every error leaves the API in OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages.0",
               "code": "model_not_found"}}

Translated once, here, from yichui's exception tree (each class carries its ``status``, ``code``
and ``param``: see :mod:`yichui.errors`), FastAPI's validation errors and HTTP errors. An
exception that is not ours is a bug: a 500 with a generic message, logged with its traceback.
A 5xx never carries a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from yichui.errors import YichuiError

log = logging.getLogger("yichui.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kwargs), status_code=status)


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or None


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


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"invalid JSON body: {first.get('ctx', {}).get('error')}")
        param = _param(first.get("loc", ()))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_response(400, f"{param}: {msg}" if param else msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    async def _translated(request: Request, exc: Exception) -> JSONResponse:
        status, body = translate(exc)
        return JSONResponse(body, status_code=status)

    # ours are answered here; the catch-all (a bug) is answered too, then re-raised by
    # Starlette's server-error middleware so that it is logged with its traceback
    app.add_exception_handler(YichuiError, _translated)
    app.add_exception_handler(Exception, _translated)
