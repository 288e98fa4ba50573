"""A local mirror folder as a hub: ``<mirror>/<org>/<name>/…`` on a disk or NAS mount.

Copies resume: a file already complete (same size) is skipped, a partial ``.part`` file is
continued from where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from yichui.errors import SourceNotFoundError, SourceUnavailableError
from yichui.models.names import model_dir
from yichui.models.sources.base import Plan, ProgressFn, PullSpec, RemoteFile
from yichui.models.sources.files import copy_resumable
from yichui.models.status import fingerprint, iter_files, read_manifest


class MirrorSource:
    name = "mirror"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _folder(self, spec: PullSpec) -> Path:
        if not self.root.is_dir():
            raise SourceUnavailableError(
                f"mirror folder {self.root} is not reachable", name=spec.repo, source=self.name
            )
        folder = model_dir(self.root, spec.repo)
        if not folder.is_dir():
            raise SourceNotFoundError(
                f"{spec.repo!r} is not in the mirror {self.root}", name=spec.repo, source=self.name
            )
        return folder

    def plan(self, spec: PullSpec) -> Plan:
        folder = self._folder(spec)
        files = iter_files(folder)
        revision = read_manifest(folder).get("revision") or fingerprint(files)
        if spec.revision and spec.revision != revision:
            raise SourceNotFoundError(
                f"the mirror has {spec.repo!r} at revision {revision}, not {spec.revision}",
                name=spec.repo,
                source=self.name,
            )
        wanted = [RemoteFile(rel, st.st_size) for rel, st in files if spec.wants(rel)]
        return Plan(self.name, spec.repo, revision, wanted)

    def fetch(self, spec: PullSpec, dest: Path, progress: ProgressFn | None = None) -> str | None:
        plan = self.plan(spec)
        src = self._folder(spec)
        total, done = plan.size, 0
        for f in plan.files:
            done = copy_resumable(src / f.path, dest / f.path, done, total, progress)
        return plan.revision
