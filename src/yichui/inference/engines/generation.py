"""One request's generation on a model of the pool, shared by the text and the vision engine.

::

    job = Generation(loaded, request.params, prepare=lambda: ModelInputs(tensors, prompt_len))
    async with contextlib.aclosing(job.stream()) as chunks:
        async for chunk in chunks:
            ...

The engine says how the prompt becomes model inputs (``prepare``, run in the generation
thread under the model's lock: token ids for a text model, the processor's tensors with the
pixels for a vision model); everything else is here, the same for both:

- Decoding is always transformers' greedy loop; sampling (``temperature > 0``) happens in a
  logits processor of ours that draws the token with a per-request ``torch.Generator`` and
  leaves only it standing. So a seed gives the same text every time, whatever else the process
  runs at once, and the sampling is OpenAI's (temperature and ``top_p`` only: transformers'
  own sampling would add its default ``top_k=50``).
- ``presence_penalty``/``frequency_penalty`` as OpenAI defines them, over generated tokens.
- ``n`` choices: greedy choices are all the same, so greedy runs one row and copies it.
  Sampled choices of inputs that repeat across rows (token ids) run as one batch of ``n``
  identical rows (no padding); other inputs (``batchable=False``: a vision model's pixels,
  whose tensors are not laid out per row in every family) run one choice after another, with
  the one generator, so a seed still gives the same choices every time.
- Stop strings and streaming: a stopping criterion of ours sees every new token of every row.
  It decodes the row, stops it at EOS, at a stop string (the text is cut before it) or at
  ``max_tokens``, and passes on the text that can no longer change: partial UTF-8 characters
  and the last ``len(longest stop) - 1`` characters (which could start a stop string) are held
  back. A complete answer is the same stream joined (:func:`join`), so a greedy stream and a
  greedy complete give exactly the same text. (transformers' ``TextIteratorStreamer`` takes
  batch size 1 only.)
- Generation runs in a worker thread under the model's lock: one generation per model at a
  time, the event loop free meanwhile. With a ``queue`` (the engines' batcher,
  :mod:`.batching`) requests wait there and run as one padded batch, each with its own
  processors and watcher from :meth:`Generation.logits` and :meth:`Generation.watcher`. A
  stream closed early stops the generation at the next token.

torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from yichui.inference.engine import (
    Choice,
    EngineChunk,
    EngineResult,
    GenerationParams,
    Usage,
)
from yichui.inference.pool import LoadedModel


class JobQueue(Protocol):
    """Runs a request's generation in its turn, maybe in a batch with others
    (:class:`~yichui.inference.engines.batching.Batcher`), its chunks sent through ``emit``."""

    async def run(self, job: Generation, emit: Emit) -> None: ...


Finish = Literal["stop", "length"]

Emit = Callable[[EngineChunk | None], None]


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """A prompt as the model takes it: ``tensors`` for ``generate`` (``input_ids`` of one row,
    ``attention_mask`` and whatever else the processor made: ``pixel_values``...),
    ``prompt_tokens`` (the length of ``input_ids``: image tokens included), and whether the
    tensors may be repeated along the first dimension to run several choices as one batch."""

    tensors: Mapping[str, Any]
    prompt_tokens: int
    batchable: bool = True


async def join(chunks: AsyncIterator[EngineChunk], n: int) -> EngineResult:
    """The whole answer of a stream of ``n`` choices (the stream is read to its end)."""
    texts: list[list[str]] = [[] for _ in range(n)]
    finish: list[Finish] = ["length"] * n
    usage = Usage(0, 0)
    async for chunk in chunks:
        if chunk.text:
            texts[chunk.index].append(chunk.text)
        if chunk.finish_reason is not None:
            finish[chunk.index] = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    choices = tuple(Choice(i, "".join(texts[i]), finish[i]) for i in range(n))
    return EngineResult(choices=choices, usage=usage)


class Generation:
    """One request's generation: :meth:`stream` runs it in a worker thread under the model's
    lock and yields its chunks (text pieces per choice, then each choice's ``finish_reason``,
    then one chunk with ``usage``)."""

    def __init__(
        self,
        loaded: LoadedModel,
        params: GenerationParams,
        prepare: Callable[[], ModelInputs],
        queue: JobQueue | None = None,
    ) -> None:
        self.loaded = loaded
        self.params = params
        self.prepare = prepare
        self.queue = queue
        """Where requests for the model wait and join batches (``engines/batching.py``);
        None: one at a time under the model's lock, alone."""
        self.cancelled = False
        self.on_cancel: Callable[[], None] | None = None
        """Set by the batcher while the job waits in its queue: drops it from there."""
        self.inputs: ModelInputs | None = None
        """The prepared inputs (prepared once, in the generation thread)."""

    def cancel(self) -> None:
        """Stop at the next token (read by the generation thread; a bool is safe to share)."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    def prepared(self) -> ModelInputs:
        """The inputs, prepared on the first call (in the generation thread)."""
        if self.inputs is None:
            self.inputs = self.prepare()
        return self.inputs

    async def stream(self) -> AsyncGenerator[EngineChunk, None]:
        """The chunks as they are generated; close it (``aclose()``) to stop early. Must run
        inside the ``pool.use()`` of the model, which stays in use until the thread ends."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineChunk | None] = asyncio.Queue()

        def emit(item: EngineChunk | None) -> None:  # from the generation thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        async def work() -> None:
            # The lock is held by the generation, not by the consumer: a slow reader of the
            # stream does not keep the next request waiting.
            try:
                if self.queue is not None:
                    await self.queue.run(self, emit)
                else:
                    async with self.loaded.lock:
                        await asyncio.to_thread(self.run, emit)
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
            self.cancel()
            if not worker.done():
                await asyncio.wait([worker])
            if not worker.cancelled():
                worker.exception()  # retrieved: it was raised above, or we are unwinding

    def run(self, emit: Emit) -> None:
        """The generation itself (in the worker thread, under the model's lock)."""
        if self.cancelled:
            return
        params = self.params
        inputs = self.prepared()
        # greedy choices are all equal: one row, copied; sampled ones: n rows, or one by one
        if params.greedy or inputs.batchable:
            rounds = [(self.rows(), 0)]  # (rows, first choice)
        else:
            rounds = [(1, i) for i in range(params.n)]
        generator = self.generator()
        completion = 0
        for rows, first in rounds:
            if self.cancelled:
                break
            completion += self._generate(inputs, rows, first, generator, emit)
        emit(EngineChunk(index=0, usage=Usage(inputs.prompt_tokens, completion)))

    def generator(self) -> Any:
        """The request's own random generator (None when greedy), seeded by its ``seed``."""
        if self.params.greedy:
            return None
        import torch

        generator = torch.Generator(device=self.loaded.device)
        if self.params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.params.seed % 2**64)
        return generator

    def rows(self) -> int:
        """Rows of a batch this request takes: one when greedy (copied to its ``n``), else
        ``n`` (its sampled choices)."""
        return 1 if self.params.greedy else self.params.n

    def logits(self, prompt_tokens: int, generator: Any) -> list[Any]:
        """The logits processors of this request: penalties over the tokens generated after
        ``prompt_tokens`` (the padded length inside a batch), then its sampler."""
        params = self.params
        processors: list[Any] = []
        if params.presence_penalty or params.frequency_penalty:
            processors.append(
                _Penalties(prompt_tokens, params.presence_penalty, params.frequency_penalty)
            )
        if generator is not None:
            processors.append(_Sampler(params.temperature, params.top_p, generator))
        return processors

    def watcher(self, rows: int, first: int, emit: Emit) -> _Watcher:
        """The stopping criterion (and streamer) of this request's ``rows``."""
        params = self.params
        return _Watcher(
            self.loaded.tokenizer,
            rows=rows,
            n=params.n if params.greedy else rows,
            first=first,
            max_tokens=params.max_tokens,
            stop=[s for s in params.stop if s],
            eos=set(eos_ids(self.loaded)),
            emit=emit,
            is_cancelled=lambda: self.cancelled,
        )

    def _generate(
        self, inputs: ModelInputs, rows: int, first: int, generator: Any, emit: Emit
    ) -> int:
        """``rows`` rows of the prompt, answering choices ``first``... (all ``n`` when one
        greedy row stands for them); returns the completion tokens they count for."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        loaded = self.loaded
        tensors = _on(loaded, inputs.tensors, rows)
        processors = LogitsProcessorList(self.logits(inputs.prompt_tokens, generator))
        watcher = self.watcher(rows, first, emit)
        with torch.inference_mode():
            loaded.model.generate(
                **tensors,
                generation_config=generation_config(loaded, self.params.max_tokens),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([watcher]),
            )
        watcher.finish()
        return watcher.completion_tokens()


def pad_id(loaded: LoadedModel) -> int:
    """The id that pads rows (the tokenizer's, else the first EOS)."""
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        eos = eos_ids(loaded)
        pad = eos[0] if eos else 0
    return int(pad)


def generation_config(loaded: LoadedModel, max_new_tokens: int) -> Any:
    """transformers' ``GenerationConfig`` of every generation of ours: the greedy loop (the
    sampling is :class:`_Sampler`'s), the model's EOS ids, nothing of its own
    ``generation_config.json`` that would change the output behind the request's back."""
    from transformers import GenerationConfig

    _own_lengths(loaded.model)
    eos = eos_ids(loaded)
    return GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_new_tokens,
        do_sample=False,  # sampling is _Sampler's: see the module docstring
        num_beams=1,
        eos_token_id=eos or None,
        pad_token_id=pad_id(loaded),
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
    )


