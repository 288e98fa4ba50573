"""Every error leaves the API in OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages.0",
               "code": "model_not_found"}}

Translated once, here, from yichui's exception tree, FastAPI's validation errors and HTTP
errors. A 5xx never carries a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from yichui.errors import ModelNotFoundError, YichuiError

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


class APIError(Exception):
    """An error with its HTTP status, raised anywhere below the routes."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


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
    """Status and OpenAI error body for any exception (used by handlers and streams)."""
    if isinstance(exc, APIError):
        return exc.status, error_body(exc.status, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, ModelNotFoundError):
        return 404, error_body(
            404, f"The model '{exc.name}' does not exist", param="model", code="model_not_found"
        )
    status = getattr(exc, "status", None)
    if isinstance(exc, YichuiError) and isinstance(status, int):  # upstream errors
        body = getattr(exc, "body", None)
        if isinstance(body, dict) and "error" in body and 400 <= status < 500:
            return status, body
        return status, error_body(status, exc.message)
    if isinstance(exc, ValueError):  # bad input found below the schema (images, …)
        return 400, error_body(400, str(exc))
    log.exception("unexpected error", exc_info=exc)
    return 500, error_body(500, f"internal error ({type(exc).__name__})")


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

    # expected errors by class: answered here, not re-raised the way the catch-all is
    for cls in (APIError, YichuiError, ValueError):
        app.add_exception_handler(cls, _translated)
    app.add_exception_handler(Exception, _translated)
