"""The load side of bench/cache.py: pre-serialised requests on raw keep-alive connections,
closed- and open-loop senders, bursts of identical misses, and CPU meters (this process,
the server, Redis)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from common import percentile

MODEL = "echo"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SPIN_S = 0.002
"""The open-loop sender sleeps until this long before a send time, then yields to the loop
(``sleep(0)``, I/O still served) until the time comes: timers alone wake up to ~1 ms late."""


class EngineCalls(Protocol):
    """What a burst needs of the upstream: how many requests it has answered."""

    def requests(self) -> int: ...


# -- the load generator -----------------------------------------------------------------------
def chat_request(port: int, prompt: str, temperature: float) -> bytes:
    """A whole pre-serialised ``POST /v1/chat/completions`` (keep-alive)."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature,
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def health_request(port: int) -> bytes:
    return f"GET /health HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()


class Conn:
    """One keep-alive HTTP/1.1 connection: write request bytes, read one response
    (Content-Length bodies only: all that these endpoints send when not streaming)."""

    def __init__(self, port: int) -> None:
        self.port = port

    @classmethod
    async def open(cls, port: int) -> Conn:
        conn = cls(port)
        await conn.connect()
        return conn

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def receive(self) -> tuple[int, str]:
        """-> (HTTP status, ``x-yichui-cache`` or "")."""
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        i = head.find(b"\r\ncontent-length:")
        if i < 0:
            raise RuntimeError(f"a response without content-length: {head[:200]!r}")
        length = int(head[i + 17 : head.index(b"\r\n", i + 2)])
        await self.reader.readexactly(length)
        j = head.find(b"\r\nx-yichui-cache:")
        cache = head[j + 17 : head.index(b"\r\n", j + 2)].strip().decode() if j >= 0 else ""
        return int(head[9:12]), cache

    async def request(self, raw: bytes) -> tuple[int, str]:
        self.send(raw)
        try:
            return await self.receive()
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
        # the server closed the connection while idle (keep-alive timeout): once more, anew
        self.close()
        await self.connect()
        self.send(raw)
        return await self.receive()

    def close(self) -> None:
        self.writer.close()


async def open_conns(port: int, n: int) -> list[Conn]:
    return list(await asyncio.gather(*(Conn.open(port) for _ in range(n))))


def _tally(seen: Counter[str], status: int, cache: str) -> None:
    seen[(cache or "ok") if status == 200 else f"http {status}"] += 1


