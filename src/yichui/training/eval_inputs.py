"""What an evaluation feeds its model, for each kind: a batch scored (prompt and answer, with
labels) and a batch asked (the prompts, left-padded for ``generate``).

Text models go through the tokenizer as training does (:mod:`yichui.training.data`);
multimodal ones through their processor, images included, as training does
(:mod:`yichui.training.vision_data`) and as they are served. Imported by workers only.
"""

from __future__ import annotations

from typing import Any, Protocol

from yichui.training.dataset import Example


class EvalInputs(Protocol):
    """Tensors for one batch of examples (on the CPU; the caller moves them)."""

    tokenizer: Any

    def scored(self, batch: list[Example]) -> dict[str, Any]:
        """input_ids, attention_mask, labels (-100 but the answer) and any image tensors."""
        ...

    def asked(self, batch: list[Example]) -> dict[str, Any]:
        """The prompts, left-padded, with any image tensors."""
        ...


class TextInputs:
    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def scored(self, batch: list[Example]) -> dict[str, Any]:
        from yichui.training.data import Collator, encode, pad_id

        rows = [encode(self.tokenizer, ex, self.max_length) for ex in batch]
        return Collator(pad_id(self.tokenizer))(
            [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
        )

    def asked(self, batch: list[Example]) -> dict[str, Any]:
        import torch

        from yichui.training.data import pad_id, render_prompt, token_ids

        templated = bool(getattr(self.tokenizer, "chat_template", None))
        prompts = [
            token_ids(
                self.tokenizer, render_prompt(self.tokenizer, ex.prompt), special=not templated
            )[-self.max_length :]
            for ex in batch
        ]
        width = max(len(p) for p in prompts)
        pad = pad_id(self.tokenizer)
        return {
            "input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
            ),
        }


class VisionInputs:
    """A multimodal model's inputs. Prompts are never cut (see
    :mod:`yichui.training.vision_data`): ``max_length`` bounds the scored answers only."""

    def __init__(
        self, processor: Any, *, model: str, max_length: int, bounds: tuple[int, int]
    ) -> None:
        from yichui.training.vision_data import VisionEncoder

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.encoder = VisionEncoder(processor, model=model, max_length=max_length, bounds=bounds)

    def scored(self, batch: list[Example]) -> dict[str, Any]:
        from yichui.ml.vision_inputs import collate
        from yichui.training.data import pad_id

        return collate([self.encoder.features(ex) for ex in batch], pad_id(self.tokenizer))

    def asked(self, batch: list[Example]) -> dict[str, Any]:
        from yichui.ml.vision_inputs import encode

        texts = [self.encoder.prompt_text(ex) for ex in batch]
        images = [self.encoder.pictures(ex) for ex in batch]
        return encode(self.processor, texts, images, padding_side="left")
