"""``yichui serve``: the OpenAI-compatible API (and, with ``--workers``, task workers)."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Annotated

import typer

from yichui.runtime import Runtime


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
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /health."""
    import uvicorn

    from yichui.api.app import create_app

    rt: Runtime = ctx.obj
    s = rt.settings
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = ctx.find_root().params.get("config")
    extra = ["--config", str(config)] if config else []
    children = [  # the same settings as ours: the same --config (and the same environment)
        subprocess.Popen([sys.executable, "-m", "yichui.cli.main", *extra, "worker", "--quiet"])
        for _ in range(workers)
    ]
    try:
        uvicorn.run(
            create_app(s, runtime=rt),
            host=host or s.api_host,
            port=port or s.api_port,
            log_level=log_level,
            access_log=False,
        )
    finally:
        for child in children:  # SIGTERM: they hand their tasks back
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
