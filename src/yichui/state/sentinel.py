"""Redis Sentinel: the master's name checked at start, and its failovers followed as they happen.

::

    check_master(target, settings)         # RedisSetupError (exit 2): no Sentinel knows the name
    watch = SentinelWatch(target, settings, on_switch=lambda host, port: ...)
    watch.start()                          # a thread per Sentinel: SUBSCRIBE +switch-master
    watch.stop()
    AsyncSentinelWatch(target, settings, on_switch=...)   # the same as asyncio tasks

A client reconnects to a promoted replica by itself (redis-py asks the Sentinels again when a
connection fails), but whoever waits between retries (a worker's backoff, the response cache's
breaker) would only notice at its next try. ``+switch-master``, which every Sentinel publishes
the moment it adopts the new master, lets them try again at once; their timers stay the
fallback when no Sentinel can be heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from yichui.backoff import Backoff
from yichui.errors import RedisSetupError
from yichui.state.tls import tls_kwargs, tls_refusal

if TYPE_CHECKING:
    from yichui.config import Settings

log = logging.getLogger("yichui.state")

SWITCH_CHANNEL = "+switch-master"
"""What a Sentinel publishes on a failover: ``<name> <old-ip> <old-port> <new-ip> <new-port>``."""

OnSwitch = Callable[[str, int], Any]


class RedisTarget(Protocol):
    """What this module reads of a parsed Sentinel URL (:class:`~.connection.RedisTarget`;
    not imported: the connection module imports this one)."""

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]: ...
    @property
    def master(self) -> str | None: ...
    @property
    def tls(self) -> bool: ...
    @property
    def options(self) -> dict[str, str]: ...
    @property
    def display(self) -> str: ...


def _sentinel_kwargs(target: RedisTarget, settings: Settings) -> dict[str, Any]:
    return {
        "password": target.options.get("sentinel_password"),
        "ssl": target.tls,
        # the CA and client certificate too: a rediss+sentinel:// target's Sentinels speak
        # TLS as its master does (ssl=True alone failed the handshake or the certificate check)
        **(tls_kwargs(settings) if target.tls else {}),
        "socket_connect_timeout": settings.redis_connect_timeout,
        "socket_timeout": settings.redis_socket_timeout,
        "client_name": "yichui-sentinel-watch",
    }


def check_master(target: RedisTarget, settings: Settings) -> None:
    """Raise :class:`RedisSetupError` (exit 2) when the Sentinels answer but none monitors
    ``target.master``, or a Sentinel refuses our password or TLS; nothing when one monitors
    it, or when none could be asked (an outage, not a setting)."""
    known: set[str] = set()
    asked = 0
    for host, port in target.nodes:
        try:
            once = Retry(NoBackoff(), 0)  # one try each: a refused port is an answer at once
            kwargs = {**_sentinel_kwargs(target, settings), "retry": once}
            with redis.Redis(host=host, port=port, **kwargs) as c:
                masters = c.execute_command("SENTINEL", "MASTERS")
        except redis.RedisError as exc:
            refused = auth_refusal(exc)
            if refused is not None:  # the Sentinel answered and refused us: a setting
                raise RedisSetupError(
                    f"{target.display} (the Sentinel at {host}:{port})",
                    _SENTINEL_REFUSED[refused],
                    hint="set the Sentinels' own password (their requirepass) as "
                    "?sentinel_password= in redis_url; the master's goes in the userinfo",
                ) from exc
            mismatch = tls_refusal(exc, tls=target.tls)
            if mismatch is not None:  # said here: the client's discovery would bury it
                raise RedisSetupError(
                    f"{target.display} (the Sentinel at {host}:{port})",
                    mismatch[0],
                    hint=mismatch[1],
                ) from exc
            continue
        asked += 1
        for entry in masters or []:
            fields = _pairs(entry)
            known.add(fields.get("name", ""))
    if not asked or target.master in known:
        return
    monitored = ", ".join(sorted(n for n in known if n)) or "none"
    raise RedisSetupError(
        target.display,
        f"no Sentinel monitors a master named {target.master!r} (they monitor: {monitored})",
        hint="fix the /<master-name> of redis_url (or cache_redis_url) to one the Sentinels "
        "monitor (SENTINEL MASTERS lists them)",
    )


def auth_refusal(exc: BaseException) -> str | None:
    """How a server refused our credentials: ``"missing"`` (it wants a password we did not
    send: ``NOAUTH``, or, as redis-py opens with ``HELLO``, "HELLO must be called with the
    client already authenticated", which redis-py raises as a wrong password), ``"wrong"``
    (a wrong password, an unknown or disabled ACL user), or None for any other failure."""
    text = str(exc).upper()
    markers = ("NOAUTH", "AUTHENTICATION REQUIRED", "CLIENT ALREADY AUTHENTICATED")
    if any(marker in text for marker in markers):
        return "missing"
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in text:
        return "wrong"
    return None


_SENTINEL_REFUSED = {
    "missing": "the Sentinel requires a password and no sentinel_password was given",
    "wrong": "the Sentinel refused the password: wrong sentinel_password",
}


def _pairs(entry: Any) -> dict[str, str]:
    """A SENTINEL MASTERS entry (a flat list, or a dict under RESP3) as text fields."""
    if isinstance(entry, dict):
        items = list(entry.items())
    else:
        items = list(zip(entry[::2], entry[1::2], strict=False))
    return {_text(k): _text(v) for k, v in items}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_switch(target: RedisTarget, data: Any) -> tuple[str, int] | None:
    """The new master's (host, port) from a ``+switch-master`` message about our master."""
    parts = _text(data).split()
    if len(parts) != 5 or parts[0] != target.master or not parts[4].isdigit():
        return None
    return parts[3], int(parts[4])


class SentinelWatch:
    """Follows ``+switch-master`` on every Sentinel of ``target`` in daemon threads and calls
    ``on_switch(host, port)`` for each (once per Sentinel that publishes it: make it
    idempotent). A Sentinel that is down is asked again with backoff."""

    def __init__(self, target: RedisTarget, settings: Settings, *, on_switch: OnSwitch) -> None:
        self.target = target
        self.settings = settings
        self.on_switch = on_switch
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[Any] = []

    def start(self) -> SentinelWatch:
        for host, port in self.target.nodes:
            thread = threading.Thread(
                target=self._follow, args=(host, port), name=f"sentinel-{port}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.redis_socket_timeout + 1.0)
        self._threads = []

    def _follow(self, host: str, port: int) -> None:
        backoff = Backoff(first=0.2, cap=5.0)
        kwargs = _sentinel_kwargs(self.target, self.settings)
        while not self._stop.is_set():
            try:
                with redis.Redis(host=host, port=port, **kwargs) as client:
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(SWITCH_CHANNEL)
                    backoff.reset()
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message is not None:
                            self._dispatch(message.get("data"))
                    pubsub.close()
                    return
            except Exception as exc:  # a Sentinel down, or a callback that failed
                log.debug("sentinel %s:%d watch: %r", host, port, exc)
            self._stop.wait(backoff.next())

    def _dispatch(self, data: Any) -> None:
        new = parse_switch(self.target, data)
        if new is not None:
            log.info("Redis master %r is now %s:%d (+switch-master)", self.target.master, *new)
            self.on_switch(*new)


class AsyncSentinelWatch:
    """:class:`SentinelWatch` as asyncio tasks; ``on_switch`` may be a coroutine function."""

    def __init__(
        self,
        target: RedisTarget,
        settings: Settings,
        *,
        on_switch: Callable[[str, int], Awaitable[None] | None],
    ) -> None:
        self.target = target
        self.settings = settings
        self.on_switch = on_switch
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> AsyncSentinelWatch:
        self._tasks = [
            asyncio.create_task(self._follow(host, port), name=f"sentinel-{port}")
            for host, port in self.target.nodes
        ]
        return self

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _follow(self, host: str, port: int) -> None:
        backoff = Backoff(first=0.2, cap=5.0)
        kwargs = _sentinel_kwargs(self.target, self.settings)
        while True:
            try:
                client = aredis.Redis(host=host, port=port, **kwargs)
                try:
                    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                        await pubsub.subscribe(SWITCH_CHANNEL)
                        backoff.reset()
                        while True:
                            message = await pubsub.get_message(timeout=1.0)
                            if message is not None:
                                await self._dispatch(message.get("data"))
                finally:
                    await client.aclose()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a Sentinel down, or a callback that failed
                log.debug("sentinel %s:%d watch: %r", host, port, exc)
            await backoff.sleep()

    async def _dispatch(self, data: Any) -> None:
        new = parse_switch(self.target, data)
        if new is None:
            return
        log.info("Redis master %r is now %s:%d (+switch-master)", self.target.master, *new)
        result = self.on_switch(*new)
        if result is not None:
            await result
