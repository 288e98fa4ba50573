"""The OpenAI-compatible API as clients use it: a real ``yichui serve`` process, a real Redis,
the official ``openai`` client. The model ``echo`` is routed to an upstream (a test double of
an OpenAI-compatible server, in this process), so every engine call can be counted."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.api_server import ServerProcess
from tests.fake_upstream import FakeUpstream, fake_upstream
from tests.images import (
    animated_gif,
    bomb,
    data_url,
    encode,
    picture,
    png,
    rotated_jpeg,
    truncated,
    with_pixel,
)
from tests.redis_proc import RedisProcess

PNG = png(24, 16, seed=3)
KEYS = {"key-team-a": "team-a", "key-team-b": "team-b"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with fake_upstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "cat.png").write_bytes(PNG)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def server(
    redis_server: RedisProcess,
    upstream: FakeUpstream,
    images: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("serve"),
        redis_url=redis_server.url,
        upstreams={"echo": {"url": upstream.url, "model": "echo-up", "accepts_images": True}},
        auth="keys",
        api_keys={hashlib.sha256(k.encode()).hexdigest(): t for k, t in KEYS.items()},
        image_file_roots=[str(images)],
        max_body_bytes=200_000,
        cache_timeout=1.0,  # a loaded CI box must not turn these tests' Redis calls into faults
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def fresh(redis_url: str, upstream: FakeUpstream, server: ServerProcess) -> FakeUpstream:
    """A flushed Redis (the conftest fixture), no near-cache copies, a reset upstream."""
    server.forget_cached(redis_url)
    upstream.reset()
    return upstream


@pytest.fixture
def client(server: ServerProcess, fresh: FakeUpstream) -> openai.OpenAI:
    return server.openai(api_key="key-team-a")


def _chat(client: openai.OpenAI, text: str = "capital of France", **kwargs: Any) -> Any:
    params: dict[str, Any] = {"temperature": 0, **kwargs}
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": text}], **params
    )
    raw.parse()  # reads the body: the connection goes back to the pool
    return raw


def _status(raw: Any) -> str:
    return str(raw.headers.get("x-yichui-cache"))


def test_models_and_unknown_model(client: openai.OpenAI) -> None:
    assert "echo" in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="nope/none", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "model_not_found"


def test_miss_then_hit_same_body(client: openai.OpenAI, fresh: FakeUpstream) -> None:
    first = _chat(client)
    second = _chat(client)
    assert (_status(first), _status(second)) == ("miss", "hit")
    assert first.parse().model_dump() == second.parse().model_dump()
    assert first.parse().choices[0].message.content == "France of capital"
    assert len(fresh.requests) == 1
    assert fresh.last.body["model"] == "echo-up"


def test_streaming_miss_then_replayed_hit(client: openai.OpenAI, fresh: FakeUpstream) -> None:
    def stream() -> tuple[str, str, list[Any]]:
        raw = client.chat.completions.with_raw_response.create(
            model="echo",
            messages=[{"role": "user", "content": "one two three"}],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return _status(raw), text, chunks

    status1, text1, _ = stream()
    status2, text2, chunks2 = stream()
    assert (status1, status2) == ("miss", "hit")
    assert text1 == text2 == "three two one"
    assert chunks2[-1].usage is not None and chunks2[-1].usage.completion_tokens > 0
    assert chunks2[-2].choices[0].finish_reason == "stop"
    whole = _chat(client, "one two three")  # the streamed answer serves a whole request too
    assert _status(whole) == "hit" and whole.parse().choices[0].message.content == text1
    assert len(fresh.requests) == 1


def test_parameters_and_policy(client: openai.OpenAI, fresh: FakeUpstream) -> None:
    assert _status(_chat(client)) == "miss"
    assert _status(_chat(client, max_tokens=3)) == "miss"  # another parameter: another key
    assert _status(_chat(client, stop=["x"])) == "miss"
    sampled = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "capital of France"}]
    )
    assert _status(sampled) == "bypass"  # no temperature: 1.0, sampled, never cached
    assert (
        _status(_chat(client, temperature=0.7, seed=3)) == "bypass"
    )  # upstream: seed not honoured
    opted = _chat(client, temperature=0.7, extra_headers={"x-yichui-cache-policy": "sampled"})
    assert _status(opted) == "miss"
    assert _status(_chat(client, extra_headers={"cache-control": "no-cache"})) == "miss"
    assert (
        _status(_chat(client, "nothing stored", extra_headers={"cache-control": "no-store"}))
        == "miss"
    )
    assert _status(_chat(client, "nothing stored")) == "miss"
    assert _status(_chat(client)) == "hit"


def test_key_ignores_json_key_order(server: ServerProcess, fresh: FakeUpstream) -> None:
    headers = {"authorization": "Bearer key-team-a", "content-type": "application/json"}
    a = '{"model": "echo", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}'
    b = '{"messages": [{"content": "hi", "role": "user"}], "temperature": 0.0, "model": "echo"}'
    r1 = httpx.post(f"{server.url}/v1/chat/completions", content=a, headers=headers)
    r2 = httpx.post(f"{server.url}/v1/chat/completions", content=b, headers=headers)
    assert (r1.headers["x-yichui-cache"], r2.headers["x-yichui-cache"]) == ("miss", "hit")
    assert r1.headers["x-yichui-cache-key"] == r2.headers["x-yichui-cache-key"]


def test_same_image_bytes_same_key(
    client: openai.OpenAI, fresh: FakeUpstream, images: Path
) -> None:
    def ask(url: str) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="echo",
            temperature=0,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        )

    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    first, second = ask(data_url), ask(f"file://{images / 'cat.png'}")
    assert (_status(first), _status(second)) == ("miss", "hit")
    sent = fresh.last.body["messages"][0]["content"][1]["image_url"]["url"]
    assert sent == data_url  # the upstream gets the bytes, never our file path
    other = encode(with_pixel(picture(24, 16, seed=3)))  # one pixel changed
    third = ask("data:image/png;base64," + base64.b64encode(other).decode())
    assert _status(third) == "miss"
    webp = encode(picture(24, 16, seed=3), "WEBP")  # the same pixels, another encoding
    fourth = ask("data:image/webp;base64," + base64.b64encode(webp).decode())
    assert _status(fourth) == "hit"
    assert fourth.headers["x-yichui-cache-key"] == first.headers["x-yichui-cache-key"]


def test_image_detail_levels(client: openai.OpenAI, fresh: FakeUpstream) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()

    def ask(**detail: str) -> Any:
        image = {"type": "image_url", "image_url": {"url": data_url, **detail}}
        messages: Any = [{"role": "user", "content": [{"type": "text", "text": "what"}, image]}]
        raw = client.chat.completions.with_raw_response.create(
            model="echo", temperature=0, messages=messages
        )
        raw.parse()
        return raw

    def sent() -> dict[str, Any]:
        image: dict[str, Any] = fresh.last.body["messages"][0]["content"][1]["image_url"]
        return image

    low = ask(detail="low")
    assert _status(low) == "miss" and sent() == {"url": data_url, "detail": "low"}
    high = ask(detail="high")
    assert _status(high) == "miss" and sent() == {"url": data_url, "detail": "high"}
    assert low.headers["x-yichui-cache-key"] != high.headers["x-yichui-cache-key"]
    assert _status(ask(detail="low")) == "hit"
    auto = ask(detail="auto")
    assert _status(auto) == "miss" and sent() == {"url": data_url}  # auto: left out
    omitted = ask()
    assert _status(omitted) == "hit"
    assert omitted.headers["x-yichui-cache-key"] == auto.headers["x-yichui-cache-key"]
    assert auto.headers["x-yichui-cache-key"].startswith("rc3-")
    assert len(fresh.requests) == 3


def _post_parts(server: ServerProcess, content: Any) -> httpx.Response:
    """A chat request of one user message with ``content``, as team-a."""
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        content=_part_body(content),
        headers={"authorization": "Bearer key-team-a", "content-type": "application/json"},
    )


def _part_body(content: Any) -> bytes:
    return json.dumps(
        {"model": "echo", "messages": [{"role": "user", "content": content}]}
    ).encode()


@pytest.mark.parametrize(
    ("content", "param", "says"),
    [
        (
            [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "x", "detail": "bogus"}},
            ],
            "messages.0.content.1.image_url.detail",
            "'auto', 'low' or 'high'",
        ),
        (
            [{"type": "picture", "url": "x"}],
            "messages.0.content.0.type",
            "unknown type 'picture': expected 'text' or 'image_url'",
        ),
        ([{"text": "hi"}], "messages.0.content.0.type", "Field required"),
        ([{"type": "text", "text": 5}], "messages.0.content.0.text", "valid string"),
        (
            [{"type": "image_url", "image_url": {}}],
            "messages.0.content.0.image_url.url",
            "required",
        ),
        (5, "messages.0.content", "a valid string or a valid list"),
        ({"type": "text", "text": "hi"}, "messages.0.content", "a valid string or a valid list"),
    ],
)
def test_validation_names_the_wrong_part(
    server: ServerProcess, fresh: FakeUpstream, content: Any, param: str, says: str
) -> None:
    resp = _post_parts(server, content)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: ") and says in error["message"], error
    assert "content.str" not in error["message"] and "list[" not in error["message"]
    assert fresh.requests == []


def test_concurrent_identical_requests_compute_once(
    server: ServerProcess, redis_server: RedisProcess, fresh: FakeUpstream, tmp_path: Path
) -> None:
    # a second server process on the same Redis: coalescing crosses processes
    second = ServerProcess(
        tmp_path,
        redis_url=redis_server.url,
        upstreams={"echo": {"url": fresh.url, "model": "echo-up"}},
        auth="keys",
        api_keys={hashlib.sha256(k.encode()).hexdigest(): t for k, t in KEYS.items()},
        cache_timeout=1.0,
    ).start()
    try:
        fresh.delay = 1.0  # the computation takes a while: everyone arrives during it
        clients = [server.openai(api_key="key-team-a"), second.openai(api_key="key-team-a")]
        statuses: list[str] = []
        texts: list[str] = []
        lock = threading.Lock()

        def ask(i: int) -> None:
            raw = _chat(clients[i % 2], "fifty at once")
            with lock:
                statuses.append(_status(raw))
                texts.append(raw.parse().choices[0].message.content or "")

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(fresh.requests) == 1
        assert statuses.count("miss") == 1
        assert sorted(set(statuses)) in (["coalesced", "miss"], ["coalesced", "hit", "miss"])
        assert set(texts) == {"once at fifty"}
    finally:
        second.stop()


def test_tenants_are_isolated(server: ServerProcess, fresh: FakeUpstream) -> None:
    a, b = server.openai(api_key="key-team-a"), server.openai(api_key="key-team-b")
    assert _status(_chat(a, "secret plan")) == "miss"
    assert _status(_chat(b, "secret plan")) == "miss"  # b never sees a's entry
    assert _status(_chat(a, "secret plan")) == "hit"
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").models.list()
    missing = httpx.get(f"{server.url}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_upstream_error_is_passed_on_and_not_cached(
    client: openai.OpenAI, fresh: FakeUpstream
) -> None:
    fresh.fail_status = 500
    with pytest.raises(openai.APIStatusError) as err:
        _chat(client, "doomed")
    assert err.value.status_code == 502
    fresh.fail_status = None
    assert _status(_chat(client, "doomed")) == "miss"  # the error was not stored


@pytest.mark.parametrize(
    ("body", "status", "where"),
    [
        (b"{not json", 400, "JSON"),
        (json.dumps({"model": "echo", "messages": "hi"}).encode(), 400, "messages"),
        (
            json.dumps(
                {"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": 5}
            ).encode(),
            400,
            "temperature",
        ),
        (
            json.dumps(
                {
                    "model": "echo",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": "many",
                }
            ).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps(
                {"model": "echo", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}
            ).encode(),
            400,
            "frobnicate",
        ),
        (
            json.dumps(
                {
                    "model": "echo",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "data:image/png;base64,@@@"},
                                }
                            ],
                        }
                    ],
                }
            ).encode(),
            400,
            "base64",
        ),
        (
            json.dumps(
                {
                    "model": "echo",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {
                                        "url": "data:image/png;base64,"
                                        + base64.b64encode(b"hello").decode()
                                    },
                                }
                            ],
                        }
                    ],
                }
            ).encode(),
            400,
            "not an image",
        ),
        (
            json.dumps(
                {
                    "model": "echo",
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}],
                        }
                    ],
                }
            ).encode(),
            400,
            "image_file_roots",
        ),
        (
            json.dumps(
                {
                    "model": "echo",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "https://example.com/a.png"},
                                }
                            ],
                        }
                    ],
                }
            ).encode(),
            400,
            "data URL",
        ),
        (
            b'{"model": "echo", "messages": [{"role": "user", "content": "'
            + b"x" * 300_000
            + b'"}]}',
            413,
            "limit",
        ),
    ],
)
def test_bad_input(
    server: ServerProcess, fresh: FakeUpstream, body: bytes, status: int, where: str
) -> None:
    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"authorization": "Bearer key-team-a", "content-type": "application/json"},
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert where.lower() in (error["message"] + str(error.get("param"))).lower()
    assert set(error) == {"message", "type", "param", "code"}
    assert fresh.requests == []  # nothing reached the engine


def _image(data: bytes, media_type: str = "image/png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(data, media_type)}}


@pytest.mark.parametrize(
    ("content", "param", "says"),
    [
        ([_image(bomb())], "messages.0.content.0.image_url", "12000x12000 pixels"),
        (
            [{"type": "text", "text": "look"}, _image(truncated(png(64, 64)))],
            "messages.0.content.1.image_url",
            "truncated",
        ),
        ([_image(encode(picture(8, 8), "TIFF"), "image/tiff")], None, "accepted format"),
        ([_image(b"GIF89a not really")], None, "accepted format"),
        ([_image(png(8, 8, seed=i)) for i in range(5)], "messages.0.content.4.image_url", "4"),
        (
            [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}],
            "messages.0.content.0.image_url",
            "not fetched",
        ),
    ],
)
def test_bad_images_refused(
    server: ServerProcess,
    client: openai.OpenAI,
    fresh: FakeUpstream,
    content: Any,
    param: str | None,
    says: str,
) -> None:
    resp = _post_parts(server, content)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == (param or "messages.0.content.0.image_url"), error
    assert says in error["message"], error
    assert fresh.requests == []  # nothing reached the engine, nothing was cached
    assert _status(_chat(client, "still serving")) in ("miss", "hit")


def test_images_forwarded_as_decoded(
    client: openai.OpenAI, server: ServerProcess, fresh: FakeUpstream
) -> None:
    """An animation is sent on as its first frame, a sideways photo as the picture it shows:
    an upstream sees what the cache key stands for."""

    def sent_image(data: bytes, media_type: str) -> Any:
        resp = _post_parts(server, [_image(data, media_type)])
        assert resp.status_code == 200, resp.text
        url = fresh.last.body["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))

    first = sent_image(animated_gif(frames=3, size=(16, 12)), "image/gif")
    assert getattr(first, "n_frames", 1) == 1 and first.size == (16, 12)
    upright = sent_image(rotated_jpeg(picture(40, 20)), "image/jpeg")
    assert upright.size == (20, 40)  # orientation 6: shown rotated


def test_chunked_body_over_the_limit(server: ServerProcess, fresh: FakeUpstream) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced as it streams
        yield b'{"model": "echo", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}]}'

    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunks(),
        headers={"authorization": "Bearer key-team-a", "content-type": "application/json"},
    )
    assert resp.status_code == 413 and "limit" in resp.json()["error"]["message"]
    assert fresh.requests == []


def test_redis_killed_mid_traffic(upstream: FakeUpstream, tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis").start()
    server = ServerProcess(
        tmp_path, redis_url=redis.url, upstreams={"echo": {"url": upstream.url}}
    ).start()
    upstream.reset()
    try:
        client = server.openai()
        assert _status(_chat(client, "steady")) == "miss"
        assert _status(_chat(client, "steady")) == "hit"
        redis.kill()
        started = time.monotonic()
        kept = _chat(client, "steady")  # still in the server's memory: a hit without Redis
        assert _status(kept) == "hit"
        for i in range(10):
            raw = _chat(client, f"steady {i}")
            assert raw.parse().choices[0].message.content == f"{i} steady"
            assert _status(raw) == "bypass"
        assert time.monotonic() - started < 10
        health = httpx.get(f"{server.url}/health").json()
        assert health["cache"] in ("open", "half-open")
    finally:
        server.stop()
        redis.stop()
