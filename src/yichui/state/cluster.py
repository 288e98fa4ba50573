"""Redis Cluster, what redis-py leaves to us: riding out a slot migration, and telling when
a failover is over.

- :class:`ReshardingCluster`, the blocking client: a command that keeps getting ``TRYAGAIN``
  (a multi-key script on a slot whose keys are split between two nodes mid-migration) is
  tried again with backoff for up to :data:`RESHARD_WAIT` seconds, not the 16 quick tries
  (about 0.4 s) redis-py gives it; the tasks' slot holds every task's keys, so moving it takes
  a while.
- :func:`masters_answer`, for the response cache's circuit breaker: while it is open, the API
  asks the cluster whether every master answers again, so hits come back as soon as a replica
  is promoted (a Sentinel announces that with ``+switch-master``; a cluster does not)::

    if await masters_answer(client, timeout=1.0):
        breaker.reset("every Redis Cluster master answers")

- :class:`ClusterWatch`, the same for a worker: while it cannot reach Redis, a thread asks
  every quarter second, and ends the worker's backoff wait once every master answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    RedisClusterException,
    TryAgainError,
)

from yichui.backoff import Backoff

log = logging.getLogger("yichui.state")
T = TypeVar("T")

RESHARD_WAIT = 10.0
"""Seconds a command may keep meeting ``TRYAGAIN`` (its slot being moved) before it fails."""


def _while_moving(
    attempt: Callable[[], T],
    errors: tuple[type[Exception], ...],
    what: str,
    between: Callable[[], object] = lambda: None,
) -> T:
    """``attempt()``, tried again with backoff (``between()`` before each new try) while it
    fails with ``errors`` (its slot being moved), for up to :data:`RESHARD_WAIT` seconds from
    the first failure; then the last error. The first try costs nothing extra."""
    try:
        return attempt()
    except errors:
        deadline = time.monotonic() + RESHARD_WAIT
    backoff = Backoff(first=0.02, cap=0.5)
    while True:
        pause = backoff.next()
        log.debug("%s: slot being moved, trying again in %.2fs", what, pause)
        time.sleep(pause)
        between()
        try:
            return attempt()
        except errors:
            if time.monotonic() + pause > deadline:
                raise


class ReshardingCluster(RedisCluster):
    """A :class:`redis.cluster.RedisCluster` whose commands outlast a slot migration."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # "TTL exhausted" (ClusterError): redirected or TRYAGAIN on every one of redis-py's tries
        return _while_moving(
            lambda: super(ReshardingCluster, self).execute_command(*args, **kwargs),  # type: ignore[no-untyped-call]
            (ClusterError,),
            str(args[0]),
        )


def on_slot_owner(client: RedisCluster, key: str, queue: Callable[[Any], object]) -> list[Any]:
    """Run the commands ``queue(pipe)`` adds to a pipeline of the master that serves ``key``'s
    slot, on one connection (what ``WAIT`` needs: it counts what that connection wrote):
    -> their replies. A slot that moved meanwhile (MOVED, ASK, TRYAGAIN) gets its owner found
    again, for up to :data:`RESHARD_WAIT` seconds; the commands must bear running again (their
    first run was refused, or went to a node that no longer has the slot)."""

    def attempt() -> list[Any]:
        node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
        pipe = client.get_redis_connection(node).pipeline(transaction=False)
        queue(pipe)
        return list(pipe.execute())

    return _while_moving(
        attempt, (MovedError, AskError, TryAgainError), key, client.nodes_manager.initialize
    )


async def warm(client: AsyncRedisCluster, timeout: float) -> bool:
    """Learn the slots before the first request needs them (a cluster client does it on its
    first command, which the cache's short timeout would cut off): -> whether it could."""
    with contextlib.suppress(TimeoutError, redis.RedisError, RedisClusterException, OSError):
        await asyncio.wait_for(client.initialize(), timeout)
        return True
    return False


async def masters_answer(client: AsyncRedisCluster, timeout: float) -> bool:
    """Whether the masters serving every slot, as a live node describes the cluster now,
    all answer ``PING``. The client's own view of the slots is refreshed on the way, so the
    requests that follow go to the promoted replicas."""
    try:
        async with asyncio.timeout(timeout):
            await client.nodes_manager.initialize()  # CLUSTER SLOTS from a node that answers
            answers = await client.ping(target_nodes=AsyncRedisCluster.PRIMARIES)
    except (TimeoutError, redis.RedisError, RedisClusterException, OSError):
        return False
    return bool(answers)


class ClusterWatch:
    """While ``wanted()`` (the worker finds Redis down), check every ``every`` seconds whether
    every master of the cluster answers (its slots refreshed on the way), and call
    ``on_back()`` when they do: the worker tries again at once, not a backoff later."""

    def __init__(
        self,
        client: RedisCluster,
        *,
        wanted: Callable[[], bool],
        on_back: Callable[[], None],
        every: float = 0.25,
    ) -> None:
        self.client = client
        self.wanted = wanted
        self.on_back = on_back
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ClusterWatch:
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if not self.wanted():
                continue
            try:
                self.client.nodes_manager.initialize()  # CLUSTER SLOTS from a node that answers
                self.client.ping(target_nodes=RedisCluster.PRIMARIES)
            except (redis.RedisError, RedisClusterException, OSError):
                continue  # a master still missing
            self.on_back()
