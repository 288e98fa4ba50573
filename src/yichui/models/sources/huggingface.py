"""The Hugging Face Hub as a source, online or from a local Hugging Face cache.

Online, the revision is resolved to a commit hash first, then ``snapshot_download`` fills the
staging folder directly (``local_dir``), which resumes a previous partial attempt: files it
already finished are skipped, ``.incomplete`` ones are continued.

Offline (``HF_HUB_OFFLINE=1``), or when the hub cannot be reached, the snapshot is resolved
from a Hugging Face cache (``~/.cache/huggingface/hub`` unless ``HF_HUB_CACHE`` or
``cache_dir`` says otherwise) with ``local_files_only=True`` and its files are hard-linked
(copied where a link is impossible) into the staging folder. This is how a model already in
someone's HF cache is imported without any network.

The steps both hubs share (plan, fetch, the completeness check, the cache fallback) are in
:mod:`yichui.models.sources.hub`; this module holds the SDK's calls and its error names. The
SDK (the optional ``hub`` extra) is imported inside the methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from yichui.errors import MissingExtraError, SourceUnavailableError, YichuiError
from yichui.models.sources.base import PullSpec, RemoteFile
from yichui.models.sources.files import class_names, first_line, is_unreachable, snapshot_files
from yichui.models.sources.hub import ByteCounter, HubSource, Listing, env_true, sdk_patterns

if TYPE_CHECKING:
    from yichui.config import Settings

_TOKEN_HINT = "check the name; a private or gated repo needs YICHUI_HF_TOKEN"


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on, read at call time.

    The SDK reads ``HF_HUB_OFFLINE`` once, at import; the environment is checked as well so
    that setting it later in the process is honoured too.
    """
    from huggingface_hub import constants

    probe = getattr(constants, "is_offline_mode", None)  # huggingface_hub >= 1.0
    sdk = bool(probe()) if callable(probe) else bool(getattr(constants, "HF_HUB_OFFLINE", False))
    return sdk or env_true("HF_HUB_OFFLINE")


