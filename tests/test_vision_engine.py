"""The vision engine on tiny random-weights LLaVA, Qwen2-VL and Idefics3 models (fast, CPU),
and the pool it shares with the text engine."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.images import image_part, png
from tests.tiny_model import build_tiny_model
from tests.vision_models import FAMILIES
from yichui.inference.engine import (
    EngineChunk,
    EngineRequest,
    GenerationParams,
    ImagePart,
    Message,
)
from yichui.inference.engines import local
from yichui.inference.engines.local import LocalEngine
from yichui.inference.engines.vision import VisionEngine, bound_visual_tokens
from yichui.inference.pool import ModelPool, estimate_bytes
from yichui.ml.loading import load_processor
from yichui.models.registry import ModelRegistry
from yichui.models.status import MANIFEST
from yichui.runtime import Runtime

TEXT = "tiny/llama"
GREEDY = GenerationParams(max_tokens=12, temperature=0.0)
BIG = 1 << 30
MAX_PIXELS = 28 * 28 * 16  # Qwen2-VL: at most 16 image tokens (one per 28x28 pixels)
MIN_PIXELS = 28 * 28 * 4
QUESTION = "What is in this picture?"


def name(family: str) -> str:
    return f"tiny/{family.replace('_', '-')}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per family and a tiny text model, built once per module."""
    root = tmp_path_factory.mktemp("vision")
    out = {name(family): build(root / family) for family, build in FAMILIES.items()}
    out[TEXT] = build_tiny_model(root / "text")
    return out


@pytest.fixture
def models(registry: ModelRegistry, built: dict[str, Path]) -> ModelRegistry:
    """The registry with every tiny model under the models root."""
    for model, folder in built.items():
        shutil.copytree(folder, registry.root / model)
    return registry


@pytest.fixture
def pool() -> ModelPool:
    return ModelPool(budget_bytes=BIG, device="cpu")


@pytest.fixture
def engine(models: ModelRegistry, pool: ModelPool) -> VisionEngine:
    return VisionEngine(models, pool, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)


@pytest.fixture(params=list(FAMILIES))
def model(request: pytest.FixtureRequest) -> str:
    return name(str(request.param))


@pytest.fixture(scope="module")
def picture() -> ImagePart:
    return image_part(png(100, 80, seed=3))


def ask(
    model: str,
    *content: str | ImagePart,
    params: GenerationParams = GREEDY,
    system: str | None = None,
) -> EngineRequest:
    messages = (Message("system", system),) if system else ()
    parts = content or (QUESTION,)
    messages += (Message("user", parts),)
    return EngineRequest(model=model, kind="chat", params=params, messages=messages)


async def collect(engine: VisionEngine, request: EngineRequest) -> list[EngineChunk]:
    return [chunk async for chunk in engine.stream(request)]


def joined(chunks: list[EngineChunk], index: int = 0) -> str:
    return "".join(c.text for c in chunks if c.index == index)


def sampled(seed: int, n: int = 1) -> GenerationParams:
    return GenerationParams(max_tokens=10, temperature=1.0, seed=seed, n=n)


# -- generation, per family ---------------------------------------------------------------------
async def test_image_question_is_answered(
    engine: VisionEngine, model: str, picture: ImagePart
) -> None:
    request = ask(model, picture, QUESTION, system="Be brief.")
    first = await engine.complete(request)
    (choice,) = first.choices
    assert choice.text.strip(), "a random model should write visible text"
    assert await engine.complete(request) == first  # greedy: the same every time
    chunks = await collect(engine, request)
    assert joined(chunks) == choice.text
    assert chunks[-1].usage == first.usage
    # the image's tokens are counted in the prompt
    text_only = await engine.complete(ask(model, QUESTION, system="Be brief."))
    assert text_only.choices[0].text.strip()
    assert first.usage.prompt_tokens > text_only.usage.prompt_tokens + 3
    assert text_only.choices[0].text != choice.text  # the image made a difference


