"""A Sentinel-managed Redis for high-availability tests: a master, a replica and three Sentinels
(quorum 2) on loopback ports, tuned to fail over in about a second and a half::

    ha = SentinelGroup(tmp_path, password="pw", sentinel_password="spw").start()
    ha.url(db=1)          # redis+sentinel://:pw@127.0.0.1:<s1>,…/yc-ha/1?sentinel_password=spw
    switches = ha.listen()            # the test's own +switch-master subscriber
    ha.kill_master()                  # SIGKILL; the Sentinels promote the replica
    switches.wait()                   # time.monotonic() of the first +switch-master seen
    ha.restart_old_master()           # it comes back and the Sentinels make it a replica
    ha.stop()
    SentinelGroup(tmp_path, tls=certs)    # all five TLS only (tests/tls_certs.py): rediss+…

Also a ``stamp`` task type (this module is an ``extensions`` entry): it sleeps ``seconds`` and
records when each run started, in this process (:data:`RUNS`), so a test can tell when workers
claimed again after a failover; and what the failover tests (Sentinel and Cluster) share::

    settings = failover_settings(tmp_path, url)   # the echo engine, stamp, short leases
    async with api_client(settings) as (client, api_rt): await ask(client, "hi")
    with running_worker(rt) as worker: ...     # a worker thread, stopped and joined after
    until(lambda: ..., 60.0)                   # poll a predicate (errors count as False)
    assert_each_ended_once(rt, task_ids)       # succeeded, with exactly one final state
    settle_then_heal(rt, task_ids, heal)       # all ended; heal(); 5 more tasks succeed
    claimed_again(task_ids, since, logs)       # when workers ran a task again; all ran
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import redis
from pydantic import Field

from tests.redis_proc import (
    PasswordRedisProcess,
    RedisProcess,
    SentinelProcess,
    wait_until,
)
from tests.tls_certs import Certs
from yichui.config import Settings, load_settings
from yichui.state.task_store import TERMINAL
from yichui.tasks.context import TaskContext
from yichui.tasks.types import TaskArgs, TaskType

if TYPE_CHECKING:
    from yichui.runtime import Runtime
    from yichui.tasks.worker import Worker

DOWN_AFTER_MS = 1000
"""A master silent this long is subjectively down (Redis' default is 30 s)."""
FAILOVER_TIMEOUT_MS = 3000
"""A failover that stalls is tried again after this (Redis' default is 3 minutes)."""


class SentinelGroup:
    """A master, a replica and three Sentinels (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        master_name: str = "yc-ha",
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: Certs | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        self.servers = [self._server("a"), self._server("b")]
        self.sentinels = [
            SentinelProcess(
                self.workdir / f"sentinel{i}",
                self.servers[0].port,
                master_name=master_name,
                master_password=password,
                password=sentinel_password,
                quorum=2,
                down_after_ms=DOWN_AFTER_MS,
                failover_timeout_ms=FAILOVER_TIMEOUT_MS,
                tls=tls,
            )
            for i in range(3)
        ]
        self.killed: RedisProcess | None = None

    def _server(self, name: str) -> RedisProcess:
        if self.password:
            return PasswordRedisProcess(self.workdir / name, self.password, tls=self.tls)
        return RedisProcess(self.workdir / name, tls=self.tls)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> SentinelGroup:
        master, replica = self.servers
        try:
            master.start()
            replica.start("--replicaof", "127.0.0.1", str(master.port))
            wait_until(lambda: _linked(replica), timeout, "the replica in sync")
            for sentinel in self.sentinels:
                sentinel.start()
            # a failover needs a quorum of Sentinels that know each other and the replica
            wait_until(self._ready, timeout, "three Sentinels that know each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as c:
                info = _fields(c.execute_command("SENTINEL", "MASTER", self.master_name))
                if info["num-other-sentinels"] != "2" or info["num-slaves"] != "1":
                    return False
        return True

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()

    # -- addresses ------------------------------------------------------------------------------
    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}{nodes}/{self.master_name}/{db}{query}"

    def master_port(self) -> int:
        """The master's port as the first Sentinel that answers sees it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    addr = c.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
                    return int(addr[1])
            except redis.RedisError:
                continue
        raise RuntimeError("no Sentinel answers")

    def master(self) -> RedisProcess:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def replica(self) -> RedisProcess:
        port = self.master_port()
        return next(s for s in self.servers if s.port != port)

    # -- faults ---------------------------------------------------------------------------------
    def listen(self) -> SwitchListener:
        return SwitchListener(self).start()

    def kill_master(self) -> RedisProcess:
        """SIGKILL the master (no AOF flush, no goodbye); -> its process, to restart later."""
        master = self.master()
        master.kill()
        self.killed = master
        return master

    def restart_old_master(
        self, *, as_replica: bool = False, timeout: float = 30.0
    ) -> RedisProcess:
        """Start the killed master again (empty: no AOF) and wait until it is a replica of the
        new master, in sync. ``as_replica``: started with ``--replicaof`` the new master (as a
        supervisor with a rewritten config would); else it comes back a master and the
        Sentinels convert it (they wait 8 s of it reporting the wrong role: slow)."""
        old = self.killed
        assert old is not None, "kill_master() first"
        if as_replica:
            old.start("--replicaof", "127.0.0.1", str(self.master_port()))
        else:
            old.start()
        wait_until(lambda: _linked(old), timeout, "the old master turned replica, in sync")
        self.killed = None
        return old


class SwitchListener:
    """The test's own subscriber to ``+switch-master`` on every Sentinel of a group."""

    def __init__(self, group: SentinelGroup) -> None:
        self.group = group
        self.first: float | None = None
        """``time.monotonic()`` of the first ``+switch-master`` any Sentinel published."""
        self.messages: list[tuple[float, str]] = []
        self._seen = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> SwitchListener:
        ready = threading.Barrier(len(self.group.sentinels) + 1)
        for sentinel in self.group.sentinels:
            t = threading.Thread(target=self._follow, args=(sentinel, ready), daemon=True)
            t.start()
            self._threads.append(t)
        ready.wait(timeout=10)
        return self

    def _follow(self, sentinel: SentinelProcess, ready: threading.Barrier) -> None:
        with sentinel.client() as c, c.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe("+switch-master")
            pubsub.get_message(timeout=1.0)  # the subscription's confirmation
            ready.wait(timeout=10)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message is None:
                    continue
                now = time.monotonic()
                self.messages.append((now, _text(message["data"])))
                if self.first is None or now < self.first:
                    self.first = now
                self._seen.set()

    def wait(self, timeout: float = 30.0) -> float:
        if not self._seen.wait(timeout):
            raise RuntimeError("no +switch-master within the timeout")
        assert self.first is not None
        return self.first

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)


