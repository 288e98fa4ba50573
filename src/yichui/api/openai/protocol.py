"""Request schemas of the OpenAI-compatible endpoints, and their translation to engine terms.

Unknown fields are refused (400, field named) rather than ignored: a parameter we do not apply
would otherwise change nothing in the answer while the client believes it did, and the cache
would key on less than the request meant. Fields that change nothing (``user``, ``metadata``,
``store``, …) are accepted.
"""

from __future__ import annotations

import binascii
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
    ImageSource,
    Message,
)
from yichui.ml import images
from yichui.ml.images import ImageLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str  # not min_length: pydantic counts the characters of megabytes (load_image checks)
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

    def to_engine(
        self, image_roots: list[Path], limits: ImageLimits = ImageLimits()
    ) -> EngineRequest:
        """The engine's request, images decoded and checked (400 naming the part)."""
        seen = [0]  # images so far in this request
        messages = tuple(
            Message(m.role, _content(m.content, i, image_roots, limits, seen), m.name)
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
    content: str | list[TextPart | ImageURLPart],
    index: int,
    roots: list[Path],
    limits: ImageLimits,
    seen: list[int],
) -> str | tuple[str | ImagePart, ...]:
    if isinstance(content, str):
        return content
    parts: list[str | ImagePart] = []
    in_message = 0
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            parts.append(part.text)
            continue
        where = f"messages.{index}.content.{j}.image_url"
        in_message += 1
        seen[0] += 1
        if seen[0] > limits.per_request:
            raise RequestError(
                f"more than {limits.per_request} images in one request (images_per_request)",
                param=where,
            )
        if in_message > limits.per_message:
            raise RequestError(
                f"more than {limits.per_message} images in one message (images_per_message)",
                param=where,
            )
        detail = part.image_url.detail or "auto"
        parts.append(load_image(part.image_url.url, where, roots, limits, detail=detail))
    return tuple(parts)


def has_images(body: ChatCompletionRequest) -> bool:
    """Whether any message has an image part (decoding them is worth a worker thread)."""
    return any(
        not isinstance(m.content, str) and any(isinstance(p, ImageURLPart) for p in m.content)
        for m in body.messages
    )


def load_image(
    url: str,
    where: str,
    roots: list[Path],
    limits: ImageLimits,
    *,
    detail: ImageDetail = "auto",
) -> ImagePart:
    """An image from a base64 data URL or a local file under ``roots``, decoded under
    ``limits`` (:mod:`yichui.ml.images`); 400 naming ``where`` otherwise. Remote URLs are
    never fetched."""
    source: ImageSource = "data"
    if not url:
        raise RequestError("the image URL is empty", param=where)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(
                "image data URLs must be base64: data:<type>;base64,<bytes>", param=where
            )
        if len(payload) > (limits.max_bytes + 2) // 3 * 4 + 4:  # refused before decoding
            raise RequestError(
                f"image is more than the {limits.max_bytes} bytes allowed (image_max_bytes)",
                param=where,
            )
        try:
            data = images.b64decode(payload)
        except (binascii.Error, ValueError):
            raise RequestError("image data URL is not valid base64", param=where) from None
    else:
        data = images.read_file(_local_path(url, where), where, roots, limits)
        source = "file"
    return ImagePart.of(images.decode(data, where, limits), detail=detail, source=source)


def _local_path(url: str, where: str) -> Path:
    split = urlsplit(url)
    if split.scheme in ("http", "https"):
        raise RequestError("image URLs are not fetched: send the bytes as a data URL", param=where)
    if split.scheme not in ("", "file"):
        raise RequestError(f"unsupported image URL scheme {split.scheme!r}", param=where)
    return Path(unquote(split.path if split.scheme == "file" else url))
