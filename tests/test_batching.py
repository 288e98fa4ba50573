"""Batched local generation (engines/batching.py): concurrent requests for one model run as
one padded batch and each gets what it gets alone; the queue is bounded and never hangs."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.tiny_model import build_tiny_model
from tests.training_fixtures import smollm2_dir  # noqa: F401  (the real model, once a session)
from yichui.errors import ChatTemplateError, EngineBusyError
from yichui.inference.engine import EngineRequest, EngineResult, GenerationParams, Message
from yichui.inference.engines import batching, local
from yichui.inference.engines.batching import BatchSettings, batcher
from yichui.inference.engines.local import LocalEngine
from yichui.inference.pool import ModelPool
from yichui.metrics import Metrics
from yichui.models.registry import ModelRegistry

A = "tiny/llama"
SMOL = "smollm2"
BIG = 1 << 30
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
    "1 2 3",
    "Hello",
    "A much longer prompt than the others, so that every other row is padded on the left",
    "Why",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build_tiny_model(tmp_path_factory.mktemp("tiny") / "a", seed=0)


@pytest.fixture
def models(registry: ModelRegistry, tiny: Path) -> ModelRegistry:
    shutil.copytree(tiny, registry.root / A)
    return registry


def engines(
    registry: ModelRegistry, metrics: Metrics | None = None, **batching: Any
) -> tuple[LocalEngine, LocalEngine]:
    """(batching, alone) on pools of their own."""
    settings = BatchSettings(metrics=metrics, **({"window": 0.05} | batching))
    return (
        LocalEngine(registry, ModelPool(budget_bytes=BIG), batching=settings),
        LocalEngine(registry, ModelPool(budget_bytes=BIG)),
    )


def completion(prompt: str, model: str = A, **params: Any) -> EngineRequest:
    p = GenerationParams(**({"max_tokens": 16, "temperature": 0.0} | params))
    return EngineRequest(model=model, kind="completion", params=p, prompt=prompt)


def batch_sizes(metrics: Metrics) -> list[float]:
    """The observed batch sizes' sum and count."""
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        if family.name == "yichui_engine_batch_size":
            found = {s.name: s.value for s in family.samples}
            return [
                found.get("yichui_engine_batch_size_sum", 0),
                found.get("yichui_engine_batch_size_count", 0),
            ]
    return [0, 0]


async def alone_and_together(
    batched: LocalEngine, alone: LocalEngine, requests: list[EngineRequest]
) -> tuple[list[EngineResult], list[EngineResult]]:
    singles = [await alone.complete(r) for r in requests]
    together = await asyncio.gather(*(batched.complete(r) for r in requests))
    return singles, list(together)


async def test_greedy_requests_batch_and_each_gets_its_own_answer(models: ModelRegistry) -> None:
    metrics = Metrics()
    batched, alone = engines(models, metrics)
    requests = [
        completion(p, max_tokens=4 + 3 * i) for i, p in enumerate(PROMPTS)
    ]  # each its own length
    singles, together = await alone_and_together(batched, alone, requests)
    assert together == singles
    assert {c.finish_reason for r in together for c in r.choices} == {"length"}
    assert [r.usage.completion_tokens for r in together] == [4 + 3 * i for i in range(6)]
    total, count = batch_sizes(metrics)
    assert total == len(requests) and count < len(requests)  # some ran together


async def test_parameters_keep_their_meaning_inside_a_batch(models: ModelRegistry) -> None:
    batched, alone = engines(models)
    probe = await alone.complete(completion(PROMPTS[0], max_tokens=24))
    text = probe.choices[0].text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 1) if text[i : i + 2].isascii())
    requests = [
        completion(PROMPTS[0], max_tokens=24, stop=(stop,)),
        completion(PROMPTS[1], max_tokens=12, presence_penalty=1.5, frequency_penalty=1.0),
        completion(PROMPTS[2], max_tokens=12, temperature=0.9, top_p=0.8, seed=7, n=3),
        completion(PROMPTS[3], max_tokens=10, temperature=1.2, seed=11),
        completion(PROMPTS[4], max_tokens=8, n=2),
    ]
    singles, together = await alone_and_together(batched, alone, requests)
    assert together == singles
    assert together[0].choices[0].finish_reason == "stop"
    assert stop not in together[0].choices[0].text
    assert len(together[2].choices) == 3


