"""``yichui serve``: the OpenAI-compatible API (and, with ``--workers``, task workers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from typing import Annotated, Any

import typer

from yichui.errors import ConfigError, RedisUnavailableError
from yichui.runtime import Runtime
from yichui.runtime.supervisor import EngineSupervisor
from yichui.supervise import PARENT_GONE, Child, spawn


def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default api_host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default api_port, 8000).")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, max=64, help="Also run this many task workers as children.")
    ] = 0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    worker_metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve the task workers' /metrics from this port up, one port each (default: "
            "worker_metrics_port; unset: none).",
        ),
    ] = None,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics."""
    from yichui.api.app import create_app

    rt: Runtime = ctx.obj
    rt.role = "api"
    s = rt.settings
    # where it listens, in its settings: its fleet heartbeat tells others (`yichui ps`)
    rt.settings = s = s.model_copy(
        update={"api_host": host or s.api_host, "api_port": port or s.api_port}
    )
    # a state instance that refuses us or evicts: one line, exit 2, before anything starts;
    # one that is down is no failure (served uncached until it is back)
    with contextlib.suppress(RedisUnavailableError):
        rt.redis()
    rt.check_redis_names()  # a Sentinel master name no Sentinel monitors (the cache's too)
    base = worker_metrics_port or s.worker_metrics_port
    if base is not None and base + workers - 1 > 65535:
        raise ConfigError(f"worker metrics ports {base}..{base + workers - 1} run past 65535")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # httpx logs every upstream call at INFO: a line (and its cost) per proxied request
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # the engines of the routes' launch tables: what they need is checked before anything
    # starts (a missing ms-swift is one line, exit 2); each dies with us, however we die
    supervisor = rt.supervisor
    supervisor.check()
    config = ctx.find_root().params.get("config")
    extra = ["--config", str(config)] if config else []
    # the same settings as ours: the same --config (and the same environment); if we die, even
    # by SIGKILL or the OOM killer, each worker gets PARENT_GONE: it hands its tasks back, exits
    children = [
        spawn(
            [
                sys.executable,
                *("-m", "yichui.cli.main", *extra, "worker", "--quiet"),
                *(("--metrics-port", str(base + i)) if base is not None else ()),
            ],
            death_signal=PARENT_GONE,
        )
        for i in range(workers)
    ]
    import uvicorn

    from yichui.runtime import malloc

    malloc.tune(s.malloc_retain_bytes)

    class _Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM once it has shut down, which ends the process before any
        ``finally``: the task workers are stopped during the shutdown instead."""

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            await asyncio.to_thread(_stop, children, supervisor)

    config_ = uvicorn.Config(
        create_app(s, runtime=rt),
        host=s.api_host,
        port=s.api_port,
        log_level=log_level,
        access_log=False,
    )
    supervisor.start()
    try:
        _Server(config_).run()
    finally:
        _stop(children, supervisor)


WORKER_STOP = 15.0
"""Seconds a task worker gets to hand its tasks back and exit before its tree is SIGKILLed."""


def _stop(children: list[Child], supervisor: EngineSupervisor) -> None:
    """SIGTERM all at once (workers hand their tasks back), then SIGKILL of what is left; the
    engines in parallel, each with its own stop_timeout."""
    engines = threading.Thread(target=supervisor.stop, name="engines-stop")
    engines.start()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + WORKER_STOP
    for child in children:
        child.stop(max(0.0, deadline - time.monotonic()))
    engines.join()
