"""The model registry: statuses and listings answered from Redis, the disk as the truth.

Reads go to the cache first (``model_status`` for one model, ``model_index`` for listings) and
fall back to the disk when the entry is missing. When Redis is unreachable every read is
answered from the disk and marked ``degraded``; writes (pull, import, rm) need Redis, because
they take the model's lock.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yichui.config import Settings
from yichui.errors import InvalidModelNameError, ModelBusyError, ModelNotFoundError, StateError
from yichui.models.names import model_dir, trash_dir, validate_name
from yichui.models.status import (
    LISTING_FIELDS,
    STATUS_VERSION,
    ModelStatus,
    is_model_folder,
    iter_files,
    read_manifest,
    scan_model,
    sha256_file,
)
from yichui.state.lock import LeaseLock
from yichui.state.model_status import ModelStatusStore

LOCK_POLL_INTERVAL = 0.2
"""Seconds between two tries at a model's lock while another process holds it."""


@dataclass
class Lookup:
    """One model's status and where the answer came from."""

    status: ModelStatus
    cached: bool = False
    degraded: str | None = None
    """Why Redis was not used (None when it was)."""


@dataclass
class Listing:
    """Models as their status JSON objects (what ``models list --json`` prints), by name."""

    models: list[dict[str, Any]]
    cached: bool = False
    degraded: str | None = None


@dataclass
class VerifyReport:
    name: str
    ok: bool
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    manifest: bool = True
    """False when the folder has no manifest: only sizes could be reported, not damage."""
    status: ModelStatus | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "checked": self.checked,
            "missing": self.missing,
            "changed": self.changed,
            "extra": self.extra,
            "manifest": self.manifest,
            "status": self.status.to_dict() if self.status else None,
        }


