"""File plumbing shared by the sources: resumable copies, links from hub caches, patterns,
and classification of SDK errors."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from yichui.errors import DownloadError
from yichui.models.sources.base import ProgressFn, PullSpec, RemoteFile

CHUNK = 4 << 20

# Exception classes (by name, so no transport library is imported) that mean "could not
# reach the server": httpx/httpx2 transport errors, requests' and the builtin ones.
_UNREACHABLE = frozenset(
    {
        "TransportError",
        "TimeoutException",
        "ConnectionError",
        "Timeout",
        "TimeoutError",
        "OfflineModeIsEnabled",
    }
)


def copy_resumable(src: Path, dst: Path, done: int, total: int, progress: ProgressFn | None) -> int:
    """Copy ``src`` to ``dst`` through ``dst.part``, continuing a partial copy; return ``done``
    advanced by the file's size (progress is reported as ``(done, total)``)."""
    size = src.stat().st_size
    if dst.exists() and dst.stat().st_size == size:
        done += size
        if progress:
            progress(done, total)
        return done
    part = dst.with_name(dst.name + ".part")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            offset = 0
        with open(src, "rb") as fin, open(part, "ab" if offset else "wb") as fout:
            fin.seek(offset)
            done += offset
            while block := fin.read(CHUNK):
                fout.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(part, dst)
    except OSError as exc:
        raise DownloadError(
            f"copying {src.name} failed: {exc.strerror or exc}", name=str(dst.parent)
        ) from exc
    return done


def normalize_patterns(spec: PullSpec) -> PullSpec:
    """``spec`` with ``dir/`` patterns written ``dir/*``, as both hub SDKs read them.

    This keeps :meth:`PullSpec.wants` (plain ``fnmatch``) in step with what the SDKs fetch.
    """

    def fix(patterns: Sequence[str]) -> tuple[str, ...]:
        return tuple(p + "*" if p.endswith("/") else p for p in patterns)

    return replace(spec, include=fix(spec.include), exclude=fix(spec.exclude))


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, nearest first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def class_names(exc: BaseException) -> set[str]:
    """Names of the classes ``exc`` is an instance of (SDK errors are matched by name)."""
    return {cls.__name__ for cls in type(exc).__mro__}


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the server could not be reached."""
    return any(
        isinstance(link, ConnectionError | TimeoutError) or class_names(link) & _UNREACHABLE
        for link in error_chain(exc)
    )


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (SDK messages run to several paragraphs)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def snapshot_files(folder: Path, *, skip_hidden: bool = False) -> list[RemoteFile]:
    """Every file under a cached snapshot, following file symlinks (HF's point at blobs).

    Symlinked directories are not followed (a cache never needs them, and a loop would never
    end); dangling links, the remains of a damaged cache, are left out.
    """
    out: list[RemoteFile] = []
    stack = [(folder, "")]
    while stack:
        current, prefix = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                if skip_hidden and entry.name.startswith("."):
                    continue
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=True):
                    out.append(RemoteFile(rel, entry.stat(follow_symlinks=True).st_size))
    out.sort(key=lambda f: f.path)
    return out


def place_files(
    src_root: Path,
    files: Sequence[RemoteFile],
    dest: Path,
    progress: ProgressFn | None,
    *,
    name: str,
) -> None:
    """Hard-link (else copy) ``files`` from a cached snapshot into ``dest``, resumably.

    A hard link costs neither space nor time. Sharing the inode with the cache blob is safe as
    long as nobody writes into a model file in place: the SDKs and the copy fallback never do
    (they write a new file and rename it over the old one), and cache blobs are immutable. Each link
    replaces whatever an earlier attempt left at that path, since a file of the same size
    may still be another revision's. Across filesystems (a models root on a NAS), or where
    links are refused, the file is copied through a ``.part`` file that a later attempt
    continues, and a file already there with the right size is kept.
    """
    total, done = sum(f.size or 0 for f in files), 0
    for f in files:
        src = (src_root / f.path).resolve()
        dst = dest / f.path
        if not _link(src, dst):
            try:
                done = copy_resumable(src, dst, done, total, progress)
            except DownloadError as exc:
                raise DownloadError(exc.message, name=name) from exc
            continue
        done += f.size or 0
        if progress:
            progress(done, total)


def _link(src: Path, dst: Path) -> bool:
    """Make ``dst`` a hard link to ``src``; False where the filesystem will not."""
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return True
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, dst)  # atomic: dst is either the old file or the complete new one
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    dst.with_name(dst.name + ".part").unlink(missing_ok=True)  # a copy the link supersedes
    return True


def is_complete(path: Path, size: int | None) -> bool:
    """Whether ``path`` is a file of ``size`` bytes (of any size when that is unknown)."""
    try:
        return path.is_file() and (size is None or path.stat().st_size == size)
    except OSError:
        return False