class HuggingFaceSource(HubSource):
    """Pulls ``org/name`` repositories from the Hugging Face Hub (or a mirror of it).

    ``endpoint`` is a mirror such as ``https://hf-mirror.example`` (default: the SDK's,
    i.e. ``HF_ENDPOINT`` or huggingface.co); ``token`` a Hugging Face token (default: the
    SDK's, i.e. ``HF_TOKEN`` or a stored login); ``cache_dir`` the Hugging Face cache read
    when offline (default: the SDK's, ``HF_HUB_CACHE``); ``download_cache`` the ``cache_dir``
    handed to online downloads, so they leave the user's own cache alone.
    """

    name = "huggingface"
    title = "Hugging Face"
    home = "the Hugging Face Hub"
    offline_reason = "offline (HF_HUB_OFFLINE is set)"

    @classmethod
    def from_settings(cls, settings: Settings) -> HuggingFaceSource:
        """The source as configured: ``hf_endpoint``, ``hf_token``, ``data_dir/hf-cache``."""
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        return cls(
            endpoint=settings.hf_endpoint,
            token=token or None,
            download_cache=settings.data_dir / "hf-cache",
        )

    def is_offline(self) -> bool:
        """Whether Hugging Face offline mode is on (see :func:`hub_offline`)."""
        return hub_offline()

    def _require_sdk(self) -> None:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError("hub", "pulling from Hugging Face") from exc

    def _revision_label(self, revision: str) -> str:
        return f"at {revision[:12]}"

    # -- online --------------------------------------------------------------------------

    def _listing(self, spec: PullSpec) -> Listing:
        """The commit ``spec.revision`` points at, and every file of the repo at that commit.

        Two API calls: ``repo_info`` and ``list_repo_tree``.
        """
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            info = api.repo_info(spec.repo, revision=spec.revision)
            # A mirror may leave the commit out: the revision as asked for is the next best.
            commit = info.sha or spec.revision or "main"
            entries = api.list_repo_tree(spec.repo, recursive=True, revision=commit)
            files = [RemoteFile(e.path, e.size) for e in entries if isinstance(e, RepoFile)]
        except Exception as exc:
            raise self._translate(exc, spec) from exc
        return Listing(commit, files, self.endpoint)

    def _download(self, spec: PullSpec, listing: Listing, dest: Path, counter: ByteCounter) -> None:
        from huggingface_hub import snapshot_download

        try:
            # A commit hash as revision: the SDK skips its own revision lookup, and every file
            # comes from the same commit even if the branch moves meanwhile.
            snapshot_download(
                spec.repo,
                revision=listing.revision,
                local_dir=dest,
                cache_dir=self.download_cache,
                token=self.token,
                endpoint=self.endpoint,
                tqdm_class=cast(Any, _progress_bars(counter)),
                **sdk_patterns(spec),
            )
        except Exception as exc:
            raise self._translate(exc, spec) from exc

    def _classify(self, exc: BaseException, spec: PullSpec) -> YichuiError | None:
        names = class_names(exc)
        repo, where = spec.repo, self._where()
        rev = f" at revision {spec.revision!r}" if spec.revision else ""
        if "GatedRepoError" in names:
            return self._not_found(
                spec,
                f"{repo!r} is gated on {where}",
                hint="accept its conditions on the model page, then set YICHUI_HF_TOKEN",
            )
        if "RepositoryNotFoundError" in names:
            return self._not_found(
                spec, f"{repo!r} does not exist on {where} (or it is private)", _TOKEN_HINT
            )
        if "RevisionNotFoundError" in names:
            return self._not_found(
                spec,
                f"{repo!r} has no revision {spec.revision!r} on {where}",
                hint="use a branch, a tag or a full 40-character commit hash of the repo",
            )
        if "EntryNotFoundError" in names:
            return self._not_found(
                spec, f"a file of {repo!r}{rev} disappeared from {where} during the pull"
            )
        if "HFValidationError" in names:
            return self._not_found(
                spec, f"{repo!r} is not a valid Hugging Face repo id: {first_line(exc)}"
            )
        if "HfHubHTTPError" in names:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                return self._not_found(
                    spec, f"{where} refused access to {repo!r} (HTTP {status})", _TOKEN_HINT
                )
            if status == 404:  # a mirror that does not say what is missing
                return self._not_found(
                    spec, f"{where} has no {repo!r}{rev} (HTTP 404)", _TOKEN_HINT
                )
            return self._unavailable(
                spec,
                f"{where} answered HTTP {status} for {repo!r}",
                hint="the hub may be down or rate-limiting: retry later",
            )
        if is_unreachable(exc):
            return self._unavailable(
                spec,
                f"cannot reach {where}: {first_line(exc)}",
                hint="check the network or YICHUI_HF_ENDPOINT; with HF_HUB_OFFLINE=1 the local "
                "Hugging Face cache is used instead",
            )
        if "LocalEntryNotFoundError" in names:  # a file neither reachable nor in the cache
            return self._unavailable(
                spec, f"cannot fetch a file of {repo!r}{rev} from {where}: {first_line(exc)}"
            )
        return None

    # -- offline: a local Hugging Face cache -----------------------------------------------

    def _hf_cache(self) -> Path:
        from huggingface_hub import constants

        return self.cache_dir or Path(constants.HF_HUB_CACHE)

    def _cached(
        self, spec: PullSpec, unreachable: SourceUnavailableError | None
    ) -> tuple[str | None, Path, list[RemoteFile]]:
        from huggingface_hub import snapshot_download

        cache = self._hf_cache()
        try:
            # local_files_only: resolve refs/<revision> (or take a commit hash as is) and
            # return snapshots/<commit>, raising if it is absent or, when the SDK kept a file
            # listing for that commit, incomplete. Never touches the network.
            folder = Path(
                snapshot_download(
                    spec.repo,
                    revision=spec.revision,
                    cache_dir=cache,
                    local_files_only=True,
                    **sdk_patterns(spec),
                )
            )
        except Exception as exc:
            raise self._not_cached(exc, spec, cache, unreachable) from exc
        files = [f for f in snapshot_files(folder) if spec.wants(f.path)]
        if not files:
            raise self._offline_error(
                f"the cached snapshot of {spec.repo!r} in {cache} has no file matching the "
                "include/exclude patterns",
                spec,
                unreachable,
            )
        return folder.name, folder, files

    def _not_cached(
        self,
        exc: BaseException,
        spec: PullSpec,
        cache: Path,
        unreachable: SourceUnavailableError | None,
    ) -> YichuiError:
        names = class_names(exc)
        if isinstance(exc, YichuiError):
            return exc
        if "HFValidationError" in names or isinstance(exc, ValueError):
            return self._translate(exc, spec)
        revision = spec.revision or "main"
        if "IncompleteSnapshotError" in names:
            what = (
                f"the cached snapshot of {spec.repo!r} ({revision}) in {cache} is incomplete: "
                f"{first_line(exc)}"
            )
        else:
            storage = cache / ("models--" + spec.repo.replace("/", "--"))
            if storage.is_dir():
                cached = _cached_revisions(storage)
                what = (
                    f"revision {revision!r} of {spec.repo!r} is not in the local Hugging Face "
                    f"cache {cache} (cached: {', '.join(cached) or 'nothing'})"
                )
            else:
                what = f"{spec.repo!r} is not in the local Hugging Face cache {cache}"
        return self._offline_error(what, spec, unreachable)

    def _offline_hint(self, spec: PullSpec) -> str:
        return (
            f"download it into the cache first (`hf download {spec.repo}`), point "
            "HF_HUB_CACHE at a cache that has it, or unset HF_HUB_OFFLINE"
        )


