"""Live stream fan-out across two real ``yichui serve`` processes on one real Redis: a streamed
answer's pieces reach every coalesced streaming request as they are produced, in any process,
from the first piece; the computation outlives its own client; a failure reaches every reader
once; nothing is stored unless the stream completed. The upstream is the test double of an
OpenAI-compatible server (``tests/fake_upstream.py``), streaming one word per piece."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
import redis

from tests.api_server import ServerProcess
from tests.fake_upstream import FakeUpstream, answer_texts, fake_upstream
from tests.redis_proc import ClusterProcesses, RedisProcess, redis_for

KEY = "key-fanout"
PROMPT = " ".join(f"w{i}" for i in range(40))  # the fake answers its words reversed
MESSAGES = [{"role": "user", "content": PROMPT}]
EXPECTED = answer_texts({"messages": MESSAGES, "max_tokens": 64}, chat=True)[0][0]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with fake_upstream() as fake:
        yield fake


def two_servers(
    redis_url: str,
    upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    **settings: str,
) -> Iterator[list[ServerProcess]]:
    """Two ``yichui serve`` processes on ``redis_url`` before the fake upstream (a fixture's
    body: they stop when it ends)."""
    made = []
    try:
        for _ in range(2):
            made.append(
                ServerProcess(
                    tmp_path_factory.mktemp("serve"),
                    redis_url=redis_url,
                    upstreams={"echo": {"url": upstream.url, "model": "echo-up"}},
                    auth="keys",
                    api_keys={hashlib.sha256(KEY.encode()).hexdigest(): "team-a"},
                    cache_timeout=1.0,
                    **settings,
                ).start()
            )
        yield made
    finally:
        for server in made:
            server.stop()


@pytest.fixture(scope="module")
def servers(
    redis_server: RedisProcess | ClusterProcesses,
    upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ServerProcess]]:
    yield from two_servers(redis_server.url, upstream, tmp_path_factory)


@pytest.fixture
def fresh(
    redis_url: str, upstream: FakeUpstream, servers: list[ServerProcess]
) -> Iterator[FakeUpstream]:
    with redis_for(redis_url) as client:  # what `yichui cache clear` publishes: every
        client.publish("response_events", b'{"clear": ""}')  # server drops its near cache
    time.sleep(0.1)
    upstream.reset()
    yield upstream
    for hold in upstream.holds.values():  # a failed test leaves no stream paused, and no
        hold.set()  # computation in flight for the next one to join
    with redis_for(redis_url) as client:
        end = time.monotonic() + 30
        while any(client.scan_iter(match="*response_lock*")) and time.monotonic() < end:
            time.sleep(0.05)


def stored_entries(redis_url: str) -> int:
    with redis_for(redis_url) as client:
        return sum(1 for _ in client.scan_iter(match="response:*"))


@dataclass
class Streamed:
    """What one streaming client received."""

    status: int = 0
    cache: str = ""
    pieces: list[str] = field(default_factory=list)
    errors: list[dict[str, object]] = field(default_factory=list)
    done: int = 0
    stored_at_first: int | None = None
    """Entries stored in Redis when this client's first piece came (0: it came live)."""

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def stream(
    server: ServerProcess,
    got: Streamed,
    *,
    leave: Callable[[], bool] | None = None,
    on_piece: Callable[[Streamed], None] | None = None,
) -> None:
    """POST a streamed chat request and read its server-sent events into ``got`` (leaving
    as soon as ``leave()`` says so after a piece: the client goes away mid-stream)."""
    body = {
        "model": "echo",
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 64,
        "stream": True,
    }
    headers = {"authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        got.status, got.cache = r.status_code, r.headers.get("x-yichui-cache", "")
        if r.status_code != 200:  # failed before its stream began: an OpenAI error body
            got.errors.append(json.loads(r.read())["error"])
            return
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got.done += 1
                continue
            event = json.loads(line[6:])
            if "error" in event:
                got.errors.append(event["error"])
                continue
            for choice in event["choices"]:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    got.pieces.append(text)
                    if on_piece is not None:
                        on_piece(got)
            if leave is not None and got.pieces and leave():
                return  # closes the connection unread: the client is gone


def started(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_for(check: Callable[[], bool], timeout: float = 20.0, *state: object) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, ("timed out", *state)
        time.sleep(0.005)


def test_followers_in_two_processes_read_live_and_outlive_the_leader(
    servers: list[ServerProcess], fresh: FakeUpstream, redis_url: str
) -> None:
    a, b = servers
    # the stream pauses after 5 and after 10 of its 40 pieces until the test lets it go on:
    # followers join, the leader's client leaves and a late follower arrives, all while the
    # answer is still being generated, however slow the machine
    first, second = threading.Event(), threading.Event()
    fresh.chunk_delay, fresh.holds = 0.02, {5: first, 10: second}

    def note_first(got: Streamed) -> None:
        if got.stored_at_first is None:
            got.stored_at_first = stored_entries(redis_url)

    leader = Streamed()
    followers = [Streamed() for _ in range(3)]  # one in the leader's process, two in the other
    # the leader's client goes away once every follower has had a piece
    leading = started(lambda: stream(a, leader, leave=lambda: all(f.pieces for f in followers)))
    wait_for(lambda: len(leader.pieces) >= 5)
    threads = []
    for got, server in zip(followers, (a, b, b), strict=True):  # one after the other
        threads.append(
            started(lambda got=got, server=server: stream(server, got, on_piece=note_first))
        )
        wait_for(lambda got=got: bool(got.pieces), 20, followers)
    whole: list[str] = []
    threads.append(
        started(
            lambda: whole.append(
                b.openai(api_key=KEY)
                .chat.completions.create(
                    model="echo", messages=MESSAGES, temperature=0, max_tokens=64
                )
                .choices[0]
                .message.content
                or ""
            )
        )
    )
    wait_for(lambda: all(f.pieces for f in followers), 20, followers)
    first.set()  # the leader's client leaves at its next piece
    leading.join(30)
    assert not leading.is_alive() and EXPECTED.startswith(leader.text), leader
    assert len(leader.pieces) <= 10, leader  # it left before the answer was whole
    late = Streamed()  # the leader's client is gone: a late follower still gets it all
    threads.append(started(lambda: stream(b, late, on_piece=note_first)))
    wait_for(lambda: bool(late.pieces), 20, late)
    second.set()  # generation goes on, for the followers alone
    for thread in threads:
        thread.join(30)

    for got in [*followers, late]:
        assert got.status == 200 and got.cache == "coalesced", got
        assert got.text == EXPECTED, got  # complete, in order, once
        assert got.errors == [] and got.done == 1, got
        assert len(got.pieces) > 1, got  # live pieces, not the stored answer replayed
        assert got.stored_at_first == 0, got  # its first piece came before the answer was whole
    assert whole == [EXPECTED]
    assert len(fresh.requests) == 1  # computed once, for everyone
    assert stored_entries(redis_url) == 1  # and stored once, although its starter left
    again = Streamed()
    stream(a, again)
    assert (again.cache, again.text) == ("hit", EXPECTED)


def test_a_failing_leader_gives_every_follower_its_error_once(
    servers: list[ServerProcess], fresh: FakeUpstream, redis_url: str
) -> None:
    a, b = servers
    fresh.chunk_delay, fresh.cut_after = 0.1, 6  # the upstream breaks off after 6 pieces
    leader = Streamed()
    leading = started(lambda: stream(a, leader))
    wait_for(lambda: len(leader.pieces) >= 1)
    followers = [Streamed() for _ in range(3)]
    threads = [
        started(lambda got=got, server=server: stream(server, got))
        for got, server in zip(followers, (a, b, b), strict=True)
    ]
    failed: list[Exception] = []

    def whole() -> None:
        try:
            b.openai(api_key=KEY).chat.completions.create(
                model="echo", messages=MESSAGES, temperature=0, max_tokens=64
            )
        except openai.APIError as exc:
            failed.append(exc)

    threads.append(started(whole))
    for thread in [leading, *threads]:
        thread.join(30)
    for got in [leader, *followers]:
        # the error once: as the stream's error event, or as the status of one not begun yet
        assert got.status in (200, 502) and len(got.errors) == 1 and got.done == 0, got
        assert EXPECTED.startswith(got.text) and len(got.pieces) <= 6, got
    assert len(failed) == 1 and isinstance(failed[0], openai.APIStatusError)
    assert len(fresh.requests) == 1  # the failure was shared, not retried by each
    assert stored_entries(redis_url) == 0  # a broken stream is never a cached answer


# -- a live stream evicted from its cache instance ------------------------------------------------


@pytest.fixture(scope="module")
def lru_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A response-cache instance of its own that evicts (allkeys-lru), as docs/deployment.md
    recommends for the cache; its memory limit is set by the test that fills it."""
    server = RedisProcess(tmp_path_factory.mktemp("lru")).start("--maxmemory-policy", "allkeys-lru")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lru_servers(
    redis_server: RedisProcess | ClusterProcesses,
    lru_cache: RedisProcess,
    upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[ServerProcess]]:
    yield from two_servers(
        redis_server.url, upstream, tmp_path_factory, cache_redis_url=lru_cache.url
    )


def live_keys(client: redis.Redis) -> list[bytes]:
    return [*client.scan_iter(match="response_live:*"), *client.scan_iter("response_lock:*")]


def test_a_follower_whose_live_stream_is_evicted_still_gets_the_whole_answer(
    lru_servers: list[ServerProcess], lru_cache: RedisProcess, fresh: FakeUpstream
) -> None:
    """Memory pressure on the cache instance evicts the live stream (and the lock) while a
    follower in another process reads it: the follower computes the answer itself and sends
    on from where it was, so its client gets the whole answer once, in order."""
    a, b = lru_servers
    hold = threading.Event()
    fresh.chunk_delay, fresh.holds = 0.01, {5: hold}
    with lru_cache.client() as c:
        c.flushall()  # our own instance
        c.config_set("maxmemory", int(c.info("memory")["used_memory"]) + 2_000_000)
    leader, follower = Streamed(), Streamed()
    threads = [started(lambda: stream(a, leader))]
    wait_for(lambda: len(leader.pieces) >= 1, 20, leader)
    threads.append(started(lambda: stream(b, follower)))
    wait_for(lambda: len(follower.pieces) >= 5, 20, follower)  # caught up with the pause
    with lru_cache.client() as c:
        assert live_keys(c), "the live stream is in the cache instance"
        for i in range(400):  # 100 kB at a time: allkeys-lru evicts the oldest keys first
            c.set(f"ballast:{i}", b"x" * 100_000)
            if not live_keys(c):
                break
        assert not live_keys(c), "memory pressure evicted the live stream and its lock"
        assert int(c.info("stats")["evicted_keys"]) > 0
    # the follower notices (its read of the stream finds nothing, the lock is gone) and asks
    # the upstream itself; that second stream pauses at the same piece until the test goes on
    wait_for(lambda: len(fresh.requests) == 2, 20, follower, fresh.requests)
    hold.set()
    for thread in threads:
        thread.join(30)
    for got in (leader, follower):
        assert got.status == 200 and got.errors == [] and got.done == 1, got
        assert got.text == EXPECTED, got  # whole, in order, nothing twice
    assert follower.cache == "coalesced" and len(follower.pieces) > 5, follower
    metrics = httpx.get(f"{b.url}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    assert 'yichui_cache_live_resumed_total{endpoint="chat",model="echo"} 1.0' in metrics, [
        line for line in metrics.splitlines() if "live_resumed" in line
    ]


def test_resuming_sends_only_what_was_not_relayed_whatever_the_chunking() -> None:
    from yichui.errors import CoalescedError
    from yichui.inference.engine import EngineChunk, Usage
    from yichui.inference.relay import Relayed

    out: list[EngineChunk] = []
    relayed = Relayed(out.append)
    for chunk in (EngineChunk(0, "The qu"), EngineChunk(1, "A"), EngineChunk(1, "b", "stop")):
        relayed(chunk)
    resume = relayed.resume()  # the same answer again, cut into other pieces
    for chunk in (
        EngineChunk(0, "The"),
        EngineChunk(1, "Ab", "stop"),  # choice 1 ended already: nothing more of it
        EngineChunk(0, " quick"),
        EngineChunk(0, " fox", "stop", Usage(3, 4)),
    ):
        resume(chunk)
    texts = {i: "".join(c.text for c in out if c.index == i) for i in (0, 1)}
    assert texts == {0: "The quick fox", 1: "Ab"}
    assert [c.finish_reason for c in out if c.index == 1] == [None, "stop"]
    assert out[-1].usage == Usage(3, 4) and out[-1].finish_reason == "stop"
    with pytest.raises(CoalescedError, match="another answer"):
        Relayed(out.append).resume()  # nothing sent yet: anything goes
        other = Relayed(out.append)
        other(EngineChunk(0, "Hello"))
        other.resume()(EngineChunk(0, "Help"))
