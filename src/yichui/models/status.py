"""What yichui knows about one model, and how it is read from the disk.

A model folder may hold ``.yichui.json`` (the manifest), written when yichui pulled, imported
or merged the model: its source, revision and per-file sizes and SHA-256 digests, which
``verify`` checks. Hidden files and folders (the manifest, hub SDK caches) are not part of the
model: they count toward neither size nor fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from yichui.models.kinds import describe
from yichui.models.kinds import detect_kind as detect_kind  # its home before kinds.py

MANIFEST = ".yichui.json"
STATUS_VERSION = 2
"""The shape of a status (the ``v`` of its JSON). A cached entry of another version is read
again from the disk, never taken as it is: v2 added ``modalities``."""

LISTING_FIELDS = (
    "name",
    "exists",
    "kind",
    "modalities",
    "size",
    "files",
    "source",
    "revision",
    "modified",
    "path",
    "fingerprint",
)
"""What ``models list`` (and ``/api/models``, the dashboard's table) shows of each model
(``models status`` shows everything)."""


@dataclass
class ModelStatus:
    """The JSON stored in ``model_status:{<name>}``."""

    name: str
    exists: bool
    path: str | None = None
    size: int = 0
    files: int = 0
    revision: str | None = None
    source: str | None = None
    modified: float | None = None
    kind: str | None = None  # text | multimodal | adapter | unknown
    modalities: list[str] | None = None
    """What a full model takes in: ``["text"]``, ``["text", "image"]``, … (see
    :mod:`yichui.models.kinds`); None for an adapter, an unknown folder, a missing model."""
    fingerprint: str | None = None
    checked_at: float = field(default_factory=time.time)
    v: int = STATUS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelStatus:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def missing(cls, name: str) -> ModelStatus:
        return cls(name=name, exists=False)


def iter_files(folder: Path) -> list[tuple[str, os.stat_result]]:
    """(relative path, stat) of every visible regular file under ``folder``, sorted."""
    out: list[tuple[str, os.stat_result]] = []
    stack = [(folder, "")]
    while stack:
        current, prefix = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=True):
                    stack.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=True):
                    out.append((rel, entry.stat(follow_symlinks=True)))
    out.sort(key=lambda item: item[0])
    return out


def fingerprint(files: list[tuple[str, os.stat_result]]) -> str:
    """Changes whenever any file is added, removed, resized or rewritten (size, mtime_ns)."""
    h = hashlib.sha256(b"yichui-fp-v1\0")
    for rel, st in files:
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "fp1-" + h.hexdigest()[:32]


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def scan_model(name: str, folder: Path) -> ModelStatus:
    """Read a model's status from its folder (stats only; no file is hashed)."""
    if not folder.is_dir():
        return ModelStatus.missing(name)
    files = iter_files(folder)
    if not files:
        return ModelStatus.missing(name)
    manifest = read_manifest(folder)
    described = describe(folder)
    return ModelStatus(
        name=name,
        exists=True,
        path=str(folder),
        size=sum(st.st_size for _, st in files),
        files=len(files),
        revision=manifest.get("revision"),
        source=manifest.get("source") or "local",
        modified=max(st.st_mtime for _, st in files),
        kind=described.kind,
        modalities=described.modalities,
        fingerprint=fingerprint(files),
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every visible file: the manifest's ``files``."""
    return {
        rel: {"size": st.st_size, "sha256": sha256_file(folder / rel)}
        for rel, st in iter_files(folder)
    }


def is_model_folder(folder: Path) -> bool:
    """A folder holding a model (as opposed to an ``org`` folder holding models)."""
    if any((folder / f).exists() for f in (MANIFEST, "config.json", "adapter_config.json")):
        return True
    try:
        with os.scandir(folder) as it:
            return any(
                e.is_file() and e.name.endswith((".safetensors", ".gguf", ".bin", ".pt"))
                for e in it
            )
    except OSError:
        return False
