"""Request schemas of the OpenAI-compatible endpoints, and their translation to engine terms.

Unknown fields are refused (400, field named) rather than ignored: a parameter we do not apply
would otherwise change nothing in the answer while the client believes it did, and the cache
would key on less than the request meant. Fields that change nothing (``user``, ``metadata``,
``store``, …) are accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from yichui.errors import RequestError
from yichui.inference.engine import (
    DEFAULT_MAX_TOKENS,
    EngineRequest,
    GenerationParams,
    ImageDetail,
    ImagePart,
    Message,
)

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: ImageDetail | None = "auto"
    """``auto`` when omitted or ``null`` (as accepted before); passed on to upstreams, and part
    of the cache key, since it can change the answer."""


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(default=None, max_length=64)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted, with no effect on the answer
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # accepted only when they ask for nothing
    logprobs: bool | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def params(self, max_tokens: int | None) -> GenerationParams:
        """Every output-affecting parameter, defaults filled in as the engines apply them."""
        return GenerationParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            n=self.n,
            stop=self.stop_list(),
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_unsupported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    def to_engine(self, image_roots: list[Path]) -> EngineRequest:
        messages = tuple(
            Message(m.role, _content(m.content, i, image_roots), m.name)
            for i, m in enumerate(self.messages)
        )
        return EngineRequest(
            model=self.model,
            kind="chat",
            params=self.params(self.max_completion_tokens or self.max_tokens),
            messages=messages,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @model_validator(mode="after")
    def _completion_unsupported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: exactly one prompt per request")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def to_engine(self) -> EngineRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return EngineRequest(
            model=self.model, kind="completion", params=self.params(self.max_tokens), prompt=prompt
        )


def _content(
    content: str | list[TextPart | ImageURLPart], index: int, roots: list[Path]
) -> str | tuple[str | ImagePart, ...]:
    if isinstance(content, str):
        return content
    parts: list[str | ImagePart] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            parts.append(part.text)
        else:
            where = f"messages.{index}.content.{j}.image_url.url"
            detail = part.image_url.detail or "auto"
            parts.append(load_image(part.image_url.url, where, roots, detail=detail))
    return tuple(parts)


def sniff(data: bytes) -> str | None:
    """The media type of image bytes, from their magic number (None: not an image we know)."""
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def load_image(
    url: str, where: str, roots: list[Path], *, detail: ImageDetail = "auto"
) -> ImagePart:
    """An image from a base64 data URL or a local file under ``roots``; 400 otherwise."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(
                "image data URLs must be base64: data:<type>;base64,<bytes>", param=where
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image data URL is not valid base64", param=where) from None
    else:
        data = _read_local(url, where, roots)
    media_type = sniff(data)
    if media_type is None:
        raise RequestError("not an image (PNG, JPEG, GIF, WebP or BMP expected)", param=where)
    return ImagePart(data, media_type, hashlib.sha256(data).hexdigest(), detail)


def _read_local(url: str, where: str, roots: list[Path]) -> bytes:
    split = urlsplit(url)
    if split.scheme in ("http", "https"):
        raise RequestError("image URLs are not fetched: send the bytes as a data URL", param=where)
    if split.scheme not in ("", "file"):
        raise RequestError(f"unsupported image URL scheme {split.scheme!r}", param=where)
    path = Path(unquote(split.path if split.scheme == "file" else url))
    if not roots:
        raise RequestError("local image files are disabled (see image_file_roots)", param=where)
    # where the path leads, checked against the roots before anything says whether it exists
    real = Path(os.path.realpath(path))
    if not path.is_absolute() or not any(real.is_relative_to(os.path.realpath(r)) for r in roots):
        raise RequestError("image file is outside image_file_roots", param=where)
    try:
        return real.read_bytes()
    except OSError:
        raise RequestError("image file not found or not readable", param=where) from None