class ModelRegistry:
    """Every model under the models root::

    registry = ModelRegistry(settings, store)       # store=None: Redis unreachable
    registry.status("Qwen/Qwen2.5-7B-Instruct").status.exists
    """

    def __init__(
        self,
        settings: Settings,
        store: ModelStatusStore | None,
        *,
        degraded: str | None = None,
    ) -> None:
        self.settings = settings
        self.root = settings.models_path
        self.store = store
        self.degraded = degraded if store is None else None

    # -- reads ------------------------------------------------------------------------------
    def status(self, name: str, *, refresh: bool = False) -> Lookup:
        """The status of ``name`` (negative entries included); one GET on a hit."""
        validate_name(name)
        if self.store is not None and not refresh:
            try:
                cached = self.store.get(name)
            except StateError as exc:
                return Lookup(self.scan(name), degraded=str(exc))
            if cached is not None and cached.get("v") == STATUS_VERSION:
                return Lookup(ModelStatus.from_dict(cached), cached=True)
            # a miss, or an entry another version of yichui wrote: read the disk again
        status = self.scan(name)
        return Lookup(status, degraded=self._record(status))

    def scan(self, name: str) -> ModelStatus:
        return scan_model(name, model_dir(self.root, name))

    def listing(
        self,
        *,
        kind: str | None = None,
        source: str | None = None,
        pattern: str | None = None,
        refresh: bool = False,
    ) -> Listing:
        """Every model, from the index in Redis (built by one walk the first time)."""
        listing = self._listing(refresh)
        if kind or source or pattern:
            pat = pattern.lower() if pattern else None
            listing.models = [
                m
                for m in listing.models
                if (kind is None or m["kind"] == kind)
                and (source is None or m["source"] == source)
                and (pat is None or fnmatch.fnmatchcase(m["name"].lower(), pat))
            ]
        return listing

    def _listing(self, refresh: bool) -> Listing:
        if self.store is not None and not refresh:
            try:
                rows = self.store.listing()
            except StateError as exc:
                return Listing(_rows(m for m in self.walk() if m.exists), degraded=str(exc))
            if rows is not None and _current(rows):
                return Listing(rows, cached=True)
        return self.rescan()

    def walk(self) -> list[ModelStatus]:
        """Scan every model folder under the root (what the cache saves us from)."""
        return [scan_model(name, folder) for name, folder in self._model_folders()]

    def _model_folders(self) -> Iterator[tuple[str, Path]]:
        if not self.root.is_dir():
            return
        for top in sorted(os.scandir(self.root), key=lambda e: e.name):
            if top.name.startswith(".") or not top.is_dir():
                continue
            folder = Path(top.path)
            if is_model_folder(folder):
                if _valid(top.name):
                    yield top.name, folder
                continue
            for sub in sorted(os.scandir(folder), key=lambda e: e.name):
                name = f"{top.name}/{sub.name}"
                if not sub.name.startswith(".") and sub.is_dir() and _valid(name):
                    yield name, Path(sub.path)

    # -- writes -----------------------------------------------------------------------------
    def rescan(self) -> Listing:
        """Walk the root and rebuild every cache entry, the index and the listing (pipelined)."""
        found = [m for m in self.walk() if m.exists]
        models = _rows(found)
        if self.store is None:
            return Listing(models, degraded=self.degraded)
        try:
            self.store.replace_all([m.to_dict() for m in found])
        except StateError as exc:
            return Listing(models, degraded=str(exc))
        return Listing(models)

    def record(self, status: ModelStatus, event: str | None = None, **fields: Any) -> None:
        """Write a status to the cache (and publish ``event``); Redis must be reachable."""
        store = self.require_store()
        store.put(status.name, status.to_dict())
        if event:
            store.publish(event, status.name, **fields)

    def _record(self, status: ModelStatus) -> str | None:
        if self.store is None:
            return self.degraded
        try:
            self.store.put(status.name, status.to_dict())
        except StateError as exc:
            return str(exc)
        return None

    def require_store(self) -> ModelStatusStore:
        if self.store is None:
            raise StateError(
                self.degraded or "Redis is not available",
                hint="changes to models need Redis (their lock); check `yichui redis status`",
            )
        return self.store

    # -- the lock on a model -----------------------------------------------------------------
    def lock(self, name: str) -> LeaseLock:
        """``name``'s lock in Redis, not taken yet: one change of a model at a time, on any
        host (pulls, imports, merges, removals)."""
        store = self.require_store()
        return LeaseLock(
            store.client, store.keys.model_lock(name), lease=self.settings.pull_lock_lease
        )

    def take_lock(self, lock: LeaseLock, name: str) -> bool:
        """Take ``lock``, waiting for its holder; True if we had to wait for someone else."""
        waited = False
        deadline = time.monotonic() + self.settings.pull_wait_timeout
        while not lock.acquire():
            waited = True
            if time.monotonic() > deadline:
                raise ModelBusyError(
                    f"another process has held the lock on {name!r} for too long",
                    name=name,
                    hint="retry later, or raise YICHUI_PULL_WAIT_TIMEOUT",
                )
            time.sleep(LOCK_POLL_INTERVAL)
        return waited

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[LeaseLock]:
        """Hold ``name``'s lock (renewed in the background) for a short exclusive change."""
        lock = self.lock(name)
        self.take_lock(lock, name)
        with lock:
            yield lock

    def remove(self, name: str) -> ModelStatus:
        """Delete a model's files (atomically moved aside first) and cache it as missing."""
        store = self.require_store()
        folder = model_dir(self.root, name)
        with self.locked(name):
            before = scan_model(name, folder)
            if not before.exists and not folder.exists():
                store.put(name, ModelStatus.missing(name).to_dict())
                raise ModelNotFoundError(name)
            trash = trash_dir(self.root) / f"{name.replace('/', '--')}.{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, trash)
            self.record(ModelStatus.missing(name), "removed")
            _prune_empty_org(self.root, name)
        shutil.rmtree(trash, ignore_errors=True)
        return before

    def verify(self, name: str) -> VerifyReport:
        """Re-hash every file against the manifest and refresh the cached status."""
        folder = model_dir(self.root, name)
        status = self.scan(name)
        if not status.exists:
            raise ModelNotFoundError(name)
        expected: dict[str, Any] = read_manifest(folder).get("files") or {}
        present = {rel: st.st_size for rel, st in iter_files(folder)}
        report = VerifyReport(name=name, ok=True, manifest=bool(expected), status=status)
        for rel, info in sorted(expected.items()):
            if rel not in present:
                report.missing.append(rel)
                continue
            report.checked += 1
            if present[rel] != info.get("size") or sha256_file(folder / rel) != info.get("sha256"):
                report.changed.append(rel)
        if expected:
            report.extra = sorted(set(present) - set(expected))
        report.ok = not (report.missing or report.changed)
        self._record(status)
        return report


def _valid(name: str) -> bool:
    """Folders whose names yichui would reject (spaces, …) are not models it can manage."""
    try:
        validate_name(name)
    except InvalidModelNameError:
        return False
    return True


_LISTED = frozenset(LISTING_FIELDS)


def _current(rows: list[dict[str, Any]]) -> bool:
    """Whether listing rows have every field this version lists (rows an older yichui wrote
    lack the newer ones: the index is rebuilt rather than shown with holes)."""
    return all(row.keys() >= _LISTED for row in rows)


def _rows(models: Iterable[ModelStatus]) -> list[dict[str, Any]]:
    rows = [{k: getattr(m, k) for k in LISTING_FIELDS} for m in models]
    rows.sort(key=lambda r: (r["name"].lower(), r["name"]))  # the order the Lua rebuild uses
    return rows


def _prune_empty_org(root: Path, name: str) -> None:
    if "/" in name:
        with contextlib.suppress(OSError):  # not empty, or already gone
            (root / name.split("/")[0]).rmdir()
