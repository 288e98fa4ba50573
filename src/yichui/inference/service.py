"""The inference service: the whole pipeline of an answer, with one entry point.

::

    service = InferenceService(router, cache, shared=False, wait=120.0)
    answer = await service.answer(request, tenant="team-a", policy=CachePolicy(),
                                  stream=False, render=render)
    answer.status, answer.key, answer.body       # or answer.chunks for a streamed miss

The steps, in order: bind the model (the router: engine, card and fingerprint in one), refuse
images the model does not take, decide whether the answer may be cached (greedy, or seeded
where the engine honours seeds, or the client asked for sampled answers to be cached), build
the canonical key, look it up (near cache, then Redis), and otherwise run the engine, store the
answer and hand it to everyone who asked for it.

**The computation belongs to the service, not to the request that started it.** A cacheable
miss runs as a *flight*: a task of its own, keyed by the cache key, which identical requests of
this process join instead of computing again (across processes, the cache's Redis lock does the
same). The request that started it reads it like any other; when that request goes away (its
client disconnected, it was cancelled), the flight goes on for the others and is stored once. A
flight that nobody wants any more is cancelled, and requests waiting for it in other processes
are told to compute it themselves. Every wait on a flight is bounded by ``wait`` seconds, after
which the waiter computes its answer itself, uncached.

``render`` turns a whole :class:`~yichui.inference.engine.EngineResult` into the response body
that is stored and answered (the API layer's protocol: OpenAI's JSON); hits are answered with
those bytes as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from yichui.errors import CoalescedError, ImagesNotAcceptedError, RequestError, describe_error
from yichui.inference.cache import ResponseCache
from yichui.inference.cache_key import cache_key, is_deterministic
from yichui.inference.engine import (
    BoundEngine,
    Choice,
    EngineChunk,
    EngineRequest,
    EngineResult,
    Usage,
)
from yichui.inference.relay import Relayed, piece_of, pieces
from yichui.inference.router import ModelRouter
from yichui.inference.session import INTERRUPTED, CacheSession, CacheStatus, stream_lost
from yichui.metrics import OTHER, Metrics

log = logging.getLogger("yichui.inference")

Render = Callable[[EngineResult], bytes]
"""A whole answer -> the response body that is stored and sent (JSON bytes)."""


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What the client asked of the cache (``Cache-Control`` and ``x-yichui-cache-policy``)."""

    refresh: bool = False  # no-cache: recompute, then store the fresh answer
    store: bool = True  # no-store: do not store this answer
    max_age: float | None = None  # max-age=N: only hits younger than N seconds
    sampled: bool = False  # x-yichui-cache-policy: sampled — cache sampled answers too

    @classmethod
    def from_headers(cls, cache_control: str | None, policy: str | None) -> CachePolicy:
        refresh, store, max_age = False, True, None
        for directive in (cache_control or "").lower().split(","):
            name, _, value = directive.strip().partition("=")
            if name == "no-cache":
                refresh = True
            elif name == "no-store":
                store = False
            elif name == "max-age":
                try:
                    max_age = max(0.0, float(value.strip().strip('"')))
                except ValueError:
                    raise RequestError(f"Cache-Control: bad max-age {value!r}") from None
        sampled = (policy or "").strip().lower() == "sampled"
        return cls(refresh, store, max_age, sampled)


def tenant_counter(tenant: str, status: str) -> str:
    """The field of the fleet totals (``response_stats``) counting ``tenant``'s answers of one
    cache status: ``tenant:<tenant>:<status>`` (``yichui cache stats`` and ``/api/cache/stats``
    show a user its own tenant's)."""
    return f"tenant:{tenant}:{status}"


@dataclass(frozen=True, slots=True)
class Answer:
    """The service's answer: ``body`` (rendered: a hit, a coalesced or a computed answer), or
    ``chunks`` (a streamed miss, generated as it is read; close it to let go of it)."""

    status: CacheStatus
    key: str | None = None
    """The cache key (None: not cacheable, so never looked up)."""
    body: bytes | None = None
    chunks: AsyncGenerator[EngineChunk, None] | None = None


