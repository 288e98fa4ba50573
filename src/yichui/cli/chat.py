"""``yichui chat MODEL PROMPT``: ask a running ``yichui serve``, streaming the answer."""

from __future__ import annotations

import sys
from typing import Annotated

import httpx
import orjson
import typer

from yichui.cli.output import err_console
from yichui.errors import ClientError
from yichui.runtime import Runtime


def chat(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name (see `yichui models list`).")],
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[
        float, typer.Option(min=0, max=2, help="0: greedy (cacheable); more: sampled.")
    ] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampled answers.")] = None,
    no_cache: Annotated[bool, typer.Option(help="Recompute, then refresh the cache.")] = False,
    url: Annotated[
        str | None, typer.Option(help="Server base URL (default http://api_host:api_port).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="YICHUI_API_KEY", help="API key, if the server wants one.")
    ] = None,
) -> None:
    """Stream an answer; stderr says whether it came from the response cache."""
    rt: Runtime = ctx.obj
    base = (url or f"http://{rt.settings.api_host}:{rt.settings.api_port}").rstrip("/")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    body: dict[str, object] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    if seed is not None:
        body["seed"] = seed
    headers = {"cache-control": "no-cache"} if no_cache else {}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    try:
        with httpx.stream(
            "POST",
            f"{base}/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=httpx.Timeout(600, connect=5),
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                raise refused(resp)
            cache = resp.headers.get("x-yichui-cache", "?")
            for line in resp.iter_lines():
                text = delta_text(line)
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
    except httpx.ConnectError:
        raise ClientError(
            f"no yichui server at {base}", hint="start one with `yichui serve`"
        ) from None
    sys.stdout.write("\n")
    err_console.print(f"(cache: {cache})", highlight=False)


def refused(resp: httpx.Response) -> ClientError:
    """The error a server's non-200 answer (read already) carries, as one line."""
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    return ClientError(f"{resp.status_code}: {message}")


def delta_text(line: str) -> str | None:
    """The text a line of a streamed chat answer adds (choice 0), None for any other line;
    ClientError for an error event."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    event = orjson.loads(line[6:])
    if "error" in event:
        raise ClientError(event["error"].get("message", "the stream failed"))
    for choice in event.get("choices", []):
        if choice.get("index", 0) == 0:
            return str(choice.get("delta", {}).get("content") or "")
    return None
