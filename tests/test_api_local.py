"""The API on the local transformers engine (a tiny random Llama): seeds, fingerprints,
images refused, and the `yichui cache` commands."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api_server import ServerProcess
from tests.images import png
from tests.redis_proc import RedisProcess
from tests.tiny_model import build_tiny_model

M = "tiny/llama"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / M)
    return root


@pytest.fixture(scope="module")
def server(
    redis_server: RedisProcess, models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("serve"), redis_url=redis_server.url, models_root=str(models_root)
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess, redis_url: str) -> openai.OpenAI:
    server.forget_cached(redis_url)  # the Redis is flushed for each test; memory too
    return server.openai()


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    params: dict[str, Any] = {"max_tokens": 6, "temperature": 0, **kwargs}
    raw = client.chat.completions.with_raw_response.create(
        model=M, messages=[{"role": "user", "content": "hello there"}], **params
    )
    raw.parse()  # reads the body: the connection goes back to the pool
    return raw


def _cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(server.env)
    return subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_greedy_and_seeded_answers_are_cached(client: openai.OpenAI) -> None:
    first, second = _chat(client), _chat(client)
    assert (first.headers["x-yichui-cache"], second.headers["x-yichui-cache"]) == ("miss", "hit")
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    streamed = client.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == first.parse().choices[0].message.content
    # the local engine honours seeds: a seeded sample is deterministic, so it is cached
    seeded = [_chat(client, temperature=0.9, seed=11) for _ in range(2)]
    assert [r.headers["x-yichui-cache"] for r in seeded] == ["miss", "hit"]
    assert _chat(client, temperature=0.9).headers["x-yichui-cache"] == "bypass"


def test_new_weights_mean_new_keys(
    client: openai.OpenAI, server: ServerProcess, tmp_path: Path
) -> None:
    before = _chat(client)
    assert _chat(client).headers["x-yichui-cache"] == "hit"
    retrained = build_tiny_model(tmp_path / "retrained", seed=7)
    imported = _cli(server, "models", "import", str(retrained), "--name", M, "--replace")
    assert imported.returncode == 0, imported.stderr
    after = _chat(client)  # the import's event reached the server: no stale answer
    assert after.headers["x-yichui-cache"] == "miss"
    assert after.headers["x-yichui-cache-key"] != before.headers["x-yichui-cache-key"]


def test_images_refused_by_a_text_model(server: ServerProcess, redis_url: str) -> None:
    image = png(8, 8)
    body = {
        "model": M,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is it"},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/png;base64," + base64.b64encode(image).decode()
                        },
                    },
                ],
            }
        ],
    }
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert "does not accept images" in resp.json()["error"]["message"]


def test_cache_stats_and_clear(client: openai.OpenAI, server: ServerProcess) -> None:
    _chat(client)
    _chat(client)
    _chat(client, max_tokens=3)
    time.sleep(1.5)  # counters are flushed about once a second
    stats = json.loads(_cli(server, "cache", "stats", "--json").stdout)
    assert stats["entries"] == 2
    assert stats["counters"]["hit"] >= 1 and stats["counters"]["miss"] >= 2
    cleared = _cli(server, "cache", "clear", "--model", "other/model", "--json")
    assert json.loads(cleared.stdout)["deleted"] == 0
    cleared = _cli(server, "cache", "clear", "--model", M, "--json")
    assert json.loads(cleared.stdout)["deleted"] == 2
    assert _chat(client).headers["x-yichui-cache"] == "miss"


def test_a_busy_model_answers_503_with_retry_after(
    redis_server: RedisProcess, models_root: Path, tmp_path: Path
) -> None:
    """One request at a time and one waiting (batch_max_size 1, batch_queue_max 1): the
    requests past that get 503 with Retry-After and an OpenAI error body, at once (a streamed
    one too, before its stream starts); the server serves on; /metrics counts the refusals."""
    busy = ServerProcess(
        tmp_path,
        redis_url=redis_server.url,
        models_root=str(models_root),
        batch_max_size=1,
        batch_queue_max=1,
    ).start()
    try:

        def ask(i: int, max_tokens: int = 6) -> httpx.Response:
            body = {
                "model": M,
                "prompt": f"request {i}",
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            return httpx.post(f"{busy.url}/v1/completions", json=body, timeout=120)

        assert ask(0).status_code == 200  # loaded
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, i, 900) for i in range(1, 7)]
            while 'reason="full"' not in httpx.get(f"{busy.url}/metrics", timeout=10).text:
                time.sleep(0.02)  # the queue is full now: a stream is refused before it starts
            body = {"model": M, "prompt": "a stream", "max_tokens": 6, "stream": True}
            streamed = httpx.post(f"{busy.url}/v1/completions", json=body, timeout=60)
            answers = [f.result() for f in futures]
        assert streamed.status_code == 503 and int(streamed.headers["retry-after"]) >= 1
        assert streamed.json()["error"]["code"] == "engine_busy"
        codes = sorted(a.status_code for a in answers)
        assert codes.count(200) >= 2 and 503 in codes, codes
        refused = next(a for a in answers if a.status_code == 503)
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "engine_busy" and "batch_queue_max" in error["message"]
        assert ask(99).status_code == 200
        metrics = httpx.get(f"{busy.url}/metrics", timeout=10).text
        assert 'yichui_engine_queue_rejected_total{model="tiny/llama",reason="full"}' in metrics
    finally:
        busy.stop()
