"""``swift deploy`` (ms-swift 4.6, ``make swift``) as a real upstream, on the bundled SmolLM2,
through the official ``openai`` client against ``yichui serve``.

One ``swift deploy`` for the whole module: ``yichui serve`` launches it (the route's
``launch.swift_deploy``) and keeps it up, so the tests also show supervision end to end: the
engine SIGKILLed is a quick 502, then restarted and serving again; serve SIGKILLed leaves no
engine behind (the last test). Three routes point at it: ``smol-swift`` (its API key),
``smol-nokey`` (none: swift refuses) and ``smol-misnamed`` (a model name swift does not
serve). Upstream calls are counted from serve's ``/metrics`` (``yichui_engine_seconds_count``,
one per computed answer: hits and coalesced requests cost none).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api_server import ServerProcess
from tests.engine_checks import alive, engines_of, serve_ready, wait_for
from tests.fake_upstream import free_port
from tests.redis_proc import RedisProcess
from yichui.inference.engines.upstream import CONNECT_TIMEOUT

pytestmark = pytest.mark.slow

KEY = "sk-swift-test-key"
ROUTE = "smol-swift"


@pytest.fixture(scope="module")
def swift_url() -> str:
    """Where ``swift deploy`` listens."""
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture(scope="module")
def swift(
    redis_server: RedisProcess,
    swift_python: Path,
    smollm2_dir: Path,
    swift_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """``yichui serve`` with ``swift deploy`` launched behind three routes, ready."""
    url = swift_url
    deploy = {
        "model": str(smollm2_dir),
        "model_type": "llama",
        "template": "chatml",
        "torch_dtype": "float32",
        "infer_backend": "transformers",
        "log_interval": -1,
    }
    server = ServerProcess(
        tmp_path_factory.mktemp("swift-serve"),
        redis_url=redis_server.url,
        swift_python=str(swift_python),
        cache_timeout=1.0,  # a loaded CI box must not turn these tests' Redis calls into faults
        upstreams={
            ROUTE: {
                "url": url,
                "model": "smol",
                "api_key": KEY,
                "timeout": 120,
                "launch": {"swift_deploy": deploy, "start_timeout": 240, "restart_backoff": 0.5},
            },
            "smol-nokey": {"url": url, "model": "smol"},
            "smol-misnamed": {"url": url, "model": "nope", "api_key": KEY},
        },
    ).start()
    try:
        serve_ready(server, ROUTE, timeout=240)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(swift: ServerProcess) -> openai.OpenAI:
    made: openai.OpenAI = swift.openai(timeout=120)
    return made


def chat(client: openai.OpenAI, text: str, model: str = ROUTE, **params: Any) -> Any:
    """The raw response of a greedy chat request (headers and parsed body)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        **{"temperature": 0, "max_tokens": 12, **params},
    )
    raw.parse()
    return raw


def cache_of(raw: Any) -> str:
    return str(raw.headers.get("x-yichui-cache"))


def upstream_calls(server: ServerProcess) -> int:
    """Answers computed by the route's engine: every call to swift that gave one."""
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf'^yichui_engine_seconds_count{{model="{ROUTE}"}} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def test_an_answer_through_yichui(client: openai.OpenAI) -> None:
    assert {ROUTE, "smol-nokey", "smol-misnamed"} <= {m.id for m in client.models.list()}
    raw = chat(client, "What is the capital of France?")
    answer = raw.parse()
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.model == ROUTE
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0
    assert cache_of(raw) == "miss"


