"""GGUF vision models, told apart from GGUF language models so that an import refuses them.

llama.cpp ships a vision-language model as two GGUF files: the language model, and the
vision projector (``mmproj-model-f16.gguf``: ``general.architecture`` ``clip``,
``general.type`` ``mmproj``, ``clip.*`` keys). transformers cannot load the projector, so
yichui would turn the pair into a text model at best; it refuses both with one line saying what
works instead (the model's safetensors folder, with its processor files).

The header is read here rather than with ``gguf.GGUFReader``: that one parses every key and
tensor before answering (about 4 s for the bundled 98 MB SmolLM2, most of it the tokenizer's
49,152 strings), while the keys needed come first in the file (``general.*``, then the
architecture's own). Reading stops at the first key past ``general.*``: a few hundred bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from yichui.errors import RequestError
from yichui.models.status import iter_files

REFUSAL = (
    "GGUF vision models (a separate mmproj file) are not supported: import the model's "
    "safetensors folder (config.json, processor files) instead"
)
"""What an import of a GGUF vision model answers (after the file at fault)."""

VISION_ARCHITECTURES = frozenset({"clip", "qwen2vl", "qwen2vlmoe", "qwen3vl", "qwen3vlmoe"})
"""``general.architecture`` values of GGUF vision parts: the projector (``clip``) and the
language halves that exist only beside one (Qwen-VL's, which transformers cannot load)."""

_MAGIC = b"GGUF"
_KEY_LIMIT = 1 << 16  # a key or string longer than this is not a real header: stop reading
_KEYS_READ = 64
# GGUF scalar value types (the spec's numbering) -> their struct format; 8 is a string, 9 an
# array
_FORMATS = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def vision_reason(path: Path) -> str | None:
    """Why the GGUF file ``path`` is part of a vision model (its name, or a header key), or
    None for anything else (a language model, an unreadable or foreign file)."""
    if "mmproj" in path.name.lower():
        return "its name says mmproj"
    header = read_header(path)
    arch = header.get("general.architecture")
    if isinstance(arch, str) and arch.lower() in VISION_ARCHITECTURES:
        return f"general.architecture is {arch!r}"
    if header.get("general.type") == "mmproj":
        return "general.type is 'mmproj'"
    clip = next((k for k in header if k.startswith("clip.")), None)
    if clip is not None:
        return f"it has {clip}"
    return None


def refuse_vision_gguf(path: Path) -> None:
    """Raise a 400 :class:`~yichui.errors.RequestError` when ``path`` (a ``.gguf`` file, or a
    folder holding any) is part of a GGUF vision model; nothing is written either way."""
    if path.is_dir():
        candidates = [path / rel for rel, _ in iter_files(path) if rel.lower().endswith(".gguf")]
    else:
        candidates = [path]
    for candidate in candidates:
        reason = vision_reason(candidate)
        if reason is not None:
            raise RequestError(
                f"{candidate.name} is part of a GGUF vision model ({reason}). {REFUSAL}",
                param="path",
            )


def read_header(path: Path) -> dict[str, object]:
    """The ``general.*`` keys of a GGUF file's header with their scalar or string values,
    and the name of the first key after them (value None); {} for a file that is no GGUF."""
    try:
        with open(path, "rb") as fh:
            return _read(fh)
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return {}


def _read(fh: BinaryIO) -> dict[str, object]:
    if fh.read(4) != _MAGIC:
        return {}
    (version,) = struct.unpack("<I", fh.read(4))
    order = "<" if version & 0xFFFF else ">"  # a big-endian file reads as version << 16
    (version,) = struct.unpack(order + "I", struct.pack("<I", version))
    if version < 2:  # GGUF v1 (2023) counted in 32 bits; nobody writes it any more
        return {}
    _tensors, count = struct.unpack(order + "QQ", fh.read(16))
    out: dict[str, object] = {}
    for _ in range(min(count, _KEYS_READ)):
        key = _string(fh, order)
        if not key.startswith("general."):
            out[key] = None
            break
        (kind,) = struct.unpack(order + "I", fh.read(4))
        out[key] = _value(fh, order, kind)
    return out


def _string(fh: BinaryIO, order: str) -> str:
    (size,) = struct.unpack(order + "Q", fh.read(8))
    if size > _KEY_LIMIT:
        raise ValueError("not a GGUF string")
    return fh.read(size).decode()


def _value(fh: BinaryIO, order: str, kind: int) -> object:
    """A scalar's or string's value; an array is skipped (None)."""
    if kind == _STRING:
        return _string(fh, order)
    if kind == _ARRAY:
        element, count = struct.unpack(order + "IQ", fh.read(12))
        if element == _STRING:
            for _ in range(count):
                _string(fh, order)
        elif element in _FORMATS:
            fh.seek(struct.calcsize(_FORMATS[element]) * count, 1)
        else:
            raise ValueError(f"GGUF array of type {element}")
        return None
    if kind not in _FORMATS:
        raise ValueError(f"GGUF value of type {kind}")
    fmt = order + _FORMATS[kind]
    (value,) = struct.unpack(fmt, fh.read(struct.calcsize(fmt)))
    return value
