"""Task types: a name, a pydantic model of its arguments, and a handler imported late.

Arguments are validated when a task is queued, so a malformed task never reaches a worker::

    builtin_types().get("selftest").parse({"steps": 3})   # SelftestArgs(steps=3, ...)

Each capability brings its own types (a ``task_types()`` function), which the composition root
registers: this module knows none of them. Handlers are named ``module:function`` and imported
only by the worker that runs them (training pulls in torch; ``yichui tasks list`` must not).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from yichui.errors import ConfigError, InvalidTaskArgsError, UnknownTaskTypeError

if TYPE_CHECKING:
    from yichui.tasks.context import TaskContext

Handler = Callable[["TaskContext", Any], Mapping[str, Any] | None]


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
        """Add a type; two capabilities may not claim one name."""
        known = self.types.get(task_type.name)
        if known is not None and known != task_type:
            raise ConfigError(
                f"task type {task_type.name!r} is registered twice"
                f" ({known.handler} and {task_type.handler})"
            )
        self.types[task_type.name] = task_type

    def get(self, name: str) -> TaskType:
        try:
            return self.types[name]
        except KeyError:
            raise UnknownTaskTypeError(name, list(self.types)) from None

    def names(self) -> list[str]:
        return sorted(self.types)


def task_types() -> list[TaskType]:
    """The task engine's own types: ``selftest`` and ``noop`` (each capability adds its own:
    ``download`` in :mod:`yichui.models.tasks`, ``train``/``merge``/``evaluate`` in
    :mod:`yichui.training.tasks`)."""
    return [
        TaskType(
            "selftest",
            SelftestArgs,
            "yichui.tasks.builtin:selftest",
            "count steps, reporting each: checks the workers end to end",
        ),
        TaskType("noop", NoopArgs, "yichui.tasks.builtin:noop", "do nothing: measures the queue"),
    ]


def builtin_types() -> TaskTypes:
    """A registry of :func:`task_types` only (a bare task engine, as in tests)."""
    reg = TaskTypes()
    for task_type in task_types():
        reg.register(task_type)
    return reg
