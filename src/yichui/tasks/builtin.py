"""Handlers of the built-in task types (imported by workers only)."""

from __future__ import annotations

import os
from typing import Any

from yichui.errors import TaskFailedError
from yichui.tasks.context import TaskContext
from yichui.tasks.types import NoopArgs, SelftestArgs


def selftest(ctx: TaskContext, args: SelftestArgs) -> dict[str, Any]:
    """Count to ``args.steps``, one report per step; resumes from its checkpoint."""
    start = int(ctx.checkpoint or 0)
    if start:
        ctx.log(f"attempt {ctx.attempt}: resuming at step {start + 1} of {args.steps}")
    else:
        ctx.log(f"attempt {ctx.attempt}: counting {args.steps} steps of {args.step_seconds}s")
    for step in range(start + 1, args.steps + 1):
        if args.crash_at == step and ctx.attempt <= args.crash_attempts:
            ctx.flush()
            os._exit(70)  # the fire drill: the worker dies without a word
        if args.fail_at == step and ctx.attempt <= args.fail_attempts:
            raise TaskFailedError(
                f"selftest failed at step {step} (attempt {ctx.attempt})",
                retryable=not args.fail_permanent,
            )
        ctx.sleep(args.step_seconds)
        ctx.log(f"step {step}/{args.steps}")
        ctx.save_checkpoint(step, now=False)  # written with the report below
        ctx.report(step, args.steps, value=float(step))
    return {"steps": args.steps, "attempt": ctx.attempt, "resumed_from": start}


def noop(ctx: TaskContext, args: NoopArgs) -> dict[str, Any]:
    """Nothing at all: what the queue itself costs (benchmarks, health checks)."""
    return {"echo": args.echo} if args.echo is not None else {}
