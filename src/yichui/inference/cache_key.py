"""The response cache key, and which requests may be cached at all.

The key is the SHA-256 of one canonical JSON document (sorted keys, numbers normalised by
parameter type, no whitespace) holding everything that changes the output::

    {"v": 3, "scope": <tenant or "shared">, "endpoint": "chat" | "completion",
     "model": <resolved name>, "fingerprint": <weights fingerprint>,
     "options": {what the engine applies that changes the output: ModelCard.options},
     "params": {every GenerationParams field, defaults filled in},
     "messages": [{"role", "name", "content": [{"t": "text", "text"} | {"t": "image",
                   "pixels", "mode", "size", "detail"}]}]   (chat)
     "prompt": <text>                           (completion)}

Images enter by the digest of their decoded pixels (:func:`yichui.ml.images.pixel_digest`:
mode, size and every pixel, EXIF orientation applied), so the same picture sent as a data
URL, as a file or re-encoded losslessly gives one key, one changed pixel another, and a URL
(whose bytes may change) is never identity. An image's ``detail`` is part of it (``auto``
when omitted): a vision model may answer differently at another level. So are the engine's
``options`` (a local vision model's visual-token bounds, ``vision_max_pixels``).
Text parts of a message are joined the way the engines join them, so ``"hi"`` and
``[{"type": "text", "text": "hi"}]`` are one key. ``stream`` is not part of the key: a
streamed answer and a whole one are the same answer. Bump :data:`KEY_VERSION` whenever the
document changes meaning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import orjson

from yichui.inference.engine import EngineRequest, GenerationParams, ImagePart, Message

KEY_VERSION = 3
"""3: images by their pixels, and the engine's options (2 keyed images by their bytes, 1 had no
``detail``; older entries are never read again)."""

_FLOAT_PARAMS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})
_INT_PARAMS = frozenset({"max_tokens", "n", "seed"})


def canonical_params(params: GenerationParams) -> dict[str, Any]:
    """Every parameter with one spelling per value: ``0`` and ``0.0`` and ``-0.0`` agree."""
    out: dict[str, Any] = {}
    for name, value in asdict(params).items():
        if value is None:
            out[name] = None
        elif name in _FLOAT_PARAMS:
            out[name] = float(value) + 0.0  # + 0.0 turns -0.0 into 0.0
        elif name in _INT_PARAMS:
            out[name] = int(value)
        elif name == "stop":
            out[name] = list(value)
        else:
            out[name] = value
    return out


def _content(message: Message) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"t": "text", "text": message.content}] if message.content else []
    parts: list[dict[str, Any]] = []
    text: list[str] = []
    for part in message.content:
        if isinstance(part, ImagePart):
            if text:
                parts.append({"t": "text", "text": "".join(text)})
                text = []
            parts.append(
                {
                    "t": "image",
                    "pixels": part.digest,
                    "mode": part.mode,
                    "size": list(part.size),
                    "detail": part.detail,
                }
            )
        else:
            text.append(part)
    if text and "".join(text):
        parts.append({"t": "text", "text": "".join(text)})
    return parts


def key_document(
    request: EngineRequest,
    *,
    scope: str,
    fingerprint: str,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The document whose hash is the key (kept readable for debugging and the docs)."""
    doc: dict[str, Any] = {
        "v": KEY_VERSION,
        "scope": scope,
        "endpoint": request.kind,
        "model": request.model,
        "fingerprint": fingerprint,
        "options": dict(options or {}),
        "params": canonical_params(request.params),
    }
    if request.kind == "chat":
        doc["messages"] = [
            {"role": m.role, "name": m.name, "content": _content(m)} for m in request.messages
        ]
    else:
        doc["prompt"] = request.prompt
    return doc


def cache_key(
    request: EngineRequest,
    *,
    scope: str,
    fingerprint: str,
    options: Mapping[str, Any] | None = None,
) -> str:
    """``rc<version>-<sha256 hex>`` of the canonical key document."""
    doc = key_document(request, scope=scope, fingerprint=fingerprint, options=options)
    raw = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return f"rc{KEY_VERSION}-{hashlib.sha256(raw).hexdigest()}"


def is_deterministic(params: GenerationParams, *, honours_seed: bool) -> bool:
    """Greedy decoding (temperature 0), or an explicit seed on an engine that honours seeds.
    An omitted temperature is 1.0, not 0: such a request is sampled and not cached."""
    return params.greedy or (params.seed is not None and honours_seed)
