"""The engine for text models of the registry, run in this process with transformers.

::

    engine = LocalEngine(registry, ModelPool(budget_bytes=settings.model_memory_budget))
    result = await engine.complete(request)
    async for chunk in engine.stream(request):
        ...

The prompt (:mod:`yichui.ml.prompts`, shared with training): a chat goes through the
tokenizer's chat template (with the generation prompt); a tokenizer without one gets
:func:`~yichui.ml.prompts.fallback_chat_prompt`. A completion's prompt is used as is. Image
parts are refused (:class:`~yichui.errors.ImagesNotAcceptedError`): a text model does not take
them (vision-language models are :mod:`.vision`'s).

How the ids are generated (sampling, penalties, ``n`` choices as one batch, stop strings,
streaming, the worker thread under the model's lock, a closed stream stopping the generation)
is shared with the vision engine: :mod:`.generation`. Binding names and listing cards:
:mod:`.pooled`.

The seam :func:`engines` builds both engines on one pool, so text and vision models share the
memory budget and the eviction order; the text engine reports the whole pool to the fleet view
(``yichui ps``), where both are named ``local``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from yichui.errors import ImagesNotAcceptedError, MissingExtraError
from yichui.inference.engine import (
    EngineChunk,
    EngineRequest,
    EngineServices,
    ModelCard,
    PoolSnapshot,
)
from yichui.inference.engines.batching import BatchSettings
from yichui.inference.engines.generation import Generation, ModelInputs
from yichui.inference.engines.pooled import (
    PooledEngine,
    PooledModel,
    card_meta,
    check_params,
    created,
    paths,
)
from yichui.inference.engines.vision import VisionEngine
from yichui.inference.pool import LoadedModel, ModelPool
from yichui.ml import prompts
from yichui.models.registry import ModelRegistry
from yichui.models.targets import Target

log = logging.getLogger("yichui.inference")

LocalModel = PooledModel
"""A registry model bound to the local engine (the name this module has always exported)."""


def engines(services: EngineServices) -> list[PooledEngine]:
    """The capability seam: the engines for the registry's text and vision-language models,
    on one warm pool sized by the settings; none (a warning) without the ``ml`` extra:
    upstream routes only."""
    s = services.settings
    try:
        pool = ModelPool(
            budget_bytes=s.model_memory_budget,
            device=s.inference_device,
            dtype=s.inference_dtype,
            metrics=services.metrics,
        )
        batching = BatchSettings.of(
            s, headroom=lambda: pool.budget_bytes - pool.nbytes, metrics=services.metrics
        )
        vision = VisionEngine(
            services.registry,
            pool,
            max_pixels=s.vision_max_pixels,
            min_pixels=s.vision_min_pixels,
            batching=batching,
        )
        # one engine for the router: a name is resolved once (one model-status lookup), then
        # served by the text or the vision half by its kind
        return [LocalEngine(services.registry, pool, peers=(vision,), batching=batching)]
    except MissingExtraError as exc:
        log.warning("local engine unavailable (%s); serving upstream routes only", exc)
        return []


class LocalEngine(PooledEngine):
    """The :class:`~yichui.inference.engine.Engine` for text models in the registry (and
    ``base@adapter`` on one), loaded into ``pool``; it reports the whole pool to the fleet
    view (:class:`~yichui.inference.engine.PoolingEngine`)."""

    name = "local"
    kinds = frozenset({"text"})

    def __init__(
        self,
        registry: ModelRegistry,
        pool: ModelPool,
        *,
        peers: Sequence[PooledEngine] = (),
        batching: BatchSettings | None = None,
    ) -> None:
        super().__init__(registry, pool, batching=batching)
        self.peers = tuple(peers)
        """Engines on the same pool for the other kinds (the vision engine): a name this one
        resolved is handed to the one that serves its kind, so it is looked up once."""

    def serve(self, target: Target) -> PooledModel | None:
        bound = super().serve(target)
        for peer in self.peers:
            if bound is not None:
                break
            bound = peer.serve(target)
        return bound

    def served_kinds(self) -> frozenset[str]:
        return self.kinds.union(*(peer.kinds for peer in self.peers))

    @staticmethod
    def card(target: Target) -> ModelCard:
        """The card of a registry model (or ``base@adapter``); its fingerprint changes whenever
        its files (or the adapter's) do."""
        return ModelCard(
            id=target.name,
            owned_by="yichui",
            fingerprint=target.fingerprint,
            created=created(target),
            accepts_images=False,
            meta=card_meta(target, "local"),
        )

    def loaded(self) -> PoolSnapshot:
        """The pool's models (text and vision: one pool), budget and bytes in use, for the
        fleet view. Only this engine reports it, so the pool is counted once."""
        pool = self.pool
        rows = tuple({**row, "engine": self.name} for row in pool.snapshot())
        return PoolSnapshot(budget=pool.budget_bytes, used=pool.nbytes, models=rows)

    async def generate(
        self, target: Target, request: EngineRequest
    ) -> AsyncGenerator[EngineChunk, None]:
        """The answer as it is generated (see :class:`~.pooled.PooledEngine`)."""
        _check(request)
        base, adapter = paths(target)
        async with self.pool.use(target.name, base, target.fingerprint, adapter=adapter) as m:
            job = Generation(m, request.params, lambda: _inputs(m, request), queue=self.queue(m))
            async with contextlib.aclosing(job.stream()) as chunks:
                async for chunk in chunks:
                    yield chunk


def _check(request: EngineRequest) -> None:
    if any(m.images() for m in request.messages):
        refused = ImagesNotAcceptedError(request.model)
        # not a route's: the upstream hint does not apply
        refused.hint = "this local model takes text only: send text, or use a vision model"
        raise refused
    check_params(request)


def prompt_ids(tokenizer: Any, request: EngineRequest) -> list[int]:
    """The token ids of the request's prompt (never empty), built as training builds them
    (:func:`yichui.ml.prompts.prompt_ids`); image parts are left out of the text."""
    messages = [prompts.chat_message(m.role, m.text(), m.name) for m in request.messages]
    return prompts.prompt_ids(
        tokenizer, request.kind, messages=messages, prompt=request.prompt, model=request.model
    )


def _inputs(loaded: LoadedModel, request: EngineRequest) -> ModelInputs:
    """The prompt's ids as one row (identical rows batch: ``n`` sampled choices at once)."""
    import torch

    ids = prompt_ids(loaded.tokenizer, request)
    input_ids = torch.tensor([ids], dtype=torch.long)
    return ModelInputs({"input_ids": input_ids}, len(ids), batchable=True)
