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
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack, cast

from yichui.errors import (
    DownloadError,
    MissingExtraError,
    SourceUnavailableError,
    YichuiError,
)
from yichui.models.sources.base import PullSpec, RemoteFile
from yichui.models.sources.files import (
    class_names,
    error_chain,
    first_line,
    is_unreachable,
    snapshot_files,
)
from yichui.models.sources.hub import (
    ByteCounter,
    HubOptions,
    HubSource,
    Listing,
    env_true,
    sdk_patterns,
)

if TYPE_CHECKING:
    from yichui.config import Settings

DEFAULT_REVISION = "master"
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


class ModelScopeSource(HubSource):
    """Pulls ``owner/name`` model repositories from ModelScope.

    ``endpoint``: default the SDK's (``MODELSCOPE_ENDPOINT``, else modelscope.cn with a
    fallback to modelscope.ai); ``token``: default the SDK's (``MODELSCOPE_API_TOKEN`` or a
    stored login); ``cache_dir``: the ModelScope cache read when offline; ``download_cache``:
    where online downloads keep their lock files; ``offline``: see the module docstring.
    """

    name = "modelscope"
    title = "ModelScope"
    home = "ModelScope"
    offline_reason = "offline"

    def __init__(self, *, offline: bool | None = None, **options: Unpack[HubOptions]) -> None:
        super().__init__(**options)
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
        return env_true("MODELSCOPE_OFFLINE") or env_true("HF_HUB_OFFLINE")

    def _require_sdk(self) -> None:
        _snapshot_download()

    def _expected_size(self, file: RemoteFile) -> int | None:
        # The listing gives 0 for an unknown size as well as for an empty file.
        return file.size or None

    # -- online --------------------------------------------------------------------------

    def _listing(self, spec: PullSpec) -> Listing:
        """The endpoint that has the repo, and every file of it at the branch or tag (one call).

        ModelScope's download path never sees commit ids, so the revision is the name asked for.
        """
        revision = spec.revision or DEFAULT_REVISION
        try:
            try:
                hub_api = _load("modelscope_hub", "HubApi")
            except ImportError:
                return Listing(revision, self._legacy_listing(spec, revision), self.endpoint)
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
            raise self._translate(exc, spec) from exc
        files = [
            RemoteFile(str(e.path), int(e.size) if e.size is not None else None)
            for e in entries
            if getattr(e, "type", "blob") != "tree"
        ]
        return Listing(revision, files, endpoint)

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

    def _download(self, spec: PullSpec, listing: Listing, dest: Path, counter: ByteCounter) -> None:
        watcher = _Stopper(counter)
        options: dict[str, Any] = {}
        if counter.progress is not None:
            options["progress_callbacks"] = [watcher.callback_class()]
        try:
            _snapshot_download()(
                model_id=spec.repo,
                revision=listing.revision,
                local_dir=str(dest),
                cache_dir=str(self.download_cache) if self.download_cache else None,
                token=self.token,
                endpoint=listing.endpoint,
                **sdk_patterns(spec),
                **options,
            )
        except Exception as exc:
            # Our progress callback stopped the download on purpose: its reason, not the SDK's.
            if watcher.error is not None:
                raise watcher.error from exc
            raise self._translate(exc, spec) from exc
        if watcher.error is not None:
            raise watcher.error

    def _classify(self, exc: BaseException, spec: PullSpec) -> YichuiError | None:
        repo, where = spec.repo, self._where()
        revision = spec.revision or DEFAULT_REVISION
        # snapshot_download re-raises NotExistError and the auth errors as requests'
        # HTTPError (from the original), so the whole chain is searched by class name.
        chain = list(error_chain(exc))
        names = set().union(*(class_names(link) for link in chain))
        status = _http_status(chain)
        if "FileDownloadError" in names and not names & _UNAVAILABLE:
            return self._failed_files(exc, spec)
        if "NotExistError" in names or status == 404:
            return self._not_found(
                spec,
                f"{repo!r} at revision {revision!r} does not exist on {where} (or it is private): "
                f"{first_line(exc)}",
                _TOKEN_HINT,
            )
        if names & {"AuthenticationError", "PermissionDeniedError"} or status in (401, 403):
            return self._not_found(
                spec, f"{where} refused access to {repo!r}: {first_line(exc)}", _TOKEN_HINT
            )
        if "InvalidParameter" in names:
            return self._not_found(spec, f"ModelScope rejected {repo!r}: {first_line(exc)}")
        if names & _UNAVAILABLE or is_unreachable(exc):
            return self._unavailable(
                spec,
                f"cannot reach {where}: {first_line(exc)}",
                hint="check the network or MODELSCOPE_ENDPOINT; with MODELSCOPE_OFFLINE=1 the "
                "local ModelScope cache is used instead",
            )
        if "FileIntegrityError" in names:
            return self._unavailable(
                spec,
                f"{where} kept serving a corrupt file of {repo!r}: {first_line(exc)}",
                hint="retry later",
            )
        return None

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
        return self._unavailable(
            spec,
            f"{len(failures) or 'some'} file(s) of {spec.repo!r} failed to download{detail}",
            hint="run the pull again: it resumes where it stopped",
        )

    # -- offline: a local ModelScope cache -----------------------------------------------

    def _ms_cache(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        env = os.environ.get("MODELSCOPE_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "modelscope"

    def _cached(
        self, spec: PullSpec, unreachable: SourceUnavailableError | None
    ) -> tuple[str | None, Path, list[RemoteFile]]:
        cache = self._ms_cache()
        legacy = _legacy_folder(cache, spec.repo)
        try:
            # local_files_only never touches the network. With local_dir it returns that
            # folder if non-empty: used for the old layouts the SDK does not probe itself.
            folder = Path(
                _snapshot_download()(
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
                raise self._translate(exc, spec) from exc
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

    def _offline_hint(self, spec: PullSpec) -> str:
        return (
            f"download it into the cache first (`modelscope download {spec.repo}`), "
            "point MODELSCOPE_CACHE at a cache that has it, or unset MODELSCOPE_OFFLINE and "
            "HF_HUB_OFFLINE"
        )


class _Stopper:
    """Turns the SDK's per-file callbacks into one count over the whole fetch.

    If the ProgressFn raises (the pull lost its lock), the error is kept for ``fetch`` to
    raise, and the callback raises an ``EACCES`` OSError instead: the one kind of error the
    SDK's retry loop gives up on at once, rather than retrying the file with back-off.
    """

    def __init__(self, counter: ByteCounter) -> None:
        self.counter = counter
        self.error: YichuiError | None = None

    def advance(self, step: int) -> None:
        if self.error is not None:
            raise _stop()
        try:
            self.counter.advance(step)
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
