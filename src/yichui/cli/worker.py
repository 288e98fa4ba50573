"""``yichui worker``: run tasks from the queue until stopped."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from yichui.config import check_queue_name
from yichui.errors import ConfigError
from yichui.runtime import Runtime


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
) -> None:
    """Run tasks from the queue. Start any number, on any hosts that share the Redis.

    SIGTERM or Ctrl-C hands running tasks back to the queue at once; a second one exits now."""
    rt: Runtime = ctx.obj
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    rt.redis()  # fail in one line now if Redis is unreachable at start
    if queue is not None:
        try:
            check_queue_name(queue)
        except ValueError as exc:
            raise ConfigError(f"invalid queue name {queue!r}: {exc}") from None
    w = rt.worker(concurrency=concurrency, queue=queue, burst=burst, name=name)
    stats = w.run()
    failed = stats.get("failed", 0) + stats.get("dead", 0)
    raise typer.Exit(1 if burst and failed else 0)