def test_streaming(client: openai.OpenAI, swift: ServerProcess) -> None:
    def stream() -> tuple[str, str, Any]:
        raw = client.chat.completions.with_raw_response.create(
            model=ROUTE,
            messages=[{"role": "user", "content": "Name a primary colour."}],
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return cache_of(raw), text, chunks[-1].usage

    calls = upstream_calls(swift)
    first, text, usage = stream()
    assert first == "miss" and text.strip()
    assert usage is not None and usage.completion_tokens > 0
    again, replayed, _ = stream()
    assert (again, replayed) == ("hit", text)  # the stored stream, replayed
    assert upstream_calls(swift) == calls + 1


def test_a_repeat_is_a_cache_hit(client: openai.OpenAI, swift: ServerProcess) -> None:
    calls = upstream_calls(swift)
    first = chat(client, "Say hello.")
    second = chat(client, "Say hello.")
    assert (cache_of(first), cache_of(second)) == ("miss", "hit")
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    assert upstream_calls(swift) == calls + 1


def test_concurrent_identical_requests_cost_one_upstream_call(
    client: openai.OpenAI, swift: ServerProcess
) -> None:
    calls = upstream_calls(swift)
    results: list[tuple[str, str]] = []
    lock = threading.Lock()

    def ask() -> None:
        raw = chat(client, "Count from one to five.", max_tokens=16)
        with lock:
            results.append((cache_of(raw), raw.parse().choices[0].message.content or ""))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    statuses = [status for status, _ in results]
    assert statuses.count("miss") == 1 and set(statuses) <= {"miss", "coalesced", "hit"}
    assert len({text for _, text in results}) == 1
    assert upstream_calls(swift) == calls + 1


def test_swift_s_refusals_are_openai_errors(client: openai.OpenAI) -> None:
    # greedy with n=2: swift's transformers backend refuses it (400, its own body shape)
    for _ in range(2):  # an error is never stored
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, "Pick a number.", n=2)
        assert err.value.status_code == 400
        body: Any = err.value.body  # the client hands over the body's "error" object
        body = body.get("error", body)
        assert set(body) == {"message", "type", "param", "code"}
        assert body["type"] == "invalid_request_error"
        assert "num_return_sequences" in body["message"]
    # the route names a model swift does not serve: this gateway's fault, not the client's
    with pytest.raises(openai.APIStatusError) as misnamed:
        chat(client, "Pick a number.", model="smol-misnamed")
    assert misnamed.value.status_code == 502
    assert "does not serve the route's model: `nope` is not in the model_list" in str(
        misnamed.value
    )


def test_the_route_s_api_key_is_sent_and_honoured(
    client: openai.OpenAI, swift: ServerProcess, swift_url: str
) -> None:
    # swift itself refuses a request without the key, so smol-swift's answers carry it
    plain = httpx.post(
        f"{swift_url}/chat/completions",
        json={"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert (plain.status_code, plain.json()) == (
        400,
        {"message": "API key error", "object": "error"},
    )
    assert chat(client, "Say yes.", max_tokens=4).parse().choices[0].message.content
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, "Say yes.", model="smol-nokey", max_tokens=4)
    assert err.value.status_code == 502
    assert "refused the request (400): API key error" in str(err.value)
    assert KEY not in str(err.value.body) and KEY not in swift.output()


def test_engine_down_is_a_quick_502_then_served_again(
    client: openai.OpenAI, swift: ServerProcess
) -> None:
    pid = engines_of(swift)[ROUTE]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), timeout=10, what="swift gone")
    for _ in range(2):  # a pooled connection found dead first, then no connection at all
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            chat(client, "Is the engine up?", max_tokens=4)
        assert err.value.status_code == 502
        assert time.monotonic() - started < CONNECT_TIMEOUT
    assert "unreachable" in str(err.value)
    serve_ready(swift, ROUTE, timeout=240, other_than=pid)  # the supervisor started it again
    assert engines_of(swift)[ROUTE]["restarts"] == 1
    raw = chat(client, "Is the engine up?", max_tokens=4)
    assert cache_of(raw) == "miss" and raw.parse().choices[0].message.content  # 502 not stored
    assert "engine 'smol-swift': killed by SIGKILL" in swift.output()


def test_sigkilled_serve_leaves_no_swift_process(swift: ServerProcess) -> None:
    """Last: it ends the module's server."""
    pid = engines_of(swift)[ROUTE]["pid"]
    assert alive(pid) and swift.proc is not None
    swift.proc.kill()
    swift.proc.wait(10)
    wait_for(lambda: not alive(pid), timeout=10, what="swift deploy gone with serve")
