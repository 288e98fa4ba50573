"""``models pull``: fetch a model from a source, once across every process and host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yichui.errors import ModelBusyError
from yichui.models.install import install_model
from yichui.models.names import validate_name
from yichui.models.registry import ModelRegistry
from yichui.models.sources.base import ModelSource, Plan, ProgressFn, PullSpec
from yichui.models.status import ModelStatus, read_manifest
from yichui.state.lock import LeaseLock


@dataclass
class PullResult:
    name: str
    action: str  # installed | reused | present | dry-run
    status: ModelStatus | None = None
    plan: Plan | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "action": self.action}
        if self.status is not None:
            out["status"] = self.status.to_dict()
        if self.plan is not None:
            out["plan"] = {
                "source": self.plan.source,
                "repo": self.plan.repo,
                "revision": self.plan.revision,
                "size": self.plan.size,
                "files": [{"path": f.path, "size": f.size} for f in self.plan.files],
            }
        return out


def pull_model(
    registry: ModelRegistry,
    source: ModelSource,
    name: str,
    spec: PullSpec,
    *,
    dry_run: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> PullResult:
    """Pull ``spec`` from ``source`` as model ``name`` (see :func:`install_model`)."""
    validate_name(name)
    if dry_run:
        return PullResult(name, "dry-run", plan=source.plan(spec))

    def is_current(status: ModelStatus) -> bool:
        if spec.revision is None:
            return True
        return read_manifest(Path(status.path or "")).get("revision") == spec.revision

    def produce(staging: Path, lock: LeaseLock) -> dict[str, Any]:
        def guarded(done: int, total: int | None) -> None:
            if lock.lost.is_set():
                raise ModelBusyError(f"lost the lock on {name!r} mid-download", name=name)
            if progress:
                progress(done, total)

        revision = source.fetch(spec, staging, guarded)
        return {
            "source": source.name,
            "repo": spec.repo,
            "revision": revision,
            "include": list(spec.include),
            "exclude": list(spec.exclude),
        }

    result = install_model(
        registry, name, produce, event="pulled", is_current=is_current, replace=force
    )
    return PullResult(name, result.action, status=result.status)