def _linked(server: RedisProcess) -> bool:
    with server.client() as c:
        info = c.info("replication")
        return info.get("role") == "slave" and info.get("master_link_status") == "up"


def _fields(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {_text(k): _text(v) for k, v in raw.items()}
    return {_text(k): _text(v) for k, v in zip(raw[::2], raw[1::2], strict=False)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the ``stamp`` task type -----------------------------------------------------------------

RUNS: list[tuple[str, float]] = []
"""(task id, ``time.monotonic()``) of each run's start, in the process that ran it."""


class StampArgs(TaskArgs):
    seconds: float = Field(default=0.1, ge=0, le=10)


def task_types() -> list[TaskType]:
    return [TaskType("stamp", StampArgs, "tests.sentinel_fixtures:stamp", "sleep, noting when")]


def stamp(ctx: TaskContext, args: StampArgs) -> dict[str, Any]:
    RUNS.append((ctx.id, time.monotonic()))
    time.sleep(args.seconds)
    return {"slept": args.seconds}


# -- what the failover tests share -----------------------------------------------------------


@contextlib.contextmanager
def running_worker(rt: Runtime, concurrency: int = 2) -> Iterator[Worker]:
    """A worker of ``rt`` in a thread for the block; stopped (no hand-back) and joined after."""
    worker = rt.worker(concurrency=concurrency)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False})
    thread.start()
    try:
        yield worker
    finally:
        worker.stop(hand_back=False)
        thread.join(timeout=15)


