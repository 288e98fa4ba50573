"""Task types: a name, a pydantic model of its arguments, and a handler imported late.

Arguments are validated when a task is queued, so a malformed task never reaches a worker::

    TASK_TYPES.get("selftest").parse({"steps": 3})   # SelftestArgs(steps=3, ...)

Handlers live in modules imported only by the worker that runs them (training pulls in torch;
``yichui tasks list`` must not).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from yichui.errors import InvalidTaskArgsError, UnknownTaskTypeError
from yichui.models.names import validate_name

if TYPE_CHECKING:
    from yichui.tasks.context import TaskContext

Handler = Callable[["TaskContext", Any], Mapping[str, Any] | None]

TRAIN_STOP_GRACE = 300.0
"""Seconds a training run gets, when its worker stops, to finish its step and save a checkpoint."""


class TaskArgs(BaseModel):
    """Base of every argument model: unknown fields are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SelftestArgs(TaskArgs):
    """``selftest``: count ``steps`` steps of ``step_seconds`` each, reporting every step.

    The ``fail_*`` and ``crash_at`` knobs are fire drills for operators: they check that
    retries, dead-lettering and recovery from a killed worker work on a deployment.
    """

    steps: int = Field(default=10, ge=1, le=1_000_000)
    step_seconds: float = Field(default=0.1, ge=0, le=3600)
    fail_at: int | None = Field(default=None, ge=1)
    """Raise at this step…"""
    fail_attempts: int = Field(default=1_000_000, ge=1)
    """…in this many first attempts (default: every attempt)."""
    fail_permanent: bool = False
    """Fail with a non-retryable error (the task ends ``failed`` at once)."""
    crash_at: int | None = Field(default=None, ge=1)
    """Kill the whole worker process (``os._exit``) at this step…"""
    crash_attempts: int = Field(default=1_000_000, ge=1)
    """…in this many first attempts (default: every attempt)."""


class NoopArgs(TaskArgs):
    """``noop``: returns at once (measures the queue itself)."""

    echo: str | None = None


class DownloadArgs(TaskArgs):
    """``download``: pull a model from a source, progress in bytes."""

    name: str
    source: str | None = None
    repo: str | None = None
    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    force: bool = False

    @field_validator("name", "repo")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value)


@dataclass(frozen=True)
class TaskType:
    name: str
    args: type[TaskArgs]
    handler: str
    """``module:function`` imported when a worker first runs this type."""
    description: str = ""
    max_attempts: int | None = None
    """Overrides ``task_max_attempts`` for this type."""
    stop_grace: float = 0.0
    """Seconds a run may take to wind down when its worker shuts down (a training run saves a
    checkpoint at its next step) before the task is handed back; meanwhile it keeps its lease.
    0: handed back at once."""

    def parse(self, args: Mapping[str, Any]) -> Any:
        try:
            return self.args.model_validate(dict(args))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "arguments"
            raise InvalidTaskArgsError(
                f"invalid arguments for task type {self.name!r}: {where}: {first['msg']}"
            ) from exc
        except ValueError as exc:  # our own validators (model names) raise YichuiErrors
            raise InvalidTaskArgsError(
                f"invalid arguments for task type {self.name!r}: {exc}"
            ) from exc

    def load(self) -> Handler:
        module, _, func = self.handler.partition(":")
        fn: Handler = getattr(importlib.import_module(module), func)
        return fn


@dataclass
class TaskTypes:
    """The registry of task types a deployment knows."""

    types: dict[str, TaskType] = field(default_factory=dict)

    def register(self, task_type: TaskType) -> None:
        self.types[task_type.name] = task_type

    def get(self, name: str) -> TaskType:
        try:
            return self.types[name]
        except KeyError:
            raise UnknownTaskTypeError(name, list(self.types)) from None

    def names(self) -> list[str]:
        return sorted(self.types)


def builtin_types() -> TaskTypes:
    reg = TaskTypes()
    reg.register(
        TaskType(
            "selftest",
            SelftestArgs,
            "yichui.tasks.builtin:selftest",
            "count steps, reporting each: checks the workers end to end",
        )
    )
    reg.register(
        TaskType("noop", NoopArgs, "yichui.tasks.builtin:noop", "do nothing: measures the queue")
    )
    reg.register(
        TaskType(
            "download",
            DownloadArgs,
            "yichui.tasks.builtin:download",
            "pull a model from a hub or the mirror",
        )
    )
    from yichui.training.args import EvalArgs, MergeArgs, TrainArgs

    reg.register(
        TaskType(
            "train",
            TrainArgs,
            "yichui.training.lora:train",
            "LoRA/QLoRA fine-tuning; resumes from its last checkpoint",
            stop_grace=TRAIN_STOP_GRACE,
        )
    )
    reg.register(
        TaskType("merge", MergeArgs, "yichui.training.merge:merge", "fold an adapter into its base")
    )
    reg.register(
        TaskType(
            "evaluate",
            EvalArgs,
            "yichui.training.evaluate:evaluate",
            "loss, perplexity and answer accuracy on a dataset",
        )
    )
    return reg
