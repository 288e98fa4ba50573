"""The seams: which modules bring task types and engines, and how the root combines them.

A capability is a module with any of: a ``task_types()`` function (-> :class:`~yichui.tasks.
types.TaskType` values), an ``engines(services)`` function (-> :class:`~yichui.inference.engine.
Engine` values; ``services`` gives ``settings`` and ``registry``), a ``sources()`` function
(-> a dict of source name -> a factory taking the settings and giving a
:class:`~yichui.models.sources.base.ModelSource`). yichui's own are listed
here; more come from the ``extensions`` setting (module names), imported when first needed::

    # my_team/echo.py, registered with YICHUI_EXTENSIONS='["my_team.echo"]'
    def task_types() -> list[TaskType]: ...
    def engines(services) -> list[Engine]: ...
    def sources() -> dict[str, Callable[[Settings], ModelSource]]: ...

Engines are asked in order: upstream routes first (configuration wins), then extensions, then
the registry's models run in this process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from yichui.config import Settings
from yichui.errors import ConfigError
from yichui.models.sources import Sources
from yichui.tasks.types import TaskTypes

if TYPE_CHECKING:
    from yichui.inference.engine import Engine

TASK_TYPES = ("yichui.tasks.types", "yichui.models.tasks", "yichui.training.tasks")
"""yichui's own modules with ``task_types()``: the engine's own, download, training."""
SOURCES = ("yichui.models.sources",)
"""yichui's own modules with ``sources()``: mirror, Hugging Face, ModelScope."""
ENGINES_FIRST = ("yichui.inference.engines.upstream",)
ENGINES_LAST = ("yichui.inference.engines.local",)
"""yichui's own modules with ``engines(services)``, around the extensions' engines."""


@dataclass(frozen=True)
class Capability:
    """One module's contributions (either may be absent)."""

    module: str
    task_types: Callable[[], Iterable[Any]] | None = None
    engines: Callable[[Any], Iterable[Any]] | None = None
    sources: Callable[[], Mapping[str, Any]] | None = None


def load(module: str, *, extension: bool = False) -> Capability:
    """Import ``module`` and read its seams; a bad extension is a clear :class:`ConfigError`."""
    try:
        mod: ModuleType = importlib.import_module(module)
    except ImportError as exc:
        if not extension:
            raise
        raise ConfigError(
            f"cannot import extension {module!r}: {exc}",
            hint="check the extensions setting and that the module is on the Python path",
        ) from exc
    seams = [getattr(mod, seam, None) for seam in ("task_types", "engines", "sources")]
    found = [seam if callable(seam) else None for seam in seams]
    if extension and not any(found):
        raise ConfigError(
            f"extension {module!r} has neither task_types(), engines(services) nor sources()",
            hint="see docs/architecture.md: where a new engine, source or task type goes",
        )
    return Capability(module, *found)


def task_types(extensions: Sequence[str]) -> TaskTypes:
    """Every task type: yichui's own, then the extensions' (one name, one type)."""
    registry = TaskTypes()
    caps = [load(m) for m in TASK_TYPES] + [load(m, extension=True) for m in extensions]
    for cap in caps:
        if cap.task_types is not None:
            for task_type in cap.task_types():
                registry.register(task_type)
    return registry


def sources(extensions: Sequence[str], settings: Settings) -> Sources:
    """Every model source by name: yichui's own, then the extensions' (one name, one
    source)."""
    factories: dict[str, Any] = {}
    for cap in [load(m) for m in SOURCES] + [load(m, extension=True) for m in extensions]:
        for name, factory in (cap.sources() if cap.sources is not None else {}).items():
            if name in factories:
                raise ConfigError(f"model source {name!r} is registered twice ({cap.module})")
            factories[name] = factory
    return Sources(factories, settings)


def engines(extensions: Sequence[str], services: Any) -> list[Engine]:
    """Every engine, in the order the router asks them (see the module docstring)."""
    caps = (
        [load(m) for m in ENGINES_FIRST]
        + [load(m, extension=True) for m in extensions]
        + [load(m) for m in ENGINES_LAST]
    )
    out: list[Engine] = []
    for cap in caps:
        if cap.engines is not None:
            out.extend(cap.engines(services))
    return out
