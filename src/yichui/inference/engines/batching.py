"""Requests for one local model generated together (dynamic batching), behind a bounded queue.

::

    queue = batcher(loaded, settings)   # one per model of the pool
    job = Generation(loaded, params, prepare, queue=queue)
    async for chunk in job.stream(): ...  # waits its turn, then runs in a batch

How it goes, per model: a request that finds the model idle waits ``window`` seconds for
others to arrive, then the waiting requests (up to ``max_size``) run as one padded ``generate``
call; requests arriving meanwhile wait, and the next batch takes them all as soon as it ends.
One generation thread per model at a time, under the model's lock, as before.

What a request keeps inside a batch (so a batch gives what the request alone gives):

- its prompt is left-padded to the batch's longest (attention mask zero over the padding,
  positions from the mask): greedy output is token-identical to the request alone (a test on
  the real model, float32; other dtypes' kernels may round differently by batch shape);
- its ``max_tokens``, stop strings, ``n`` and finish reasons: its own stopping criterion
  (:class:`~.generation._Watcher`) over its own rows; its stream ends, with its usage, the
  step its last row ends, not when the batch does;
- its penalties and sampling: its own logits processors over its own rows, with its own
  ``torch.Generator``: a seeded request draws the same tokens alone or in a batch;
- a batch runs ``CHUNK`` (16) steps per ``generate`` call, its KV cache carried from one call
  to the next; between calls the rows of the requests that ended (answered, or cancelled:
  their client gone) leave the batch, cache included, so their slots cost nothing after and
  the rest run narrower. A cancelled request stops sending at the next token.

What runs alone: a batch of one (no padding at all), and requests whose inputs do not batch
(a vision model's pixels: ``ModelInputs.batchable`` is false), one after another in their turn.
A request whose prompt fails to build (a chat template that refuses it) fails alone.

Memory: a batch's KV cache (rows x (longest prompt + largest ``max_tokens``) x the model's
bytes per token) must fit in the pool's budget beside the loaded weights; requests past that
wait for the next batch (one always runs).

Admission control: at most ``queue_max`` requests wait per model (then
:class:`~yichui.errors.EngineBusyError`, 503 with ``Retry-After``), and a request that waited
``queue_timeout`` seconds without starting gets the same; nothing hangs. Batch sizes, queue
depth and waits are in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from yichui.errors import EngineBusyError
from yichui.inference.engine import EngineChunk, Usage
from yichui.inference.engines.generation import (
    Emit,
    Generation,
    _Watcher,
    generation_config,
    pad_id,
)
from yichui.inference.pool import LoadedModel

if TYPE_CHECKING:
    from yichui.config import Settings
    from yichui.metrics import Metrics


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """The batching settings (``batch_*``), the pool's free memory and the metrics."""

    max_size: int = 16
    window: float = 0.005
    queue_max: int = 64
    queue_timeout: float = 30.0
    headroom: Callable[[], int] | None = None
    """Bytes the pool can still give (its budget less the loaded weights); None: unbounded."""
    metrics: Metrics | None = None

    @classmethod
    def of(
        cls, settings: Settings, headroom: Callable[[], int] | None, metrics: Metrics | None
    ) -> BatchSettings:
        return cls(
            max_size=settings.batch_max_size,
            window=settings.batch_window,
            queue_max=settings.batch_queue_max,
            queue_timeout=settings.batch_queue_timeout,
            headroom=headroom,
            metrics=metrics,
        )


def batcher(loaded: LoadedModel, settings: BatchSettings) -> Batcher:
    """The model's batcher (made on first use, kept with the model in the pool)."""
    found = loaded.batcher
    if not isinstance(found, Batcher):
        loaded.batcher = found = Batcher(loaded, settings)
    return found


@dataclass(eq=False)
class _Waiting:
    job: Generation
    emit: Emit
    done: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)


@dataclass
class _Outcome:
    errors: dict[int, BaseException] = field(default_factory=dict)
    deferred: list[int] = field(default_factory=list)


