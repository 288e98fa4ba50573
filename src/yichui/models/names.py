"""Model names and their folders.

A name is ``name`` or ``org/name`` (hub style, ``Qwen/Qwen2.5-7B-Instruct``), each segment
``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 96 characters in all. Anything else (``..``, absolute
paths, backslashes, control characters, braces, ``@`` which is reserved for ``base@adapter``)
is rejected by pure string checks, before any I/O.
"""

from __future__ import annotations

import re
from pathlib import Path

from yichui.errors import InvalidModelNameError

MAX_NAME_LENGTH = 96
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe model name, else raise :class:`InvalidModelNameError`."""
    if not isinstance(name, str) or not name:
        raise InvalidModelNameError(str(name), "empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelNameError(name[:40] + "…", f"longer than {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidModelNameError(name, "contains control characters")
    if name.startswith("/") or name.startswith("~") or "\\" in name:
        raise InvalidModelNameError(name, "must be relative, like 'org/model'")
    segments = name.split("/")
    if len(segments) > 2:
        raise InvalidModelNameError(name, "at most one '/' (org/model)")
    for seg in segments:
        if seg in ("", ".", "..") or ".." in seg:
            raise InvalidModelNameError(name, "empty or '..' path segment")
        if not _SEGMENT.fullmatch(seg):
            raise InvalidModelNameError(
                name, "use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        if seg.endswith("."):
            raise InvalidModelNameError(name, "a segment may not end with '.'")
    return name


def model_dir(root: Path, name: str) -> Path:
    """The folder of model ``name`` under ``root`` (validated first)."""
    return root.joinpath(*validate_name(name).split("/"))


def staging_dir(root: Path, name: str) -> Path:
    """Where a pull of ``name`` is assembled (and resumed) before it is moved into place.

    Inside the root, so the final move is an atomic rename on the same filesystem; hidden,
    so listings and scans never see it.
    """
    return root / ".partial" / validate_name(name).replace("/", "--")


def trash_dir(root: Path) -> Path:
    """Where ``rm`` moves a model before deleting it, so the removal is atomic."""
    return root / ".trash"
