"""The local engine and the warm model pool, on tiny random-weights Llamas (fast, CPU)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.images import image_part, png
from tests.tiny_model import build_tiny_model
from yichui.errors import (
    ChatTemplateError,
    ImagesNotAcceptedError,
    ModelLoadError,
    ModelNotFoundError,
)
from yichui.inference.engine import (
    EngineChunk,
    EngineRequest,
    GenerationParams,
    Message,
)
from yichui.inference.engines.local import LocalEngine
from yichui.inference.pool import ModelPool, estimate_bytes
from yichui.ml.prompts import fallback_chat_prompt
from yichui.models.registry import ModelRegistry
from yichui.models.targets import Target

A = "tiny/llama"
B = "tiny/llama-b"
PROMPT = "The quick brown fox"
GREEDY = GenerationParams(max_tokens=24, temperature=0.0)
BIG = 1 << 30


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two tiny models (different weights) and a broken folder, built once per module."""
    root = tmp_path_factory.mktemp("tiny")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    yield {
        A: build_tiny_model(root / "a", seed=0),
        B: build_tiny_model(root / "b", seed=1),
        "broken": broken,
    }


@pytest.fixture
def models(registry: ModelRegistry, built: dict[str, Path]) -> ModelRegistry:
    """The registry with both tiny models under the models root."""
    for name in (A, B):
        shutil.copytree(built[name], registry.root / name)
    return registry


@pytest.fixture
def pool() -> ModelPool:
    return ModelPool(budget_bytes=BIG)


@pytest.fixture
def engine(models: ModelRegistry, pool: ModelPool) -> LocalEngine:
    return LocalEngine(models, pool)


def completion(params: GenerationParams = GREEDY, prompt: str = PROMPT, model: str = A) -> Any:
    return EngineRequest(model=model, kind="completion", params=params, prompt=prompt)


def chat(params: GenerationParams = GREEDY, content: Any = "Hello there") -> EngineRequest:
    return EngineRequest(model=A, kind="chat", params=params, messages=(Message("user", content),))


async def collect(engine: LocalEngine, request: EngineRequest) -> list[EngineChunk]:
    return [chunk async for chunk in engine.stream(request)]


def joined(chunks: list[EngineChunk], index: int = 0) -> str:
    return "".join(c.text for c in chunks if c.index == index)


def tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def ascii_stop(text: str) -> str:
    """Two printable ASCII characters from the middle of ``text`` (random models also write
    pieces of UTF-8 characters, which make poor stop strings)."""
    for i in range(3, len(text) - 1):
        piece = text[i : i + 2]
        if piece.isascii() and piece.isprintable():
            return piece
    raise AssertionError(f"no ASCII stop string in {text!r}")


# -- generation ---------------------------------------------------------------------------------
async def test_greedy_is_deterministic_and_stream_matches(engine: LocalEngine) -> None:
    first = await engine.complete(completion())
    second = await engine.complete(completion())
    assert first == second
    (choice,) = first.choices
    assert len(choice.text) >= 5, "the tiny model should not stop at once"
    assert choice.finish_reason == "length"
    chunks = await collect(engine, completion())
    assert joined(chunks) == choice.text
    assert len([c for c in chunks if c.text]) > 1  # it really streamed
    finishes = [c for c in chunks if c.finish_reason]
    assert [(c.index, c.finish_reason) for c in finishes] == [(0, "length")]
    assert chunks[-1].usage == first.usage
    assert chunks.index(finishes[0]) > max(i for i, c in enumerate(chunks) if c.text)


async def test_greedy_is_transformers_greedy(
    engine: LocalEngine, pool: ModelPool, models: ModelRegistry
) -> None:
    """Our processors and criteria change nothing when no parameter asks them to."""
    ours = (await engine.complete(completion())).choices[0].text
    status = models.status(A).status
    async with pool.use(A, Path(str(status.path)), str(status.fingerprint)) as loaded:
        ids = loaded.tokenizer(PROMPT, return_tensors="pt")
        out = loaded.model.generate(**ids, max_new_tokens=GREEDY.max_tokens, do_sample=False)
        theirs = loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert pool.loads == 1
    assert ours == theirs


