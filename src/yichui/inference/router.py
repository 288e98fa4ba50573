"""Which engine serves a model name, and the card (fingerprint) the cache keys on."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from yichui.config import Settings
from yichui.errors import InvalidModelNameError, ModelNotFoundError, TrainingError
from yichui.inference.engine import Engine, ModelCard
from yichui.models.status import read_manifest
from yichui.models.targets import ADAPTER_KIND, resolve_target

if TYPE_CHECKING:
    from yichui.inference.engines.local import LocalEngine
    from yichui.inference.engines.upstream import UpstreamEngine
    from yichui.models.registry import ModelRegistry

SERVABLE_KINDS = frozenset({"text", "multimodal"})

CARD_TTL = 5.0
"""Seconds a resolved model card is reused in-process: the registry is asked (in a thread) at
most this often per model, so a re-downloaded model's new fingerprint is seen within it."""


@dataclass(frozen=True, slots=True)
class Route:
    engine: Engine
    card: ModelCard
    honours_seed: bool


class ModelRouter:
    """Upstream routes first (configuration), then the local models of the registry."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        *,
        local: LocalEngine | None,
        upstream: UpstreamEngine | None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.local = local
        self.upstream = upstream
        self._cards: dict[str, tuple[float, Route]] = {}

    async def resolve(self, model: str) -> Route:
        """The route of ``model``; ModelNotFoundError (404) when nothing serves it."""
        cached = self._cards.get(model)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        route = await self._resolve(model)
        self._cards[model] = (time.monotonic() + CARD_TTL, route)
        return route

    async def _resolve(self, model: str) -> Route:
        if self.upstream is not None and model in self.settings.upstreams:
            up = self.upstream
            return Route(up, up.card(model), up.honours_seed_for(model))
        if self.local is None:
            raise ModelNotFoundError(model)
        try:
            target = await asyncio.to_thread(resolve_target, self.registry, model)
        except (InvalidModelNameError, TrainingError):  # malformed, or an adapter alone
            raise ModelNotFoundError(model) from None
        if target.kind not in SERVABLE_KINDS:
            raise ModelNotFoundError(model)
        return Route(self.local, self.local.card(target), self.local.honours_seed)

    def forget(self, model: str | None = None) -> None:
        """Drop resolved cards (all, or one model's) after a pull, import, merge or delete."""
        if model is None:
            self._cards.clear()
        else:
            self._cards.pop(model, None)

    async def cards(self) -> list[ModelCard]:
        """Every servable model, for ``/v1/models``."""
        out: list[ModelCard] = []
        if self.local is not None:
            listing = await asyncio.to_thread(self.registry.listing)
            for row in listing.models:
                if not row.get("exists", True):
                    continue
                name = str(row["name"])
                if row.get("kind") == ADAPTER_KIND:  # served on its base: base@adapter
                    base = read_manifest(Path(str(row.get("path") or ""))).get("base")
                    if not base:
                        continue
                    name = f"{base}@{name}"
                elif row.get("kind") not in SERVABLE_KINDS:
                    continue
                try:
                    out.append((await self.resolve(name)).card)
                except ModelNotFoundError:
                    continue
        if self.upstream is not None:
            out.extend(self.upstream.card(m) for m in self.upstream.models())
        return sorted(out, key=lambda c: c.id)
