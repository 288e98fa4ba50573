"""A chat or a completion as the model reads it: the chat template, the fallback format, ids.

Inference (the local engine) and training (datasets, evaluation) build prompts here, so a
fine-tuned model is asked exactly the way it was taught. Messages are plain dicts, as chat
templates take them; the tokenizer is passed in, so nothing heavy is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from yichui.errors import ChatTemplateError

PromptKind = Literal["chat", "completion"]
"""A chat (``messages``) or a plain completion (``prompt``)."""


def chat_message(role: str, content: str, name: str | None = None) -> dict[str, str]:
    """One message as chat templates take it (``name`` only when there is one)."""
    out = {"role": role, "content": content}
    if name:
        out["name"] = name
    return out


def fallback_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The chat prompt for a tokenizer without a chat template: one ``Role: content`` line per
    message, then ``Assistant:`` for the answer::

        System: Be brief.
        User: Hi!
        Assistant:
    """
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders chats itself (else :func:`fallback_chat_prompt` does)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, model: str) -> str:
    """The conversation plus the opening of the assistant's turn, as text.

    Raises :class:`~yichui.errors.ChatTemplateError` (naming ``model``) when the template
    refuses the conversation.
    """
    if not has_chat_template(tokenizer):
        return fallback_chat_prompt(messages)
    try:
        text: str = tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # templates raise jinja2's TemplateError on purpose
        raise ChatTemplateError(model, str(exc)) from exc
    return text


def prompt_ids(
    tokenizer: Any,
    kind: PromptKind,
    *,
    messages: Sequence[Mapping[str, str]] = (),
    prompt: str = "",
    model: str,
) -> list[int]:
    """The token ids of a chat's ``messages`` or a completion's ``prompt`` (never empty).

    A chat template writes the special tokens (BOS included) itself, so they are added only
    to the fallback format and to a completion.
    """
    if kind == "chat":
        text = render_chat(tokenizer, messages, model=model)
        ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:  # an empty prompt without BOS: generation needs one token to start from
        start = tokenizer.bos_token_id
        if start is None:
            start = tokenizer.eos_token_id
        ids = [start if start is not None else 0]
    return [int(i) for i in ids]
