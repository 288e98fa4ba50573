"""A throwaway task type added through the task-type seam: ``tally`` adds up numbers,
reporting each one. One module plus one registration (the ``extensions`` setting)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from yichui.tasks.context import TaskContext
from yichui.tasks.types import TaskArgs, TaskType


class TallyArgs(TaskArgs):
    numbers: tuple[int, ...] = Field(min_length=1)


def task_types() -> list[TaskType]:
    return [TaskType("tally", TallyArgs, "tests.extensions.tally_task:tally", "add up numbers")]


def tally(ctx: TaskContext, args: TallyArgs) -> dict[str, Any]:
    total = 0
    for i, n in enumerate(args.numbers, 1):
        total += n
        ctx.report(i, len(args.numbers))
    ctx.log(f"total {total}")
    return {"total": total, "models_root": str(ctx.services.settings.models_path)}
