"""Which engine serves a model name: the first of the engines, in order, that binds it.

The bound engine carries the card (and so the fingerprint) the response cache keys on, and runs
exactly that model: nothing resolves the name twice::

    router = ModelRouter([upstream, local])
    bound = await router.resolve("smollm2-135m-instruct")
    bound.card.fingerprint, await bound.complete(request)
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from yichui.errors import ModelNotFoundError
from yichui.inference.engine import BoundEngine, Engine, ModelCard, PoolingEngine, PoolSnapshot

CARD_TTL = 5.0
"""Seconds a bound model is reused in-process: engines are asked (the local one reads the
registry in a thread) at most this often per model, so a re-downloaded model's new fingerprint
is seen within it; model events make it at once (:meth:`ModelRouter.forget`)."""


class ModelRouter:
    """The engines of one process, asked in order (upstream routes first: configuration wins
    over what happens to be on disk)."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = tuple(engines)
        self._bound: dict[str, tuple[float, BoundEngine]] = {}

    async def resolve(self, model: str) -> BoundEngine:
        """``model`` bound to its engine; ModelNotFoundError (404) when none serves it."""
        cached = self._bound.get(model)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        for engine in self.engines:
            bound = await engine.bind(model)
            if bound is not None:
                self._bound[model] = (time.monotonic() + CARD_TTL, bound)
                return bound
        raise ModelNotFoundError(model)

    def forget(self, model: str | None = None) -> None:
        """Drop bound models (all, or one's) after a pull, import, merge or delete."""
        if model is None:
            self._bound.clear()
        else:
            self._bound.pop(model, None)

    async def cards(self) -> list[ModelCard]:
        """Every servable model, for ``/v1/models`` (a name two engines serve: the first's)."""
        out: dict[str, ModelCard] = {}
        for engine in self.engines:
            for card in await engine.cards():
                out.setdefault(card.id, card)
        return sorted(out.values(), key=lambda c: c.id)

    def loaded(self) -> PoolSnapshot | None:
        """What the engines that keep models in this process hold (their budgets and bytes
        added up), for the fleet view; None when no engine does (upstream routes only)."""
        pools = [e.loaded() for e in self.engines if isinstance(e, PoolingEngine)]
        if not pools:
            return None
        return PoolSnapshot(
            budget=sum(p.budget for p in pools),
            used=sum(p.used for p in pools),
            models=tuple(m for p in pools for m in p.models),
        )

    async def close(self) -> None:
        for engine in self.engines:
            await engine.close()
