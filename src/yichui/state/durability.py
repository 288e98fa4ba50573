"""What a write waits for once Redis has it in memory (``task_durability``)::

    durability = Durability("replicated", replicas=1, timeout=1.0)
    reply = durability.write(client, key, lambda pipe: script(keys=…, args=…, client=pipe),
                             what="task t1 queued")

``replicated`` sends ``WAIT`` after the write, ``fsync`` sends ``WAITAOF`` (Redis >= 7.2, read
from ``INFO`` once, refused with one line on older servers). Both count what one connection
wrote, so the write and the wait go in one pipeline on one connection: on a cluster, the
connection to the master of ``key``'s slot (:func:`~yichui.state.cluster.on_slot_owner`).
Short of the replicas within the timeout: :class:`NotDurableError` (the write stays).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from redis.cluster import RedisCluster

from yichui.errors import NotDurableError, RedisSetupError
from yichui.state.cluster import on_slot_owner


class Durability:
    """``mode``: ``none``, ``replicated`` or ``fsync``; ``replicas`` that must have the write
    within ``timeout`` seconds."""

    def __init__(self, mode: str = "none", *, replicas: int = 1, timeout: float = 1.0) -> None:
        self.mode = mode
        self.replicas = replicas
        self.timeout = timeout
        self._waitaof: bool | None = None  # whether the server has WAITAOF (Redis >= 7.2)

    def write(self, client: Any, key: str, queue: Callable[[Any], object], *, what: str) -> Any:
        """Run the one command ``queue(pipe)`` adds, then the wait, on one connection: -> the
        command's reply. ``what`` names the write in a :class:`NotDurableError`."""
        fsync = self.mode == "fsync"
        if fsync and not self._has_waitaof(client):
            raise RedisSetupError(
                "the state instance",
                f'task_durability = "fsync" needs WAITAOF (Redis >= 7.2); '
                f"this server is Redis {_version(client)}",
                hint='set task_durability = "replicated" (WAIT: in the replicas\' memory), '
                "or upgrade Redis to 7.2 or later",
            )
        timeout_ms = max(1, int(self.timeout * 1000))
        wait: tuple[Any, ...] = ("WAIT", self.replicas, timeout_ms)
        if fsync:
            wait = ("WAITAOF", 1, self.replicas, timeout_ms)

        def commands(pipe: Any) -> None:
            queue(pipe)
            pipe.execute_command(*wait)

        if isinstance(client, RedisCluster):  # the slot's master, one connection
            res, acked = on_slot_owner(client, key, commands)
        else:
            pipe = client.pipeline(transaction=False)
            commands(pipe)
            res, acked = pipe.execute()
        if fsync:
            local, remote = int(acked[0]), int(acked[1])
            if local < 1 or remote < self.replicas:
                raise NotDurableError(
                    what,
                    f"the AOF fsynced here and on {self.replicas} replica(s)",
                    f"{'here' if local else 'not here'} and on {remote}",
                )
        elif int(acked) < self.replicas:
            raise NotDurableError(what, f"{self.replicas} replica(s)", f"{int(acked)}")
        return res

    def _has_waitaof(self, client: Any) -> bool:
        if self._waitaof is None:
            parts = [int(p) for p in re.findall(r"\d+", _version(client))[:2]] or [0]
            self._waitaof = tuple(parts) >= (7, 2)
        return self._waitaof


def _version(client: Any) -> str:
    return str(client.info("server").get("redis_version", "unknown"))