def _cached_revisions(storage: Path) -> list[str]:
    """``ref (commit…)`` for each cached ref, then the snapshots no ref points at."""
    out: list[str] = []
    named: set[str] = set()
    refs = storage / "refs"
    if refs.is_dir():
        for ref in sorted(p for p in refs.rglob("*") if p.is_file()):
            commit = ref.read_text().strip()
            named.add(commit)
            out.append(f"{ref.relative_to(refs).as_posix()} ({commit[:12]})")
    snapshots = storage / "snapshots"
    if snapshots.is_dir():
        out += sorted(p.name[:12] for p in snapshots.iterdir() if p.name not in named)
    return out


class _ProgressBar:
    """Stands in for the ``tqdm`` class ``snapshot_download`` accepts, feeding a ProgressFn.

    The SDK creates several bars from it: one counting files, one for the bytes received from
    the network, and one for the bytes written, into which it aggregates every file's
    updates. Only the last is reported: it is the one that adds up to the files' sizes.
    """

    counter: ClassVar[ByteCounter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.desc = str(kwargs.get("desc") or "")
        # "Downloading bytes" is the network-transfer bar (compressed, deduplicated bytes).
        self.reports = kwargs.get("unit") == "B" and "bytes" not in self.desc
        self.n: int = kwargs.get("initial") or 0
        self.total: int | None = kwargs.get("total")
        self.format_dict: dict[str, Any] = {}
        if self.reports and self.n:
            self.counter.advance(self.n)

    def update(self, n: float | None = 1) -> bool:
        step = int(n or 0)
        self.n += step
        if self.reports and step:
            self.counter.advance(step)
        return True

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to draw."""

    def close(self) -> None:
        """Nothing to release."""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """Ignored."""

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        """Ignored."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Ignored."""

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bars(counter: ByteCounter) -> type[_ProgressBar]:
    """A ``_ProgressBar`` class bound to this one fetch's counter (the SDK wants a class)."""
    return type("_FetchProgressBar", (_ProgressBar,), {"counter": counter})