class Batcher:
    """The queue of one model and the task that runs its batches (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, settings: BatchSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.runner: asyncio.Future[None] | None = None
        self.batch_seconds = 1.0
        """A running mean of how long a batch takes (the ``Retry-After`` estimate)."""

    async def run(self, job: Generation, emit: Emit) -> None:
        """Run ``job`` in its turn; returns when its generation ended (or raises what it
        raised); :class:`~yichui.errors.EngineBusyError` when the queue is full or the wait
        ran out before it started."""
        s = self.settings
        self.admit()
        entry = _Waiting(job, emit, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self._depth()
        job.on_cancel = lambda: self._drop(entry)
        if self.runner is None or self.runner.done():
            self.runner = asyncio.ensure_future(self._loop())
        try:
            try:
                await asyncio.wait_for(asyncio.shield(entry.done), s.queue_timeout)
            except TimeoutError:
                if entry in self.waiting:  # never started
                    self.waiting.remove(entry)
                    self._depth()
                    self._rejected("timeout")
                    raise EngineBusyError(
                        self.loaded.name,
                        f"the request waited {s.queue_timeout:g} s without starting "
                        "(batch_queue_timeout)",
                        retry_after=self._retry_after(),
                    ) from None
                await entry.done  # it runs: to its end
        finally:
            job.on_cancel = None

    def admit(self) -> None:
        """:class:`~yichui.errors.EngineBusyError` if the queue is full (before anything is
        computed: the inference service asks before it starts a computation, so a stream is
        refused with a status too)."""
        if len(self.waiting) >= self.settings.queue_max:
            self._rejected("full")
            raise EngineBusyError(
                self.loaded.name,
                f"{len(self.waiting)} requests are waiting for it (batch_queue_max)",
                retry_after=self._retry_after(),
            )

    def _drop(self, entry: _Waiting) -> None:
        """A waiting job was cancelled: out of the queue, its wait over."""
        if entry in self.waiting:
            self.waiting.remove(entry)
            self._depth()
            _resolve(entry)

    async def _loop(self) -> None:
        s = self.settings
        if s.window > 0 and len(self.waiting) < s.max_size:
            await asyncio.sleep(s.window)  # the model was idle: let concurrent arrivals join
        loop = asyncio.get_running_loop()

        def finished(entry: _Waiting) -> Callable[[], None]:
            def call() -> None:  # from the generation thread
                loop.call_soon_threadsafe(_resolve, entry)

            return call

        while self.waiting:
            batch = [self.waiting.popleft() for _ in range(min(s.max_size, len(self.waiting)))]
            self._depth()
            started = time.monotonic()
            jobs = [(e.job, e.emit, finished(e)) for e in batch]
            headroom = s.headroom() if s.headroom is not None else None

            def ran(chosen: list[int], batch: list[_Waiting] = batch, at: float = started) -> None:
                if s.metrics is not None and chosen:  # before any of them can end
                    waits = [at - batch[i].since for i in chosen]
                    s.metrics.batch_ran(self.loaded.name, len(chosen), waits)

            def starting(chosen: list[int]) -> None:  # from the generation thread
                loop.call_soon_threadsafe(ran, chosen)

            try:
                async with self.loaded.lock:
                    outcome = await asyncio.to_thread(
                        run_batch, self.loaded, jobs, headroom, starting
                    )
            except BaseException as exc:  # the thread itself failed: every job of it
                for entry in batch:
                    _resolve(entry, exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            took = time.monotonic() - started
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * took
            deferred = set(outcome.deferred)
            for i in sorted(deferred, reverse=True):  # back to the front, in their order
                self.waiting.appendleft(batch[i])
            self._depth()
            for i, entry in enumerate(batch):
                if i not in deferred:
                    _resolve(entry, outcome.errors.get(i))

    def _depth(self) -> None:
        if self.settings.metrics is not None:
            self.settings.metrics.queue_depth(self.loaded.name, len(self.waiting))

    def _rejected(self, reason: str) -> None:
        if self.settings.metrics is not None:
            self.settings.metrics.queue_rejected(self.loaded.name, reason)

    def _retry_after(self) -> int:
        batches = len(self.waiting) / max(1, self.settings.max_size) + 1
        return max(1, math.ceil(self.batch_seconds * batches))


def _resolve(entry: _Waiting, error: BaseException | None = None) -> None:
    if entry.done.done():
        return
    if error is None:
        entry.done.set_result(None)
    else:
        entry.done.set_exception(error)


Job = tuple[Generation, Emit, Callable[[], None]]
"""A job of a batch: the generation, where its chunks go, and what says it has ended."""


def run_batch(
    loaded: LoadedModel,
    jobs: list[Job],
    headroom: int | None,
    starting: Callable[[list[int]], None] = lambda chosen: None,
) -> _Outcome:
    """The generation thread's part: prepare each job (a failure is that job's), keep those
    whose KV cache fits ``headroom`` (the rest: ``deferred``), tell ``starting`` which run,
    and run them as one batch, or alone when they do not batch."""
    outcome = _Outcome()
    ready: list[int] = []
    for i, (job, _, _) in enumerate(jobs):
        if job.cancelled:
            continue
        try:
            job.prepared()
        except Exception as exc:
            outcome.errors[i] = exc
            continue
        ready.append(i)
    per_token = kv_bytes_per_token(loaded) if headroom is not None else 0
    chosen: list[int] = []
    for n, i in enumerate(ready):
        need = _kv([jobs[j][0] for j in [*chosen, i]], per_token) if per_token else 0
        if chosen and headroom is not None and need > headroom:
            outcome.deferred = ready[n:]
            break
        chosen.append(i)
    starting(chosen)
    together = [i for i in chosen if jobs[i][0].prepared().batchable]
    if len(together) < 2:
        together = []
    for i in chosen:
        if i in together:
            continue
        job, emit, finished = jobs[i]
        try:
            job.run(emit)
        except Exception as exc:
            outcome.errors[i] = exc
        finished()
    if together:
        try:
            _generate(loaded, [jobs[i] for i in together])
        except Exception as exc:
            for i in together:
                outcome.errors[i] = exc
    return outcome


def _kv(jobs: list[Generation], per_token: int) -> int:
    rows = sum(job.rows() for job in jobs)
    longest = max(int(job.prepared().prompt_tokens) for job in jobs)
    most = max(job.params.max_tokens for job in jobs)
    return rows * (longest + most) * per_token


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes of KV cache one row's token takes in ``loaded`` (keys and values of every layer),
    from its config; 0 when the config does not say."""
    model: Any = loaded.model
    config: Any = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        size = int(getattr(model.dtype, "itemsize", 4))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return 0
    return 2 * layers * kv_heads * head_dim * size


