"""The OpenAI wire format of an upstream's answers: how its replies, its errors and its
server-sent event stream become yichui's results (:class:`~yichui.inference.engine.EngineResult`,
:class:`~yichui.inference.engine.EngineChunk`) and errors (:class:`~yichui.errors.UpstreamError`).

The engine (``upstream.py``) sends the request and hands what comes back to this module:

- :func:`translated`: transport failures and timeouts, as 502 and 504;
- :func:`status_error`: an answer of status 400 or more, its body in any of the shapes
  OpenAI-compatible servers use (OpenAI's, the flat one of older vLLM and ``swift deploy``,
  Ollama's, FastAPI's 422), as an OpenAI error passed through or a 502 with a hint;
- :func:`parse_json` and :func:`parse_result`: a whole reply;
- :class:`StreamParser`: the lines of a stream, up to ``[DONE]``.

The route's API key, and any password in its URL, never appear in a message or a body passed
through.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx
import orjson

from yichui.config import UpstreamRoute
from yichui.errors import UpstreamError
from yichui.inference.engine import Choice, EngineChunk, EngineResult, Usage

_ERROR_TEXT_MAX = 500
"""Characters of an upstream's non-JSON error text quoted in a message."""


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
def translated(where: str, route: UpstreamRoute) -> Iterator[None]:
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


def status_error(status: int, raw: bytes, where: str, route: UpstreamRoute) -> UpstreamError:
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


def parse_json(raw: bytes, where: str, route: UpstreamRoute) -> dict[str, Any]:
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


def parse_result(data: dict[str, Any], kind: str, where: str, route: UpstreamRoute) -> EngineResult:
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


class StreamParser:
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
