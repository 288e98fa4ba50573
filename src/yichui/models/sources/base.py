"""The interface every model source implements."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ProgressFn = Callable[[int, int | None], None]
"""Called with (bytes done, bytes total or None) as a fetch advances."""


@dataclass(frozen=True)
class PullSpec:
    """What to fetch: ``repo`` at ``revision``, filtered by glob patterns."""

    repo: str
    revision: str | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def wants(self, path: str) -> bool:
        """Whether ``path`` passes the include/exclude patterns (``fnmatch``, as the hubs do)."""
        if self.include and not any(fnmatch.fnmatch(path, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatch(path, p) for p in self.exclude)


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None = None


@dataclass(frozen=True)
class Plan:
    """What a fetch would bring: the resolved revision and the files (for ``--dry-run``)."""

    source: str
    repo: str
    revision: str | None
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


class ModelSource(Protocol):
    """A place models are pulled from."""

    name: str

    def plan(self, spec: PullSpec) -> Plan:
        """Resolve the revision and list the files a fetch would bring, without writing."""
        ...

    def fetch(self, spec: PullSpec, dest: Path, progress: ProgressFn | None = None) -> str | None:
        """Bring the files into ``dest`` (resuming what is there); return the revision.

        Raises :class:`~yichui.errors.SourceNotFoundError` for an unknown repo or revision,
        :class:`~yichui.errors.SourceUnavailableError` when the source cannot be reached, and
        :class:`~yichui.errors.DownloadError` when writing fails.
        """
        ...
