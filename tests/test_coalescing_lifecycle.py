"""The coalescing lifecycle: a computation belongs to the inference service, not to the request
that started it. A cancellation is injected at the k-th await of the leading request, for every
k until it completes, of a whole and of a streamed answer; each time, the requests waiting for
the same answer (in this process and in another) get a 200 with the whole answer, and the next
identical request is answered.

Real Redis (a throwaway server); the engine is a test double that takes a few awaits per answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, ClassVar

import orjson
import pytest
from fastapi.responses import Response, StreamingResponse

from yichui.api.openai.serving import respond
from yichui.config import Settings
from yichui.inference.cache import ResponseCache
from yichui.inference.cache_key import cache_key
from yichui.inference.engine import (
    EngineChunk,
    EngineRequest,
    EngineResult,
    GenerationParams,
    Message,
    ModelCard,
    Usage,
)
from yichui.inference.router import ModelRouter
from yichui.inference.service import CachePolicy, InferenceService
from yichui.state.connection import make_async_client, parse_redis_url
from yichui.state.keys import Keys
from yichui.state.response_store import ResponseStore

MODEL = "test/steps"


def answer_for(prompt: str) -> str:
    return f"The answer to {prompt} is forty-two."


class StepEngine:
    """Serves MODEL: each word of the answer comes after an await of its own."""

    name = "steps"
    honours_seed = True
    card = ModelCard(id=MODEL, owned_by="test", fingerprint="fp-steps")

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def bind(self, model: str) -> StepEngine | None:
        return self if model == MODEL else None

    async def cards(self) -> list[ModelCard]:
        return [self.card]

    async def close(self) -> None:
        return None

    async def complete(self, request: EngineRequest) -> EngineResult:
        from yichui.inference.engine import Choice

        text = ""
        async for chunk in self.stream(request):
            text += chunk.text
        return EngineResult((Choice(0, text, "stop"),), Usage(3, len(text.split())))

    async def stream(self, request: EngineRequest) -> AsyncGenerator[EngineChunk, None]:
        prompt = request.messages[-1].text()
        self.calls[prompt] += 1
        words = answer_for(prompt).split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(0)
            yield EngineChunk(0, word if i == 0 else " " + word)
        await asyncio.sleep(0)
        yield EngineChunk(0, finish_reason="stop")
        yield EngineChunk(0, usage=Usage(3, len(words)))


class CancelAt:
    """Awaits ``coro``, cancelling its task at the ``k``-th time it suspends (as a real
    ``Task.cancel()`` arriving while it waits there); ``fired`` says whether it did."""

    def __init__(self, coro: Coroutine[Any, Any, Any], k: int) -> None:
        self.coro = coro
        self.k = k
        self.fired = False

    def __await__(self) -> Any:
        it = self.coro.__await__()
        value: Any = None
        error: BaseException | None = None
        suspensions = 0
        while True:
            try:
                yielded = it.throw(error) if error is not None else it.send(value)
            except StopIteration as stop:
                return stop.value
            suspensions += 1
            if suspensions == self.k:
                self.fired = True
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # delivered at the await it just reached
            try:
                value, error = (yield yielded), None
            except BaseException as exc:
                value, error = None, exc


def chat(prompt: str) -> EngineRequest:
    return EngineRequest(
        model=MODEL,
        kind="chat",
        params=GenerationParams(temperature=0.0, max_tokens=32),
        messages=(Message("user", prompt),),
    )


async def _body_bytes(response: Response) -> bytes:
    if isinstance(response, StreamingResponse):
        parts = [p if isinstance(p, bytes) else p.encode() async for p in response.body_iterator]
        return b"".join(parts)
    return bytes(response.body)


def text_of(raw: bytes, streamed: bool) -> str:
    if not streamed:
        return str(orjson.loads(raw)["choices"][0]["message"]["content"])
    text = ""
    for line in raw.split(b"\n\n"):
        if line.startswith(b"data: {"):
            event = orjson.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                text += choice.get("delta", {}).get("content") or ""
    return text


Ask = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
async def processes(settings: Settings) -> AsyncIterator[list[tuple[InferenceService, StepEngine]]]:
    """Two inference services with their own Redis clients: two server processes."""
    made: list[tuple[InferenceService, StepEngine, ResponseCache, Any]] = []
    for _ in range(2):
        client = make_async_client(parse_redis_url(str(settings.redis_url)), settings)
        cache = ResponseCache(ResponseStore(client, Keys()), ttl_for=lambda m: 60, timeout=1.0)
        await cache.start()
        engine = StepEngine()
        service = InferenceService(ModelRouter([engine]), cache, shared=True)
        made.append((service, engine, cache, client))
    await asyncio.sleep(0.1)  # their subscriptions in place
    yield [(svc, engine) for svc, engine, _, _ in made]
    for svc, _, cache, client in made:
        await svc.close()
        await cache.close()
        await client.aclose()


async def ask(svc: InferenceService, prompt: str, *, stream: bool) -> tuple[int, str, str]:
    """One request through the API's serving layer -> (status, text, x-yichui-cache)."""
    response = await respond(
        svc, chat(prompt), tenant="t", stream=stream, include_usage=False, policy=CachePolicy()
    )
    raw = await _body_bytes(response)
    text = text_of(raw, stream) if response.status_code == 200 else raw.decode()
    return response.status_code, text, response.headers.get("x-yichui-cache", "")


