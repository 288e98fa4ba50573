"""The upstream engine against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import pytest
from pydantic import SecretStr

from tests.fake_upstream import FakeUpstream, fake_upstream, free_port
from tests.images import image_part, png
from yichui.config import UpstreamRoute
from yichui.errors import ImagesNotAcceptedError, ModelNotFoundError, UpstreamError, YichuiError
from yichui.inference.engine import (
    EngineChunk,
    EngineRequest,
    GenerationParams,
    Message,
    Usage,
)
from yichui.inference.engines.upstream import UpstreamEngine

SECRET = "sk-very-secret-key-123"
PNG = png(8, 8)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with fake_upstream() as fake:
        yield fake


@pytest.fixture
def upstream(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    return server


def route(fake: FakeUpstream, **kw: Any) -> UpstreamRoute:
    return UpstreamRoute(url=fake.url, **kw)


@pytest.fixture
async def engine(upstream: FakeUpstream) -> AsyncIterator[UpstreamEngine]:
    eng = UpstreamEngine(
        {
            "big": route(upstream, model="Org/Big-72B-Instruct", honours_seed=True),
            "same-name": route(upstream),
            "vision": route(upstream, model="Org/VL", accepts_images=True),
            "keyed": route(upstream, api_key=SecretStr(SECRET)),
            "quick": route(upstream, timeout=0.3),
        }
    )
    yield eng
    await eng.close()


def chat(model: str = "big", text: str = "one two three", **params: Any) -> EngineRequest:
    return EngineRequest(
        model=model,
        kind="chat",
        params=GenerationParams(**params),
        messages=(Message("system", "be brief"), Message("user", text)),
    )


def completion(model: str = "big", prompt: str = "alpha beta", **params: Any) -> EngineRequest:
    return EngineRequest(
        model=model, kind="completion", params=GenerationParams(**params), prompt=prompt
    )


async def collect(engine: UpstreamEngine, request: EngineRequest) -> list[EngineChunk]:
    return [chunk async for chunk in engine.stream(request)]


def joined(chunks: list[EngineChunk], n: int = 1) -> list[str]:
    return ["".join(c.text for c in chunks if c.index == i) for i in range(n)]


# -- answers ----------------------------------------------------------------------------------


async def test_complete_chat(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    result = await engine.complete(chat(text="one two three"))
    assert [c.text for c in result.choices] == ["three two one"]
    assert result.choices[0].finish_reason == "stop"
    assert result.usage == Usage(prompt_tokens=5, completion_tokens=3)
    assert upstream.last.path == "/v1/chat/completions"


async def test_complete_completion(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    result = await engine.complete(completion(prompt="alpha beta gamma", max_tokens=2))
    assert [(c.text, c.finish_reason) for c in result.choices] == [("gamma beta", "length")]
    assert result.usage == Usage(3, 2)
    assert upstream.last.path == "/v1/completions"
    assert upstream.last.body["prompt"] == "alpha beta gamma"


@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_stream_joins_to_complete(engine: UpstreamEngine, kind: str) -> None:
    words = "a b c d e"
    request = (
        chat(text=words, n=2, max_tokens=4)
        if kind == "chat"
        else completion(prompt=words, n=2, max_tokens=4)
    )
    whole = await engine.complete(request)
    chunks = await collect(engine, request)
    assert joined(chunks, 2) == [c.text for c in whole.choices]
    finishes = {c.index: c.finish_reason for c in chunks if c.finish_reason}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    for i in range(2):  # nothing of a choice after its finish
        mine = [c for c in chunks if c.index == i and c.usage is None]
        assert mine[-1].finish_reason is not None


async def test_stream_sends_stream_options(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    await collect(engine, chat())
    assert upstream.last.body["stream"] is True
    assert upstream.last.body["stream_options"] == {"include_usage": True}
    assert upstream.last.headers["accept"] == "text/event-stream"


async def test_stop_and_n(engine: UpstreamEngine) -> None:
    result = await engine.complete(chat(text="x y z", stop=(" x",), n=3))
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.text for c in result.choices] == ["z y"] * 3
    assert {c.finish_reason for c in result.choices} == {"stop"}


# -- what is sent -----------------------------------------------------------------------------


async def test_params_sent(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    params: dict[str, Any] = {
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 0.5,
        "n": 2,
        "stop": ("END", "\n\n"),
        "seed": 42,
        "presence_penalty": 0.25,
        "frequency_penalty": -0.5,
    }
    await engine.complete(chat(**params))
    body = upstream.last.body
    assert body["model"] == "Org/Big-72B-Instruct"
    assert {k: body[k] for k in params} == {**params, "stop": ["END", "\n\n"]}
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two three"},
    ]
    assert "stream" not in body
    assert "authorization" not in upstream.last.headers


async def test_defaults_omit_stop_and_seed(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    await engine.complete(chat("same-name"))
    body = upstream.last.body
    assert body["model"] == "same-name"
    assert "stop" not in body
    assert "seed" not in body
    assert body["max_tokens"] == GenerationParams().max_tokens


async def test_text_parts_sent_as_a_string(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    request = EngineRequest(
        model="big",
        kind="chat",
        params=GenerationParams(),
        messages=(Message("user", ("hello ", "world"), name="ann"),),
    )
    await engine.complete(request)
    assert upstream.last.body["messages"] == [
        {"role": "user", "content": "hello world", "name": "ann"}
    ]


def image_request(model: str) -> EngineRequest:
    image = image_part(PNG)
    return EngineRequest(
        model=model,
        kind="chat",
        params=GenerationParams(),
        messages=(Message("user", ("what is ", image, "this")),),
    )


async def test_images_sent_as_data_urls(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    result = await engine.complete(image_request("vision"))
    assert result.choices[0].text == "this is what"
    sent = upstream.last.body
    assert sent["model"] == "Org/VL"
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "what is "},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
        },
        {"type": "text", "text": "this"},
    ]


async def test_image_detail_passed_on(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    image = image_part(PNG, "low")
    request = EngineRequest(
        model="vision",
        kind="chat",
        params=GenerationParams(),
        messages=(Message("user", ("look", image)),),
    )
    await engine.complete(request)
    sent = upstream.last.body["messages"][0]["content"][1]["image_url"]
    assert sent == {
        "url": "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "detail": "low",
    }
    # auto (the default) is left out: see test_images_sent_as_data_urls


async def test_images_refused_when_not_accepted(
    engine: UpstreamEngine, upstream: FakeUpstream
) -> None:
    with pytest.raises(ImagesNotAcceptedError, match="model 'big' does not accept images"):
        await engine.complete(image_request("big"))
    with pytest.raises(ValueError, match="does not accept images"):
        await collect(engine, image_request("big"))
    assert upstream.requests == []


async def test_api_key_sent(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    upstream.api_key = SECRET
    result = await engine.complete(chat("keyed"))
    assert result.choices[0].text == "three two one"
    assert upstream.last.headers["authorization"] == f"Bearer {SECRET}"
    await collect(engine, chat("keyed"))
    assert upstream.last.headers["authorization"] == f"Bearer {SECRET}"


async def test_api_key_never_in_errors(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    upstream.api_key = "sk-the-right-one"  # the fake quotes the wrong key it got
    for call in (engine.complete(chat("keyed")), collect(engine, chat("keyed"))):
        with pytest.raises(UpstreamError) as info:
            await call
        err = info.value
        assert err.status == 502  # our credentials: not the client's fault
        assert "401" in str(err)
        assert SECRET not in str(err)
        assert SECRET not in repr(err.body) + repr(err.hint) + repr(err.args)
    upstream.reset()
    upstream.fail_status, upstream.fail_body = 400, {"error": {"message": f"echo {SECRET}"}}
    with pytest.raises(UpstreamError) as info:
        await engine.complete(chat("keyed"))
    assert info.value.status == 400
    assert SECRET not in str(info.value)
    assert info.value.body == {"error": {"message": "echo ***"}}


# -- model cards ------------------------------------------------------------------------------


async def test_models_cards_and_seed(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    assert engine.models() == ["big", "keyed", "quick", "same-name", "vision"]
    card = engine.card("big")
    expected = hashlib.sha256(f"{upstream.url}|Org/Big-72B-Instruct".encode()).hexdigest()
    assert (card.id, card.owned_by, card.fingerprint) == ("big", "upstream", "up1-" + expected)
    assert not card.accepts_images
    assert engine.card("vision").accepts_images
    assert engine.card("same-name").fingerprint != card.fingerprint
    assert engine.honours_seed_for("big")
    assert not engine.honours_seed_for("same-name")
    assert engine.honours_seed is False
    with pytest.raises(ModelNotFoundError):
        engine.card("nope")
    with pytest.raises(ModelNotFoundError):
        await engine.complete(chat("nope"))


# -- failures ---------------------------------------------------------------------------------


async def test_400_passed_through(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    body = {
        "error": {
            "message": "max_tokens is too large",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": None,
        }
    }
    upstream.fail_status, upstream.fail_body = 400, body
    for call in (engine.complete(chat()), collect(engine, chat())):
        with pytest.raises(UpstreamError) as info:
            await call
        assert info.value.status == 400
        assert info.value.body == body
        assert "max_tokens is too large" in str(info.value)
        assert isinstance(info.value, YichuiError)


async def test_flat_vllm_error_body_normalised(
    engine: UpstreamEngine, upstream: FakeUpstream
) -> None:
    upstream.fail_status = 400
    upstream.fail_body = {"object": "error", "message": "bad", "type": "BadRequestError"}
    with pytest.raises(UpstreamError) as info:
        await engine.complete(chat())
    assert info.value.status == 400
    assert info.value.body == {
        "error": {"message": "bad", "type": "BadRequestError", "param": None, "code": None}
    }


async def test_swift_deploy_error_bodies(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    """`swift deploy` answers every refusal 400 with ``{"message", "object": "error"}``: a
    request it cannot run is the client's (400, OpenAI's body); our key or our route's model
    name is this gateway's fault (502, with a hint)."""
    upstream.fail_status = 400
    upstream.fail_body = {"message": "`max_new_tokens` must be greater than 0", "object": "error"}
    with pytest.raises(UpstreamError) as info:
        await engine.complete(chat())
    assert info.value.status == 400
    assert info.value.body == {
        "error": {
            "message": "`max_new_tokens` must be greater than 0",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    upstream.fail_body = {"message": "API key error", "object": "error"}
    for call in (engine.complete(chat("keyed")), collect(engine, chat("keyed"))):
        with pytest.raises(UpstreamError) as info:
            await call
        assert info.value.status == 502
        assert info.value.body is None
        assert "refused the request (400): API key error" in str(info.value)
        assert info.value.hint == "check the route's api_key"
    upstream.fail_body = {
        "message": "`Org/Big` is not in the model_list: `['smol']`.",
        "object": "error",
    }
    with pytest.raises(UpstreamError) as info:
        await engine.complete(chat())
    assert info.value.status == 502
    assert "does not serve the route's model" in str(info.value)
    assert info.value.hint is not None and "route's model" in info.value.hint


async def test_fastapi_422_becomes_400(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    upstream.fail_status = 422
    upstream.fail_body = {
        "detail": [
            {
                "type": "list_type",
                "loc": ["body", "messages"],
                "msg": "Input should be a valid list",
            }
        ]
    }
    with pytest.raises(UpstreamError) as info:
        await engine.complete(chat())
    assert info.value.status == 400
    assert info.value.body == {
        "error": {
            "message": "messages: Input should be a valid list",
            "type": "invalid_request_error",
            "param": "messages",
            "code": None,
        }
    }


async def test_4xx_without_error_body_is_502(
    engine: UpstreamEngine, upstream: FakeUpstream
) -> None:
    upstream.fail_status, upstream.fail_body = 404, "<html>Not Found</html>"
    with pytest.raises(UpstreamError) as info:
        await engine.complete(chat())
    assert info.value.status == 502
    assert info.value.body is None
    assert "404" in str(info.value)


async def test_500_is_502(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    upstream.fail_status, upstream.fail_body = 500, "Internal Server Error"
    for call in (engine.complete(chat()), collect(engine, chat())):
        with pytest.raises(UpstreamError) as info:
            await call
        assert info.value.status == 502
        assert info.value.body is None
        assert "500" in str(info.value)
        assert "Internal Server Error" in str(info.value)
        assert info.value.retryable


async def test_invalid_json_is_502(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    upstream.garbage = True
    with pytest.raises(UpstreamError, match="invalid JSON") as info:
        await engine.complete(chat())
    assert info.value.status == 502


async def test_refused_connection_is_502() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = UpstreamEngine({"gone": UpstreamRoute(url=url, api_key=SecretStr(SECRET))})
    try:
        for call in (engine.complete(chat("gone")), collect(engine, chat("gone"))):
            with pytest.raises(UpstreamError) as info:
                await call
            assert info.value.status == 502
            assert str(info.value).startswith(f"upstream {url} unreachable: ")
            assert SECRET not in str(info.value)
    finally:
        await engine.close()


async def test_url_password_never_in_errors() -> None:
    url = f"http://bob:hunter2@127.0.0.1:{free_port()}/v1"
    engine = UpstreamEngine({"gone": UpstreamRoute(url=url)})
    try:
        with pytest.raises(UpstreamError) as info:
            await engine.complete(chat("gone"))
        assert "hunter2" not in str(info.value)
    finally:
        await engine.close()


async def test_timeout_is_504(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    upstream.delay = 2.0
    for call in (engine.complete(chat("quick")), collect(engine, chat("quick"))):
        start = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await call
        assert info.value.status == 504
        assert time.monotonic() - start < 1.5


async def test_slow_stream_hits_the_total_timeout(
    engine: UpstreamEngine, upstream: FakeUpstream
) -> None:
    upstream.chunk_delay = 0.1  # every read is quick, the whole stream is not
    chunks: list[EngineChunk] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in engine.stream(chat("quick", text=" ".join("w" * 20))):
            chunks.append(chunk)
    assert info.value.status == 504
    assert chunks and all(c.finish_reason is None for c in chunks)


async def test_truncated_stream_raises(engine: UpstreamEngine, upstream: FakeUpstream) -> None:
    upstream.cut_stream = True
    chunks: list[EngineChunk] = []
    with pytest.raises(UpstreamError, match=r"before \[DONE\]") as info:
        async for chunk in engine.stream(chat()):
            chunks.append(chunk)
    assert info.value.status == 502
    assert joined(chunks) == ["three"]
    assert all(c.usage is None and c.finish_reason is None for c in chunks)


async def test_closed_engine_refuses(upstream: FakeUpstream) -> None:
    engine = UpstreamEngine({"m": route(upstream)})
    await engine.complete(chat("m"))
    await engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        await engine.complete(chat("m"))


async def test_stream_left_early_frees_the_connection(
    engine: UpstreamEngine, upstream: FakeUpstream
) -> None:
    async with aclosing(engine.stream(chat(text="a b c d e f"))) as chunks:
        async for chunk in chunks:
            assert chunk.text == "f"
            break
    result = await engine.complete(chat(text="a b"))
    assert result.choices[0].text == "b a"