def _on(loaded: LoadedModel, tensors: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """``tensors`` on the model's device, floats in its dtype (pixels), repeated ``rows``
    times along the first dimension; an attention mask added where there is none."""
    import torch

    dtype = getattr(loaded.model, "dtype", None)
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            value = value.to(loaded.device)
            if value.is_floating_point() and dtype is not None:
                value = value.to(dtype)
            if rows > 1:
                value = value.repeat(rows, *([1] * (value.dim() - 1)))
        out[key] = value
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def eos_ids(loaded: LoadedModel) -> list[int]:
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

    Called by ``generate`` after every step with all rows' ids; row ``r`` answers choice
    ``first + r``, or choices ``first..first + n - 1`` when one row stands for ``n`` (greedy,
    copied). A stopping criterion by duck typing, like :class:`_Penalties`.
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
        emit: Emit,
        is_cancelled: Callable[[], bool],
        first: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.rows = rows
        self.n = n
        self.first = first
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
        if self.rows == 1 and self.n > 1:
            return range(self.first, self.first + self.n)
        return range(self.first + row, self.first + row + 1)

    def finish(self) -> None:
        """End the rows ``generate`` stopped without us (its own length limits)."""
        for row in range(self.rows):
            if not self.done[row]:
                self._end(row, self.texts[row], "length")

    def completion_tokens(self) -> int:
        per_row = sum(self.counts)
        return per_row * self.n if self.rows == 1 else per_row
