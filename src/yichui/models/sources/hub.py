"""What the Hugging Face and ModelScope sources share: the shape of a hub pull.

Both hubs are pulled the same way, and :class:`HubSource` holds that way once:

* **plan**: list the repo's files at the revision (one or two API calls) and keep the wanted
  ones; offline, or when the hub cannot be reached, describe what the local SDK cache holds.
* **fetch**: list, let the SDK's ``snapshot_download`` fill the staging folder directly (it
  resumes what an earlier attempt left), then check that every listed file arrived; offline or
  unreachable, hard-link (else copy) the cached snapshot's files instead.
* **errors**: a yichui error raised anywhere in the SDK's chain (the progress callback's lost
  lock) passes through; an SDK exception is classified by the subclass; what is left becomes a
  :class:`~yichui.errors.DownloadError` (a local write failed) or
  :class:`~yichui.errors.SourceUnavailableError`.

A subclass supplies only what differs between the SDKs: how the SDK is found and told to be
offline, the listing call, the download call with its progress hook, the cache lookup and the
SDK's own exception names.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

from yichui.errors import (
    DownloadError,
    SourceNotFoundError,
    SourceUnavailableError,
    YichuiError,
)
from yichui.models.sources.base import Plan, ProgressFn, PullSpec, RemoteFile
from yichui.models.sources.files import (
    error_chain,
    first_line,
    is_complete,
    normalize_patterns,
    place_files,
)

_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # what huggingface_hub accepts as "true"


def env_true(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (``1``, ``yes``, …)."""
    return (os.environ.get(name) or "").strip().upper() in _TRUE


class SdkPatterns(TypedDict):
    """The filter arguments both SDKs' ``snapshot_download`` takes (None: no filter)."""

    allow_patterns: list[str] | None
    ignore_patterns: list[str] | None


def sdk_patterns(spec: PullSpec) -> SdkPatterns:
    """``spec``'s patterns as keyword arguments of ``snapshot_download``."""
    return {
        "allow_patterns": list(spec.include) or None,
        "ignore_patterns": list(spec.exclude) or None,
    }


@dataclass(frozen=True)
class Listing:
    """A repo's files at one revision, as the hub's API listed them."""

    revision: str
    """What the fetch is pinned to and records: a commit hash, or a branch or tag name."""
    files: list[RemoteFile]
    endpoint: str | None
    """The endpoint that has the repo (ModelScope probes two when none is configured)."""


class HubOptions(TypedDict, total=False):
    """Where and as whom a hub is reached; every key may be left out (see :class:`HubSource`)."""

    endpoint: str | None
    token: str | None
    cache_dir: Path | None
    download_cache: Path | None


class ByteCounter:
    """Bytes done out of a total, for one fetch; advanced from the SDK's worker threads."""

    def __init__(self, progress: ProgressFn | None, done: int, total: int) -> None:
        self.progress = progress
        self.done = done
        self.total = total
        self.lock = threading.Lock()

    def advance(self, step: int) -> None:
        """Add ``step`` bytes and report; may raise what the ProgressFn raises (a lost lock)."""
        with self.lock:
            self.done += step
            # Clamped: a retried or resumed file may be counted twice, never past the total.
            done = min(self.done, self.total) if self.total else self.done
        if self.progress is not None:
            self.progress(done, self.total or None)


