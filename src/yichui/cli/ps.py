"""``yichui ps``: every API server of the deployment and the models it has loaded."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from yichui.cli.output import JsonOpt, console, human_size, print_json
from yichui.runtime import Runtime
from yichui.state.fleet import STALE_BEATS


def ps(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """API servers on every host and what each has loaded (like `ollama ps`, for the team).

    Each `yichui serve` writes a heartbeat every server_heartbeat seconds; a server silent for
    three of them is left out. The pool evicts the least recently used idle models when a load
    would pass model_memory_budget.
    """
    rt: Runtime = ctx.obj
    servers = rt.fleet.listing(stale_after=STALE_BEATS * rt.settings.server_heartbeat)
    if json:
        print_json({"servers": servers})
        return
    if not servers:
        console.print("no server is running (each `yichui serve` shows up here)")
        return
    # no rules between columns, as `ollama ps`: a row fits 80 columns
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("SERVER", "MODEL", "ENGINE", "SIZE", "DEVICE", "REQUESTS", "LAST USED / IDLE"):
        right = col in ("SIZE", "REQUESTS")
        table.add_column(
            col,
            justify="right" if right else "left",
            no_wrap=col != "MODEL",
            overflow="fold" if col == "MODEL" else "ellipsis",  # a long name folds, whole
        )
    for server in servers:
        name = escape(f"{server.get('host', '?')}:{server.get('port', '?')}")
        models: list[dict[str, Any]] = server.get("models") or []
        if not models:
            table.add_row(name, "-", "-", "-", "-", "-", "-")
        for m in models:
            table.add_row(
                name,
                escape(str(m.get("model", "?"))),
                escape(str(m.get("engine", "?"))),
                human_size(m.get("bytes")),
                escape(str(m.get("device", "?"))),
                str(m.get("requests", 0)),
                _last_used(m),
            )
    console.print(table)
    for server in servers:
        console.print(_summary(server), highlight=False)
        for engine in server.get("engines") or []:
            console.print(_engine(engine), highlight=False)
    console.print(
        "[dim]a pool evicts its least recently used idle models when a load would pass its "
        "budget (model_memory_budget)[/dim]",
        highlight=False,
    )


def _last_used(model: dict[str, Any]) -> str:
    last = model.get("last_used")
    when = datetime.fromtimestamp(float(last)).strftime("%H:%M:%S") if last else "-"
    if model.get("in_use"):
        return f"{when} / in use"
    return f"{when} / {_duration(float(model.get('idle_seconds') or 0))}"


def _summary(server: dict[str, Any]) -> str:
    """One line per server: where, what, since when, its requests and its pool's memory."""
    budget, used = server.get("budget"), server.get("used") or 0
    pool = f"pool {human_size(used)} of {human_size(budget)}" if budget else "no local pool"
    up = _duration(max(0.0, float(server.get("heartbeat", 0)) - float(server.get("started", 0))))
    return escape(
        f"{server.get('url', '?')}  pid {server.get('pid', '?')} · yichui "
        f"{server.get('version', '?')} · up {up} · {server.get('requests', 0)} requests · {pool}"
    )


def _engine(engine: dict[str, Any]) -> str:
    """One line per engine the server launched (a route's ``launch`` table)."""
    line = (
        f"  engine {engine.get('route', '?')} at {engine.get('url', '?')}: "
        f"{engine.get('state', '?')}"
    )
    if engine.get("pid"):
        line += f" · pid {engine['pid']}"
    line += f" · {engine.get('restarts', 0)} restarts"
    if engine.get("last_exit"):
        line += f" · last: {engine['last_exit']}"
    return escape(line)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