class _Flight:
    """One computation of one cache key in this process. A streamed one keeps its pieces so
    that every request reading it gets them all, from the first, live (:meth:`read`)."""

    def __init__(self, key: str, *, streamed: bool) -> None:
        loop = asyncio.get_running_loop()
        self.key = key
        self.streamed = streamed
        self.entered: asyncio.Future[tuple[CacheStatus, bytes | None]] = loop.create_future()
        """Set once the cache session is open: its status and a stored body (or None)."""
        self.session: CacheSession | None = None
        self.pieces: list[EngineChunk] = []
        self.ended = False
        self.error: BaseException | None = None
        self._more = asyncio.Event()
        """Set (and replaced) when a piece comes or the flight ends."""
        self.task: asyncio.Task[bytes] | None = None
        self.watch: asyncio.Task[None] | None = None
        """While no request of this process reads it: asks whether any elsewhere still do."""
        self.interest = 1  # the request that started it

    def push(self, piece: EngineChunk) -> None:
        self.pieces.append(piece)
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        self.ended, self.error = True, error
        self._wake()

    def _wake(self) -> None:
        more, self._more = self._more, asyncio.Event()
        more.set()

    async def read(self) -> AsyncGenerator[EngineChunk, None]:
        """Every piece, from the first, as they come; the flight's error at the end."""
        i = 0
        while True:
            while i < len(self.pieces):
                yield self.pieces[i]
                i += 1
            if self.ended:
                if self.error is not None:
                    raise self.error
                return
            await self._more.wait()  # no await since the checks: nothing can slip in between


