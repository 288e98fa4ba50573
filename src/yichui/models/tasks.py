"""The models capability's task type: ``download`` (``yichui models pull``, queued).

Registered by the composition root through :func:`task_types`; the handler runs in a worker,
which imports the hub SDKs only then.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import field_validator

from yichui.config import Settings
from yichui.models.names import validate_name
from yichui.models.registry import ModelRegistry
from yichui.models.sources import Sources
from yichui.tasks.context import TaskContext
from yichui.tasks.types import TaskArgs, TaskType


class ModelServices(Protocol):
    """What the model task handlers use of the worker's services."""

    @property
    def settings(self) -> Settings: ...

    @property
    def registry(self) -> ModelRegistry: ...

    @property
    def sources(self) -> Sources: ...


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


def task_types() -> list[TaskType]:
    return [
        TaskType(
            "download",
            DownloadArgs,
            "yichui.models.tasks:download",
            "pull a model from a hub or the mirror",
        )
    ]


def download(ctx: TaskContext[ModelServices], args: DownloadArgs) -> dict[str, Any]:
    """Pull a model (see ``yichui models pull``); progress in bytes."""
    from yichui.models.catalog import pull_target
    from yichui.models.pull import pull_model
    from yichui.models.sources.base import PullSpec

    services = ctx.services
    source = services.sources.get(args.source)
    # the CLI and the API map a catalog name before queueing; a task queued otherwise too
    target = pull_target(args.name, source.name, args.repo)
    name = target.name
    spec = PullSpec(
        repo=target.repo,
        revision=args.revision,
        include=args.include,
        exclude=args.exclude,
    )
    ctx.log(f"pulling {spec.repo} from {source.name} as {name}")

    def progress(done: int, total: int | None) -> None:
        ctx.report(done, total, unit="bytes")

    result = pull_model(services.registry, source, name, spec, force=args.force, progress=progress)
    status = result.status
    ctx.log(f"{name}: {result.action}")
    return {
        "name": name,
        "action": result.action,
        "path": status.path if status else None,
        "size": status.size if status else None,
        "files": status.files if status else None,
    }
