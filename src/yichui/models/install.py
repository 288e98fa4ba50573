"""Single-flight creation of a model folder: shared by pull, import and (later) merge.

One process (on any host) at a time holds ``model_lock:{<name>}``; it assembles the model in
a hidden staging folder inside the models root, writes the manifest, moves the folder into
place with one rename, and then publishes the new status and releases the lock in one Lua
script. Anyone else asking for the same model waits for the lock and reuses the result. A
failed or interrupted attempt leaves only the staging folder (which the next attempt resumes
from), so a partial model is never reported as existing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yichui.errors import DownloadError, ModelBusyError, YichuiError
from yichui.models.names import model_dir, staging_dir, trash_dir
from yichui.models.status import ModelStatus, file_digests, scan_model, write_manifest
from yichui.state.lock import LeaseLock

if TYPE_CHECKING:
    from yichui.models.registry import ModelRegistry

Producer = Callable[[Path, LeaseLock], dict[str, Any]]
"""Fills the staging folder; returns manifest fields (``source``, ``revision``, …)."""


@dataclass
class InstallResult:
    status: ModelStatus
    action: str  # installed | reused | present


def install_model(
    registry: ModelRegistry,
    name: str,
    produce: Producer,
    *,
    event: str,
    is_current: Callable[[ModelStatus], bool] = lambda s: s.exists,
    replace: bool = False,
) -> InstallResult:
    """Create model ``name`` with ``produce`` unless it is there already (or made meanwhile).

    ``is_current`` decides whether what is on disk already satisfies the request; ``replace``
    forces a new install over it.
    """
    root = registry.root
    final = model_dir(root, name)
    store = registry.require_store()
    lock = registry.lock(name)
    waited = registry.take_lock(lock, name)
    with lock:
        existing = scan_model(name, final)
        if existing.exists and is_current(existing) and not replace:
            store.put(name, existing.to_dict())
            return InstallResult(existing, "reused" if waited else "present")
        staging = staging_dir(root, name)
        try:
            staging.mkdir(parents=True, exist_ok=True)
            fields = produce(staging, lock)
            _check_lock(lock, name)
            manifest = {
                "name": name,
                "created_at": time.time(),
                **fields,
                "files": file_digests(staging),
            }
            write_manifest(staging, manifest)
            _shed_sdk_caches(staging)
            _check_lock(lock, name)
            _move_into_place(staging, final, root)
        except YichuiError:
            raise
        except OSError as exc:
            raise DownloadError(_os_reason(exc), name=name) from exc
        status = scan_model(name, final)
        if not store.commit(name, lock.token, status.to_dict()):
            store.put(name, status.to_dict())  # lock lapsed after the move: still record truth
        store.publish(event, name, revision=status.revision, source=status.source)
        return InstallResult(status, "installed")


def _check_lock(lock: LeaseLock, name: str) -> None:
    if lock.lost.is_set():
        raise ModelBusyError(
            f"lost the lock on {name!r} (Redis unreachable for longer than the lease?)",
            name=name,
            hint="retry: the download resumes from where it stopped",
        )


def _shed_sdk_caches(staging: Path) -> None:
    # hub SDKs keep resume metadata in hidden folders of the target dir; not part of the model
    for entry in staging.iterdir():
        if entry.name.startswith(".") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _move_into_place(staging: Path, final: Path, root: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    old: Path | None = None
    if final.exists():
        old = trash_dir(root) / f"{final.name}.{uuid.uuid4().hex[:8]}"
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, old)
    os.replace(staging, final)
    with contextlib.suppress(OSError):  # the shared staging parent, once nothing else is in it
        staging.parent.rmdir()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device holding the models root"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied: {exc.filename or ''}".strip()
    return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