async def test_a_request_cancelled_inside_a_batch_frees_its_slot_and_the_rest_finish(
    models: ModelRegistry,
) -> None:
    """A request of 200 tokens cancelled after 2, in a batch with three of 40: the three
    answer as alone, and the cancelled row leaves the batch at the next chunk boundary: the
    model computes fewer row-steps than 4 rows x 40."""
    batched, alone = engines(models)
    long = completion(PROMPTS[0], max_tokens=200)
    others = [completion(p, max_tokens=40) for p in PROMPTS[1:4]]
    singles = [await alone.complete(r) for r in others]
    rows = [0]

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows[0] += int(kwargs["input_ids"].shape[0])

    async with batched.pool.use(A, models.root / A, _fingerprint(models)) as loaded:
        loaded.model.register_forward_pre_hook(count, with_kwargs=True)

    async def cancelled() -> int:
        seen = 0
        async with contextlib.aclosing(batched.stream(long)) as chunks:
            async for chunk in chunks:
                seen += bool(chunk.text)
                if seen == 2:
                    break  # the client went away
        return seen

    results = await asyncio.gather(cancelled(), *(batched.complete(r) for r in others))
    assert results[0] == 2
    assert list(results[1:]) == singles
    assert rows[0] <= 4 * batching.CHUNK + 3 * (40 - batching.CHUNK) + 4, rows  # < 4 x 40
    # and the model is free again: the next request runs
    assert await batched.complete(others[0]) == singles[0]


def _fingerprint(models: ModelRegistry) -> str:
    from yichui.models.targets import resolve_target

    return resolve_target(models, A).fingerprint


async def test_a_request_that_cannot_be_built_fails_alone(
    models: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt that fails to build (as a chat template refusing the messages does) fails its
    own request; the others of its batch answer as alone."""
    real = local._inputs

    def inputs(loaded: Any, request: EngineRequest) -> Any:
        if request.prompt == "refused":
            raise ChatTemplateError(A, "roles must alternate")
        return real(loaded, request)

    monkeypatch.setattr(local, "_inputs", inputs)
    batched, alone = engines(models)
    good = [completion(p, max_tokens=8) for p in PROMPTS[:3]]
    singles = [await alone.complete(r) for r in good]
    results = await asyncio.gather(
        *(batched.complete(r) for r in [good[0], completion("refused"), *good[1:]]),
        return_exceptions=True,
    )
    assert isinstance(results[1], ChatTemplateError)
    assert [results[0], *results[2:]] == singles


async def test_the_queue_is_bounded_and_a_long_wait_is_refused(
    models: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = Metrics()
    batched, _ = engines(models, metrics, max_size=1, queue_max=2, queue_timeout=0.5, window=0)
    gate = threading.Event()  # the first batch runs until the test opens it, however fast
    real_run = batching.run_batch

    def held(*args: Any) -> Any:
        gate.wait(30)
        return real_run(*args)

    monkeypatch.setattr(batching, "run_batch", held)
    first = asyncio.ensure_future(batched.complete(completion(PROMPTS[0])))
    while not _running(batched):
        await asyncio.sleep(0.01)
    waiting = [asyncio.ensure_future(batched.complete(completion(p))) for p in PROMPTS[1:3]]
    await asyncio.sleep(0.05)
    with pytest.raises(EngineBusyError) as full:
        await batched.complete(completion(PROMPTS[3]))
    assert full.value.status == 503 and full.value.retry_after >= 1
    assert "batch_queue_max" in str(full.value)
    for task in waiting:  # waited past batch_queue_timeout without starting: 503, no hang
        with pytest.raises(EngineBusyError, match="batch_queue_timeout"):
            await task
    gate.set()
    assert (await first).choices[0].finish_reason in ("length", "stop")
    text = metrics.exposition().decode()
    assert 'yichui_engine_queue_rejected_total{model="tiny/llama",reason="full"} 1.0' in text
    assert 'yichui_engine_queue_rejected_total{model="tiny/llama",reason="timeout"} 2.0' in text
    assert 'yichui_engine_queue_depth{model="tiny/llama"} 0.0' in text


def _running(engine: LocalEngine) -> bool:
    loaded = [m for m in engine.pool._models.values()]
    return any(m.lock.locked() for m in loaded)


@pytest.mark.slow
async def test_greedy_in_a_batch_is_token_identical_on_the_real_model(
    registry: ModelRegistry,
    smollm2_dir: Path,  # noqa: F811
) -> None:
    """The bundled SmolLM2 (float32 on CPU): 6 distinct chat questions at once, each the same
    text as alone, with their natural ends (EOS) inside the batch."""
    shutil.copytree(smollm2_dir, registry.root / SMOL)
    metrics = Metrics()
    batched, alone = engines(registry, metrics)
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "hi",
        "Translate 'good morning' into Spanish.",
        "What is 2+2?",
    ]
    requests = [
        EngineRequest(
            model=SMOL,
            kind="chat",
            params=GenerationParams(max_tokens=40, temperature=0.0),
            messages=(Message("user", q),),
        )
        for q in questions
    ]
    singles, together = await alone_and_together(batched, alone, requests)
    assert together == singles
    assert "stop" in {c.finish_reason for r in together for c in r.choices}
    _, count = batch_sizes(metrics)
    assert count < len(requests)


def test_a_models_batcher_is_made_once() -> None:
    settings = BatchSettings()
    loaded: Any = type("Loaded", (), {"batcher": None, "name": A})()
    assert batcher(loaded, settings) is batcher(loaded, settings)