class HubSource(ABC):
    """A hub reached through its SDK, online or from the SDK's local cache.

    ``endpoint`` is a mirror of the hub (default: the SDK's); ``token`` an access token
    (default: the SDK's stored login or environment); ``cache_dir`` the SDK cache read when
    offline (default: the SDK's); ``download_cache`` the ``cache_dir`` handed to online
    downloads, so they leave the user's own cache alone.
    """

    name: str
    title: str
    """The hub as a user names it ("Hugging Face"): in messages and log lines."""
    home: str
    """Where the hub is when no endpoint is configured, as messages name it."""
    offline_reason: str
    """How a message says that offline mode is on ("offline (HF_HUB_OFFLINE is set)")."""

    def __init__(self, **options: Unpack[HubOptions]) -> None:
        endpoint = options.get("endpoint")
        cache_dir = options.get("cache_dir")
        download_cache = options.get("download_cache")
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.token = options.get("token")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.download_cache = Path(download_cache) if download_cache is not None else None

    # -- what each SDK does its own way ----------------------------------------------------

    @abstractmethod
    def is_offline(self) -> bool:
        """Whether to use the local cache only (read at call time)."""

    @abstractmethod
    def _require_sdk(self) -> None:
        """Raise :class:`~yichui.errors.MissingExtraError` where the SDK is not installed."""

    @abstractmethod
    def _listing(self, spec: PullSpec) -> Listing:
        """The revision to fetch and every file of the repo there (raises yichui errors)."""

    @abstractmethod
    def _download(self, spec: PullSpec, listing: Listing, dest: Path, counter: ByteCounter) -> None:
        """Let the SDK fill ``dest`` with ``spec``'s files at ``listing.revision``, advancing
        ``counter`` as bytes arrive (raises yichui errors)."""

    @abstractmethod
    def _cached(
        self, spec: PullSpec, unreachable: SourceUnavailableError | None
    ) -> tuple[str | None, Path, list[RemoteFile]]:
        """(revision, snapshot folder, wanted files) of ``spec`` in the local cache."""

    @abstractmethod
    def _classify(self, exc: BaseException, spec: PullSpec) -> YichuiError | None:
        """The yichui error an SDK exception stands for; None to fall back on the generic."""

    @abstractmethod
    def _offline_hint(self, spec: PullSpec) -> str:
        """What to do when offline mode is on and the cache lacks ``spec``."""

    def _revision_label(self, revision: str) -> str:
        """``revision`` as a message shows it after the repo name."""
        return f"({revision})"

    def _expected_size(self, file: RemoteFile) -> int | None:
        """The size a complete copy of ``file`` has (None: any size will do)."""
        return file.size

    # -- the ModelSource interface ---------------------------------------------------------

    def plan(self, spec: PullSpec) -> Plan:
        """Resolve the revision and list the wanted files; writes nothing.

        Offline, or when the hub is unreachable, the plan describes what the local cache would
        provide.
        """
        self._require_sdk()
        spec = normalize_patterns(spec)
        if self.is_offline():
            return self._cached_plan(spec, unreachable=None)
        try:
            listing = self._listing(spec)
        except SourceUnavailableError as exc:
            return self._cached_plan(spec, unreachable=exc)
        return Plan(self.name, spec.repo, listing.revision, self._wanted(spec, listing))

    def fetch(self, spec: PullSpec, dest: Path, progress: ProgressFn | None = None) -> str | None:
        """Download into ``dest`` (resuming what is there); return the revision fetched."""
        self._require_sdk()
        spec = normalize_patterns(spec)
        if self.is_offline():
            return self._fetch_cached(spec, dest, progress, unreachable=None)
        try:
            listing = self._listing(spec)
        except SourceUnavailableError as exc:
            return self._fetch_cached(spec, dest, progress, unreachable=exc)
        wanted = self._wanted(spec, listing)
        total = sum(f.size or 0 for f in wanted)
        already = sum(
            f.size or 0 for f in wanted if is_complete(dest / f.path, self._expected_size(f))
        )
        self._download(spec, listing, dest, ByteCounter(progress, already, total))
        # When the file listing fails mid-way an SDK may return a non-empty local_dir as it is
        # (logging a warning), so completeness is checked here rather than assumed.
        missing = [f.path for f in wanted if not is_complete(dest / f.path, self._expected_size(f))]
        if missing:
            raise self._unavailable(
                spec,
                f"the pull of {spec.repo!r} stopped with {len(missing)} file(s) missing "
                f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})",
                hint="run the pull again: it resumes where it stopped",
            )
        return listing.revision

    # -- shared steps ------------------------------------------------------------------------

    def _where(self) -> str:
        return self.endpoint or self.home

    def _wanted(self, spec: PullSpec, listing: Listing) -> list[RemoteFile]:
        wanted = [f for f in listing.files if spec.wants(f.path)]
        if not wanted:
            raise self._not_found(
                spec,
                f"no file of {spec.repo!r} {self._revision_label(listing.revision)} matches the "
                "include/exclude patterns",
            )
        return wanted

    def _not_found(self, spec: PullSpec, message: str, hint: str | None = None) -> YichuiError:
        return SourceNotFoundError(message, name=spec.repo, source=self.name, hint=hint)

    def _unavailable(self, spec: PullSpec, message: str, hint: str | None = None) -> YichuiError:
        return SourceUnavailableError(message, name=spec.repo, source=self.name, hint=hint)

    def _translate(self, exc: BaseException, spec: PullSpec) -> YichuiError:
        """The yichui error for an exception the SDK raised (a yichui one passes through)."""
        for link in error_chain(exc):
            if isinstance(link, YichuiError):  # e.g. the progress callback's lost lock
                return link
        known = self._classify(exc, spec)
        if known is not None:
            return known
        if isinstance(exc, OSError):
            return DownloadError(
                f"writing {spec.repo!r} failed: {exc.strerror or exc}", name=spec.repo
            )
        return self._unavailable(
            spec, f"{self.title} download failed: {type(exc).__name__}: {first_line(exc)}"
        )

    def _cached_plan(self, spec: PullSpec, unreachable: SourceUnavailableError | None) -> Plan:
        revision, _, files = self._cached(spec, unreachable)
        return Plan(self.name, spec.repo, revision, files)

    def _fetch_cached(
        self,
        spec: PullSpec,
        dest: Path,
        progress: ProgressFn | None,
        unreachable: SourceUnavailableError | None,
    ) -> str | None:
        revision, folder, files = self._cached(spec, unreachable)
        if unreachable is not None:
            # Logged under the SDK module's name, as each source did before sharing this.
            logging.getLogger(type(self).__module__).warning(
                "%s; using the local %s cache instead", unreachable.message, self.title
            )
        place_files(folder, files, dest, progress, name=spec.repo)
        return revision

    def _offline_error(
        self,
        what: str,
        spec: PullSpec,
        unreachable: SourceUnavailableError | None,
        detail: str | None = None,
    ) -> YichuiError:
        """The error for a cache that lacks ``what``; ``unreachable`` when the hub was down."""
        if unreachable is not None:
            # The hub is down or unreachable: the model may well exist, so "unavailable".
            return self._unavailable(spec, f"{unreachable.message}, and {what}", unreachable.hint)
        # Offline on purpose: the cache is the whole source, and it does not have it.
        return self._not_found(
            spec,
            f"{self.offline_reason}: {what}" + (f" ({detail})" if detail else ""),
            hint=self._offline_hint(spec),
        )
