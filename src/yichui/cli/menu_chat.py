"""The menu's chat: through a running ``yichui serve`` when one answers, else in this process.

::

    asyncio.run(chat_session(rt, "org/model", ask))   # ``ask``: the menu's prompt

A server at ``api_host:api_port`` (``/health`` answers) is asked over HTTP, as ``yichui chat``
asks it: its warm models and its response cache serve everyone. Without one, the answer is
computed here through the runtime's serving services (the model loads in this process, once
per chat; the answers still go through the shared response cache). Greedy answers (temperature
0), so asking the same question again is a cache hit, and the line after each answer says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from yichui.cli.chat import delta_text, refused
from yichui.cli.output import console
from yichui.errors import ClientError, YichuiError

if TYPE_CHECKING:
    from yichui.runtime import Runtime
    from yichui.runtime.serving import ServingServices

MAX_TOKENS = 256
"""Longest answer of one turn, in tokens (``yichui chat``'s default too)."""

Write = Callable[[str], None]
Asker = Callable[[str, list[dict[str, str]], Write], Awaitable[str]]
"""(model, messages, write each piece) -> the answer's cache status (hit, miss, …)."""
Prompt = Callable[[str], Awaitable[str]]
"""Asks the user for the next message (raises to leave the chat)."""

LEAVE = ("", "/exit", "/quit", "/back")


async def chat_session(rt: Runtime, model: str, prompt: Prompt) -> None:
    """Chat with ``model`` until the user leaves (an empty line, ``/exit``, or Ctrl-C)."""
    base = f"http://{rt.settings.api_host}:{rt.settings.api_port}"
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5)) as client:
        if await _server_answers(client, base):
            console.print(f"[dim]asking the server at {base}[/dim]", highlight=False)
            await _loop(model, _server_asker(client, base), prompt)
            return
    console.print(
        f"[dim]no server at {base}: answering in this process (the model loads here; "
        "`yichui serve` keeps it warm for everyone)[/dim]",
        highlight=False,
    )
    async with rt.serving() as services:
        await _loop(model, _local_asker(services), prompt)


async def _loop(model: str, ask: Asker, prompt: Prompt) -> None:
    console.print(
        f"chatting with [bold]{model}[/bold]; an empty line or /exit goes back, /reset forgets",
        highlight=False,
    )
    history: list[dict[str, str]] = []
    while True:
        text = (await prompt("you:")).strip()
        if text in LEAVE:
            return
        if text == "/reset":
            history.clear()
            console.print("[dim](conversation forgotten)[/dim]")
            continue
        messages = [*history, {"role": "user", "content": text}]
        said = await _turn(model, ask, messages)
        if said is not None:
            history = [*messages, {"role": "assistant", "content": said}]


async def _turn(model: str, ask: Asker, messages: list[dict[str, str]]) -> str | None:
    """One answer, streamed, then its cache status and latency -> its text (None: it failed)."""
    pieces: list[str] = []
    waiting = console.status("thinking…")  # until the first piece (the model may be loading)
    waiting.start()

    def write(piece: str) -> None:
        if not pieces:
            waiting.stop()
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    started = time.monotonic()
    try:
        cache = await ask(model, messages, write)
    except YichuiError as exc:  # say it, and let the user try again or leave
        waiting.stop()
        sys.stdout.write("\n" if pieces else "")
        console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        if exc.hint:
            console.print(f"hint: {exc.hint}", highlight=False)
        return None
    finally:
        waiting.stop()
    sys.stdout.write("\n")
    console.print(
        f"[dim](cache: {cache} · {time.monotonic() - started:.2f} s)[/dim]", highlight=False
    )
    return "".join(pieces)


# -- through a server ---------------------------------------------------------------------------


async def _server_answers(client: httpx.AsyncClient, base: str) -> bool:
    """Whether a yichui server answers at ``base`` (its ``/health``, within a second)."""
    try:
        resp = await client.get(f"{base}/health", timeout=1.0)
        return resp.status_code == 200 and resp.json().get("status") == "ok"
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def _server_asker(client: httpx.AsyncClient, base: str) -> Asker:
    headers = {}
    if key := os.environ.get("YICHUI_API_KEY"):  # as `yichui chat --api-key` reads it
        headers["authorization"] = f"Bearer {key}"

    async def ask(model: str, messages: list[dict[str, str]], write: Write) -> str:
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
        }
        try:
            async with client.stream(
                "POST", f"{base}/v1/chat/completions", json=body, headers=headers
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise refused(resp)
                async for line in resp.aiter_lines():
                    text = delta_text(line)
                    if text:
                        write(text)
                return str(resp.headers.get("x-yichui-cache", "?"))
        except httpx.HTTPError as exc:
            raise ClientError(f"the server at {base} failed: {exc}") from None

    return ask


# -- in this process ----------------------------------------------------------------------------


def _local_asker(services: ServingServices) -> Asker:
    # the API's own request types and body: a stored answer is one the API can replay
    from yichui.access import LOCAL_TENANT
    from yichui.api.openai.serving import build_body
    from yichui.inference.engine import EngineRequest, EngineResult, GenerationParams, Message
    from yichui.inference.service import CachePolicy

    async def ask(model: str, messages: list[dict[str, str]], write: Write) -> str:
        request = EngineRequest(
            model=model,
            kind="chat",
            params=GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0),
            messages=tuple(Message(m["role"], m["content"]) for m in messages),
        )

        def render(result: EngineResult) -> bytes:
            return orjson.dumps(build_body(request, result))

        answer = await services.inference.answer(
            request,
            tenant=LOCAL_TENANT,
            policy=CachePolicy(),
            stream=True,
            render=render,
            endpoint="chat",
        )
        if answer.body is not None:  # a hit, or an answer computed for someone else
            stored: dict[str, Any] = orjson.loads(answer.body)
            write(stored["choices"][0]["message"]["content"] or "")
        else:
            assert answer.chunks is not None
            async with contextlib.aclosing(answer.chunks) as chunks:
                async for chunk in chunks:
                    if chunk.index == 0 and chunk.text:
                        write(chunk.text)
        return answer.status.value

    return ask