# -- CPU accounting ---------------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def redis_cpu(probe: redis.Redis) -> float:
    cpu: dict[str, Any] = probe.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def redis_commands(probe: redis.Redis) -> float:
    """Commands Redis has executed (the probe's own INFO left out)."""
    stats: dict[str, dict[str, Any]] = probe.info("commandstats")
    return float(sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"))


@dataclass
class Meter:
    """CPU of the server(s), Redis and this process, and the commands Redis executed, between
    :meth:`start` and :meth:`stop`."""

    pids: list[int]
    probe: redis.Redis
    t0: tuple[float, ...] = ()

    def _now(self) -> tuple[float, ...]:
        servers = sum(proc_cpu(p) for p in self.pids)
        return servers, redis_cpu(self.probe), self_cpu(), redis_commands(self.probe)

    def start(self) -> None:
        self.t0 = self._now()

    def stop(self, requests: int) -> dict[str, float]:
        """Per request: CPU µs of the server, Redis, the client; Redis commands."""
        t1 = self._now()
        n = max(requests, 1)
        server, red, client, cmds = ((b - a) / n for a, b in zip(self.t0, t1, strict=True))
        return {
            "server_us": server * 1e6,
            "redis_us": red * 1e6,
            "client_us": client * 1e6,
            "redis_cmds": cmds,
        }


# -- the measurements -------------------------------------------------------------------------
async def closed_loop(
    conns: list[Conn], raws: list[bytes], seconds: float, meter: Meter
) -> dict[str, Any]:
    """Connection ``i`` sends ``raws[i % len(raws)]`` again as soon as its answer is in."""
    seen: Counter[str] = Counter()
    end = 0.0

    async def client(conn: Conn, raw: bytes) -> int:
        n = 0
        while time.perf_counter() < end:
            status, cache = await conn.request(raw)
            _tally(seen, status, cache)
            n += 1
        return n

    gc.collect()
    gc.disable()
    meter.start()
    t0 = time.perf_counter()
    end = t0 + seconds
    try:
        clients = (client(c, raws[i % len(raws)]) for i, c in enumerate(conns))
        done = sum(await asyncio.gather(*clients))
    finally:
        elapsed = time.perf_counter() - t0
        gc.enable()
    return {"per_s": done / elapsed, "requests": done, "seen": seen, **meter.stop(done)}


async def open_loop(port: int, raw: bytes, rate: float, seconds: float) -> dict[str, Any]:
    """``rate`` requests/s on a fixed schedule; latency from the scheduled send time."""
    pool = await open_conns(port, 4)
    opened = len(pool)
    latency: list[float] = []
    lag: list[float] = []
    seen: Counter[str] = Counter()

    async def finish(conn: Conn, scheduled: float) -> None:
        status, cache = await conn.receive()
        latency.append(time.perf_counter() - scheduled)
        _tally(seen, status, cache)
        pool.append(conn)

    async def fresh(scheduled: float) -> None:
        conn = await Conn.open(port)
        lag.append(time.perf_counter() - scheduled)
        conn.send(raw)
        await finish(conn, scheduled)

    count = round(rate * seconds)
    tasks: list[asyncio.Task[None]] = []
    gc.collect()
    gc.disable()
    t0 = time.perf_counter() + 0.05
    try:
        for i in range(count):
            scheduled = t0 + i / rate
            pause = scheduled - time.perf_counter() - SPIN_S
            if pause > 0:
                await asyncio.sleep(pause)
            while time.perf_counter() < scheduled:
                await asyncio.sleep(0)
            if pool:
                conn = pool.pop()
                lag.append(time.perf_counter() - scheduled)
                conn.send(raw)
                tasks.append(asyncio.create_task(finish(conn, scheduled)))
            else:  # every connection busy: one more (its connect time counts)
                opened += 1
                tasks.append(asyncio.create_task(fresh(scheduled)))
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
    for conn in pool:
        conn.close()
    ms = [x * 1000 for x in latency]
    lag_ms = [x * 1000 for x in lag]
    return {
        "requests": len(ms),
        "p50_ms": percentile(ms, 0.5),
        "p90_ms": percentile(ms, 0.9),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms),
        "lag_p99_ms": percentile(lag_ms, 0.99),
        "lag_max_ms": max(lag_ms),
        "connections": opened,
        "seen": seen,
    }


async def burst(ports: list[int], n: int, prompt: str, up: EngineCalls) -> dict[str, Any]:
    """``n`` identical misses at once, dealt over ``ports`` -> headers and engine calls."""
    conns = [await Conn.open(ports[i % len(ports)]) for i in range(n)]
    raws = {p: chat_request(p, prompt, 0) for p in ports}
    before = up.requests()
    seen: Counter[str] = Counter()
    by_server: list[Counter[str]] = [Counter() for _ in ports]
    t0 = time.perf_counter()
    for i, conn in enumerate(conns):
        conn.send(raws[ports[i % len(ports)]])
    answers = await asyncio.gather(*(c.receive() for c in conns))
    wall = time.perf_counter() - t0
    for i, (status, cache) in enumerate(answers):
        _tally(seen, status, cache)
        _tally(by_server[i % len(ports)], status, cache)
    for conn in conns:
        conn.close()
    return {
        "engine_calls": up.requests() - before,
        "seen": seen,
        "by_server": [dict(c) for c in by_server],
        "wall_s": wall,
    }


async def one_by_one(port: int, raws: list[bytes]) -> tuple[list[float], Counter[str]]:
    """Each request alone (a fresh connection kept for all) -> latencies in ms, headers."""
    conn = await Conn.open(port)
    out: list[float] = []
    seen: Counter[str] = Counter()
    for raw in raws:
        t0 = time.perf_counter()
        status, cache = await conn.request(raw)
        out.append((time.perf_counter() - t0) * 1000)
        _tally(seen, status, cache)
    conn.close()
    return out, seen
