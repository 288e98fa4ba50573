"""A test double of an OpenAI-compatible server (what vLLM, SGLang or Ollama's ``/v1`` answer),
run by uvicorn in a background thread on 127.0.0.1.

It answers ``/v1/chat/completions`` and ``/v1/completions`` deterministically: the words of the
last user message (or of the prompt) in reverse order; choice ``i > 0`` gets ``#i`` appended.
``max_tokens`` counts words (cut -> ``finish_reason="length"``), ``stop`` cuts the text at the
first stop string, ``n`` gives that many choices, ``stream`` sends one SSE chunk per word, a
finish chunk per choice, a usage chunk (``stream_options.include_usage``) and ``[DONE]``.
``prompt_tokens`` is the number of words in every message (or the prompt).

Switches (set them on the object; :meth:`FakeUpstream.reset` puts them back):

* ``fail_status`` / ``fail_body``: answer every request with that status and body (a dict is
  sent as JSON, a string as text);
* ``delay``: seconds to wait before answering; ``chunk_delay``: seconds between stream chunks;
* ``cut_stream``: end the stream after the first word, without ``[DONE]`` (``cut_after``: after
  that many words); ``holds``: ``{n: Event}`` pauses each stream after ``n`` words until the
  event is set;
* ``garbage``: answer 200 with a body that is not JSON;
* ``api_key``: require ``Authorization: Bearer <api_key>`` (401 with an OpenAI error body that
  quotes the key it got otherwise, as OpenAI itself does);
* ``requests``: every request received, as :class:`Received` (path, headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse


@dataclass
class Received:
    """One request the fake got."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeUpstream:
    """The server's switches and what it received; :func:`fake_upstream` runs it."""

    host: str = "127.0.0.1"
    port: int = 0
    fail_status: int | None = None
    fail_body: dict[str, Any] | str | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    cut_stream: bool = False
    cut_after: int = 0
    holds: dict[int, threading.Event] = field(default_factory=dict)
    garbage: bool = False
    api_key: str | None = None
    requests: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The base URL, up to and including ``/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def reset(self) -> None:
        """Every switch off, nothing received."""
        self.fail_status = None
        self.fail_body = None
        self.delay = 0.0
        self.chunk_delay = 0.0
        self.cut_stream = False
        self.cut_after = 0
        self.holds = {}
        self.garbage = False
        self.api_key = None
        self.requests.clear()

    @property
    def last(self) -> Received:
        """The last request received."""
        return self.requests[-1]


def answer_texts(body: dict[str, Any], *, chat: bool) -> list[tuple[str, str, int]]:
    """``(text, finish_reason, words)`` of every choice the fake gives for ``body``."""
    source = _last_user_text(body["messages"]) if chat else str(body.get("prompt", ""))
    words = source.split()[::-1]
    max_tokens = int(body.get("max_tokens") or 16)
    stops = body.get("stop") or []
    if isinstance(stops, str):
        stops = [stops]
    out = []
    for i in range(int(body.get("n") or 1)):
        choice_words = words + ([f"#{i}"] if i else [])
        finish = "stop"
        if len(choice_words) > max_tokens:
            choice_words, finish = choice_words[:max_tokens], "length"
        text = " ".join(choice_words)
        for stop in stops:
            if stop and stop in text:
                text, finish = text[: text.index(stop)], "stop"
        out.append((text, finish, len(text.split())))
    return out


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _prompt_tokens(body: dict[str, Any], *, chat: bool) -> int:
    if chat:
        return sum(len(_text_of(m.get("content")).split()) for m in body["messages"])
    return len(str(body.get("prompt", "")).split())


def _pieces(text: str) -> list[str]:
    """``text`` as stream deltas: the first word, then `` word`` for each next one."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]] if text else []


def build_app(state: FakeUpstream) -> FastAPI:
    """The FastAPI app of the fake, reading its switches from ``state``."""
    app = FastAPI()

    async def wait(request: Request, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if await request.is_disconnected():
                return
            await asyncio.sleep(min(0.02, max(0.0, end - time.monotonic())))

    async def handle(request: Request, *, chat: bool) -> Response:
        body = await request.json()
        state.requests.append(Received(request.url.path, dict(request.headers), body))
        if state.api_key is not None:
            got = request.headers.get("authorization", "")
            if got != f"Bearer {state.api_key}":
                given = got.removeprefix("Bearer ")
                return JSONResponse(
                    {
                        "error": {
                            "message": f"Incorrect API key provided: {given}",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                    status_code=401,
                )
        if state.delay:
            await wait(request, state.delay)
        if state.fail_status is not None:
            if isinstance(state.fail_body, dict):
                return JSONResponse(state.fail_body, status_code=state.fail_status)
            return PlainTextResponse(state.fail_body or "", status_code=state.fail_status)
        if state.garbage:
            return PlainTextResponse("<html>not json</html>", media_type="application/json")
        answers = answer_texts(body, chat=chat)
        prompt_tokens = _prompt_tokens(body, chat=chat)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(a[2] for a in answers),
            "total_tokens": prompt_tokens + sum(a[2] for a in answers),
        }
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": i, "text": text}
                for i, (text, _, _) in enumerate(answers)
            ]
            for choice, (_, finish, _) in zip(choices, answers, strict=True):
                choice["finish_reason"] = finish
            return JSONResponse(
                {
                    "id": "cmpl-fake",
                    "object": obj,
                    "created": 0,
                    "model": body["model"],
                    "choices": choices,
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            def event(choices: list[dict[str, Any]], **extra: Any) -> str:
                chunk = {
                    "id": "cmpl-fake",
                    "object": obj + ".chunk" if chat else obj,
                    "created": 0,
                    "model": body["model"],
                    "choices": choices,
                    **extra,
                }
                return f"data: {json.dumps(chunk)}\n\n"

            def delta(i: int, text: str, finish: str | None = None) -> dict[str, Any]:
                if chat:
                    return {"index": i, "delta": {"content": text}, "finish_reason": finish}
                return {"index": i, "text": text, "finish_reason": finish}

            if chat:
                yield event(
                    [
                        {"index": i, "delta": {"role": "assistant"}, "finish_reason": None}
                        for i in range(len(answers))
                    ]
                )
            sent = 0
            for i, (text, finish, _) in enumerate(answers):
                for piece in _pieces(text):
                    yield event([delta(i, piece)])
                    sent += 1
                    if state.cut_stream or sent == state.cut_after:
                        return
                    hold = state.holds.get(sent)
                    if hold is not None:  # until the test lets it go on (60 s at most)
                        held = time.monotonic() + 60
                        while not hold.is_set() and time.monotonic() < held:
                            await asyncio.sleep(0.01)
                    if state.chunk_delay:
                        await asyncio.sleep(state.chunk_delay)
                yield event([delta(i, "", finish)])
            if include_usage:
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    return app


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    """Run a :class:`FakeUpstream` on a free port of 127.0.0.1 until the block ends."""
    state = FakeUpstream()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((state.host, 0))
    state.port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        build_app(state),
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        loop="asyncio",
        http="h11",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.01)
        yield state
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
