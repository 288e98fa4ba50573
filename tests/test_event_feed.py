"""The dashboard's event feed: one Redis subscription fanned out to bounded watchers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import redis.asyncio as aredis

from tests.redis_proc import RedisProcess
from yichui.runtime.feed import DROPPED, EventFeed
from yichui.state.keys import Keys


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_watcher_that_never_reads_is_dropped_not_buffered(redis_url: str) -> None:
    keys = Keys()
    client = aredis.Redis.from_url(redis_url)
    feed = EventFeed(client, keys, buffer=8)
    slow, quick = feed.watch(), feed.watch()
    try:
        await _until(lambda: feed.reachable is True)
        assert await slow.get() == ("redis", {"reachable": True})
        assert await quick.get() == ("redis", {"reachable": True})
        got: list[dict[str, object]] = []
        for i in range(50):
            await client.publish(keys.task_events(), orjson.dumps({"id": f"t{i}", "tenant": "a"}))
            kind, data = await asyncio.wait_for(quick.get(), 5)  # a reader keeps up
            assert kind == "task"
            got.append(data)
        assert [d["id"] for d in got] == [f"t{i}" for i in range(50)]
        # the one that never read: dropped after `buffer` events, holding one item only
        assert slow.dropped and slow not in feed.watchers and quick in feed.watchers
        assert slow.queue.qsize() == 1 and await slow.get() == DROPPED
    finally:
        await feed.close()
        await client.aclose()


async def test_watchers_hear_when_redis_goes_and_comes_back(redis_server: RedisProcess) -> None:
    keys = Keys()
    client = aredis.Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    feed = EventFeed(client, keys, buffer=64)
    watcher = feed.watch()
    try:
        assert await asyncio.wait_for(watcher.get(), 5) == ("redis", {"reachable": True})
        redis_server.kill()
        assert await asyncio.wait_for(watcher.get(), 15) == ("redis", {"reachable": False})
        redis_server.start()
        assert await asyncio.wait_for(watcher.get(), 15) == ("redis", {"reachable": True})
        await client.publish(keys.model_events(), b'{"event": "pulled", "name": "m"}')
        assert await asyncio.wait_for(watcher.get(), 5) == (
            "model",
            {"event": "pulled", "name": "m"},
        )
    finally:
        await feed.close()
        await client.aclose()
