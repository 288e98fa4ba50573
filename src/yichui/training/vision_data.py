"""Examples with images -> a vision-language model's inputs and labels (imported by workers only).

Each example is encoded when the Trainer asks for it (pixel values of a whole dataset would not
fit in memory): its images are decoded as requests' are (:func:`yichui.ml.images.decode`: first
frame, EXIF orientation) and scaled to at most ``vision_max_pixels``, the processor bounded as
the vision engine bounds it (:func:`yichui.ml.vision_inputs.bound_visual_tokens`); the prompt (the
conversation up to the assistant's turn, through the processor's chat template) goes through
the processor with them, so its length counts every image token; the answer (the template's
rendering of it, end-of-turn included) is tokenized after it. Labels are ``-100`` over the
prompt, the answer's ids after it, as for text (:mod:`yichui.training.data`).

The prompt is never cut (an image's tokens must all be there for its features to fit): an
example longer than ``max_length`` loses the end of its answer, and keeps at least one answer
token however long its prompt is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from yichui.ml.images import ImageLimits, decode
from yichui.ml.prompts import has_chat_template
from yichui.ml.vision_inputs import bound_visual_tokens, collate, encode, prepare, render
from yichui.training.data import IGNORE
from yichui.training.dataset import Example

CHECKED = ImageLimits(
    max_bytes=1 << 40, max_pixels=1 << 40, per_request=1 << 20, per_message=1 << 20
)
"""The limits a snapshot's images are decoded under: they passed the settings' own when the
task was queued (a worker with other settings must not refuse them halfway through a run)."""


class VisionEncoder:
    """One example at a time through ``processor``, bounded to ``bounds`` (min, max) pixels
    per image as the vision engine bounds it (see the module docstring)."""

    def __init__(
        self,
        processor: Any,
        *,
        model: str,
        max_length: int,
        bounds: tuple[int, int],
        limits: ImageLimits | None = None,
    ) -> None:
        bound_visual_tokens(processor, *bounds)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model = model
        self.max_length = max_length
        self.max_pixels = bounds[1]
        self.limits = limits or CHECKED

    def pictures(self, example: Example) -> list[Any]:
        """The example's images, decoded and scaled as the model is shown them."""
        out = []
        for i, source in enumerate(example.images):
            decoded = decode(source.read(self.limits), f"images[{i}]", self.limits)
            out.append(prepare(decoded.image, self.max_pixels))
        return out

    def prompt_text(self, example: Example) -> str:
        return render(self.processor, example.prompt, model=self.model, add_generation_prompt=True)

    def answer_ids(self, example: Example, prompt: str) -> list[int]:
        """The answer's ids: the template's rendering after the prompt (its end-of-turn too),
        or the answer and EOS for a template that renders the prompt otherwise there."""
        whole = render(
            self.processor, list(example.messages), model=self.model, add_generation_prompt=False
        )
        if whole.startswith(prompt) and len(whole) > len(prompt):
            return _ids(self.tokenizer, whole[len(prompt) :])
        if not has_chat_template(self.processor):  # as the text path (data.encode) does
            ids = _ids(self.tokenizer, " " + str(example.messages[-1]["content"]))
        else:
            ids = _ids(self.tokenizer, str(example.messages[-1]["content"]))
        eos = self.tokenizer.eos_token_id
        return ids + ([int(eos)] if eos is not None else [])

    def features(self, example: Example) -> dict[str, Any]:
        """The processor's tensors for the example (a batch of one) with ``labels``."""
        import torch

        prompt = self.prompt_text(example)
        inputs = encode(self.processor, [prompt], [self.pictures(example)])
        n = int(inputs["input_ids"].shape[-1])
        answer = self.answer_ids(example, prompt)[: max(1, self.max_length - n)]
        tail = torch.tensor([answer], dtype=inputs["input_ids"].dtype)
        out: dict[str, Any] = {}
        for key, value in inputs.items():
            if key == "input_ids":
                out[key] = torch.cat([value, tail], dim=1)
            elif hasattr(value, "shape") and tuple(value.shape) == (1, n):  # per-token
                fill = 1 if key == "attention_mask" else 0
                out[key] = torch.cat([value, torch.full_like(tail, fill, dtype=value.dtype)], 1)
            else:
                out[key] = value
        out["labels"] = torch.cat([torch.full((1, n), IGNORE, dtype=torch.long), tail.long()], 1)
        return out


class VisionDataset:
    """A map-style dataset that encodes each example when it is asked for."""

    def __init__(self, examples: Sequence[Example], encoder: VisionEncoder) -> None:
        self.examples = list(examples)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.encoder.features(self.examples[i])


class VisionCollator:
    """Pads a batch of encoded examples and merges their image tensors
    (:func:`yichui.ml.vision_inputs.collate`)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(batch, self.pad_id)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
