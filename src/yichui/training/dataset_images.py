"""Images in dataset records: where they may be, what they must be, and their snapshot copies.

A record names an image by a path, a ``file://`` URL or a ``data:`` URL (see
:mod:`yichui.training.dataset` for the record shapes). The rules:

- a relative path is relative to the dataset's folder and, links followed, must stay inside it;
- an absolute path (or ``file://`` URL) must lead under one of ``image_file_roots``;
- ``http(s)`` URLs are refused: a dataset is checked, and trained on, from local bytes only;
- every image must decode under the limits requests have (:func:`yichui.ml.images.decode`
  with :meth:`ImageLimits.from_settings`), and a record may hold at most ``images_per_request``
  images, a message ``images_per_message``.

When a task is queued its dataset is snapshotted: each image is copied to
``<datasets>/images/<sha256><suffix>`` and the JSONL is rewritten to name the copies, so the
snapshot's hash covers every image's bytes and a retried task reads what was checked. Nothing
here imports torch; Pillow only to check an image.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from yichui.errors import DatasetError, RequestError
from yichui.ml.images import ImageLimits, b64decode, decode

if TYPE_CHECKING:
    from yichui.config import Settings

IMAGES_DIR = "images"
"""The snapshot's image folder, beside the rewritten JSONL (whose paths are relative to it)."""
SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
_MEDIA_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp",
                 "image/gif": ".gif", "image/bmp": ".bmp"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ImageRules:
    """How a dataset's images are checked: the request limits, the folders absolute paths may
    lead into, and whether each image is decoded (``check``: when queuing; a worker reading
    its checked snapshot only resolves the paths)::

        rules = ImageRules.from_settings(settings)
    """

    limits: ImageLimits = field(default_factory=ImageLimits)
    roots: tuple[Path, ...] = ()
    check: bool = True

    @classmethod
    def from_settings(cls, settings: Settings, *, check: bool = True) -> ImageRules:
        return cls(ImageLimits.from_settings(settings), tuple(settings.image_file_roots), check)


@dataclass(frozen=True, slots=True)
class ImageSource:
    """Where one image's bytes are: a file (``path``) or a data URL's payload (``data``)."""

    path: Path | None = None
    data: bytes | None = None
    suffix: str = ""

    def read(self, limits: ImageLimits) -> bytes:
        """The bytes (one over ``max_bytes`` at most, enough for decode() to refuse them)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as fh:
            # never more than the file holds: read(n) allocates n bytes up front
            size = os.fstat(fh.fileno()).st_size
            return fh.read(min(limits.max_bytes, size) + 1)


def resolve(ref: Any, where: str, line: int, dataset: Path, rules: ImageRules) -> ImageSource:
    """The image a record names (``ref`` at ``where``), or DatasetError naming line and part."""
    if not isinstance(ref, str) or not ref.strip():
        raise DatasetError(
            f"{where}: an image must be a path or URL string", path=dataset, line=line
        )
    scheme = urlsplit(ref).scheme.lower() if "://" in ref or ref.startswith("data:") else ""
    if scheme == "data":
        return ImageSource(data=_data_url(ref, where, line, dataset), suffix=_data_suffix(ref))
    if scheme in ("http", "https"):
        raise DatasetError(
            f"{where}: remote images are not fetched ({ref[:60]}); save it beside the dataset",
            path=dataset,
            line=line,
        )
    if scheme == "file":
        ref = unquote(urlsplit(ref).path)
    elif scheme:
        raise DatasetError(
            f"{where}: unsupported image URL scheme {scheme!r}", path=dataset, line=line
        )
    given = Path(ref).expanduser()
    if given.is_absolute():
        real = Path(os.path.realpath(given))
        if not any(real.is_relative_to(os.path.realpath(r)) for r in rules.roots):
            raise DatasetError(
                f"{where}: image {ref!r} is outside image_file_roots"
                + ("" if rules.roots else " (none are set)")
                + "; name it relative to the dataset's folder",
                path=dataset,
                line=line,
            )
    else:
        folder = Path(os.path.realpath(dataset.parent))
        real = Path(os.path.realpath(folder / given))
        if not real.is_relative_to(folder):
            raise DatasetError(
                f"{where}: image {ref!r} leads outside the dataset's folder",
                path=dataset,
                line=line,
            )
    suffix = real.suffix.lower()
    return ImageSource(path=real, suffix=suffix if suffix in SUFFIXES else "")


def check(
    source: ImageSource, ref: str, where: str, line: int, dataset: Path, rules: ImageRules
) -> bytes:
    """The image's bytes, decoded once under the request limits; DatasetError otherwise."""
    shown = ref if len(ref) < 80 else ref[:60] + "…"
    try:
        data = source.read(rules.limits)
    except OSError as exc:
        why = "not found" if isinstance(exc, FileNotFoundError) else "not readable"
        raise DatasetError(f"{where}: image {shown!r} {why}", path=dataset, line=line) from None
    if rules.check:
        try:
            decode(data, where, rules.limits)
        except RequestError as exc:
            raise DatasetError(
                f"{where}: image {shown!r}: {exc.message}", path=dataset, line=line
            ) from None
    return data


def stored_name(data: bytes, source: ImageSource) -> str:
    """The snapshot's name for an image: ``images/<sha256 of its bytes><suffix>``."""
    return f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}{source.suffix}"


def store(data: bytes, name: str, folder: Path) -> None:
    """Write ``data`` as ``folder/name`` (once: the name is its content's hash)."""
    dest = folder / name
    if dest.exists() and dest.stat().st_size == len(data):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def verify_stored(folder: Path, names: list[str]) -> str | None:
    """The first stored image that is missing or whose bytes no longer match its name."""
    for name in names:
        path = folder / name
        stem = Path(name).name.split(".", 1)[0]
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return name
        if digest != stem:
            return name
    return None


def _data_url(ref: str, where: str, line: int, dataset: Path) -> bytes:
    head, sep, payload = ref.partition(",")
    if not sep or not head.endswith(";base64"):
        raise DatasetError(
            f"{where}: a data URL must be base64 (data:image/...;base64,...)",
            path=dataset,
            line=line,
        )
    try:
        return b64decode(payload)
    except (binascii.Error, ValueError):
        raise DatasetError(
            f"{where}: the image data URL is not valid base64", path=dataset, line=line
        ) from None


def _data_suffix(ref: str) -> str:
    media = ref[5:].split(";", 1)[0].lower()
    return _MEDIA_SUFFIX.get(media, "")