async def test_seeded_sampling_is_reproducible(engine: LocalEngine) -> None:
    def seeded(seed: int) -> EngineRequest:
        return completion(GenerationParams(max_tokens=12, temperature=1.0, seed=seed))

    one = await engine.complete(seeded(1))
    assert (await engine.complete(seeded(1))) == one
    assert joined(await collect(engine, seeded(1))) == one.choices[0].text
    others = {(await engine.complete(seeded(s))).choices[0].text for s in (2, 3, 4)}
    assert others - {one.choices[0].text}, "different seeds should give different samples"


async def test_unseeded_sampling_and_top_p(engine: LocalEngine) -> None:
    for params in (
        GenerationParams(max_tokens=8, temperature=0.7),
        GenerationParams(max_tokens=8, temperature=1.3, top_p=0.5),
    ):
        result = await engine.complete(completion(params))
        assert result.choices[0].text
        # sampling may draw EOS early (its row is only shrunk): then the choice says so
        tokens, finish = result.usage.completion_tokens, result.choices[0].finish_reason
        assert (tokens, finish) == (8, "length") or (1 <= tokens < 8 and finish == "stop")


async def test_max_tokens_ends_with_length(engine: LocalEngine, built: dict[str, Path]) -> None:
    result = await engine.complete(completion(replace(GREEDY, max_tokens=5)))
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 5
    tok = tokenizer(built[A])
    assert result.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    longer = await engine.complete(completion())
    assert longer.choices[0].text.startswith(result.choices[0].text)


async def test_stop_string_cuts_the_text(engine: LocalEngine) -> None:
    full = (await engine.complete(completion())).choices[0].text
    stop = ascii_stop(full)
    expected = full[: full.index(stop)]
    request = completion(replace(GREEDY, stop=("never-written", stop)))
    result = await engine.complete(request)
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < GREEDY.max_tokens
    chunks = await collect(engine, request)
    assert joined(chunks) == expected
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


async def test_penalties_change_greedy_output(engine: LocalEngine) -> None:
    plain = (await engine.complete(completion())).choices[0].text
    for penalties in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        params = replace(GREEDY, **penalties)
        penalized = (await engine.complete(completion(params))).choices[0].text
        assert penalized != plain, penalties
        assert joined(await collect(engine, completion(params))) == penalized


async def test_n_choices(engine: LocalEngine) -> None:
    sampled = await engine.complete(
        completion(GenerationParams(max_tokens=6, temperature=1.0, n=3, seed=7))
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) > 1
    assert sampled.usage.completion_tokens == 18
    chunks = await collect(
        engine, completion(GenerationParams(max_tokens=6, temperature=1.0, n=3, seed=7))
    )
    assert [joined(chunks, i) for i in range(3)] == [c.text for c in sampled.choices]
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2]

    greedy = await engine.complete(completion(replace(GREEDY, n=3, max_tokens=6)))
    assert len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == 18
    single = await engine.complete(completion(replace(GREEDY, max_tokens=6)))
    assert greedy.choices[0].text == single.choices[0].text


async def test_chat_uses_the_template(engine: LocalEngine, built: dict[str, Path]) -> None:
    result = await engine.complete(chat())
    assert result.choices[0].text
    tok = tokenizer(built[A])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    assert result.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    plain = await engine.complete(completion(prompt="Hello there"))
    assert plain.usage.prompt_tokens < result.usage.prompt_tokens
    # text parts of a message count as its text
    parts = await engine.complete(chat(content=("Hello ", "there")))
    assert parts == result


