"""``yichui worker``: run tasks from the queue until stopped."""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType
from typing import Annotated

import typer

from yichui.backoff import Backoff
from yichui.config import check_queue_name
from yichui.errors import ConfigError, RedisUnavailableError
from yichui.runtime import Runtime
from yichui.runtime.metrics_server import MetricsServer
from yichui.supervise import PARENT_GONE

log = logging.getLogger("yichui.worker")


def _leave(signum: int, _frame: FrameType | None) -> None:
    """Until the worker runs (it installs its own handlers) nothing is held: a SIGTERM, a
    Ctrl-C or the parent's death just leaves, at once, even from inside a connection attempt to
    a hung Redis."""
    log.info("%s before the worker started: exiting", signal.Signals(signum).name)
    sys.exit(0)  # SystemExit: not an Exception, so no retry loop on the way swallows it


def _wait_for_redis(rt: Runtime) -> None:
    """Workers outlive Redis restarts, and may start before it: wait with backoff."""
    backoff, warned = Backoff(first=0.2, cap=5.0, jitter=0.0), False
    while True:
        try:
            rt.redis()
            if warned:
                log.info("Redis is reachable; starting")
            return
        except RedisUnavailableError as exc:
            if not warned:
                log.warning("%s; waiting for it (Ctrl-C to give up)", exc)
                warned = True
            time.sleep(backoff.next())


def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-n",
            min=1,
            max=256,
            help="Tasks run at once (default: worker_concurrency).",
        ),
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Queue to read (default: task_queue).")] = None,
    burst: Annotated[
        bool, typer.Option(help="Exit once the queue is empty instead of waiting for work.")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Worker id (default: host:pid:random).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve this worker's /metrics on this port (default: worker_metrics_port; "
            "unset: none).",
        ),
    ] = None,
) -> None:
    """Run tasks from the queue. Start any number, on any hosts that share the Redis.

    SIGTERM or Ctrl-C hands running tasks back to the queue at once; a second one exits now."""
    rt: Runtime = ctx.obj
    rt.role = "worker"
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    for sig in (signal.SIGTERM, signal.SIGINT, PARENT_GONE):
        signal.signal(sig, _leave)
    _wait_for_redis(rt)
    if queue is not None:
        try:
            check_queue_name(queue)
        except ValueError as exc:
            raise ConfigError(f"invalid queue name {queue!r}: {exc}") from None
    w = rt.worker(concurrency=concurrency, queue=queue, burst=burst, name=name)
    port = metrics_port or rt.settings.worker_metrics_port
    server = MetricsServer(rt, host=rt.settings.metrics_host, port=port).start() if port else None
    try:
        stats = w.run()
    finally:
        if server is not None:
            server.stop()
    failed = stats.get("failed", 0) + stats.get("dead", 0)
    raise typer.Exit(1 if burst and failed else 0)
