"""The response cache against a real Redis: keys, hits, coalescing, failing open."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from tests.images import encode, image_part, picture, png, with_pixel
from tests.redis_proc import RedisProcess, free_port
from yichui.config import Settings, load_settings
from yichui.errors import CoalescedError
from yichui.inference.cache import Breaker, ResponseCache
from yichui.inference.cache_key import KEY_VERSION, cache_key, is_deterministic, key_document
from yichui.inference.engine import (
    EngineRequest,
    GenerationParams,
    ImageDetail,
    Message,
)
from yichui.inference.session import CacheStatus
from yichui.state.connection import make_async_client, parse_redis_url
from yichui.state.keys import Keys
from yichui.state.response_store import ResponseStore

M = "org/model"


def _request(**params: Any) -> EngineRequest:
    return EngineRequest(
        model=M,
        kind="chat",
        params=GenerationParams(**params),
        messages=(Message("user", "What is the capital of France?"),),
    )


def _key(request: EngineRequest, scope: str = "t1", fingerprint: str = "fp1") -> str:
    return cache_key(request, scope=scope, fingerprint=fingerprint)


# -- keys ---------------------------------------------------------------------------------------


def test_every_output_parameter_changes_the_key() -> None:
    base = _key(_request(temperature=0.0))
    variants = [
        dict(max_tokens=17),
        dict(top_p=0.5),
        dict(n=2),
        dict(stop=("\n",)),
        dict(seed=7),
        dict(presence_penalty=0.5),
        dict(frequency_penalty=0.5),
        dict(temperature=0.7),
    ]
    keys = {_key(_request(**{"temperature": 0.0, **v})) for v in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants) and base not in keys
    assert _key(_request(temperature=0.0), scope="t2") != base
    assert _key(_request(temperature=0.0), fingerprint="fp2") != base
    other_model = EngineRequest(
        "org/other", "chat", GenerationParams(temperature=0.0), _request().messages
    )
    assert _key(other_model) != base


def test_equal_values_give_one_key() -> None:
    assert _key(_request(temperature=0)) == _key(_request(temperature=0.0))  # type: ignore[arg-type]
    assert _key(_request(temperature=-0.0)) == _key(_request(temperature=0.0))
    as_parts = EngineRequest(
        M,
        "chat",
        GenerationParams(temperature=0.0),
        (Message("user", ("What is the capital ", "of France?")),),
    )
    assert _key(as_parts) == _key(_request(temperature=0.0))


def test_images_enter_by_their_pixels() -> None:
    def with_image(data: bytes) -> EngineRequest:
        part = image_part(data)
        return EngineRequest(
            M, "chat", GenerationParams(temperature=0.0), (Message("user", ("describe", part)),)
        )

    one = picture(20, 10, seed=1)
    assert _key(with_image(encode(one))) == _key(with_image(encode(one)))
    # the same pixels in another lossless format: one key
    assert _key(with_image(encode(one))) == _key(with_image(encode(one, "WEBP")))
    assert _key(with_image(encode(one))) == _key(with_image(encode(one, "BMP")))
    # one pixel changed, or the same pixels in another mode or size: another key
    assert _key(with_image(encode(one))) != _key(with_image(encode(with_pixel(one))))
    assert _key(with_image(encode(one))) != _key(with_image(encode(one.convert("RGBA"))))
    assert _key(with_image(encode(one))) != _key(with_image(encode(picture(10, 20, seed=1))))
    doc = key_document(with_image(encode(one)), scope="s", fingerprint="f")
    image = doc["messages"][0]["content"][1]
    assert set(image) == {"t", "pixels", "mode", "size", "detail"}
    assert image["pixels"].startswith("px1-") and image["size"] == [20, 10]


def test_engine_options_change_the_key() -> None:
    request = _request(temperature=0.0)
    plain = cache_key(request, scope="s", fingerprint="f")
    assert cache_key(request, scope="s", fingerprint="f", options={}) == plain
    bounded = cache_key(request, scope="s", fingerprint="f", options={"max_pixels": 100})
    assert bounded != plain
    assert bounded != cache_key(request, scope="s", fingerprint="f", options={"max_pixels": 200})


def test_image_detail_changes_the_key() -> None:
    def with_detail(*detail: ImageDetail) -> EngineRequest:
        part = image_part(png(8, 8), *detail)
        return EngineRequest(
            M, "chat", GenerationParams(temperature=0.0), (Message("user", ("describe", part)),)
        )

    low, high = _key(with_detail("low")), _key(with_detail("high"))
    assert low != high and _key(with_detail("auto")) not in (low, high)
    assert _key(with_detail("auto")) == _key(with_detail())  # omitted is auto
    assert low.startswith(f"rc{KEY_VERSION}-") and KEY_VERSION == 3  # 2: bytes, 1: no detail
    doc = key_document(with_detail("low"), scope="s", fingerprint="f")
    assert doc["v"] == 3 and doc["messages"][0]["content"][1]["detail"] == "low"


def test_determinism_policy() -> None:
    assert is_deterministic(GenerationParams(temperature=0.0), honours_seed=False)
    assert not is_deterministic(GenerationParams(), honours_seed=True)  # omitted = 1.0
    assert is_deterministic(GenerationParams(seed=3), honours_seed=True)
    assert not is_deterministic(GenerationParams(seed=3), honours_seed=False)


# -- the cache ----------------------------------------------------------------------------------


@pytest.fixture
async def make_cache(settings: Settings) -> AsyncIterator[Callable[..., ResponseCache]]:
    made: list[tuple[ResponseCache, Any]] = []

    def make(url: str | None = None, **kwargs: Any) -> ResponseCache:
        s = (
            settings
            if url is None
            else load_settings(
                redis_url=url,
                data_dir=settings.data_dir,
                redis_retries=0,
                redis_connect_timeout=0.2,
            )
        )
        client = make_async_client(parse_redis_url(str(s.redis_url)), s)
        opts: dict[str, Any] = {"ttl_for": lambda model: 60, "timeout": 0.2, **kwargs}
        cache = ResponseCache(ResponseStore(client, Keys()), **opts)
        made.append((cache, client))
        return cache

    yield make
    for cache, client in made:
        await cache.close()
        await client.aclose()


def _body(text: str) -> dict[str, Any]:
    return {"id": "x", "choices": [{"index": 0, "message": {"content": text}}]}


async def _ask(
    cache: ResponseCache, calls: list[str], text: str = "Paris", delay: float = 0.2, **session: Any
) -> tuple[dict[str, Any], CacheStatus]:
    async with cache.session(M, "k1", **session) as s:
        if s.body is not None:
            return json.loads(s.body), s.status
        calls.append(text)
        await asyncio.sleep(delay)
        body = _body(text)
        await s.commit(json.dumps(body).encode())
        return body, s.status


@pytest.mark.cluster_only("a cluster client's start (make test runs this file on a cluster)")
async def test_start_learns_a_clusters_slots(make_cache: Callable[..., ResponseCache]) -> None:
    """A cold cluster client learns the slots on its first command (CLUSTER SLOTS, COMMAND:
    about 9 ms here, more on a loaded box), which the cache's timeout may cut off: a bypass.
    ResponseCache.start learns them first."""
    cache = make_cache()
    assert cache.store is not None
    client = cache.store.client
    assert isinstance(client, AsyncRedisCluster)
    assert not client.nodes_manager.slots_cache
    await cache.start()
    assert len(client.nodes_manager.slots_cache) == 16384


async def test_miss_then_hit(make_cache: Callable[..., ResponseCache]) -> None:
    cache = make_cache()
    await cache.start()
    calls: list[str] = []
    assert (await _ask(cache, calls))[1] == CacheStatus.MISS
    body, status = await _ask(cache, calls)
    assert status == CacheStatus.HIT and body == _body("Paris") and calls == ["Paris"]
    # no-cache recomputes and refreshes; no-store computes without storing
    assert (await _ask(cache, calls, "Lyon", refresh=True))[1] == CacheStatus.MISS
    assert (await _ask(cache, calls))[0] == _body("Lyon")
    assert await cache.clear(M) == 1
    assert (await _ask(cache, calls, "Nice", store=False))[1] == CacheStatus.MISS
    assert (await _ask(cache, calls, "Nice", store=False))[1] == CacheStatus.MISS
    assert calls == ["Paris", "Lyon", "Nice", "Nice"]


async def test_concurrent_misses_compute_once(make_cache: Callable[..., ResponseCache]) -> None:
    # two caches with their own connections stand for two server processes; a loaded CI box
    # must not turn 50 sessions' Redis calls into faults (each one a bypass: computed again)
    a, b = make_cache(timeout=1.0), make_cache(timeout=1.0)
    await a.start()
    await b.start()
    await asyncio.sleep(0.1)  # subscriptions in place
    calls: list[str] = []
    results = await asyncio.gather(*(_ask(a if i % 2 else b, calls) for i in range(50)))
    assert calls == ["Paris"]
    statuses = [s for _, s in results]
    assert statuses.count(CacheStatus.MISS) == 1
    assert statuses.count(CacheStatus.COALESCED) == 49
    assert all(body == _body("Paris") for body, _ in results)


async def test_a_failed_leader_fails_its_waiters(make_cache: Callable[..., ResponseCache]) -> None:
    a, b = make_cache(), make_cache()
    await a.start()
    await b.start()
    await asyncio.sleep(0.1)

    async def failing() -> None:
        async with a.session(M, "k1") as s:
            assert s.body is None
            await asyncio.sleep(0.6)  # the waiters arrive meanwhile, even on a loaded machine
            await s.fail({"message": "engine exploded", "status": 502})

    async def waiting(cache: ResponseCache) -> None:
        await asyncio.sleep(0.05)
        with pytest.raises(CoalescedError) as err:
            async with cache.session(M, "k1"):
                raise AssertionError("a waiter must not compute")
        assert err.value.error["message"] == "engine exploded"

    await asyncio.gather(failing(), waiting(a), waiting(b))
    assert await a.store.get(M, "k1") is None  # type: ignore[union-attr]  # errors never stored


async def test_redis_down_fails_open_and_recovers(
    make_cache: Callable[..., ResponseCache], tmp_path: Any
) -> None:
    port = free_port()
    cache = make_cache(f"redis://127.0.0.1:{port}/0", breaker=Breaker(threshold=2, cooldown=0.5))
    await cache.start()
    calls: list[str] = []
    started = time.monotonic()
    for _ in range(5):
        _, status = await _ask(cache, calls, delay=0)
        assert status == CacheStatus.BYPASS
    assert time.monotonic() - started < 2.0  # bounded by the timeout, then the breaker
    assert len(calls) == 5 and cache.breaker.state in ("open", "half-open")
    assert cache.counts["faults"] >= 2
    server = RedisProcess(tmp_path / "r", port=port).start()
    try:
        await asyncio.sleep(0.6)  # cooldown over: the next request probes and succeeds
        _, status = await _ask(cache, calls, delay=0)
        assert status == CacheStatus.MISS and cache.breaker.state == "closed"
        assert (await _ask(cache, calls, delay=0))[1] == CacheStatus.HIT
    finally:
        server.stop()


async def test_waiters_of_an_unstored_answer_compute_it(
    make_cache: Callable[..., ResponseCache],
) -> None:
    a, b = make_cache(), make_cache()
    await a.start()
    await b.start()
    await asyncio.sleep(0.1)
    calls: list[str] = []
    leader = asyncio.create_task(_ask(a, calls, "no-store", delay=0.3, store=False))
    await asyncio.sleep(0.1)
    body, status = await _ask(b, calls, "waiter", delay=0)  # not an error: it computes
    assert (await leader)[1] == CacheStatus.MISS
    assert status == CacheStatus.MISS and body == _body("waiter")
    assert calls == ["no-store", "waiter"]


async def test_near_cache_answers_repeats_and_follows_clears(
    make_cache: Callable[..., ResponseCache],
) -> None:
    a, b = make_cache(), make_cache()
    await a.start()
    await b.start()
    await asyncio.sleep(0.1)
    calls: list[str] = []
    await _ask(a, calls)
    assert (await _ask(b, calls))[1] == CacheStatus.HIT  # from Redis, then kept in b's memory
    assert (await _ask(b, calls))[1] == CacheStatus.HIT
    assert b.counts["near_hits"] == 1
    assert await a.clear(M) == 1  # published: b forgets its copy too
    for _ in range(50):
        if not b.near:
            break
        await asyncio.sleep(0.02)
    assert (await _ask(b, calls, "Lyon", delay=0))[1] == CacheStatus.MISS
    assert calls == ["Paris", "Lyon"]


async def test_a_slow_live_read_is_tried_again_not_waited_out(
    make_cache: Callable[..., ResponseCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streaming follower whose first read of the live stream times out looks again and
    reads it live: it does not fall back to waiting for the whole answer."""
    leader, follower = make_cache(), make_cache()
    assert follower.store is not None and leader.store is not None
    # connected first: a cluster client learns the slots on its first command, which alone
    # can take longer than the cache timeout
    await leader.store.client.ping()
    await follower.store.client.ping()
    real = follower.store.read_live
    reads: list[bytes] = []

    async def slow_once(model: str, key: str, last: bytes, *args: Any) -> Any:
        reads.append(last)
        if len(reads) == 1:
            await asyncio.sleep(0.5)  # past the cache timeout (0.2 s)
        return await real(model, key, last, *args)

    monkeypatch.setattr(follower.store, "read_live", slow_once)
    async with leader.session(M, "k1", live=True) as lead:
        assert lead.body is None and lead.publishing
        lead.publish({"i": 0, "t": "Pa"})
        async with follower.session(M, "k1", live=True) as follow:
            assert follow.status is CacheStatus.COALESCED and follow.live is not None
            assert await anext(follow.live) == {"i": 0, "t": "Pa"}  # before the answer is whole
            lead.publish({"i": 0, "t": "ris"})
            assert await anext(follow.live) == {"i": 0, "t": "ris"}
            await lead.commit(json.dumps(_body("Paris")).encode())
            assert [piece async for piece in follow.live] == []
    assert len(reads) >= 2 and reads[:2] == [b"0", b"0"]  # the first, timed out, read again