async def test_chat_without_template_and_refusing_template(
    models: ModelRegistry, pool: ModelPool, built: dict[str, Path]
) -> None:
    engine = LocalEngine(models, pool)
    plain, strict = "tiny/no-template", "tiny/strict"
    for name in (plain, strict):
        shutil.copytree(built[A], models.root / name)
    (models.root / plain / "chat_template.jinja").unlink()
    (models.root / strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    messages = (Message("system", "Be brief."), Message("user", "Hi!"))

    result = await engine.complete(
        EngineRequest(model=plain, kind="chat", params=GREEDY, messages=messages)
    )
    expected = fallback_chat_prompt(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    )
    assert expected == "System: Be brief.\nUser: Hi!\nAssistant:"
    assert result.usage.prompt_tokens == len(tokenizer(built[A])(expected)["input_ids"])

    with pytest.raises(ChatTemplateError, match="no system messages") as info:
        await engine.complete(
            EngineRequest(model=strict, kind="chat", params=GREEDY, messages=messages)
        )
    assert isinstance(info.value, ValueError)


async def test_images_are_refused(engine: LocalEngine, pool: ModelPool) -> None:
    image = image_part(png(8, 8))
    with pytest.raises(ImagesNotAcceptedError, match="does not accept images") as info:
        await engine.complete(chat(content=("What is this?", image)))
    assert isinstance(info.value, ValueError)
    assert info.value.hint and "local" in info.value.hint
    assert pool.loads == 0  # refused before loading anything


async def test_unknown_model(engine: LocalEngine) -> None:
    with pytest.raises(ModelNotFoundError):
        await engine.complete(completion(model="tiny/nope"))


async def test_stream_closed_early_frees_the_model(engine: LocalEngine, pool: ModelPool) -> None:
    stream = engine.stream(completion(replace(GREEDY, max_tokens=200)))
    first = await anext(stream)
    assert first.text
    await stream.aclose()
    (stats,) = pool.stats()["models"]
    assert stats["in_use"] == 0
    assert (await engine.complete(completion())).choices[0].text


def test_card(models: ModelRegistry) -> None:
    status = models.status(A).status
    card = LocalEngine.card(Target(A, status))
    assert card.id == A and card.owned_by == "yichui"
    assert card.fingerprint == status.fingerprint and card.fingerprint
    assert card.created == int(status.modified or 0) > 0
    assert not card.accepts_images
    assert status.kind == "text"


async def test_changed_model_is_reloaded(
    engine: LocalEngine, pool: ModelPool, models: ModelRegistry
) -> None:
    before = await engine.complete(completion())
    assert (await engine.complete(completion())) == before
    assert pool.loads == 1
    # "re-downloaded": other weights in the same folder, and the registry sees it
    build_tiny_model(models.root / A, seed=5)
    models.status(A, refresh=True)
    after = await engine.complete(completion())
    assert pool.loads == 2 and pool.loaded() == [A]
    assert after != before


# -- the pool -----------------------------------------------------------------------------------
async def test_concurrent_first_requests_load_once(engine: LocalEngine, pool: ModelPool) -> None:
    results = await asyncio.gather(*(engine.complete(completion()) for _ in range(10)))
    assert pool.loads == 1
    assert len({r.choices[0].text for r in results}) == 1
    stats = pool.stats()
    assert stats["loaded"] == [A] and stats["loads"] == 1 and stats["evictions"] == 0
    # the nine others waited for the one load: not hits; a request now is one
    assert stats["hits"] == 0 and stats["models"][0]["in_use"] == 0
    await engine.complete(completion())
    assert pool.hits == 1 and pool.loads == 1
    await engine.close()
    assert pool.loaded() == [] and pool.nbytes == 0


async def test_lru_eviction(built: dict[str, Path]) -> None:
    one = estimate_bytes(built[A], 4)
    pool = ModelPool(budget_bytes=one * 3 // 2, device="cpu", dtype="float32")
    async with pool.use(A, built[A], "fp-a") as a:
        assert a.nbytes == one  # the estimate from the headers is exact for float32
        assert a.device == "cpu" and a.dtype == "float32"
    async with pool.use(B, built[B], "fp-b"):
        pass
    assert pool.loaded() == [B] and pool.evictions == 1
    async with pool.use(B, built[B], "fp-b"):
        pass
    assert pool.loads == 2 and pool.hits == 1
    # the same, as Prometheus sees it
    scrape = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(pool.metrics.exposition().decode())
        for s in family.samples
    }
    assert scrape[("yichui_pool_loads_total", (("model", A),))] == 1
    assert scrape[("yichui_pool_loads_total", (("model", B),))] == 1
    assert scrape[("yichui_pool_evictions_total", (("model", A),))] == 1
    assert ("yichui_pool_evictions_total", (("model", B),)) not in scrape
    assert scrape[("yichui_pool_load_seconds_count", (("model", B),))] == 1
    assert scrape[("yichui_pool_memory_bytes", ())] == pool.nbytes == one
    assert scrape[("yichui_pool_budget_bytes", ())] == one * 3 // 2
    assert scrape[("yichui_pool_models", ())] == 1


async def test_model_in_use_is_not_evicted(built: dict[str, Path]) -> None:
    pool = ModelPool(budget_bytes=estimate_bytes(built[A], 4) * 3 // 2)
    async with pool.use(A, built[A], "fp-a"):
        async with pool.use(B, built[B], "fp-b"):
            assert sorted(pool.loaded()) == [A, B]
            assert pool.nbytes > pool.budget_bytes
        assert sorted(pool.loaded()) == [A, B]  # A is still in use
    # everything released: back within budget, the most recently released model kept
    assert pool.loaded() == [A] and pool.evictions == 1


async def test_model_bigger_than_budget_still_loads(
    built: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    pool = ModelPool(budget_bytes=1000)
    async with pool.use(A, built[A], "fp-a"):
        pass
    assert pool.loaded() == [A]
    assert "loading it anyway" in caplog.text
    async with pool.use(A, built[A], "fp-a"):  # kept: a hit, not a reload
        pass
    assert pool.loads == 1
    async with pool.use(B, built[B], "fp-b"):
        pass
    assert pool.loaded() == [B] and pool.evictions == 1


async def test_fingerprint_change_reloads(built: dict[str, Path]) -> None:
    pool = ModelPool(budget_bytes=BIG)
    async with pool.use(A, built[A], "fp-1") as first:
        pass
    async with pool.use(A, built[A], "fp-1"):
        pass
    async with pool.use(A, built[A], "fp-2") as second:
        pass
    assert pool.loads == 2 and second is not first and pool.loaded() == [A]
    assert second.fingerprint == "fp-2" and first.model is None  # the old weights let go


async def test_failed_load_reaches_every_waiter_and_is_retried(
    built: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(built["broken"], folder)
    pool = ModelPool(budget_bytes=BIG)

    async def use() -> None:
        async with pool.use("broken", folder, "fp"):
            pass

    results = await asyncio.gather(*(use() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ModelLoadError) for r in results), results
    assert len({id(r) for r in results}) == 1  # one load, its error given to all
    assert pool.loads == 0 and pool.loaded() == [] and pool.stats()["loading"] == []
    # repaired: the next request loads it (the failure was not kept)
    shutil.rmtree(folder)
    shutil.copytree(built[A], folder)
    await use()
    assert pool.loads == 1 and pool.loaded() == ["broken"]


async def test_cancelled_first_waiter_does_not_cancel_the_load(
    built: dict[str, Path],
) -> None:
    pool = ModelPool(budget_bytes=BIG)

    async def use() -> int:
        async with pool.use(A, built[A], "fp") as loaded:
            return loaded.nbytes

    first = asyncio.ensure_future(use())
    second = asyncio.ensure_future(use())
    await asyncio.sleep(0)
    first.cancel()
    assert await second > 0
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert pool.loads == 1


def test_pool_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="dtype"):
        ModelPool(budget_bytes=BIG, dtype="int3")
    with pytest.raises(ValueError, match="budget"):
        ModelPool(budget_bytes=0)