async def _settle(*services: InferenceService) -> None:
    for _ in range(500):
        if not any(s.running for s in services):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("flights still running")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_cancelled_leader_never_fails_or_hangs_its_waiters(
    processes: list[tuple[InferenceService, StepEngine]], stream: bool
) -> None:
    (a, engine_a), (b, engine_b) = processes
    rounds = 0
    for k in range(1, 200):
        prompt = f"question {k} ({'streamed' if stream else 'whole'})"
        expected = answer_for(prompt)
        stored_before = a.cache.counts["stored"] + b.cache.counts["stored"]
        leader = CancelAt(ask(a, prompt, stream=stream), k)
        leading = asyncio.ensure_future(leader)
        waiters = [
            asyncio.ensure_future(ask(a, prompt, stream=False)),  # same process
            asyncio.ensure_future(ask(a, prompt, stream=True)),
            asyncio.ensure_future(ask(b, prompt, stream=stream)),  # another process
        ]
        results = await asyncio.wait_for(asyncio.gather(*waiters), 20)
        with contextlib.suppress(asyncio.CancelledError):
            await leading
        for status, text, _ in results:
            assert (status, text) == (200, expected), (k, results)
        await _settle(a, b)
        assert engine_a.calls[prompt] + engine_b.calls[prompt] == 1, k  # computed once…
        stored = a.cache.counts["stored"] + b.cache.counts["stored"]
        assert stored == stored_before + 1, k  # …and stored once
        again = await asyncio.wait_for(ask(a, prompt, stream=stream), 10)
        assert again[:2] == (200, expected) and again[2] == "hit", (k, again)
        rounds += 1
        if not leader.fired:  # k went past the leader's last await: every one was covered
            break
    assert rounds >= 3 and not leader.fired  # a miss awaits Redis, the session, the answer


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_leader_alone_cancelled_leaves_nothing_behind(
    processes: list[tuple[InferenceService, StepEngine]], stream: bool
) -> None:
    """Nobody else wants the answer: its computation stops, and no lock or half-done state is
    left behind: the next asker, in another process or this one, is answered at once (not
    after the 30 s lease of a lock nobody releases)."""
    (a, _), (b, _) = processes
    for k in range(1, 200):
        prompt = f"alone {k} ({'streamed' if stream else 'whole'})"
        expected = answer_for(prompt)
        leader = CancelAt(ask(a, prompt, stream=stream), k)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(leader, 10)
        await _settle(a)
        key = cache_key(chat(prompt), scope="shared", fingerprint=StepEngine.card.fingerprint)
        assert a.cache.store is not None
        assert not await a.cache.store.locked(MODEL, key), k  # no lock left for its lease
        other = await asyncio.wait_for(ask(b, prompt, stream=stream), 5)
        assert other[:2] == (200, expected), (k, other)
        again = await asyncio.wait_for(ask(a, prompt, stream=False), 5)
        assert again[:2] == (200, expected), (k, again)
        if not leader.fired:
            break
    assert not leader.fired


async def test_a_fault_on_the_lookup_bypasses_the_cache_at_once(settings: Settings) -> None:
    """The first Redis call of a request failing (a timeout on a loaded box) sends it straight
    to the engine (``bypass``), as the cache promises: no lock taken, nothing more asked."""

    class FlakyStore(ResponseStore):
        calls: ClassVar[Counter[str]] = Counter()

        async def get(self, model: str, digest: str) -> Any:
            self.calls["get"] += 1
            if self.calls["get"] == 1:
                raise TimeoutError("injected: Redis too slow")
            return await super().get(model, digest)

        async def lock(self, *args: Any, **kwargs: Any) -> str | None:
            self.calls["lock"] += 1
            return await super().lock(*args, **kwargs)

    client = make_async_client(parse_redis_url(str(settings.redis_url)), settings)
    store = FlakyStore(client, Keys())
    cache = ResponseCache(store, ttl_for=lambda m: 60, timeout=1.0)
    engine = StepEngine()
    svc = InferenceService(ModelRouter([engine]), cache, shared=True)
    try:
        first = await ask(svc, "flaky", stream=False)
        assert first == (200, answer_for("flaky"), "bypass")
        assert store.calls == {"get": 1} and cache.counts["faults"] == 1
        second = await ask(svc, "flaky", stream=False)  # Redis answers again: a real miss
        assert second[2] == "miss" and store.calls["lock"] == 1
        assert (await ask(svc, "flaky", stream=False))[2] == "hit"
        assert engine.calls["flaky"] == 2
    finally:
        await svc.close()
        await cache.close()
        await client.aclose()
