"""One process's feed of the deployment's events, fanned out to its watchers (the dashboard's
``/api/events`` streams)::

    feed = EventFeed(client, keys, buffer=256)
    watcher = feed.watch()              # a bounded queue of (kind, data)
    kind, data = await watcher.get()    # ("task", {...}), ("model", {...}), ("redis", {...})
    feed.unwatch(watcher)

One Redis subscription per process (``task_events``, ``model_events``), however many browsers
watch. A watcher that falls ``buffer`` events behind is dropped (its stream ends; an
``EventSource`` reconnects and the page reloads its state from the API), so a client that never
reads cannot grow the server's memory. When Redis goes away the watchers hear
``("redis", {"reachable": False})``, and ``True`` when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import orjson

from yichui.backoff import Backoff
from yichui.state.connection import AsyncRedis
from yichui.state.keys import Keys

log = logging.getLogger("yichui.api")

DROPPED: tuple[str, dict[str, Any]] = ("dropped", {})
"""The last item a dropped watcher gets."""


class Watcher:
    def __init__(self, buffer: int) -> None:
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(buffer)
        self.dropped = False

    async def get(self) -> tuple[str, dict[str, Any]]:
        return await self.queue.get()


class EventFeed:
    def __init__(self, client: AsyncRedis, keys: Keys, *, buffer: int) -> None:
        self.client = client
        self.keys = keys
        self.buffer = buffer
        self.watchers: set[Watcher] = set()
        self.reachable: bool | None = None
        self._pump: asyncio.Task[None] | None = None
        self._channels = {keys.task_events(): "task", keys.model_events(): "model"}

    def watch(self) -> Watcher:
        watcher = Watcher(self.buffer)
        self.watchers.add(watcher)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="event-feed")
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        for watcher in list(self.watchers):
            try:
                watcher.queue.put_nowait((kind, data))
            except asyncio.QueueFull:  # a slow client: drop it rather than buffer without end
                self.watchers.discard(watcher)
                watcher.dropped = True
                while not watcher.queue.empty():
                    watcher.queue.get_nowait()
                watcher.queue.put_nowait(DROPPED)

    def _reach(self, up: bool) -> None:
        if self.reachable is not up:
            self.reachable = up
            self.publish("redis", {"reachable": up})

    async def _run(self) -> None:
        backoff = Backoff(first=0.5, cap=5.0)
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(*self._channels)
                await self.client.ping()
                self._reach(True)
                backoff.reset()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None:
                        await self.client.ping()  # a quiet feed still notices Redis leaving
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    try:
                        data = orjson.loads(message["data"])
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(data, dict):
                        self.publish(self._channels.get(channel, "other"), data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis unreachable: tell the watchers, try again
                log.debug("event feed: %r", exc)
                self._reach(False)
            finally:
                with contextlib.suppress(Exception):
                    await cast(Any, pubsub).aclose()  # typed from redis-py 8.2 on
            await backoff.sleep()

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        for watcher in list(self.watchers):
            self.publish("closed", {})
            self.watchers.discard(watcher)
