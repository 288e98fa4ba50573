"""What the engines for models of the registry share: binding names, listing cards, one pool.

The text engine (:mod:`.local`) and the vision engine (:mod:`.vision`) serve different kinds
of registry models from one :class:`~yichui.inference.pool.ModelPool` (one memory budget, one
eviction order). Each says which kinds it serves, what its card says and how a request becomes
model inputs; binding, listing and running a bound model are here::

    class TextEngine(PooledEngine):
        kinds = frozenset({"text"})
        def card(self, target): ...
        def generate(self, target, request): ...
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from yichui.errors import (
    InvalidModelNameError,
    MissingExtraError,
    ModelKindError,
    ModelNotFoundError,
    RequestError,
)
from yichui.inference.engine import EngineChunk, EngineRequest, EngineResult, ModelCard
from yichui.inference.engines.batching import Batcher, BatchSettings, batcher
from yichui.inference.engines.generation import JobQueue, join
from yichui.inference.pool import LoadedModel, ModelPool
from yichui.models.registry import ModelRegistry
from yichui.models.status import read_manifest
from yichui.models.targets import ADAPTER_KIND, Target, resolve_target


class PooledEngine:
    """An engine for the registry's models of ``kinds`` (adapters served on such a base as
    ``base@adapter``), loaded into ``pool``. Raises :class:`~yichui.errors.MissingExtraError`
    without the ``ml`` extra (torch and transformers are looked for, not imported)."""

    name = "local"
    honours_seed = True
    kinds: ClassVar[frozenset[str]] = frozenset()
    """The registry kinds (``text``, ``multimodal``) this engine serves."""

    def __init__(
        self, registry: ModelRegistry, pool: ModelPool, *, batching: BatchSettings | None = None
    ) -> None:
        if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
            raise MissingExtraError("ml", "the local inference engine")
        self.registry = registry
        self.pool = pool
        self.batching = batching
        """How requests wait for a model and batch (``engines/batching.py``); None: one at
        a time, no queue bound."""

    def admit(self, target: Target) -> None:
        """Refuse (503 ``engine_busy``) a new computation for ``target`` whose model's queue
        is full; a model not loaded yet has no queue."""
        loaded = self.pool.peek(target.name) if self.batching is not None else None
        if loaded is not None and isinstance(loaded.batcher, Batcher):
            loaded.batcher.admit()

    def queue(self, loaded: LoadedModel) -> JobQueue | None:
        """Where requests for ``loaded`` wait their turn (its batcher), if batching is on."""
        return batcher(loaded, self.batching) if self.batching is not None else None

    def card(self, target: Target) -> ModelCard:
        """The card of a registry model (or ``base@adapter``) this engine serves."""
        raise NotImplementedError

    def generate(self, target: Target, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        """The answer as it is generated: text pieces per choice, then a chunk with each
        choice's ``finish_reason``, then one with ``usage``. Close it (``aclose()``) to stop
        the generation early."""
        raise NotImplementedError

    # -- the Engine protocol ------------------------------------------------------------------

    async def bind(self, model: str) -> PooledModel | None:
        """``model`` (a registry name or ``base@adapter``) resolved once; None when the
        registry has no model of that name this engine serves (malformed, missing, an adapter
        alone, another kind)."""
        try:
            target = await asyncio.to_thread(resolve_target, self.registry, model)
        except (InvalidModelNameError, ModelKindError, ModelNotFoundError):
            return None
        return self.serve(target)

    def serve(self, target: Target) -> PooledModel | None:
        """``target`` bound to this engine; None when it is of a kind this one does not serve."""
        if target.kind not in self.kinds:
            return None
        return PooledModel(self, target, self.card(target))

    def served_kinds(self) -> frozenset[str]:
        """The kinds :meth:`cards` lists (an engine with peers: theirs too)."""
        return self.kinds

    async def cards(self) -> list[ModelCard]:
        """Every model of the registry this engine serves, adapters as ``base@adapter``."""
        listing = await asyncio.to_thread(self.registry.listing)
        out: list[ModelCard] = []
        for row in listing.models:
            if not row.get("exists", True):
                continue
            name = str(row["name"])
            if row.get("kind") == ADAPTER_KIND:  # served on its base: base@adapter
                base = read_manifest(Path(str(row.get("path") or ""))).get("base")
                if not base:
                    continue
                name = f"{base}@{name}"
            elif row.get("kind") not in self.served_kinds():
                continue
            bound = await self.bind(name)  # an adapter's base of another kind: None
            if bound is not None:
                out.append(bound.card)
        return out

    async def close(self) -> None:
        """Let the pool's models go (those still in use go when their requests end)."""
        await self.pool.close()

    # -- running a model by name ----------------------------------------------------------------

    async def complete(self, request: EngineRequest) -> EngineResult:
        """The whole answer of ``request.model``, bound first (for callers without a router)."""
        return await (await self._bound(request.model)).complete(request)

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        """The streamed answer of ``request.model``, bound first (for callers without a
        router)."""
        bound = await self._bound(request.model)
        async with contextlib.aclosing(bound.stream(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _bound(self, model: str) -> PooledModel:
        bound = await self.bind(model)
        if bound is None:
            raise ModelNotFoundError(model)
        return bound


@dataclass(frozen=True, slots=True)
class PooledModel:
    """A registry model (or ``base@adapter``) bound to its engine: what it runs is
    ``target``, whose fingerprint is the card's."""

    engine: PooledEngine
    target: Target
    card: ModelCard
    honours_seed: bool = True

    async def complete(self, request: EngineRequest) -> EngineResult:
        """The whole answer: the stream, joined (so a greedy stream and a greedy complete give
        exactly the same text)."""
        async with contextlib.aclosing(self.stream(request)) as chunks:
            return await join(chunks, request.params.n)

    def stream(self, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        return self.engine.generate(self.target, request)

    def admit(self) -> None:
        """Raise :class:`~yichui.errors.EngineBusyError` if a new computation would find the
        model's queue full (asked by the inference service before it starts one)."""
        self.engine.admit(self.target)


def check_params(request: EngineRequest) -> None:
    """Refuse what no generation can run (``n`` or ``max_tokens`` below 1)."""
    if request.params.n < 1:
        raise RequestError("n must be at least 1", param="n")
    if request.params.max_tokens < 1:
        raise RequestError("max_tokens must be at least 1", param="max_tokens")


def paths(target: Target) -> tuple[Path, Path | None]:
    """The folders of the target's base model and adapter (None without one)."""
    adapter = Path(target.adapter.path or "") if target.adapter else None
    return Path(target.base.path or ""), adapter


def card_meta(target: Target, engine: str) -> dict[str, object]:
    """A registry model's card ``meta``: engine, kind, size, and base and adapter names."""
    base, adapter = target.base, target.adapter
    meta: dict[str, object] = {"engine": engine, "kind": base.kind, "size": base.size}
    if adapter is not None:
        meta.update(base=base.name, adapter=adapter.name)
    return meta


def created(target: Target) -> int:
    """When the target's files last changed (the later of base and adapter), epoch seconds."""
    modified = target.base.modified or 0
    if target.adapter is not None:
        modified = max(modified, target.adapter.modified or 0)
    return int(modified)