class InferenceService:
    """Answers for one process (see the module docstring)."""

    MEMO_SIZE = 10_000
    """Request digests remembered for the hit fast path (see ``api/fastpath.py``)."""

    def __init__(
        self,
        router: ModelRouter,
        cache: ResponseCache,
        *,
        shared: bool,
        wait: float = 120.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.router = router
        self.cache = cache
        self.metrics = metrics or cache.metrics
        self.shared = shared
        self.wait = wait
        self._flights: dict[str, _Flight] = {}
        """Key -> the flight identical requests join (one per key)."""
        self.running: set[asyncio.Task[bytes]] = set()
        """Every flight's task until it ends: replaced and cancelled ones too, which may still be
        letting their lock go."""
        self._memo: OrderedDict[str, str] = OrderedDict()
        """Digest of (tenant, path, cache headers, raw body) -> the cache key it resolved to."""
        self._watches: set[asyncio.Task[None]] = set()

    # -- the one entry point --------------------------------------------------------------------

    async def answer(
        self,
        request: EngineRequest,
        *,
        tenant: str,
        policy: CachePolicy,
        stream: bool,
        render: Render,
        endpoint: str = OTHER,
    ) -> Answer:
        """Answer ``request`` for ``tenant`` (see the module docstring); ``endpoint`` (``chat``,
        ``completions``) labels its metrics."""
        answer = await self._answer(request, tenant, policy, stream, render, endpoint)
        self.metrics.fleet[tenant_counter(tenant, answer.status)] += 1
        return answer

    async def _answer(
        self,
        request: EngineRequest,
        tenant: str,
        policy: CachePolicy,
        stream: bool,
        render: Render,
        endpoint: str,
    ) -> Answer:
        bound = await self.router.resolve(request.model)
        if any(m.images() for m in request.messages) and not bound.card.accepts_images:
            raise ImagesNotAcceptedError(request.model)
        deterministic = is_deterministic(request.params, honours_seed=bound.honours_seed)
        if not (deterministic or policy.sampled):
            self.cache.count("bypass", endpoint, bound.card.id)
            _admit(bound)
            return await self._uncached(bound, request, stream, render)
        scope = "shared" if self.shared else f"tenant:{tenant}"
        card = bound.card
        key = cache_key(request, scope=scope, fingerprint=card.fingerprint, options=card.options)
        reachable = True
        if not policy.refresh:
            flight = self._flights.get(key)
            if flight is None:
                body, reachable = await self.cache.lookup(
                    request.model, key, policy.max_age, endpoint
                )
                if body is not None:
                    return Answer(CacheStatus.HIT, key, body)
                flight = self._flights.get(key)  # one may have started while we looked
            if flight is not None:
                return await self._join(flight, bound, request, stream, render, endpoint)
        _admit(bound)  # a hit, or joining a computation under way, is never refused
        flight = self._start(bound, request, key, policy, stream, render, reachable, endpoint)
        return await self._lead(flight)

    # -- the hit fast path ----------------------------------------------------------------------

    def remember(self, request_digest: str, key: str) -> None:
        """``request_digest`` (of a request's bytes) resolved to ``key``."""
        self._memo[request_digest] = key
        self._memo.move_to_end(request_digest)
        if len(self._memo) > self.MEMO_SIZE:
            self._memo.popitem(last=False)

    def fast_hit(
        self,
        request_digest: str,
        max_age: float | None,
        endpoint: str = OTHER,
        tenant: str = "local",
    ) -> tuple[str, bytes] | None:
        """A byte-identical request seen before whose answer this process holds in memory."""
        key = self._memo.get(request_digest)
        if key is None:
            return None
        held = self.cache.near.entry(key, max_age)
        if held is None:
            return None
        model, body = held
        self.cache.near_hit(endpoint, model, fast=True)
        self.metrics.fleet[tenant_counter(tenant, CacheStatus.HIT)] += 1
        return key, body

    def model_changed(self, model: str | None) -> None:
        """A model was pulled, imported, merged or removed (None: any): bind it anew, and
        forget which cache key a request's bytes led to (the fingerprint may have changed)."""
        self.router.forget(model)
        self._memo.clear()

    async def close(self) -> None:
        """Cancel the flights still running (at shutdown), and wait for them to let go."""
        self._flights = {}
        for watch in list(self._watches):
            watch.cancel()
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- flights --------------------------------------------------------------------------------

    def _start(
        self,
        bound: BoundEngine,
        request: EngineRequest,
        key: str,
        policy: CachePolicy,
        stream: bool,
        render: Render,
        reachable: bool,
        endpoint: str,
    ) -> _Flight:
        flight = _Flight(key, streamed=stream)
        flight.task = asyncio.create_task(
            self._fly(flight, bound, request, policy, render, reachable, endpoint),
            name=f"flight-{key[:12]}",
        )
        self.running.add(flight.task)
        flight.task.add_done_callback(lambda _: self._landed(flight))
        self._flights[key] = flight  # a refresh replaces an older flight; that one goes on
        return flight

    def _landed(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        task = flight.task
        if task is not None:
            self.running.discard(task)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved here: the requests that read it may all be gone

    def _release(self, flight: _Flight) -> None:
        """One request less reads ``flight``; the last one out cancels it if it still runs."""
        flight.interest -= 1
        task = flight.task
        if flight.interest > 0 or task is None or task.done():
            return
        session = flight.session
        if flight.streamed and session is not None and session.publishing:
            if flight.watch is None:  # read live elsewhere, perhaps: then it goes on for them
                flight.watch = asyncio.create_task(self._orphaned(flight, session))
                self._watches.add(flight.watch)
            return
        self._drop(flight)

    def _drop(self, flight: _Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]  # nobody may join it now
        if flight.task is not None:
            flight.task.cancel()

    async def _orphaned(self, flight: _Flight, session: CacheSession) -> None:
        """Keep a live flight without readers here going while requests in other processes
        read it (asked twice a second); cancel it once nobody does."""
        task = flight.task
        try:
            while task is not None and not task.done() and flight.interest <= 0:
                if await session.remote_readers() == 0:
                    if flight.interest <= 0:
                        self._drop(flight)
                    return
                await asyncio.sleep(0.5)
        finally:
            self._watches.discard(asyncio.current_task())
            flight.watch = None

    async def _fly(
        self,
        flight: _Flight,
        bound: BoundEngine,
        request: EngineRequest,
        policy: CachePolicy,
        render: Render,
        reachable: bool,
        endpoint: str,
    ) -> bytes:
        """The computation itself: cache session, engine, render, store."""
        session = self.cache.session(
            request.model,
            flight.key,
            refresh=policy.refresh,
            store=policy.store,
            max_age=policy.max_age,
            looked_up=True,  # answer() just missed (or refreshes)
            reachable=reachable,  # a fault just now: bypass, ask Redis nothing more
            endpoint=endpoint,
            live=flight.streamed,
        )
        flight.session = session
        n = request.params.n
        try:
            async with session:
                flight.entered.set_result((session.status, session.body))
                if session.body is not None:
                    return session.body
                if session.live is not None:  # streamed by another process: relayed live
                    relayed = Relayed(flight.push)
                    try:
                        async with contextlib.aclosing(session.live) as remote:
                            result, _ = await _pump(pieces(remote), n, relayed)
                    except CoalescedError as exc:
                        if not stream_lost(exc):
                            raise  # the computation's own error: every reader gets it
                        # its stream broke off (evicted, or its computation gone): the answer
                        # is deterministic, so compute it here and send on what was not sent
                        self.cache.count("live_resumed", endpoint, request.model)
                        chunks = self._timed(bound, request)
                        result, _ = await _pump(chunks, n, relayed.resume())
                        body = render(result)
                    else:
                        body = session.body if session.body is not None else render(result)
                elif not flight.streamed:
                    result = await self._complete(bound, request)
                    body = render(result)
                    await session.commit(body, cacheable=_complete(result))
                else:

                    def emit(chunk: EngineChunk) -> None:
                        flight.push(chunk)
                        session.publish(piece_of(chunk))

                    chunks = self._timed(bound, request)
                    result, finished = await _pump(chunks, n, emit)
                    body = render(result)
                    # stored before the last piece goes out: a client gone now loses nothing
                    await session.commit(body, cacheable=finished and _complete(result))
        except BaseException as exc:
            if not flight.entered.done():
                flight.entered.set_exception(exc)
                flight.entered.exception()  # retrieved: the starter may be gone
            flight.finish(exc)
            if not isinstance(exc, asyncio.CancelledError | CoalescedError):
                log.debug("computing %s failed: %r", flight.key[:12], exc)
            raise
        flight.finish()
        return body

    async def _lead(self, flight: _Flight) -> Answer:
        """The request that started ``flight`` reads it."""
        try:
            status, stored = await asyncio.shield(flight.entered)
        except BaseException:
            self._release(flight)
            raise
        if stored is not None or not flight.streamed:
            try:
                body = stored if stored is not None else await asyncio.shield(_task(flight))
            finally:
                self._release(flight)
            return Answer(status, flight.key, body)
        return Answer(status, flight.key, chunks=self._follow(flight))

    async def _follow(
        self, flight: _Flight, labels: tuple[str, str] | None = None
    ) -> AsyncGenerator[EngineChunk, None]:
        """The live pieces of a streamed flight, for the request that started it, or (with
        the ``labels`` of its counts) one that joined it: that one gets the flight's error as
        a :class:`CoalescedError`."""
        try:
            async for piece in flight.read():
                yield piece
        except asyncio.CancelledError:
            if labels is None or _cancelled_here():
                raise
            raise CoalescedError(INTERRUPTED) from None  # the flight was, not this request
        except Exception as exc:
            if labels is None or isinstance(exc, CoalescedError):
                raise
            self.cache.count("coalesced_errors", *labels)
            raise CoalescedError(describe_error(exc)) from exc
        finally:
            self._release(flight)

    async def _join(
        self,
        flight: _Flight,
        bound: BoundEngine,
        request: EngineRequest,
        stream: bool,
        render: Render,
        endpoint: str,
    ) -> Answer:
        """An identical request waits for ``flight`` (at most ``wait`` seconds); a streamed
        one reads a streamed flight's pieces live, from the first."""
        flight.interest += 1
        model = bound.card.id
        following = False
        try:
            async with asyncio.timeout(self.wait):
                if stream and flight.streamed:
                    _, stored = await asyncio.shield(flight.entered)
                    if stored is None:
                        following = True
                        self.cache.count("coalesced", endpoint, model)
                        chunks = self._follow(flight, (endpoint, model))
                        return Answer(CacheStatus.COALESCED, flight.key, chunks=chunks)
                body = await asyncio.shield(_task(flight))
        except TimeoutError:
            self.cache.count("coalesce_timeouts", endpoint, model)
            return await self._uncached(bound, request, stream, render)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.cache.count("coalesced_errors", endpoint, model)
            raise CoalescedError(describe_error(exc)) from exc
        finally:
            if not following:
                self._release(flight)
        self.cache.count("coalesced", endpoint, model)
        return Answer(CacheStatus.COALESCED, flight.key, body)

    async def _uncached(
        self, bound: BoundEngine, request: EngineRequest, stream: bool, render: Render
    ) -> Answer:
        if stream:
            return Answer(CacheStatus.BYPASS, chunks=self._timed(bound, request))
        return Answer(CacheStatus.BYPASS, body=render(await self._complete(bound, request)))

    # -- engine time ----------------------------------------------------------------------------

    async def _complete(self, bound: BoundEngine, request: EngineRequest) -> EngineResult:
        started = time.perf_counter()
        result = await bound.complete(request)
        self.metrics.engine_answered(bound.card.id, time.perf_counter() - started, result.usage)
        return result

    async def _timed(
        self, bound: BoundEngine, request: EngineRequest
    ) -> AsyncGenerator[EngineChunk, None]:
        """``bound.stream(request)``, timed to its first piece of text and to its end."""
        model, metrics = bound.card.id, self.metrics
        started = time.perf_counter()
        first = True
        usage: Usage | None = None
        async with contextlib.aclosing(_own(bound.stream(request))) as chunks:
            async for chunk in chunks:
                if first and chunk.text:
                    metrics.first_token(model, time.perf_counter() - started)
                    first = False
                if chunk.usage is not None:
                    usage = chunk.usage
                yield chunk
        metrics.engine_answered(model, time.perf_counter() - started, usage)


def _task(flight: _Flight) -> asyncio.Task[bytes]:
    assert flight.task is not None
    return flight.task


async def _own(chunks: AsyncIterator[EngineChunk]) -> AsyncGenerator[EngineChunk, None]:
    """``chunks``, closed when the reader closes this (it may be a plain iterator)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            await closer()


def _cancelled_here() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _pump(
    stream: AsyncGenerator[EngineChunk, None],
    n: int,
    out: Callable[[EngineChunk], None],
) -> tuple[EngineResult, bool]:
    """Run a streamed answer of ``n`` choices, passing each piece on to ``out`` -> the whole
    answer, and whether the engine finished every choice."""
    texts = [""] * n
    finish: list[str | None] = [None] * n
    usage = Usage(0, 0)
    async with contextlib.aclosing(stream) as chunks:
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            texts[chunk.index] += chunk.text
            if chunk.finish_reason is not None:
                finish[chunk.index] = chunk.finish_reason
            out(chunk)
    reasons: list[Literal["stop", "length"]] = [
        "length" if f == "length" else "stop" for f in finish
    ]
    choices = tuple(Choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons, strict=True)))
    return EngineResult(choices, usage), all(finish)


def _complete(result: EngineResult) -> bool:
    """Only whole, non-empty answers are stored."""
    return bool(result.choices) and all(c.text.strip() for c in result.choices)


def _admit(bound: BoundEngine) -> None:
    """Let the engine refuse a new computation it has no room for (a local model's full queue:
    503 with ``Retry-After``), before any response starts, streamed or not."""
    admit = getattr(bound, "admit", None)
    if admit is not None:
        admit()
