"""A throwaway engine added through the engine seam: serves ``echo/shout``, which answers the
last user message in capitals. One module plus one registration (the ``extensions`` setting)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from yichui.inference.engine import (
    Choice,
    EngineChunk,
    EngineRequest,
    EngineResult,
    ModelCard,
    Usage,
)

MODEL = "echo/shout"


class ShoutEngine:
    name = "shout"
    honours_seed = True
    card = ModelCard(id=MODEL, owned_by="extension", fingerprint="shout-v1")

    async def bind(self, model: str) -> ShoutEngine | None:
        return self if model == MODEL else None

    async def cards(self) -> list[ModelCard]:
        return [self.card]

    async def close(self) -> None:
        return None

    async def complete(self, request: EngineRequest) -> EngineResult:
        text = _answer(request)
        return EngineResult((Choice(0, text, "stop"),), Usage(1, len(text.split())))

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        for word in _answer(request).split(" "):
            yield EngineChunk(0, word + " ")
        yield EngineChunk(0, finish_reason="stop")
        yield EngineChunk(0, usage=Usage(1, 1))


def _answer(request: EngineRequest) -> str:
    text = request.messages[-1].text() if request.messages else request.prompt
    if text == "boom":  # stands for a bug deep inside an engine (torch raising ValueError)
        raise ValueError("tensor a (3) must match the size of tensor b (4) at dimension 1")
    return text.upper()


def engines(services: Any) -> list[ShoutEngine]:
    return [ShoutEngine()]
