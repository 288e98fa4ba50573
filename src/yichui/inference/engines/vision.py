"""The engine for vision-language models of the registry (kind ``multimodal``), in this process.

::

    engine = VisionEngine(registry, pool, max_pixels=settings.vision_max_pixels,
                          min_pixels=settings.vision_min_pixels)
    result = await engine.complete(request)      # messages with ImagePart values

It shares the text engine's pool (one memory budget and eviction order: :func:`.local.engines`
builds both) and its generation (:mod:`.generation`: sampling, penalties, stop strings,
streaming, cancelling). What differs:

- A model loads with its processor (:func:`yichui.ml.loading.load_processor`), whose image
  processor is then bounded by the settings (:func:`bound_visual_tokens`): Qwen2-VL-like
  processors look at ``vision_min_pixels`` to ``vision_max_pixels`` pixels (one token per
  28x28 pixels); Idefics3/SmolVLM-like ones split an image into at most
  ``vision_max_pixels`` pixels of tiles (one tile, no splitting, when that is all the budget
  holds); fixed-resolution ones (LLaVA) need nothing. Before the processor every image is
  scaled down to ``vision_max_pixels`` (:func:`yichui.ml.images.fit`), and to 512x512 pixels
  for ``detail: "low"``. The bounds change the answer, so they are the card's ``options``
  (the response cache keys on them).
- A chat becomes the processor's chat format (content parts ``{"type": "image", "image":
  <PIL image>}`` and ``{"type": "text", "text": ...}``, every message as parts) through
  ``processor.apply_chat_template``; a processor without a chat template gets
  :func:`~yichui.ml.prompts.fallback_chat_prompt` with the processor's image token where each
  image was. Every tensor the processor makes (``pixel_values``, ``image_grid_thw``,
  ``pixel_attention_mask``...) goes to ``generate``. A completion's prompt is text only.
- ``usage.prompt_tokens`` counts the prompt as the model reads it: image tokens included.
- Sampled ``n > 1`` choices run one after another with the request's one generator (pixel
  tensors are not laid out one image per row in every family, so rows are not repeated);
  greedy choices are one row, copied.

The engine's name is ``local``, as the text engine's: the fleet view (``yichui ps``) lists
every model of the shared pool under it (the text engine reports the pool).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from yichui.errors import ChatTemplateError, RequestError
from yichui.inference.engine import (
    EngineChunk,
    EngineRequest,
    ImagePart,
    Message,
    ModelCard,
)
from yichui.inference.engines.batching import BatchSettings
from yichui.inference.engines.generation import Generation, ModelInputs
from yichui.inference.engines.pooled import (
    PooledEngine,
    card_meta,
    check_params,
    created,
    paths,
)
from yichui.inference.pool import LoadedModel, ModelPool
from yichui.ml import prompts
from yichui.ml.images import fit
from yichui.ml.vision_inputs import bound_visual_tokens
from yichui.models.registry import ModelRegistry
from yichui.models.targets import Target

LOW_DETAIL_PIXELS = 512 * 512
"""Most pixels of an image sent with ``detail: "low"`` (OpenAI's low-resolution view)."""


class VisionEngine(PooledEngine):
    """The :class:`~yichui.inference.engine.Engine` for the registry's vision-language models
    (and ``base@adapter`` on one), loaded into ``pool`` with their processors; images are
    looked at with ``min_pixels`` to ``max_pixels`` pixels (see the module docstring)."""

    name = "local"
    kinds = frozenset({"multimodal"})

    def __init__(
        self,
        registry: ModelRegistry,
        pool: ModelPool,
        *,
        max_pixels: int,
        min_pixels: int,
        batching: BatchSettings | None = None,
    ) -> None:
        super().__init__(registry, pool, batching=batching)
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels

    @property
    def options(self) -> dict[str, int]:
        """What this engine applies beyond the weights that changes the answer."""
        return {"vision_max_pixels": self.max_pixels, "vision_min_pixels": self.min_pixels}

    def card(self, target: Target) -> ModelCard:
        """The card of a vision-language model: it takes images, and its ``options`` (the
        visual-token bounds) go into the cache key with its fingerprint."""
        meta = card_meta(target, self.name)
        meta["modalities"] = ["text", "image"]
        return ModelCard(
            id=target.name,
            owned_by="yichui",
            fingerprint=target.fingerprint,
            created=created(target),
            accepts_images=True,
            meta=meta,
            options=self.options,
        )

    async def generate(
        self, target: Target, request: EngineRequest
    ) -> AsyncGenerator[EngineChunk, None]:
        """The answer as it is generated (see :class:`~.pooled.PooledEngine`)."""
        check_params(request)
        base, adapter = paths(target)
        async with self.pool.use(
            target.name,
            base,
            target.fingerprint,
            adapter=adapter,
            kind="multimodal",
            setup=self._setup,
        ) as m:
            job = Generation(
                m, request.params, lambda: self._inputs(m, request), queue=self.queue(m)
            )
            async with contextlib.aclosing(job.stream()) as chunks:
                async for chunk in chunks:
                    yield chunk

    def _setup(self, loaded: LoadedModel) -> None:
        bound_visual_tokens(loaded.processor, self.min_pixels, self.max_pixels)

    def _inputs(self, loaded: LoadedModel, request: EngineRequest) -> ModelInputs:
        """The processor's tensors for the request (in the generation thread)."""
        import torch

        if request.kind == "completion":
            ids = prompts.prompt_ids(
                loaded.tokenizer, "completion", prompt=request.prompt, model=request.model
            )
            return ModelInputs({"input_ids": torch.tensor([ids])}, len(ids), batchable=False)
        conversation = [self._message(m) for m in request.messages]
        tensors = _process(loaded.processor, conversation, request.model)
        return ModelInputs(tensors, int(tensors["input_ids"].shape[1]), batchable=False)

    def _message(self, message: Message) -> dict[str, Any]:
        """A message in the processor's chat format, every content as parts, images fitted
        to the bound."""
        content = (message.content,) if isinstance(message.content, str) else message.content
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, ImagePart):
                parts.append({"type": "image", "image": fit(part.image, self._pixels(part))})
            else:
                parts.append({"type": "text", "text": part})
        out: dict[str, Any] = {"role": message.role, "content": parts}
        if message.name:
            out["name"] = message.name
        return out

    def _pixels(self, part: ImagePart) -> int:
        if part.image is None:  # an ImagePart the API did not decode
            raise RequestError("image part without decoded pixels", param="messages")
        if part.detail == "low":
            return min(self.max_pixels, LOW_DETAIL_PIXELS)
        return self.max_pixels


