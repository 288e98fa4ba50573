"""Pub/sub channels as async iterators of JSON events (the state layer's only subscriber)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from yichui.state.codec import loads
from yichui.state.keys import Keys


async def subscribe(client: Any, channel: str) -> AsyncIterator[dict[str, Any]]:
    """Every JSON event published on ``channel`` from now on; ends on a Redis error (callers
    reconnect with backoff: pub/sub does not buffer what was sent meanwhile)."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message.get("type") == "message":
                event = loads(message["data"])
                if isinstance(event, dict):
                    yield event
    finally:
        await pubsub.aclose()


def model_events(client: Any, keys: Keys) -> AsyncIterator[dict[str, Any]]:
    """Pulls, imports, merges and removals of models, as the registry publishes them on the
    state instance (``{"name": …, "event": …}``); ends on a Redis error."""
    return subscribe(client, keys.model_events())
