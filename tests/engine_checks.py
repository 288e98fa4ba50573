"""Helpers of the tests of launched engines (``test_engine_supervisor.py``,
``test_swift_deploy.py``): whether a process runs, waiting, a serve's engines."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.api_server import ServerProcess


def alive(pid: int | None) -> bool:
    """``pid`` runs (a zombie does not)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """``check()``'s first truthy value, polled every 50 ms; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


def engines_of(server: ServerProcess) -> dict[str, Any]:
    """The ``engines`` of serve's ``/health`` (none while it does not answer)."""
    try:
        health = httpx.get(f"{server.url}/health", timeout=2).json()
    except httpx.HTTPError:
        return {}
    engines: dict[str, Any] = health.get("engines", {})
    return engines


def serve_ready(
    server: ServerProcess, name: str, timeout: float = 30.0, *, other_than: int | None = None
) -> int:
    """Wait until serve's ``/health`` has engine ``name`` ready (in a process other than
    ``other_than``) -> its pid."""

    def check() -> int | None:
        engine = engines_of(server).get(name, {})
        pid = engine.get("pid")
        return pid if engine.get("state") == "ready" and pid != other_than else None

    return int(wait_for(check, timeout, f"{name} ready in serve"))
