"""The open-loop sender: every request leaves at its scheduled time, whatever the answers do,
so a slow server shows as queueing (no coordinated omission). Latency and time to first token
run from the *scheduled* time. A request that takes longer than ``timeout`` is a time-out: it
counts as an error and enters the latency figures at the time-out value. The run always ends by
itself: the last scheduled request plus at most ``timeout``.

The client is kept cheap, since it shares the cores with the servers it loads: a minimal
HTTP/1.1 client on asyncio streams (uvloop when installed) over keep-alive connections, one
more opened whenever all are busy (its connect time counts), Content-Length and chunked
bodies, bodies serialised before the clock starts, the garbage collector off while it runs.
(httpx spends milliseconds of CPU per request, and its pool's bookkeeping grows with the
requests waiting: it became the bottleneck.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

FIRST_TEXT = re.compile(rb'"(?:content|text)":"[^"]')
"""A stream event carrying text (the role event and empty deltas carry none)."""


@dataclass(frozen=True)
class Outgoing:
    """One request ready to go."""

    at: float
    """Seconds after the start."""
    body: bytes
    key: str
    """API key (``Authorization: Bearer``)."""
    stream: bool


@dataclass
class Outcome:
    """What became of one request."""

    at: float
    stream: bool = False
    status: int = 0
    """HTTP status; 0 when no answer came (a time-out or a connection error)."""
    cache: str = ""
    """``x-yichui-cache``: hit, miss, coalesced, bypass (or "")."""
    latency: float = 0.0
    """Seconds from the scheduled time to the answer's end (the time-out value on a time-out)."""
    ttft: float = 0.0
    """Seconds from the scheduled time to the first text (streams), else ``latency``."""
    done: float = 0.0
    """Seconds after the start at which it ended."""
    error: str = ""
    """"" when fine; ``timeout``, ``http <status>``, ``truncated`` or an exception's name."""


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int, ssl: bool) -> Conn:
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl or None, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    def close(self) -> None:
        self.reusable = False
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass
class Response:
    status: int
    cache: str
    first: float
    """perf_counter of the first text of a stream (0: none seen)."""
    complete: bool
    """A stream that ended with ``[DONE]`` (whole bodies: always)."""


def _header(head: bytes, name: bytes) -> bytes | None:
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    return head[start : head.index(b"\r\n", start)].strip()


async def _read(conn: Conn, stream: bool) -> Response:
    reader = conn.reader
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head[9:12])
    cache = (_header(head, b"x-yichui-cache") or b"").decode()
    if _header(head, b"connection") == b"close":
        conn.reusable = False
    first, tail = 0.0, b""
    if _header(head, b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            data = (await reader.readexactly(size + 2))[:-2]
            if stream and not first and FIRST_TEXT.search(tail + data):
                first = time.perf_counter()
            tail = (tail + data)[-64:]
    else:
        length = _header(head, b"content-length")
        if length is not None:
            data = await reader.readexactly(int(length))
        else:
            data = await reader.read()
            conn.reusable = False
        tail = data[-64:]
        if stream and FIRST_TEXT.search(data):
            first = time.perf_counter()
    complete = not stream or status != 200 or b"[DONE]" in tail
    return Response(status, cache, first, complete)


class Pool:
    """Idle connections to one server; a new one whenever none is idle."""

    def __init__(self, url: str, path: str) -> None:
        parts = urlsplit(url)
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.ssl else 80)
        self.netloc = parts.netloc
        self.path = (parts.path.rstrip("/") + path).encode()
        self.idle: list[Conn] = []
        self.opened = 0

    def raw(self, out: Outgoing) -> bytes:
        head = (
            b"POST "
            + self.path
            + b" HTTP/1.1\r\nhost: "
            + self.netloc.encode()
            + b"\r\ncontent-type: application/json\r\nauthorization: Bearer "
            + out.key.encode()
            + b"\r\ncontent-length: "
            + str(len(out.body)).encode()
            + b"\r\n\r\n"
        )
        return head + out.body

    async def request(self, out: Outgoing) -> Response:
        raw = self.raw(out)
        reused = bool(self.idle)
        conn = self.idle.pop() if reused else await self._open()
        try:
            conn.writer.write(raw)
            try:
                response = await _read(conn, out.stream)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                partial = getattr(exc, "partial", b"")
                if not reused or partial:
                    raise
                # the server closed it while idle (keep-alive timeout): once more, anew
                conn.close()
                conn = await self._open()
                conn.writer.write(raw)
                response = await _read(conn, out.stream)
        except BaseException:
            conn.close()
            raise
        if conn.reusable:
            self.idle.append(conn)
        else:
            conn.close()
        return response

    async def _open(self) -> Conn:
        self.opened += 1
        return await Conn.open(self.host, self.port, self.ssl)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _one(pool: Pool, out: Outgoing, start: float, timeout: float) -> Outcome:
    scheduled = start + out.at
    result = Outcome(at=out.at, stream=out.stream)
    try:
        async with asyncio.timeout(max(0.0, scheduled + timeout - time.perf_counter())):
            response = await pool.request(out)
        now = time.perf_counter()
        result.latency = now - scheduled
        result.ttft = (response.first or now) - scheduled if out.stream else result.latency
        result.status, result.cache = response.status, response.cache
        if response.status != 200:
            result.error = f"http {response.status}"
        elif not response.complete:
            result.error = "truncated"
    except TimeoutError:
        result.latency = result.ttft = timeout
        result.error = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.LimitOverrunError) as exc:
        result.latency = result.ttft = time.perf_counter() - scheduled
        result.error = type(exc).__name__
    result.done = time.perf_counter() - start
    return result


async def send_all(
    base_urls: Sequence[str],
    requests: Sequence[Outgoing],
    *,
    timeout: float,
    path: str = "/v1/chat/completions",
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Outcome]:
    """Send ``requests`` on their schedule, dealt in turn over ``base_urls`` (one per
    server); one :class:`Outcome` each, in order. ``on_progress(sent, done)`` is called
    about four times a second."""
    pools = [Pool(url, path) for url in base_urls]
    tasks: list[asyncio.Task[Outcome]] = []
    done = 0

    def count(_: object) -> None:
        nonlocal done
        done += 1

    async def ticker() -> None:
        while True:
            if on_progress is not None:
                on_progress(len(tasks), done)
            await asyncio.sleep(0.25)

    tick = asyncio.create_task(ticker())
    gc.collect()
    gc.disable()
    start = time.perf_counter() + 0.1
    try:
        for i, out in enumerate(requests):
            # timers wake up to a millisecond late: that lateness counts in the latency
            pause = start + out.at - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            task = asyncio.create_task(_one(pools[i % len(pools)], out, start, timeout))
            task.add_done_callback(count)
            tasks.append(task)
        results = await asyncio.gather(*tasks)
    finally:
        gc.enable()
        tick.cancel()
        for task in tasks:
            task.cancel()
        for pool in pools:
            pool.close()
    if on_progress is not None:
        on_progress(len(tasks), done)
    return list(results)


def run_loop(coro_factory: Callable[[], object]) -> object:
    """Run a coroutine on uvloop when it is installed, else asyncio's loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    with contextlib.suppress(ImportError):  # uvicorn[standard] brings it
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro_factory())  # type: ignore[arg-type]