def _process(processor: Any, conversation: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The processor's tensors for ``conversation`` (with the assistant's turn opened): via
    its chat template, else via the fallback format with its image token per image."""
    import jinja2

    try:
        if prompts.has_chat_template(processor):
            try:
                out = processor.apply_chat_template(
                    conversation,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                )
            except jinja2.TemplateError as exc:  # raised by templates on purpose
                raise ChatTemplateError(model, str(exc)) from exc
        else:
            out = _fallback(processor, conversation)
    except ValueError as exc:
        if isinstance(exc, ChatTemplateError):
            raise
        # what processors raise about their input: an image of a shape they refuse (Qwen2-VL:
        # an aspect ratio over 200), image tokens the template dropped
        message = f"model {model!r} cannot take this input: {exc}"
        raise RequestError(message, param="messages") from exc
    return dict(out)


def _fallback(processor: Any, conversation: list[dict[str, Any]]) -> Any:
    image_token = getattr(processor, "image_token", None)
    images: list[Any] = []
    messages: list[dict[str, str]] = []
    for message in conversation:
        text = []
        for part in message["content"]:
            if part["type"] == "image":
                if image_token is None:
                    raise ValueError("the processor has no chat template and no image token")
                images.append(part["image"])
                text.append(str(image_token))
            else:
                text.append(part["text"])
        messages.append(prompts.chat_message(message["role"], "".join(text), message.get("name")))
    prompt = prompts.fallback_chat_prompt(messages)
    return processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
