"""ModelScope as a source, online or from a local ModelScope cache.

Online, the file list is fetched first (it gives the plan, the progress total and tells an
unreachable hub from a missing repo), then ``snapshot_download`` fills the staging folder
directly (``local_dir``). That resumes a previous partial attempt: a file already there with
the listed size (and SHA-256, when the hub gives one) is kept, a ``<file>.incomplete`` is
continued with an HTTP range request.

ModelScope's SDK has no offline switch of its own (no environment variable makes it stop
using the network; only ``local_files_only=True`` per call does). This adapter is offline
when built with ``offline=True``, or when ``MODELSCOPE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set:
someone who set the latter asked for "no hub traffic", and it keeps the test suite off the
network. Offline, or when the hub cannot be reached, the snapshot is resolved from a
ModelScope cache with ``local_files_only=True`` and hard-linked (else copied) into the
staging folder, as the Hugging Face adapter does. The cache layouts it reads:

* ``<cache>/models/<owner>--<name>/snapshots/<revision>/…`` (modelscope >= 1.38, with
  modelscope_hub), where ``<revision>`` is the branch or tag asked for (``master`` by default);
* ``<cache>/models/<owner>/<name___>/…`` and ``<cache>/hub/models/<owner>/<name___>/…``
  (older SDKs: no revision folder; ``.`` in the name written ``___``; the revision, when
  known, is in a ``.mv`` file), and a few flatter layouts older still.

``<cache>`` is ``cache_dir``, else ``MODELSCOPE_CACHE``, else ``~/.cache/modelscope``.

ModelScope's download path never sees commit ids, so the revision returned (and recorded in
the manifest) is the branch or tag name.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from yichui.errors import (
    DownloadError,
    MissingExtraError,
    SourceNotFoundError,
    SourceUnavailableError,
    YichuiError,
)
from yichui.models.sources.base import Plan, ProgressFn, PullSpec, RemoteFile
from yichui.models.sources.files import (
    class_names,
    error_chain,
    first_line,
    is_complete,
    is_unreachable,
    normalize_patterns,
    place_files,
    snapshot_files,
)

if TYPE_CHECKING:
    from yichui.config import Settings

log = logging.getLogger(__name__)

DEFAULT_REVISION = "master"
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
_TOKEN_HINT = "check the name; a private repo needs YICHUI_MODELSCOPE_TOKEN"
# Names of SDK errors that mean the hub is unreachable or failing, not that the repo is absent.
_UNAVAILABLE = frozenset({"NetworkError", "RequestTimeoutError", "ServerError", "RateLimitError"})
# Files the SDKs keep next to a model's files, and downloads they left unfinished.
_SDK_LEFTOVERS = re.compile(r".*\.(incomplete|parallel_tmp|corrupted|lock)$")


def _load(module: str, attribute: str) -> Any:
    """``module.attribute`` of the SDK; imported by name as its typing differs by version."""
    return getattr(importlib.import_module(module), attribute)


def _snapshot_download() -> Callable[..., Any]:
    # modelscope >= 1.38 delegates to modelscope_hub; calling it directly avoids importing
    # modelscope itself, which pulls in torch (seconds). Older SDKs only have the latter.
    for module in ("modelscope_hub.compat.snapshot_download", "modelscope.hub.snapshot_download"):
        try:
            return cast(Callable[..., Any], _load(module, "snapshot_download"))
        except ImportError:
            continue
    raise MissingExtraError("hub", "pulling from ModelScope")


def _env_true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in _TRUE


class ModelScopeSource:
    """Pulls ``owner/name`` model repositories from ModelScope.

    ``endpoint``: default the SDK's (``MODELSCOPE_ENDPOINT``, else modelscope.cn with a
    fallback to modelscope.ai); ``token``: default the SDK's (``MODELSCOPE_API_TOKEN`` or a
    stored login); ``cache_dir``: the ModelScope cache read when offline; ``download_cache``:
    where online downloads keep their lock files; ``offline``: see the module docstring.
    """

    name = "modelscope"

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        cache_dir: Path | None = None,
        download_cache: Path | None = None,
        offline: bool | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.token = token
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.download_cache = Path(download_cache) if download_cache is not None else None
        self.offline = offline

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelScopeSource:
        """The source as configured: ``modelscope_token`` and ``data_dir/ms-cache``."""
        token = settings.modelscope_token.get_secret_value() if settings.modelscope_token else None
        return cls(token=token or None, download_cache=settings.data_dir / "ms-cache")

    def is_offline(self) -> bool:
        """Whether to use the local cache only (read at call time)."""
        if self.offline is not None:
            return self.offline
        return _env_true("MODELSCOPE_OFFLINE") or _env_true("HF_HUB_OFFLINE")

    # -- the ModelSource interface -------------------------------------------------------

    def plan(self, spec: PullSpec) -> Plan:
        """The revision and the wanted files (online: one listing call); writes nothing."""
        sdk = _snapshot_download()
        spec = normalize_patterns(spec)
        if self.is_offline():
            return self._cached_plan(sdk, spec, unreachable=None)
        try:
            _, files = self._listing(spec)
        except SourceUnavailableError as exc:
            return self._cached_plan(sdk, spec, unreachable=exc)
        revision = spec.revision or DEFAULT_REVISION
        return Plan(self.name, spec.repo, revision, self._wanted(spec, files))

    def fetch(self, spec: PullSpec, dest: Path, progress: ProgressFn | None = None) -> str | None:
        """Download into ``dest`` (resuming what is there); return the branch or tag."""
        sdk = _snapshot_download()
        spec = normalize_patterns(spec)
        if self.is_offline():
            return self._fetch_cached(sdk, spec, dest, progress, unreachable=None)
        try:
            endpoint, files = self._listing(spec)
        except SourceUnavailableError as exc:
            return self._fetch_cached(sdk, spec, dest, progress, unreachable=exc)
        revision = spec.revision or DEFAULT_REVISION
        wanted = self._wanted(spec, files)
        total = sum(f.size or 0 for f in wanted)
        # The listing gives 0 for an unknown size as well as for an empty file.
        already = sum(f.size or 0 for f in wanted if is_complete(dest / f.path, f.size or None))
        watcher = _Progress(progress, already, total)
        options: dict[str, Any] = {}
        if progress is not None:
            options["progress_callbacks"] = [watcher.callback_class()]
        try:
            sdk(
                model_id=spec.repo,
                revision=revision,
                local_dir=str(dest),
                cache_dir=str(self.download_cache) if self.download_cache else None,
                allow_patterns=list(spec.include) or None,
                ignore_patterns=list(spec.exclude) or None,
                token=self.token,
                endpoint=endpoint,
                **options,
            )
        except Exception as exc:
            raise self._translate(exc, spec, watcher.error) from exc
        if watcher.error is not None:
            raise watcher.error
        missing = [f.path for f in wanted if not is_complete(dest / f.path, f.size or None)]
        if missing:
            raise SourceUnavailableError(
                f"the pull of {spec.repo!r} stopped with {len(missing)} file(s) missing "
                f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})",
                name=spec.repo,
                source=self.name,
                hint="run the pull again: it resumes where it stopped",
            )
        return revision

    # -- online --------------------------------------------------------------------------

    def _listing(self, spec: PullSpec) -> tuple[str | None, list[RemoteFile]]:
        """(endpoint that has the repo, every file of it at the revision)."""
        revision = spec.revision or DEFAULT_REVISION
        try:
            try:
                hub_api = _load("modelscope_hub", "HubApi")
            except ImportError:
                return self.endpoint, self._legacy_listing(spec, revision)
            api = hub_api(endpoint=self.endpoint, token=self.token)
            # The configured endpoint as is; with none, the SDK looks for the repo on
            # modelscope.cn then modelscope.ai. Passing the answer on saves a second probe.
            endpoint = str(api.resolve_endpoint_for_read(spec.repo, repo_type="model"))
            if endpoint != self.endpoint:
                api = hub_api(endpoint=endpoint, token=self.token)
            entries = api.list_repo_files(spec.repo, "model", revision=revision, recursive=True)
        except YichuiError:
            raise
        except Exception as exc:
            raise self._translate(exc, spec, None) from exc
        files = [
            RemoteFile(str(e.path), int(e.size) if e.size is not None else None)
            for e in entries
            if getattr(e, "type", "blob") != "tree"
        ]
        return endpoint, files

    def _legacy_listing(self, spec: PullSpec, revision: str) -> list[RemoteFile]:
        # modelscope < 1.38 (no modelscope_hub): the old HubApi, whose files are dicts.
        api = _load("modelscope.hub.api", "HubApi")(endpoint=self.endpoint)
        if self.token:
            api.login(self.token)
        raw = api.get_model_files(spec.repo, revision=revision, recursive=True)
        return [
            RemoteFile(str(d["Path"]), d.get("Size"))
            for d in raw
            if d.get("Type", "blob") != "tree"
        ]

    def _wanted(self, spec: PullSpec, files: list[RemoteFile]) -> list[RemoteFile]:
        wanted = [f for f in files if spec.wants(f.path)]
        if not wanted:
            raise SourceNotFoundError(
                f"no file of {spec.repo!r} ({spec.revision or DEFAULT_REVISION}) matches the "
                "include/exclude patterns",
                name=spec.repo,
                source=self.name,
            )
        return wanted

    def _translate(
        self, exc: BaseException, spec: PullSpec, stopped: YichuiError | None
    ) -> YichuiError:
        """The yichui error for an exception the SDK raised (a yichui one passes through)."""
        if stopped is not None:  # our progress callback stopped the download on purpose
            return stopped
        for link in error_chain(exc):
            if isinstance(link, YichuiError):
                return link
        repo, where = spec.repo, self.endpoint or "ModelScope"
        revision = spec.revision or DEFAULT_REVISION

        def not_found(message: str, hint: str | None = None) -> SourceNotFoundError:
            return SourceNotFoundError(message, name=repo, source=self.name, hint=hint)

        def unavailable(message: str, hint: str | None = None) -> SourceUnavailableError:
            return SourceUnavailableError(message, name=repo, source=self.name, hint=hint)

        # snapshot_download re-raises NotExistError and the auth errors as requests'
        # HTTPError (from the original), so the whole chain is searched by class name.
        chain = list(error_chain(exc))
        names = set().union(*(class_names(link) for link in chain))
        status = _http_status(chain)
        if "FileDownloadError" in names and not names & _UNAVAILABLE:
            return self._failed_files(exc, spec)
        if "NotExistError" in names or status == 404:
            return not_found(
                f"{repo!r} at revision {revision!r} does not exist on {where} (or it is private): "
                f"{first_line(exc)}",
                _TOKEN_HINT,
            )
        if names & {"AuthenticationError", "PermissionDeniedError"} or status in (401, 403):
            return not_found(f"{where} refused access to {repo!r}: {first_line(exc)}", _TOKEN_HINT)
        if "InvalidParameter" in names:
            return not_found(f"ModelScope rejected {repo!r}: {first_line(exc)}")
        if names & _UNAVAILABLE or is_unreachable(exc):
            return unavailable(
                f"cannot reach {where}: {first_line(exc)}",
                hint="check the network or MODELSCOPE_ENDPOINT; with MODELSCOPE_OFFLINE=1 the "
                "local ModelScope cache is used instead",
            )
        if "FileIntegrityError" in names:
            return unavailable(
                f"{where} kept serving a corrupt file of {repo!r}: {first_line(exc)}",
                hint="retry later",
            )
        if isinstance(exc, OSError):
            return DownloadError(f"writing {repo!r} failed: {exc.strerror or exc}", name=repo)
        return unavailable(f"ModelScope download failed: {type(exc).__name__}: {first_line(exc)}")

    def _failed_files(self, exc: BaseException, spec: PullSpec) -> YichuiError:
        # modelscope_hub tries every file, then raises one FileDownloadError carrying each
        # file's own exception: report the most telling of those.
        failures: dict[str, BaseException] = dict(getattr(exc, "failed_files", None) or {})
        for error in failures.values():
            if isinstance(error, YichuiError):
                return error
        for path, error in failures.items():
            if isinstance(error, OSError) and error.errno in (
                errno.ENOSPC,
                errno.EACCES,
                errno.EROFS,
                errno.EDQUOT,
            ):
                return DownloadError(
                    f"writing {path} of {spec.repo!r} failed: {error.strerror or error}",
                    name=spec.repo,
                )
        first = next(iter(failures.items()), None)
        detail = f" (first: {first[0]}: {first_line(first[1])})" if first else ""
        return SourceUnavailableError(
            f"{len(failures) or 'some'} file(s) of {spec.repo!r} failed to download{detail}",
            name=spec.repo,
            source=self.name,
            hint="run the pull again: it resumes where it stopped",
        )

    # -- offline: a local ModelScope cache -----------------------------------------------

    def _ms_cache(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        env = os.environ.get("MODELSCOPE_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "modelscope"

    def _cached(
        self,
        sdk: Callable[..., Any],
        spec: PullSpec,
        unreachable: SourceUnavailableError | None,
    ) -> tuple[str | None, Path, list[RemoteFile]]:
        """(revision, snapshot folder, wanted files) of ``spec`` in the local cache."""
        cache = self._ms_cache()
        legacy = _legacy_folder(cache, spec.repo)
        try:
            # local_files_only never touches the network. With local_dir it returns that
            # folder if non-empty: used for the old layouts the SDK does not probe itself.
            folder = Path(
                sdk(
                    model_id=spec.repo,
                    revision=spec.revision,
                    cache_dir=str(cache),
                    local_dir=str(legacy) if legacy else None,
                    local_files_only=True,
                )
            )
        except Exception as exc:
            if isinstance(exc, YichuiError):
                raise
            if "InvalidParameter" in class_names(exc):
                raise self._translate(exc, spec, None) from exc
            raise self._offline_error(
                f"{spec.repo!r}{_at(spec)} is not in the local ModelScope cache {cache}",
                spec,
                unreachable,
                detail=first_line(exc),
            ) from exc
        revision = _folder_revision(folder)
        if spec.revision and revision != spec.revision:
            # The SDK returns an old-layout folder whatever revision was asked for.
            raise self._offline_error(
                f"the local ModelScope cache {cache} has {spec.repo!r} at revision "
                f"{revision or 'unknown'}, not {spec.revision!r}",
                spec,
                unreachable,
            )
        files = [
            f
            for f in snapshot_files(folder, skip_hidden=True)
            if not _SDK_LEFTOVERS.fullmatch(f.path) and spec.wants(f.path)
        ]
        if not files:
            raise self._offline_error(
                f"the cached copy of {spec.repo!r} in {folder} has no file matching the "
                "include/exclude patterns",
                spec,
                unreachable,
            )
        return revision or spec.revision, folder, files

    def _cached_plan(
        self,
        sdk: Callable[..., Any],
        spec: PullSpec,
        unreachable: SourceUnavailableError | None,
    ) -> Plan:
        revision, _, files = self._cached(sdk, spec, unreachable)
        return Plan(self.name, spec.repo, revision, files)

    def _fetch_cached(
        self,
        sdk: Callable[..., Any],
        spec: PullSpec,
        dest: Path,
        progress: ProgressFn | None,
        unreachable: SourceUnavailableError | None,
    ) -> str | None:
        revision, folder, files = self._cached(sdk, spec, unreachable)
        if unreachable is not None:
            log.warning("%s; using the local ModelScope cache instead", unreachable.message)
        place_files(folder, files, dest, progress, name=spec.repo)
        return revision

    def _offline_error(
        self,
        what: str,
        spec: PullSpec,
        unreachable: SourceUnavailableError | None,
        detail: str | None = None,
    ) -> YichuiError:
        if unreachable is not None:
            return SourceUnavailableError(
                f"{unreachable.message}, and {what}",
                name=spec.repo,
                source=self.name,
                hint=unreachable.hint,
            )
        return SourceNotFoundError(
            f"offline: {what}" + (f" ({detail})" if detail else ""),
            name=spec.repo,
            source=self.name,
            hint=f"download it into the cache first (`modelscope download {spec.repo}`), "
            "point MODELSCOPE_CACHE at a cache that has it, or unset MODELSCOPE_OFFLINE and "
            "HF_HUB_OFFLINE",
        )


class _Progress:
    """Turns the SDK's per-file callbacks into one ProgressFn over the whole fetch.

    If the ProgressFn raises (the pull lost its lock), the error is kept for ``fetch`` to
    raise, and the callback raises an ``EACCES`` OSError instead: the one kind of error the
    SDK's retry loop gives up on at once, rather than retrying the file with back-off.
    """

    def __init__(self, progress: ProgressFn | None, done: int, total: int) -> None:
        self.progress = progress
        self.done = done
        self.total = total
        self.error: YichuiError | None = None
        self.lock = threading.Lock()

    def advance(self, step: int) -> None:
        if self.error is not None:
            raise _stop()
        with self.lock:
            self.done += step
            done = min(self.done, self.total) if self.total else self.done
        if self.progress is None:
            return
        try:
            self.progress(done, self.total or None)
        except YichuiError as exc:
            self.error = exc
            raise _stop() from exc

    def callback_class(self) -> type:
        """A ``ProgressCallback``-shaped class (the SDK instantiates one per file)."""
        watcher = self

        class Callback:
            def __init__(self, filename: str, file_size: int) -> None:
                self.filename = filename
                self.file_size = file_size

            def update(self, size: int) -> None:
                watcher.advance(int(size))

            def end(self) -> None:
                pass

        return Callback


def _stop() -> OSError:
    return OSError(errno.EACCES, "download stopped by yichui")


def _legacy_folder(cache: Path, repo: str) -> Path | None:
    """An old-SDK folder of ``repo`` that modelscope_hub does not probe, if any.

    The same search as modelscope's own ``find_reusable_legacy_repo_dir``: only when neither
    layout the SDK handles exists, so as never to shadow them.
    """
    if "/" not in repo:
        return None
    owner, name = repo.split("/", 1)
    safe = name.replace(".", "___")
    handled = (cache / "models" / repo.replace("/", "--"), cache / "models" / owner / safe)
    if any(_non_empty(p) for p in handled):
        return None
    candidates = (
        cache / owner / name,
        cache / owner / safe,
        cache / "hub" / owner / name,
        cache / "hub" / owner / safe,
        cache / "models" / owner / name,
    )
    return next((p for p in candidates if _non_empty(p)), None)


def _folder_revision(folder: Path) -> str | None:
    """The revision a cached folder holds: its name in the new layout, else its ``.mv``."""
    if folder.parent.name == "snapshots":
        return folder.name
    try:
        text = (folder / ".mv").read_text().strip()
    except OSError:
        return None
    # "Revision:v1.0.2,CreatedAt:1700000000", or the bare revision
    match = re.match(r"Revision:([^,]+)", text)
    return (match.group(1) if match else text).strip() or None


def _non_empty(path: Path) -> bool:
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return False


def _at(spec: PullSpec) -> str:
    return f" at revision {spec.revision!r}" if spec.revision else ""


def _http_status(chain: list[BaseException]) -> int | None:
    """The HTTP status carried by an exception of ``chain``, if any."""
    for link in chain:
        status = getattr(getattr(link, "response", None), "status_code", None)
        if isinstance(status, int) and status:
            return status
    return None
