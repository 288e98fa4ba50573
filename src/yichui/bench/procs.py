"""The processes an arm needs, each on a loopback free port, all stopped by one ExitStack
(also on Ctrl-C or an error): a private redis-server, ``yichui bench upstream``, ``yichui
serve``. Never the Redis on 6379, never the user's data directory::

    with contextlib.ExitStack() as stack:
        redis_url = start_redis(stack, workdir / "redis")
        up = start_upstream(stack, workdir, base=0.3, slope=0.0104)
        server = start_serve(stack, workdir, redis_url=redis_url, env={...})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from yichui.supervise import Child, spawn

LOOPBACK = "127.0.0.1"
UPSTREAM_MODEL = "bench"
"""The model name the upstream arms ask for, routed to ``yichui bench upstream``."""


class StartError(RuntimeError):
    """A process the load test needs did not start (with the tail of its log)."""


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port: int = s.getsockname()[1]
        if port != 6379:  # never the shared Redis's port
            return port


def _spawn(
    stack: contextlib.ExitStack,
    args: list[str],
    log: Path,
    env: dict[str, str] | None,
    *,
    death_signal: int = signal.SIGTERM,
) -> Child:
    """Start ``args`` in a session of its own, tied to this process (it gets ``death_signal``
    should we die, even by SIGKILL); stopped when ``stack`` closes (SIGTERM, SIGKILL after
    10 s)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = spawn(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, death_signal=death_signal
        )
    stack.callback(child.stop, 10.0)
    return child


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(proc: Child, url: str, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"{what} exited at start:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise StartError(f"{what} did not answer within {timeout:.0f} s:\n{_tail(log)}")


def start_redis(stack: contextlib.ExitStack, workdir: Path) -> str:
    """A throwaway redis-server (no persistence) -> its URL."""
    import redis

    from yichui.state.embedded import find_redis_server

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [
        find_redis_server(),
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        str(workdir / "redis.log"),
    ]
    proc = _spawn(stack, args, workdir / "redis.out", None, death_signal=signal.SIGKILL)
    probe = redis.Redis(host=LOOPBACK, port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise StartError(f"redis-server on port {port} did not start") from None
            time.sleep(0.02)
    probe.close()
    return f"redis://{LOOPBACK}:{port}/0"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env.update(HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), PYTHONUNBUFFERED="1")
    return env


@dataclass
class Upstream:
    """The handle on a running ``yichui bench upstream``."""

    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = httpx.get(f"http://{LOOPBACK}:{self.port}/_bench/stats").json()
        return out

    def configure(self, **timing: float) -> None:
        httpx.post(f"http://{LOOPBACK}:{self.port}/_bench/config", json=timing).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"http://{LOOPBACK}:{self.port}/_bench/reset").raise_for_status()


def start_upstream(
    stack: contextlib.ExitStack, workdir: Path, *, base: float, slope: float
) -> Upstream:
    port = free_port()
    log = workdir / "upstream.log"
    args = [
        sys.executable,
        "-m",
        "yichui.cli.main",
        "bench",
        "upstream",
        "--port",
        str(port),
        "--base",
        str(base),
        "--slope",
        str(slope),
    ]
    proc = _spawn(stack, args, log, _clean_env())
    _wait(proc, f"http://{LOOPBACK}:{port}/_bench/stats", log, "yichui bench upstream", 30)
    return Upstream(port)


@dataclass
class Tenants:
    """API keys made up for the run: key ``i`` is tenant ``bench-i``."""

    keys: list[str]

    @classmethod
    def make(cls, n: int) -> Tenants:
        return cls([f"yk-bench-{i}-{secrets.token_hex(12)}" for i in range(n)])

    def setting(self) -> str:
        """``api_keys``: SHA-256 of each key -> its tenant."""
        table = {
            hashlib.sha256(k.encode()).hexdigest(): f"bench-{i}" for i, k in enumerate(self.keys)
        }
        return json.dumps(table)


def start_serve(
    stack: contextlib.ExitStack,
    workdir: Path,
    *,
    redis_url: str,
    settings: dict[str, str],
    timeout: float = 120.0,
) -> str:
    """``yichui serve`` on a free port with ``settings`` (``YICHUI_*`` names without the
    prefix) -> its base URL."""
    port = free_port()
    env = _clean_env()
    env.update(YICHUI_REDIS_URL=redis_url, YICHUI_DATA_DIR=str(workdir / "data"))
    env.update({f"YICHUI_{k.upper()}": v for k, v in settings.items()})
    log = workdir / f"serve-{port}.log"
    args = [
        sys.executable,
        "-m",
        "yichui.cli.main",
        "serve",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = _spawn(stack, args, log, env)
    url = f"http://{LOOPBACK}:{port}"
    _wait(proc, f"{url}/health", log, "yichui serve", timeout)
    return url
