"""Printing for people (rich tables) and for scripts (``--json``)."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import orjson
import typer
from rich.console import Console

console = Console()
# soft_wrap: an error stays one line however narrow the terminal
err_console = Console(stderr=True, soft_wrap=True)

JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def warn_degraded(reason: str | None) -> None:
    if reason:
        warn(f"Redis unavailable ({reason}); answered from disk (degraded)")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def human_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