def _generate(loaded: LoadedModel, jobs: list[Job]) -> None:
    """One padded ``generate`` call for every row of ``jobs`` (see the module docstring)."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    seqs = [job.prepared().tensors["input_ids"][0] for job, _, _ in jobs]
    longest = max(int(seq.shape[0]) for seq in seqs)
    rows = [job.rows() for job, _, _ in jobs]
    input_ids = torch.full((sum(rows), longest), pad_id(loaded), dtype=torch.long)
    mask = torch.zeros((sum(rows), longest), dtype=torch.long)
    parts: list[_Part] = []
    row = 0
    for (job, emit, finished), seq, count in zip(jobs, seqs, rows, strict=True):
        start = row
        for _ in range(count):
            input_ids[row, longest - seq.shape[0] :] = seq
            mask[row, longest - seq.shape[0] :] = 1
            row += 1
        generator = job.generator()
        parts.append(
            _Part(
                start,
                row,
                job.logits(longest, generator),
                job.watcher(count, 0, emit),
                emit,
                finished,
                job.prepared().prompt_tokens,
            )
        )
    most = max(job.params.max_tokens for job, _, _ in jobs)
    ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
    cache: Any = None
    with torch.inference_mode():
        # CHUNK steps at a time, the KV cache carried over; between calls the rows of the
        # requests that ended leave the batch (their cache too), so the rest run narrower
        while (left := most - (ids.shape[1] - longest)) > 0:
            config = generation_config(loaded, min(CHUNK, left))
            config.return_dict_in_generate = True
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([_RowsLogits(parts)]),
                stopping_criteria=StoppingCriteriaList([_RowsStop(parts)]),
                **_carried(cache),
            )
            new = out.sequences.shape[1] - ids.shape[1]
            ids = out.sequences
            cache = out.cache if _cache_named_cache() else out.past_key_values
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], new))], dim=1)
            keep = [r for part in parts if not part.ended for r in range(part.start, part.stop)]
            if not keep:
                break
            if len(keep) < ids.shape[0]:
                ids, mask, cache, parts = _narrowed(ids, mask, cache, parts, keep)
    for part in parts:
        part.end()


CHUNK = 16
"""Steps of one ``generate`` call of a batch: how often ended requests leave it."""


@functools.cache
def _cache_named_cache() -> bool:
    """Whether this transformers calls the KV cache ``cache`` (5.2x on; ``past_key_values``
    before, now deprecated)."""
    try:
        from transformers.generation.utils import GenerateDecoderOnlyOutput
    except ImportError:
        return False
    return "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__


def _carried(cache: Any) -> dict[str, Any]:
    if cache is None:
        return {}
    return {"cache": cache} if _cache_named_cache() else {"past_key_values": cache}


def _narrowed(
    ids: Any, mask: Any, cache: Any, parts: list[_Part], keep: list[int]
) -> tuple[Any, Any, Any, list[_Part]]:
    """The batch without the rows of its ended requests: ids, mask, KV cache, row ranges."""
    import torch

    index = torch.tensor(keep, device=ids.device)
    cache.batch_select_indices(index)
    alive, row = [], 0
    for part in parts:
        if part.ended:
            continue
        width = part.stop - part.start
        part.start, part.stop = row, row + width
        row += width
        alive.append(part)
    return ids[index], mask[index], cache, alive


@dataclass(eq=False)
class _Part:
    """One job's rows ``start:stop`` of the batch, its processors and its watcher."""

    start: int
    stop: int
    processors: list[Any]
    watcher: _Watcher
    emit: Emit
    finished: Callable[[], None]
    prompt_tokens: int
    ended: bool = False

    def end(self) -> None:
        """Its rows are all done: finish reasons, usage, and its stream ends now."""
        if self.ended:
            return
        self.ended = True
        self.watcher.finish()
        completion = self.watcher.completion_tokens()
        self.emit(EngineChunk(index=0, usage=Usage(self.prompt_tokens, completion)))
        self.finished()


class _RowsLogits:
    """The batch's logits processor: each job's own processors over its rows (a processor by
    duck typing, like :class:`~.generation._Penalties`)."""

    def __init__(self, parts: list[_Part]) -> None:
        self.parts = parts

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        for part in self.parts:
            if part.ended or not part.processors:
                continue
            ids, sub = input_ids[part.start : part.stop], scores[part.start : part.stop]
            for processor in part.processors:
                sub = processor(ids, sub)
            scores[part.start : part.stop] = sub
        return scores


class _RowsStop:
    """The batch's stopping criterion: each job's watcher over its rows; a job whose rows are
    all done ends there (its stream closes while the batch goes on)."""

    def __init__(self, parts: list[_Part]) -> None:
        self.parts = parts

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = []
        for part in self.parts:
            rows = part.stop - part.start
            if part.ended:
                done.append(torch.ones(rows, dtype=torch.bool, device=input_ids.device))
                continue
            flags = part.watcher(input_ids[part.start : part.stop], scores)
            if bool(flags.all()):
                part.end()
            done.append(flags)
        return torch.cat(done)
