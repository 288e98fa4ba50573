"""The fleet heartbeat of an API process: what it has loaded, written to Redis for ``yichui ps``.

::

    heartbeat = FleetHeartbeat(settings, keys, state_client, router, cache)
    heartbeat.start()          # a record every server_heartbeat seconds
    ...
    await heartbeat.close()    # stops, and deletes this server's entry

Started by :meth:`ServingServices.start` and stopped by its ``close()``. Redis down is no
failure: the beat is logged at debug level and tried again at the next one; readers drop an
entry that missed three (:mod:`yichui.state.fleet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from yichui import __version__
from yichui.config import Settings
from yichui.inference.cache import ResponseCache
from yichui.inference.router import ModelRouter
from yichui.metrics import RESULTS
from yichui.state import fleet
from yichui.state.connection import AsyncRedis
from yichui.state.keys import Keys

log = logging.getLogger("yichui.api")

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def server_url(host: str, port: int) -> str:
    """Where others reach this server: a wildcard address (all interfaces) is named by the
    host's name instead."""
    if host in _WILDCARDS:
        host = socket.gethostname()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"http://{host}:{port}"


class FleetHeartbeat:
    """Writes this process's record (:meth:`record`) every ``settings.server_heartbeat``
    seconds into the state instance's ``servers`` hash."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        client: AsyncRedis,
        router: ModelRouter,
        cache: ResponseCache,
        *,
        engines: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.settings, self.keys, self.client = settings, keys, client
        self.router, self.cache = router, cache
        self.engines = engines
        """The engine processes this server launched (``runtime/supervisor.py``)."""
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.port = settings.api_port
        self.id = f"{self.host}:{self.pid}:{self.port}"
        """Unique per process: two servers of one host differ by pid and port."""
        self.url = server_url(settings.api_host, self.port)
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def record(self) -> dict[str, Any]:
        """This process now (``heartbeat`` and ``started`` are added by the write, on the
        Redis clock): cheap, no I/O."""
        snap = self.router.loaded()
        counts = self.cache.counts
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "port": self.port,
            "url": self.url,
            "version": __version__,
            "requests": sum(counts[r] for r in RESULTS),
            "budget": snap.budget if snap else None,
            "used": snap.used if snap else 0,
            "models": list(snap.models) if snap else [],
            "engines": self.engines() if self.engines else [],
        }

    async def beat(self) -> bool:
        """One heartbeat -> whether Redis took it (a failure is logged at debug level)."""
        try:
            uptime = time.monotonic() - self._started
            write = fleet.beat(self.client, self.keys, self.id, self.record(), uptime=uptime)
            await asyncio.wait_for(write, self._timeout)
        except Exception as exc:  # Redis down or slow: the next beat tries again
            log.debug("fleet heartbeat: %r", exc)
            return False
        return True

    @property
    def _timeout(self) -> float:
        return max(self.settings.server_heartbeat, 0.5)

    async def run(self) -> None:
        """Beat until cancelled."""
        interval = self.settings.server_heartbeat
        while True:
            started = time.monotonic()
            await self.beat()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="fleet-heartbeat")

    async def close(self) -> None:
        """Stop beating and delete this server's entry (Redis down: readers drop it soon)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(fleet.forget(self.client, self.keys, self.id), self._timeout)
        except Exception as exc:
            log.debug("fleet: entry not removed: %r", exc)
