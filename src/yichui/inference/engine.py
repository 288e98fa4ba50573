"""The one interface every inference engine implements, and the values it speaks in.

The API layer turns an OpenAI request into an :class:`EngineRequest` with every generation
parameter resolved (defaults filled in as the engine applies them: the response cache keys on
exactly these), asks an :class:`Engine` for a whole :class:`EngineResult` or a stream of
:class:`EngineChunk`, and builds the OpenAI response body from that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from yichui.config import Settings
    from yichui.metrics import Metrics
    from yichui.ml.images import DecodedImage
    from yichui.models.registry import ModelRegistry

DEFAULT_MAX_TOKENS = 256
"""``max_tokens`` when a request gives none (OpenAI's "up to the context" is too much for a CPU)."""

ImageDetail = Literal["auto", "low", "high"]
"""How closely a vision model should look at an image (OpenAI's ``image_url.detail``)."""


ImageSource = Literal["data", "file"]
"""Where an image came from: a base64 data URL in the request, or a local file (which may
change under the same request bytes: such requests never take the hit fast path)."""


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image content part, decoded and checked (:func:`yichui.inference.images.decode`).

    ``image`` is the decoded picture (a Pillow image: EXIF orientation applied, the first frame
    of an animation), what a local vision model is given. ``data`` is what an upstream is sent:
    the bytes as they came, or a PNG of ``image`` when orienting or taking a frame changed them.
    ``digest`` stands for the pixels (mode, size and every pixel's bytes): the response cache
    keys on it, so the same picture sent as a data URL, as a file or re-encoded losslessly is
    one key. ``detail`` can change the answer, so the cache keys on it too."""

    data: bytes
    media_type: str
    digest: str
    mode: str
    size: tuple[int, int]
    detail: ImageDetail = "auto"
    source: ImageSource = "data"
    image: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def of(
        cls, decoded: DecodedImage, *, detail: ImageDetail = "auto", source: ImageSource = "data"
    ) -> ImagePart:
        """The part of an image :func:`yichui.ml.images.decode` accepted."""
        return cls(
            data=decoded.data,
            media_type=decoded.media_type,
            digest=decoded.digest,
            mode=decoded.mode,
            size=decoded.size,
            detail=detail,
            source=source,
            image=decoded.image,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``content`` is text, or parts: ``str`` text and :class:`ImagePart`."""

    role: str
    content: str | tuple[str | ImagePart, ...]
    name: str | None = None

    def text(self) -> str:
        """The text of the message (image parts left out)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p for p in self.content if isinstance(p, str))

    def images(self) -> list[ImagePart]:
        if isinstance(self.content, str):
            return []
        return [p for p in self.content if isinstance(p, ImagePart)]


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Every parameter that changes the output, resolved (no None meaning "default")."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What an engine runs: a chat (``messages``) or a plain completion (``prompt``)."""

    model: str
    kind: Literal["chat", "completion"]
    params: GenerationParams
    messages: tuple[Message, ...] = ()
    prompt: str = ""


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    finish_reason: Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class EngineResult:
    choices: tuple[Choice, ...]
    usage: Usage


@dataclass(frozen=True, slots=True)
class EngineChunk:
    """A piece of a streamed answer: new ``text`` of choice ``index``; the last chunk of a
    choice has ``finish_reason``; the very last chunk of a stream carries ``usage``."""

    index: int
    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class ModelCard:
    """A model an engine serves, for ``/v1/models`` and the cache key."""

    id: str
    owned_by: str
    fingerprint: str
    """Changes whenever the weights do (re-download, merge): old cache entries become
    unreachable. For an upstream: its URL and the model name there."""
    created: int = 0
    accepts_images: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    """What the engine applies beyond the weights that changes the output (a vision model's
    visual-token bounds, ...): part of the cache key. JSON values only."""


class EngineServices(Protocol):
    """What building an engine may use of the composition root (its ``engines(services)``
    seam): the settings, the model registry and the process's metrics."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def registry(self) -> ModelRegistry: ...


class BoundEngine(Protocol):
    """An engine bound to one resolved model: what the router hands the inference service.

    ``card`` is the model it will run, with the fingerprint the response cache keys on: the
    engine runs exactly that (no second lookup of the name)."""

    @property
    def card(self) -> ModelCard: ...

    @property
    def honours_seed(self) -> bool:
        """Whether the same seed gives the same output (then a seeded request may be cached)."""
        ...

    async def complete(self, request: EngineRequest) -> EngineResult:
        """The whole answer (all ``n`` choices)."""
        ...

    def stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """The answer as it is generated; close it (``aclose()``) to stop early."""
        ...


class Engine(Protocol):
    """An inference backend: the model names it serves, bound one at a time.

    Implementations: ``engines/upstream.py`` (OpenAI-compatible servers: vLLM, SGLang, Ollama,
    ``swift deploy``…), ``engines/local.py`` (transformers, in this process). More come from
    capabilities and extensions (see ``docs/architecture.md``); the router asks them in order.
    One that keeps models loaded in this process also implements :class:`PoolingEngine`, so
    the fleet view (``yichui ps``) shows them.
    """

    name: str

    async def bind(self, model: str) -> BoundEngine | None:
        """``model`` resolved and ready to run, or None when this engine does not serve it."""
        ...

    async def cards(self) -> list[ModelCard]:
        """Every model this engine serves now, for ``/v1/models``."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """What an engine holds loaded in this process, for the fleet view (``yichui ps``).

    ``models``: one dict per loaded model (``model``, ``engine``, ``bytes``, ``device``,
    ``dtype``, ``requests``, ``in_use``, ``last_used``, ``idle_seconds``), least recently used
    first. The pool evicts by memory: before a load, least recently used idle models go until
    the new one fits ``budget`` bytes (``model_memory_budget``); ``used`` is what it holds now.
    """

    budget: int
    used: int
    models: tuple[dict[str, Any], ...] = ()


@runtime_checkable
class PoolingEngine(Protocol):
    """An engine that keeps models loaded in this process (the local one). Optional: engines
    that only forward requests (upstreams, most extensions) do not implement it, and the
    router reports nothing for them."""

    def loaded(self) -> PoolSnapshot:
        """What is loaded now; cheap (no I/O), called once per fleet heartbeat."""
        ...
