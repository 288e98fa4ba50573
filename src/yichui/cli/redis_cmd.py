"""``yichui redis …``: the Redis yichui uses (the embedded one, or a configured URL)."""

from __future__ import annotations

from typing import Any

import redis
import typer
from rich.table import Table

from yichui.cli.output import JsonOpt, console, print_json
from yichui.errors import ConfigError, RedisUnavailableError
from yichui.runtime import Runtime
from yichui.state.connection import parse_redis_url
from yichui.state.embedded import EmbeddedInfo, EmbeddedRedis

app = typer.Typer(help="Inspect, start and stop yichui's Redis.", no_args_is_help=True)


def _embedded(rt: Runtime) -> EmbeddedRedis:
    if rt.settings.redis_url:
        raise ConfigError(
            "a Redis URL is configured, so there is no embedded Redis to manage",
            hint="unset YICHUI_REDIS_URL to use the embedded one",
        )
    return EmbeddedRedis(rt.settings.data_dir)


def _describe(info: EmbeddedInfo, embedded: EmbeddedRedis) -> dict[str, Any]:
    return {
        "mode": "embedded",
        "running": True,
        "url": info.display_url,
        "host": info.host,
        "port": info.port,
        "pid": info.pid,
        "version": info.version,
        "binary": info.binary,
        "dir": str(embedded.dir),
        "started_at": info.started_at,
    }


def _show(data: dict[str, Any], json: bool) -> None:
    if json:
        print_json(data)
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        table.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(table)


@app.command()
def status(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """Where Redis is, whether it answers, and its version (exit 1 when down)."""
    rt: Runtime = ctx.obj
    if rt.settings.redis_url:
        target = parse_redis_url(rt.settings.redis_url)
        data: dict[str, Any] = {"mode": target.kind, "url": target.display}
        try:
            client, _ = rt.redis()
            info = client.info("server")
            data.update(running=True, version=info.get("redis_version"))
        except RedisUnavailableError as exc:
            data.update(running=False, error=exc.reason)
        except redis.RedisError as exc:
            data.update(running=False, error=str(exc).splitlines()[0] if str(exc) else repr(exc))
    else:
        embedded = EmbeddedRedis(rt.settings.data_dir)
        found = embedded.status()
        data = (
            _describe(found, embedded)
            if found
            else {"mode": "embedded", "running": False, "dir": str(embedded.dir)}
        )
    _show(data, json)
    if not data["running"]:
        raise typer.Exit(1)


@app.command()
def start(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """Start the embedded Redis (or show the one already running)."""
    embedded = _embedded(ctx.obj)
    _show(_describe(embedded.ensure(), embedded), json)


@app.command()
def stop(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """Stop the embedded Redis; its data (AOF) stays for the next start."""
    stopped = _embedded(ctx.obj).stop()
    if json:
        print_json({"stopped": stopped})
    else:
        console.print("embedded Redis stopped" if stopped else "embedded Redis was not running")
