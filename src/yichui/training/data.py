"""Examples -> token ids and labels, and the padding collator (imported by workers only).

The conversation is rendered with the tokenizer's chat template (the fallback prompt format
without one). Labels are ``-100`` over the prompt, so the loss is the answer's alone: what a
fine-tune should learn, and what an evaluation's perplexity measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from yichui.ml.prompts import has_chat_template, render_chat
from yichui.training.dataset import Example

IGNORE = -100


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text a model is asked with: the conversation plus the assistant's turn opening,
    rendered as the local engine renders it (:func:`yichui.ml.prompts.render_chat`)."""
    return render_chat(tokenizer, messages, model=getattr(tokenizer, "name_or_path", "?"))


def token_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"]]


def encode(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """Prompt and answer ids; the prompt is cut from the left when the whole is too long, so
    the answer (what is learned) survives; an answer longer than ``max_length`` is cut too."""
    templated = has_chat_template(tokenizer)
    prompt = token_ids(tokenizer, render_prompt(tokenizer, example.prompt), special=not templated)
    answer_text = example.messages[-1]["content"]
    if templated:
        # the template's own end-of-turn after the answer (ChatML's <|im_end|>\n, …)
        full_text = tokenizer.apply_chat_template(list(example.messages), tokenize=False)
        full = token_ids(tokenizer, full_text, special=False)
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            answer = full[len(prompt) :]
        else:  # a template that renders the prompt differently inside the whole conversation
            answer = token_ids(tokenizer, answer_text, special=False)
    else:
        answer = token_ids(tokenizer, " " + answer_text, special=False)
        if tokenizer.eos_token_id is not None:
            answer.append(int(tokenizer.eos_token_id))
    truncated = False
    if len(answer) >= max_length:
        answer, prompt, truncated = answer[: max_length - 1], prompt[-1:], True
    elif len(prompt) + len(answer) > max_length:
        prompt, truncated = prompt[len(prompt) + len(answer) - max_length :], True
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, len(prompt), truncated)


class EncodedDataset:
    """A map-style dataset over encoded examples (what the Trainer's sampler indexes)."""

    def __init__(self, rows: list[Encoded]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        row = self.rows[i]
        return {"input_ids": row.input_ids, "labels": row.labels}


class Collator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in batch)
        ids, labels, mask = [], [], []
        for r in batch:
            gap = width - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_id] * gap)
            labels.append(r["labels"] + [IGNORE] * gap)
            mask.append([1] * len(r["input_ids"]) + [0] * gap)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