async def test_greedy_is_transformers_greedy(
    engine: VisionEngine, pool: ModelPool, models: ModelRegistry, model: str, picture: ImagePart
) -> None:
    """Every processor output reaches generate, and our processors change nothing."""
    ours = await engine.complete(ask(model, picture, QUESTION))
    status = models.status(model).status
    path, fp = Path(str(status.path)), str(status.fingerprint)
    async with pool.use(model, path, fp, kind="multimodal") as loaded:
        image = picture.image.convert("RGB")
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}],
            }
        ]
        inputs = loaded.processor.apply_chat_template(
            conversation,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        out = loaded.model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
        prompt = inputs["input_ids"].shape[1]
        theirs = loaded.tokenizer.decode(out[0, prompt:], skip_special_tokens=True)
    assert pool.loads == 1  # the engine's load, shared
    assert ours.choices[0].text == theirs
    assert ours.usage.prompt_tokens == prompt


async def test_sampling_is_seeded(engine: VisionEngine, model: str, picture: ImagePart) -> None:
    one = await engine.complete(ask(model, picture, params=sampled(1)))
    assert await engine.complete(ask(model, picture, params=sampled(1))) == one
    others = {
        (await engine.complete(ask(model, picture, params=sampled(s)))).choices[0].text
        for s in (2, 3)
    }
    assert others - {one.choices[0].text}, "different seeds should give different samples"
    # n sampled choices, one after another with one generator: reproducible, and different
    two = await engine.complete(ask(model, picture, params=sampled(5, n=2)))
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text != two.choices[1].text
    assert await engine.complete(ask(model, picture, params=sampled(5, n=2))) == two
    chunks = await collect(engine, ask(model, picture, params=sampled(5, n=2)))
    assert [joined(chunks, i) for i in (0, 1)] == [c.text for c in two.choices]
    # greedy n: one row, copied
    greedy = await engine.complete(ask(model, picture, params=replace(GREEDY, n=2)))
    assert greedy.choices[0].text == greedy.choices[1].text
    single = await engine.complete(ask(model, picture))
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens


async def test_stop_string_cuts(engine: VisionEngine, model: str, picture: ImagePart) -> None:
    full = (await engine.complete(ask(model, picture))).choices[0].text
    stop = next(
        full[i : i + 2]
        for i in range(2, len(full) - 1)
        if full[i : i + 2].isascii() and full[i : i + 2].isprintable()
    )
    request = ask(model, picture, params=replace(GREEDY, stop=(stop,)))
    result = await engine.complete(request)
    assert result.choices[0].text == full[: full.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    assert joined(await collect(engine, request)) == result.choices[0].text


async def test_card_and_binding(
    engine: VisionEngine, pool: ModelPool, models: ModelRegistry, model: str
) -> None:
    bound = await engine.bind(model)
    assert bound is not None
    card = bound.card
    assert card.accepts_images and card.id == model
    assert card.options == {"vision_max_pixels": MAX_PIXELS, "vision_min_pixels": MIN_PIXELS}
    assert card.meta["modalities"] == ["text", "image"]
    assert card.meta["kind"] == "multimodal" and card.meta["engine"] == "local"
    assert card.fingerprint == models.status(model).status.fingerprint
    # each engine serves its own kind only
    text_engine = LocalEngine(models, pool)
    assert await text_engine.bind(model) is None
    assert await engine.bind(TEXT) is None
    assert model in {c.id for c in await engine.cards()}
    assert TEXT not in {c.id for c in await engine.cards()}
    assert model not in {c.id for c in await text_engine.cards()}


# -- visual-token bounds ------------------------------------------------------------------------
async def test_qwen2_vl_tokens_grow_with_the_image_up_to_the_bound(engine: VisionEngine) -> None:
    model = name("qwen2_vl")

    async def prompt_tokens(width: int, height: int) -> int:
        request = ask(
            model, image_part(png(width, height)), QUESTION, params=replace(GREEDY, max_tokens=1)
        )
        return (await engine.complete(request)).usage.prompt_tokens

    text = (
        await engine.complete(ask(model, QUESTION, params=replace(GREEDY, max_tokens=1)))
    ).usage.prompt_tokens
    # the image: vision start and end around one token per 28x28 pixels
    tiny, middle, large, huge = [
        await prompt_tokens(w, h) for w, h in ((20, 20), (84, 84), (140, 140), (900, 700))
    ]
    assert tiny - text == 2 + MIN_PIXELS // (28 * 28)  # scaled up to vision_min_pixels
    assert middle - text == 2 + 9
    assert tiny < middle < large
    assert large - text <= 2 + MAX_PIXELS // (28 * 28)
    assert huge - text <= 2 + MAX_PIXELS // (28 * 28)  # bounded by vision_max_pixels
    assert huge - text >= 2 + MAX_PIXELS // (28 * 28) // 2


async def test_low_detail_looks_at_fewer_pixels(models: ModelRegistry, pool: ModelPool) -> None:
    engine = VisionEngine(models, pool, max_pixels=700 * 700, min_pixels=MIN_PIXELS)
    data = png(700, 700)
    params = replace(GREEDY, max_tokens=1)
    model = name("qwen2_vl")
    high = await engine.complete(ask(model, image_part(data, "high"), params=params))
    low = await engine.complete(ask(model, image_part(data, "low"), params=params))
    assert high.usage.prompt_tokens - low.usage.prompt_tokens > 100
    assert low.usage.prompt_tokens - 20 <= 512 * 512 // (28 * 28)


async def test_idefics3_splits_within_the_bound(models: ModelRegistry, picture: ImagePart) -> None:
    model = name("idefics3")

    async def prompt_tokens(max_pixels: int) -> int:
        engine = VisionEngine(
            models, ModelPool(budget_bytes=BIG), max_pixels=max_pixels, min_pixels=1
        )
        return (
            await engine.complete(ask(model, picture, params=replace(GREEDY, max_tokens=1)))
        ).usage.prompt_tokens

    split = await prompt_tokens(MAX_PIXELS)  # 112x112: 4 tiles of 56x56 and a global view
    one_tile = await prompt_tokens(56 * 56)  # one tile: no splitting
    assert split - one_tile >= 4 * 4


def test_bound_visual_tokens(built: dict[str, Path]) -> None:
    qwen = load_processor(built[name("qwen2_vl")], "qwen")
    bound_visual_tokens(qwen, 1000, 2000)
    size = qwen.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (1000, 2000)
    idefics = load_processor(built[name("idefics3")], "idefics")
    bound_visual_tokens(idefics, 1, 3 * 56 * 56)  # sqrt: 97 pixels, one whole 56-pixel tile
    assert idefics.image_processor.do_image_splitting is False
    idefics = load_processor(built[name("idefics3")], "idefics")
    bound_visual_tokens(idefics, 1, 10**8)  # beyond the model's own size: its own stays
    assert idefics.image_processor.size.longest_edge == 112
    assert idefics.image_processor.do_image_splitting is True
    llava = load_processor(built[name("llava")], "llava")
    before = dict(llava.image_processor.to_dict())
    bound_visual_tokens(llava, 1, 100)
    assert llava.image_processor.to_dict() == before  # fixed resolution: nothing to bound


# -- other prompts ------------------------------------------------------------------------------
async def test_completion_and_fallback_prompt(
    engine: VisionEngine, models: ModelRegistry, picture: ImagePart
) -> None:
    model = name("llava")
    completion = EngineRequest(model=model, kind="completion", params=GREEDY, prompt="Once upon")
    assert (await engine.complete(completion)).choices[0].text.strip()
    with_template = await engine.complete(ask(model, picture, QUESTION))
    (models.root / model / "chat_template.jinja").unlink()  # a processor without a template
    other = VisionEngine(
        models, ModelPool(budget_bytes=BIG), max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS
    )
    fallback = await other.complete(ask(model, picture, QUESTION))
    assert fallback.choices[0].text.strip()
    # "User: <image>What is in this picture?\nAssistant:" with the image's 16 tokens
    assert fallback.usage.prompt_tokens > 16
    assert fallback.usage.prompt_tokens != with_template.usage.prompt_tokens


# -- the shared pool ----------------------------------------------------------------------------
async def test_text_and_vision_models_share_the_budget(
    models: ModelRegistry, built: dict[str, Path], picture: ImagePart
) -> None:
    sizes = {m: estimate_bytes(built[m], 4) for m in (TEXT, name("qwen2_vl"))}
    pool = ModelPool(budget_bytes=max(sizes.values()) * 3 // 2, device="cpu")
    text_engine = LocalEngine(models, pool)
    vision = VisionEngine(models, pool, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    text_request = EngineRequest(model=TEXT, kind="completion", params=GREEDY, prompt="Hello")
    await text_engine.complete(text_request)
    await vision.complete(ask(name("qwen2_vl"), picture))
    assert pool.loaded() == [name("qwen2_vl")] and pool.evictions == 1  # the text model went
    # the fleet view: the text engine reports the whole pool, once
    snapshot = text_engine.loaded()
    assert [row["model"] for row in snapshot.models] == [name("qwen2_vl")]
    assert snapshot.budget == pool.budget_bytes
    assert not hasattr(vision, "loaded")
    await text_engine.complete(text_request)
    assert pool.loaded() == [TEXT] and pool.evictions == 2


def test_the_seam_builds_both_engines_on_one_pool(runtime: Runtime) -> None:
    (text_engine,) = local.engines(runtime)  # one for the router: a name is resolved once
    assert isinstance(text_engine, LocalEngine)
    (vision,) = text_engine.peers
    assert isinstance(vision, VisionEngine)
    assert text_engine.pool is vision.pool
    assert vision.max_pixels == runtime.settings.vision_max_pixels
    assert vision.min_pixels == runtime.settings.vision_min_pixels
    assert text_engine.name == vision.name == "local"


# -- an adapter on a vision model ---------------------------------------------------------------
@pytest.fixture
def adapter(models: ModelRegistry, tmp_path: Path) -> Iterator[str]:
    """A LoRA adapter (random, non-zero) on the tiny Qwen2-VL, in the registry."""
    import json

    from peft import LoraConfig, get_peft_model

    from yichui.ml.loading import load_model

    base = name("qwen2_vl")
    model = load_model(models.root / base, base, device="cpu", dtype="float32", kind="multimodal")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = models.root / "tiny/qwen-lora"
    get_peft_model(model, lora).save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps({"base": base}))
    yield f"{base}@tiny/qwen-lora"


async def test_adapter_on_a_vision_model(
    engine: VisionEngine, adapter: str, picture: ImagePart
) -> None:
    bound = await engine.bind(adapter)
    assert bound is not None and bound.card.accepts_images
    assert bound.card.meta["adapter"] == "tiny/qwen-lora"
    on_adapter = await engine.complete(ask(adapter, picture))
    on_base = await engine.complete(ask(name("qwen2_vl"), picture))
    assert on_adapter.choices[0].text.strip()
    assert on_adapter.choices[0].text != on_base.choices[0].text
    assert on_adapter.usage.prompt_tokens == on_base.usage.prompt_tokens