def until(predicate: Callable[[], bool], timeout: float) -> None:
    """Poll ``predicate`` every 50 ms (an exception counts as not yet) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s")


def assert_each_ended_once(rt: Runtime, tasks: list[str]) -> None:
    """Each task succeeded, with exactly one final state in its log: it ran once or (an
    acknowledgement lost with the master) more, and ended once."""
    for t in tasks:
        assert rt.tasks.get(t)["state"] == "succeeded", t
        ends = [
            e
            for e in rt.task_store.log_entries(t)
            if e.kind == "state" and e.data.get("state") in TERMINAL
        ]
        assert len(ends) == 1, (t, ends)


def claimed_again(tasks: list[str], since: float, logs: list[logging.LogRecord]) -> float:
    """``time.monotonic()`` of the first run that started after ``since`` (a failover seen),
    once every one of ``tasks`` ran and no ``READONLY`` reply was logged (a client that kept
    writing to a demoted master). Clears :data:`RUNS` for the next test."""
    assert set(tasks) <= {tid for tid, _ in RUNS}
    assert not [r.getMessage() for r in logs if "READONLY" in r.getMessage()]
    after = [t for _, t in RUNS if t > since]
    RUNS.clear()
    return min(after) if after else float("inf")


def settle_then_heal(rt: Runtime, tasks: list[str], heal: Callable[[], object]) -> list[str]:
    """Wait until every one of ``tasks`` has ended, ``heal()`` (the old master back as a
    replica), then 5 more ``stamp`` tasks must succeed on the healed set-up: -> their ids."""
    until(lambda: all(rt.tasks.get(t)["state"] in TERMINAL for t in tasks), 60.0)
    heal()
    after = [rt.tasks.submit("stamp", {"seconds": 0.0})["id"] for _ in range(5)]
    until(lambda: all(rt.tasks.get(t)["state"] == "succeeded" for t in after), 20.0)
    return after


EXTENSIONS = ["tests.extensions.echo_engine", "tests.sentinel_fixtures"]
"""The echo engine (deterministic answers, cached) and the ``stamp`` task type."""


def failover_settings(tmp_path: Path, url: str, **extra: Any) -> Settings:
    """Settings for a failover test on ``url``: every cache hit read from Redis (no near
    cache: what is measured is Redis coming back), short leases and backoffs."""
    return load_settings(
        data_dir=tmp_path / "data",
        models_root=tmp_path / "models",
        redis_url=url,
        extensions=EXTENSIONS,
        cache_near_ttl=0,
        task_lease=3.0,
        task_heartbeat=0.5,
        task_backoff=0.1,
        **extra,
    )


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    """The API app on ``settings`` in this process, its lifespan around a client of it:
    -> (the client, the API's runtime)."""
    from yichui.api.app import create_app  # not at import: yichui loads this module itself
    from yichui.runtime import Runtime

    rt = Runtime(settings, role="api")
    app = create_app(settings, runtime=rt)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test"
            ) as client,
        ):
            yield client, rt
    finally:
        rt.close()


async def ask(client: httpx.AsyncClient, prompt: str) -> tuple[int, str]:
    """A deterministic chat request to the echo engine: -> (status, ``x-yichui-cache``)."""
    body = {"model": "echo/shout", "messages": [{"role": "user", "content": prompt}],
            "temperature": 0}  # fmt: skip
    r = await client.post("/v1/chat/completions", json=body)
    return r.status_code, r.headers.get("x-yichui-cache", "")
