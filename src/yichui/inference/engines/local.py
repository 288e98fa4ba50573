"""The engine for models of the registry, run in this process with transformers.

::

    engine = LocalEngine(registry, ModelPool(budget_bytes=settings.model_memory_budget))
    result = await engine.complete(request)
    async for chunk in engine.stream(request):
        ...

How a request is run:

- The prompt (:mod:`yichui.ml.prompts`, shared with training): a chat goes through the
  tokenizer's chat template (with the generation prompt); a tokenizer without one gets
  :func:`~yichui.ml.prompts.fallback_chat_prompt`. A completion's prompt is used as is. Image
  parts are refused (:class:`~yichui.errors.ImagesNotAcceptedError`): no local model takes
  them yet, so an image's ``detail`` is never applied here.
- Decoding is always transformers' greedy loop; sampling (``temperature > 0``) happens in a
  logits processor of ours that draws the token with a per-request ``torch.Generator`` and
  leaves only it standing. So a seed gives the same text every time, whatever else the process
  runs at once, and the sampling is OpenAI's (temperature and ``top_p`` only: transformers'
  own sampling would add its default ``top_k=50``).
- ``presence_penalty``/``frequency_penalty`` as OpenAI defines them, over generated tokens.
- ``n`` choices run as one batch (identical prompts, so no padding); greedy choices are all the
  same, so greedy runs one row and copies it.
- Stop strings and streaming: a stopping criterion of ours sees every new token of every row.
  It decodes the row, stops it at EOS, at a stop string (the text is cut before it) or at
  ``max_tokens``, and passes on the text that can no longer change: partial UTF-8 characters
  and the last ``len(longest stop) - 1`` characters (which could start a stop string) are held
  back. ``complete()`` is the same stream joined, so a greedy stream and a greedy complete give
  exactly the same text. (transformers' ``TextIteratorStreamer`` takes batch size 1 only.)
- Generation runs in a worker thread under the model's lock: one generation per model at a time,
  the event loop free meanwhile. A stream closed early stops the generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from yichui.errors import (
    ImagesNotAcceptedError,
    InvalidModelNameError,
    MissingExtraError,
    ModelKindError,
    ModelNotFoundError,
    RequestError,
)
from yichui.inference.engine import (
    Choice,
    EngineChunk,
    EngineRequest,
    EngineResult,
    EngineServices,
    ModelCard,
    PoolSnapshot,
    Usage,
)
from yichui.inference.pool import LoadedModel, ModelPool
from yichui.ml import prompts
from yichui.models.registry import ModelRegistry
from yichui.models.status import read_manifest
from yichui.models.targets import ADAPTER_KIND, Target, resolve_target

Finish = Literal["stop", "length"]


log = logging.getLogger("yichui.inference")


def engines(services: EngineServices) -> list[LocalEngine]:
    """The capability seam: the engine for the registry's models, with a warm pool sized by
    the settings; none (a warning) without the ``ml`` extra: upstream routes only."""
    s = services.settings
    try:
        pool = ModelPool(
            budget_bytes=s.model_memory_budget,
            device=s.inference_device,
            dtype=s.inference_dtype,
            metrics=services.metrics,
        )
        return [LocalEngine(services.registry, pool)]
    except MissingExtraError as exc:
        log.warning("local engine unavailable (%s); serving upstream routes only", exc)
        return []


SERVABLE_KINDS = frozenset({"text", "multimodal"})
"""Kinds of registry models this engine serves (adapters are served on their base)."""


class LocalEngine:
    """The :class:`~yichui.inference.engine.Engine` for models in the registry, loaded into
    ``pool``. Raises :class:`~yichui.errors.MissingExtraError` without the ``ml`` extra (torch
    and transformers are looked for, not imported)."""

    name = "local"
    honours_seed = True

    def __init__(self, registry: ModelRegistry, pool: ModelPool) -> None:
        if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
            raise MissingExtraError("ml", "the local inference engine")
        self.registry = registry
        self.pool = pool

    @staticmethod
    def card(target: Target) -> ModelCard:
        """The card of a registry model (or ``base@adapter``); its fingerprint changes whenever
        its files (or the adapter's) do."""
        base, adapter = target.base, target.adapter
        meta: dict[str, object] = {"engine": "local", "kind": base.kind, "size": base.size}
        modified = base.modified or 0
        if adapter is not None:
            meta.update(base=base.name, adapter=adapter.name)
            modified = max(modified, adapter.modified or 0)
        return ModelCard(
            id=target.name,
            owned_by="yichui",
            fingerprint=target.fingerprint,
            created=int(modified),
            accepts_images=False,
            meta=meta,
        )

    # -- the Engine protocol ------------------------------------------------------------------

    async def bind(self, model: str) -> LocalModel | None:
        """``model`` (a registry name or ``base@adapter``) resolved once; None when the
        registry has no servable model of that name (malformed, missing, an adapter alone)."""
        try:
            target = await asyncio.to_thread(resolve_target, self.registry, model)
        except (InvalidModelNameError, ModelKindError, ModelNotFoundError):
            return None
        if target.kind not in SERVABLE_KINDS:
            return None
        return LocalModel(self, target, self.card(target))

    async def cards(self) -> list[ModelCard]:
        """Every servable model of the registry, adapters as ``base@adapter``."""
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
            elif row.get("kind") not in SERVABLE_KINDS:
                continue
            bound = await self.bind(name)
            if bound is not None:
                out.append(bound.card)
        return out

    def loaded(self) -> PoolSnapshot:
        """The pool's models, budget and bytes in use (:class:`PoolingEngine`: the fleet view)."""
        pool = self.pool
        rows = tuple({**row, "engine": self.name} for row in pool.snapshot())
        return PoolSnapshot(budget=pool.budget_bytes, used=pool.nbytes, models=rows)

    async def close(self) -> None:
        """Let the pool's models go (those still in use go when their requests end)."""
        await self.pool.close()

    # -- running a resolved model ---------------------------------------------------------------

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

    async def _bound(self, model: str) -> LocalModel:
        bound = await self.bind(model)
        if bound is None:
            raise ModelNotFoundError(model)
        return bound

    async def generate(
        self, target: Target, request: EngineRequest
    ) -> AsyncGenerator[EngineChunk, None]:
        """The answer as it is generated: text pieces per choice, then a chunk with each
        choice's ``finish_reason``, then one with ``usage``. Close it (``aclose()``) to stop
        the generation early."""
        _check(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineChunk | None] = asyncio.Queue()

        def emit(item: EngineChunk | None) -> None:  # from the generation thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        adapter = Path(target.adapter.path or "") if target.adapter else None
        base = Path(target.base.path or "")
        async with self.pool.use(target.name, base, target.fingerprint, adapter=adapter) as m:
            job = _Generation(m, request, emit)

            async def work() -> None:
                # The lock is held by the generation, not by the consumer: a slow reader of
                # the stream does not keep the next request waiting.
                async with m.lock:
                    try:
                        await asyncio.to_thread(job.run)
                    finally:
                        emit(None)

            worker = asyncio.ensure_future(work())
            try:
                while (chunk := await queue.get()) is not None:
                    yield chunk
                await worker  # raises what the generation raised
            finally:
                # Never cancel the worker: the thread would run on without the lock. Ask the
                # generation to stop and wait for it, so the model stays in use until then.
                job.cancel()
                if not worker.done():
                    await asyncio.wait([worker])
                if not worker.cancelled():
                    worker.exception()  # retrieved: it was raised above, or we are unwinding


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A registry model (or ``base@adapter``) bound to the local engine: what it runs is
    ``target``, whose fingerprint is the card's."""

    engine: LocalEngine
    target: Target
    card: ModelCard
    honours_seed: bool = True

    async def complete(self, request: EngineRequest) -> EngineResult:
        """The whole answer: the stream, joined (so a greedy stream and a greedy complete give
        exactly the same text)."""
        n = request.params.n
        texts: list[list[str]] = [[] for _ in range(n)]
        finish: list[Finish] = ["length"] * n
        usage = Usage(0, 0)
        async with contextlib.aclosing(self.stream(request)) as chunks:
            async for chunk in chunks:
                if chunk.text:
                    texts[chunk.index].append(chunk.text)
                if chunk.finish_reason is not None:
                    finish[chunk.index] = chunk.finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage
        choices = tuple(Choice(i, "".join(texts[i]), finish[i]) for i in range(n))
        return EngineResult(choices=choices, usage=usage)

    def stream(self, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        return self.engine.generate(self.target, request)


def _check(request: EngineRequest) -> None:
    if any(m.images() for m in request.messages):
        refused = ImagesNotAcceptedError(request.model)
        refused.hint = "no local model accepts images yet: send text only"  # not a route's
        raise refused
    if request.params.n < 1:
        raise RequestError("n must be at least 1", param="n")
    if request.params.max_tokens < 1:
        raise RequestError("max_tokens must be at least 1", param="max_tokens")


def prompt_ids(tokenizer: Any, request: EngineRequest) -> list[int]:
    """The token ids of the request's prompt (never empty), built as training builds them
    (:func:`yichui.ml.prompts.prompt_ids`); image parts are left out of the text."""
    messages = [prompts.chat_message(m.role, m.text(), m.name) for m in request.messages]
    return prompts.prompt_ids(
        tokenizer, request.kind, messages=messages, prompt=request.prompt, model=request.model
    )


def _eos_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids of the generation config (chat models often list several) and the tokenizer."""
    ids: list[int] = []
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, list | tuple):
        ids.extend(int(i) for i in configured)
    tokenizer_eos = loaded.tokenizer.eos_token_id
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(int(tokenizer_eos))
    return ids


class _Generation:
    """One request's generation, run in a worker thread by :meth:`run`."""

    def __init__(
        self,
        loaded: LoadedModel,
        request: EngineRequest,
        emit: Callable[[EngineChunk | None], None],
    ) -> None:
        self.loaded = loaded
        self.request = request
        self.emit = emit
        self.cancelled = False

    def cancel(self) -> None:
        """Stop at the next token (read by the generation thread; a bool is safe to share)."""
        self.cancelled = True

    def run(self) -> None:
        if self.cancelled:
            return
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        params = self.request.params
        loaded = self.loaded
        tokenizer = loaded.tokenizer
        ids = prompt_ids(tokenizer, self.request)
        eos = _eos_ids(loaded)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        # greedy choices are all equal: compute one, copy it
        rows = 1 if params.greedy else params.n
        input_ids = torch.tensor([ids] * rows, dtype=torch.long, device=loaded.device)

        processors = LogitsProcessorList()
        if params.presence_penalty or params.frequency_penalty:
            processors.append(
                _Penalties(len(ids), params.presence_penalty, params.frequency_penalty)
            )
        if not params.greedy:
            generator = torch.Generator(device=loaded.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed % 2**64)
            processors.append(_Sampler(params.temperature, params.top_p, generator))

        watcher = _Watcher(
            tokenizer,
            rows=rows,
            n=params.n,
            max_tokens=params.max_tokens,
            stop=[s for s in params.stop if s],
            eos=set(eos),
            emit=self.emit,
            is_cancelled=lambda: self.cancelled,
        )
        _own_lengths(loaded.model)
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=params.max_tokens,
            do_sample=False,  # sampling is _Sampler's: see the module docstring
            num_beams=1,
            eos_token_id=eos or None,
            pad_token_id=pad,
            # Unset fields would be filled from the model's generation_config.json; these
            # would change the output behind the request's back.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )
        with torch.inference_mode():
            loaded.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([watcher]),
            )
        watcher.finish()
        self.emit(EngineChunk(index=0, usage=Usage(len(ids), watcher.completion_tokens())))


def _own_lengths(model: Any) -> None:
    """Drop the length limits of the model's ``generation_config.json``: the request's
    ``max_tokens`` decides (generate() would also log a warning on every call about both being
    set). Idempotent; called under the model's lock."""
    defaults = getattr(model, "generation_config", None)
    for attr in ("max_length", "min_length", "min_new_tokens"):
        if getattr(defaults, attr, None) is not None:
            setattr(defaults, attr, None)


class _Penalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far::

    logits[t] -= presence * (count[t] > 0) + frequency * count[t]

    A logits processor by duck typing (``LogitsProcessorList`` only calls it): subclassing
    transformers' would import it with this module.
    """

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len = prompt_len
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _Sampler:
    """Temperature and nucleus (``top_p``) sampling with the request's own generator: the
    drawn token keeps score 0, every other one gets -inf, so the greedy loop picks it."""

    def __init__(self, temperature: float, top_p: float, generator: Any) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.generator = generator

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            # keep the most likely tokens until their mass reaches top_p (the first always)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop = before >= self.top_p
            drop[:, 0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            picked = order.gather(-1, torch.multinomial(sorted_probs, 1, generator=self.generator))
        else:
            picked = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, picked, 0.0)


class _Watcher:
    """The stopping criterion that also streams (see the module docstring).

    Called by ``generate`` after every step with all rows' ids; row ``r`` answers choice ``r``,
    or every choice when greedy (one row copied ``n`` times). A stopping criterion by duck
    typing, like :class:`_Penalties`.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        rows: int,
        n: int,
        max_tokens: int,
        stop: list[str],
        eos: set[int],
        emit: Callable[[EngineChunk | None], None],
        is_cancelled: Callable[[], bool],
    ) -> None:
        self.tokenizer = tokenizer
        self.rows = rows
        self.n = n
        self.max_tokens = max_tokens
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.eos = eos
        self.emit = emit
        self.is_cancelled = is_cancelled
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.counts = [0] * rows
        self.texts = [""] * rows
        self.sent = [""] * rows
        self.done = [False] * rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        for row, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[row]:
                self._step(row, int(token))
        if self.is_cancelled():
            self.done = [True] * self.rows  # generate stops; nothing more is sent
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _step(self, row: int, token: int) -> None:
        self.counts[row] += 1
        if token in self.eos:
            self._end(row, self.texts[row], "stop")
            return
        self.tokens[row].append(token)
        # The whole row is decoded every step: decoding is not always a concatenation of
        # per-token pieces (UTF-8 split across tokens, merged spaces). It is cheap next to a
        # forward pass.
        text = self.tokenizer.decode(
            self.tokens[row], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        self.texts[row] = text
        cut = min((i for s in self.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._end(row, text[:cut], "stop")
        elif self.counts[row] >= self.max_tokens:
            self._end(row, text, "length")
        else:
            settled = text.rstrip("\ufffd")  # an unfinished UTF-8 character may still change
            self._send(row, settled[: max(0, len(settled) - self.hold)])

    def _send(self, row: int, text: str) -> None:
        sent = self.sent[row]
        if len(text) > len(sent) and text.startswith(sent):
            self.sent[row] = text
            for index in self._choices(row):
                self.emit(EngineChunk(index=index, text=text[len(sent) :]))

    def _end(self, row: int, text: str, reason: Finish) -> None:
        if self.is_cancelled():
            self.done[row] = True
            return
        self._send(row, text)
        self.done[row] = True
        for index in self._choices(row):
            self.emit(EngineChunk(index=index, finish_reason=reason))

    def _choices(self, row: int) -> range:
        return range(self.n) if self.rows == 1 and self.n > 1 else range(row, row + 1)

    def finish(self) -> None:
        """End the rows ``generate`` stopped without us (its own length limits)."""
        for row in range(self.rows):
            if not self.done[row]:
                self._end(row, self.texts[row], "length")

    def completion_tokens(self) -> int:
        per_row = sum(self.counts)
        return per_row * self.n if self.rows == 1 else per_row
