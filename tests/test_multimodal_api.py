"""Vision-language models served by the local engine, through the API as clients use it: a real
``yichui serve``, a real Redis, the official ``openai`` client, and one tiny random-weights model
per family (``tests/vision_models.py``: LLaVA, Idefics3, Qwen2-VL) built from the real
architecture configs, so the real load, processor, chat template and generate paths run."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api_server import ServerProcess
from tests.images import bomb, data_url, encode, picture, png, truncated, with_pixel
from tests.redis_proc import RedisProcess
from tests.tiny_model import build_tiny_model
from tests.vision_models import FAMILIES

TEXT = "tiny/llama"
VISION = {family: f"tiny/{family}" for family in ("llava", "idefics3", "qwen2_vl")}
QWEN = VISION["qwen2_vl"]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_tiny_model(root / TEXT)
    for family, name in VISION.items():
        FAMILIES[family](root / name)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "cat.png").write_bytes(encode(picture(64, 48, seed=5)))
    return root


def _server(workdir: Path, redis_url: str, models_root: Path, images: Path) -> ServerProcess:
    return ServerProcess(
        workdir,
        redis_url=redis_url,
        models_root=str(models_root),
        image_file_roots=[str(images)],
        cache_timeout=1.0,  # a loaded CI box must not turn Redis calls into faults
    )


@pytest.fixture(scope="module")
def server(
    redis_server: RedisProcess,
    models_root: Path,
    images: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    proc = _server(tmp_path_factory.mktemp("serve"), redis_server.url, models_root, images)
    proc.start(timeout=120)
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess, redis_url: str) -> openai.OpenAI:
    server.forget_cached(redis_url)  # the Redis is flushed for each test; memory too
    return server.openai()


def _ask(client: openai.OpenAI, model: str, url: str, **kwargs: Any) -> Any:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        temperature=0,
        max_tokens=kwargs.pop("max_tokens", 8),
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        **kwargs,
    )
    raw.parse()
    return raw


def _status(raw: Any) -> str:
    return str(raw.headers["x-yichui-cache"])


@pytest.mark.parametrize("family", sorted(VISION))
def test_each_family_answers_and_caches(client: openai.OpenAI, family: str) -> None:
    url = data_url(png(64, 48, seed=1))
    first = _ask(client, VISION[family], url)
    answer = first.parse()
    assert answer.choices[0].message.content  # random weights: any text, but some
    assert _status(first) == "miss"
    text_only = client.chat.completions.create(
        model=VISION[family],
        temperature=0,
        max_tokens=8,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert text_only.choices[0].message.content
    # the image's tokens are counted in the prompt
    assert answer.usage is not None and text_only.usage is not None
    assert answer.usage.prompt_tokens > text_only.usage.prompt_tokens + 2
    second = _ask(client, VISION[family], url)
    assert _status(second) == "hit"
    assert second.parse().choices[0].message.content == answer.choices[0].message.content


def test_key_is_the_picture(client: openai.OpenAI, images: Path) -> None:
    cat = picture(64, 48, seed=5)
    first = _ask(client, QWEN, data_url(encode(cat)))
    assert _status(first) == "miss"
    key = first.headers["x-yichui-cache-key"]
    as_file = _ask(client, QWEN, f"file://{images / 'cat.png'}")
    assert (_status(as_file), as_file.headers["x-yichui-cache-key"]) == ("hit", key)
    webp = _ask(client, QWEN, data_url(encode(cat, "WEBP"), "image/webp"))
    assert (_status(webp), webp.headers["x-yichui-cache-key"]) == ("hit", key)
    changed = _ask(client, QWEN, data_url(encode(with_pixel(cat, (63, 47)))))
    assert _status(changed) == "miss" and changed.headers["x-yichui-cache-key"] != key


def test_a_file_request_never_takes_the_fast_path(
    client: openai.OpenAI, server: ServerProcess, images: Path, tmp_path: Path
) -> None:
    """The same request bytes naming a file whose pixels changed: the changed picture's answer,
    never the remembered one."""
    path = images / "changing.png"
    path.write_bytes(encode(picture(32, 32, seed=1)))
    url = f"file://{path}"
    decoded = _count(server, "yichui_image_decode_seconds", endpoint="chat")
    first, again = _ask(client, QWEN, url), _ask(client, QWEN, url)
    assert (_status(first), _status(again)) == ("miss", "hit")
    path.write_bytes(encode(picture(32, 32, seed=2)))
    changed = _ask(client, QWEN, url)
    assert _status(changed) == "miss"
    assert changed.headers["x-yichui-cache-key"] != first.headers["x-yichui-cache-key"]
    # each of the three read and decoded its file (the hit too), timed in /metrics
    assert _count(server, "yichui_image_decode_seconds", endpoint="chat") == decoded + 3


def _count(server: ServerProcess, histogram: str, **label: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    ((name, value),) = label.items()
    pattern = rf'^{histogram}_count\{{{name}="{re.escape(value)}"\}} (\S+)$'
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def _engine_calls(server: ServerProcess, model: str) -> float:
    return _count(server, "yichui_engine_seconds", model=model)


def test_concurrent_identical_image_questions_computed_once(
    server: ServerProcess,
    client: openai.OpenAI,
    redis_server: RedisProcess,
    models_root: Path,
    images: Path,
    tmp_path: Path,
) -> None:
    second = _server(tmp_path, redis_server.url, models_root, images).start(timeout=120)
    try:
        clients = [client, second.openai()]
        _ask(clients[1], QWEN, data_url(png(16, 16, seed=9)))  # loads the model there too
        before = _engine_calls(server, QWEN) + _engine_calls(second, QWEN)
        url = data_url(png(96, 96, seed=3))
        statuses: list[str] = []
        texts: list[str] = []
        lock = threading.Lock()

        def ask(i: int) -> None:
            raw = _ask(clients[i % 2], QWEN, url, max_tokens=24)
            with lock:
                statuses.append(_status(raw))
                texts.append(raw.parse().choices[0].message.content or "")

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(statuses) == 20 and len(set(texts)) == 1, statuses
        assert statuses.count("miss") == 1, statuses
        assert set(statuses) <= {"miss", "coalesced", "hit"}
        after = _engine_calls(server, QWEN) + _engine_calls(second, QWEN)
        assert after - before == 1
    finally:
        second.stop()


def test_text_model_given_an_image(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, TEXT, data_url(png(8, 8)))
    assert f"model '{TEXT}' does not accept images" in str(info.value)


@pytest.mark.parametrize(
    ("data", "says"), [(bomb(), "pixels"), (truncated(png(64, 64)), "truncated")]
)
def test_bad_images_refused_and_serving_goes_on(
    client: openai.OpenAI, data: bytes, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, QWEN, data_url(data))
    error: Any = info.value.body
    assert says in error["message"] and error["param"] == "messages.0.content.1.image_url"
    assert _status(_ask(client, QWEN, data_url(png(16, 16, seed=4)))) == "miss"


def test_listed_with_what_it_takes(client: openai.OpenAI) -> None:
    listed = {m.id for m in client.models.list().data}
    assert set(VISION.values()) | {TEXT} <= listed
