"""Conversations with images as a vision-language model's processor takes them, and batches.

Training and evaluation build a vision model's inputs here, as the vision engine serves it
(``inference/engines/vision.py``: the same bounds, the same fitting, the same template), so a
fine-tuned model is shown its images as it was taught::

    bound_visual_tokens(processor, settings.vision_min_pixels, settings.vision_max_pixels)
    image = prepare(decoded.image, settings.vision_max_pixels)     # RGB, scaled down
    text = render(processor, messages, model=name, add_generation_prompt=True)
    one = encode(processor, [text], [[image]])                     # a batch of one
    batch = collate([features_a, features_b], pad_id)              # padded, extras merged

Messages are plain dicts as chat templates take them, content a string or a list of parts
``{"type": "text", "text": ...}`` / ``{"type": "image"}``; the pictures go to the processor
beside the text, in the order their parts appear. torch is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from yichui.errors import ChatTemplateError
from yichui.ml.images import fit
from yichui.ml.prompts import chat_message, fallback_chat_prompt, has_chat_template

TOKEN_KEYS = ("input_ids", "attention_mask", "labels")
"""The per-token tensors every family has; any other tensor as long as ``input_ids`` (Qwen2-VL's
``mm_token_type_ids``) is per-token too and is padded beside them."""

PAD_VALUES = {"labels": -100, "attention_mask": 0}
"""What a pad position holds in each per-token tensor (``input_ids``: the pad id, others 0)."""


def prepare(image: Any, max_pixels: int) -> Any:
    """A decoded Pillow image as vision processors take it: RGB, at most ``max_pixels``
    (``vision_max_pixels``: bounds the visual tokens, the same in training and serving)."""
    return fit(image, max_pixels)


def render(
    processor: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str,
    add_generation_prompt: bool,
) -> str:
    """The conversation as text through the processor's chat template, each image part as the
    family's placeholder (which the processor expands into the image's tokens). A processor
    without a template gets :func:`~yichui.ml.prompts.fallback_chat_prompt` (which always
    opens the assistant's turn) with its image token where each image is.

    Raises :class:`~yichui.errors.ChatTemplateError` (naming ``model``) when the template
    refuses the conversation."""
    if not has_chat_template(processor):
        return _fallback(processor, messages, model)
    try:
        text: str = processor.apply_chat_template(
            [_without_pictures(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as exc:  # jinja2's TemplateError, raised by templates on purpose
        raise ChatTemplateError(model, str(exc)) from exc
    return text


def _fallback(processor: Any, messages: Sequence[Mapping[str, Any]], model: str) -> str:
    token = getattr(processor, "image_token", None)
    flat: list[dict[str, str]] = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            if token is None and any(p.get("type") == "image" for p in content):
                raise ChatTemplateError(model, "no chat template and no image token")
            content = "".join(
                str(token) if p.get("type") == "image" else str(p.get("text", "")) for p in content
            )
        flat.append(chat_message(str(m["role"]), content))
    return fallback_chat_prompt(flat)


def encode(
    processor: Any,
    texts: Sequence[str],
    images: Sequence[Sequence[Any]],
    *,
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, Any]:
    """``processor(text=..., images=...)`` for a batch: ``images[i]`` are the pictures of
    ``texts[i]`` (in order; may be empty). Special tokens are the template's own, so none are
    added. Returns the processor's tensors (``input_ids``, ``attention_mask``,
    ``pixel_values`` and the family's extras: ``image_grid_thw``, ``pixel_attention_mask``...)."""
    nested = [list(group) for group in images]
    kwargs: dict[str, Any] = {
        "text": list(texts),
        "return_tensors": "pt",
        "add_special_tokens": False,
    }
    if any(nested):
        kwargs["images"] = nested
    if len(texts) > 1:
        kwargs["padding"] = True
        kwargs["padding_side"] = padding_side
    return dict(processor(**kwargs))


def collate(
    features: Sequence[Mapping[str, Any]],
    pad_id: int,
    *,
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, Any]:
    """One batch of examples encoded one by one (each a batch of one, as :func:`encode` gives).

    Per-token tensors are padded to the longest (``input_ids`` with ``pad_id``, ``labels``
    with -100, others with 0). Every other tensor (``pixel_values``, ``image_grid_thw``...)
    is concatenated along its first axis, as the families' processors batch them (LLaVA and
    Qwen2-VL count images or patches there, Idefics3 examples): where the other axes differ
    (Idefics3's tiles per image) they are padded with zeros, which the models skip as padding
    images. An example without images has none of these and adds nothing."""
    import torch

    lengths = [int(f["input_ids"].shape[-1]) for f in features]
    width = max(lengths)
    token_keys = [k for k in features[0] if _per_token(k, features[0])]
    out: dict[str, Any] = {}
    for key in token_keys:
        value = pad_id if key == "input_ids" else PAD_VALUES.get(key, 0)
        rows = []
        for f, n in zip(features, lengths, strict=True):
            row = f[key].reshape(-1)
            gap = torch.full((width - n,), value, dtype=row.dtype)
            rows.append(torch.cat([gap, row] if padding_side == "left" else [row, gap]))
        out[key] = torch.stack(rows)
    extras = {k for f in features for k in f if k not in token_keys}
    for key in sorted(extras):
        parts = [f[key] for f in features if key in f]
        out[key] = torch.cat(_zero_padded(parts))
    return out


def bound_visual_tokens(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Bound how many pixels (so how many visual tokens) ``processor`` makes of an image, as
    the vision engine does when it loads a model:

    - Qwen2-VL, Qwen2.5-VL (an image processor with ``merge_size``): its pixel bounds become
      ``min_pixels`` to ``max_pixels``;
    - Idefics3, SmolVLM (``max_image_size`` tiles and ``do_image_splitting``): the longest
      edge becomes at most the whole tiles that fit in ``sqrt(max_pixels)``; splitting goes
      off when one tile is all that fits;
    - others (LLaVA: one fixed resolution) are left as they are.
    """
    images = getattr(processor, "image_processor", None)
    if images is None:
        return
    size = getattr(images, "size", None)
    if hasattr(images, "max_image_size") and hasattr(images, "do_image_splitting"):
        tile = int(_get(images.max_image_size, "longest_edge") or 0)
        longest = _get(size, "longest_edge")
        if tile <= 0 or longest is None:
            return
        side = tile * max(1, math.isqrt(max_pixels) // tile)
        if side < int(longest):
            images.size = _with(size, longest_edge=side)
        if side <= tile:
            images.do_image_splitting = False
    elif hasattr(images, "merge_size"):
        if size is not None:
            images.size = _with(size, shortest_edge=min_pixels, longest_edge=max_pixels)
        for attr, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if getattr(images, attr, None) is not None:
                setattr(images, attr, value)


def _get(size: Any, key: str) -> Any:
    """``size[key]`` of a dict or of transformers' ``SizeDict`` (a dataclass); None if unset."""
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _with(size: Any, **values: int) -> Any:
    """``size`` (a dict or a ``SizeDict``) with ``values`` set, of the same type."""
    if dataclasses.is_dataclass(size) and not isinstance(size, type):
        return dataclasses.replace(size, **values)
    return {**(size or {}), **values}


def _per_token(key: str, feature: Mapping[str, Any]) -> bool:
    if key in TOKEN_KEYS:
        return True
    value, ids = feature[key], feature["input_ids"]
    return hasattr(value, "shape") and tuple(value.shape) == tuple(ids.shape)


def _zero_padded(parts: list[Any]) -> list[Any]:
    """``parts`` padded with zeros on every axis but the first to the largest shape."""
    import torch

    shape = [max(int(p.shape[d]) for p in parts) for d in range(1, parts[0].dim())]
    out = []
    for p in parts:
        if list(p.shape[1:]) == shape:
            out.append(p)
            continue
        padded = torch.zeros((p.shape[0], *shape), dtype=p.dtype)
        padded[tuple(slice(0, s) for s in p.shape)] = p
        out.append(padded)
    return out


def _without_pictures(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message whose image parts are bare ``{"type": "image"}`` (templates only look at the
    type; the pictures go to the processor separately)."""
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    parts = [
        {"type": "image"} if isinstance(p, Mapping) and p.get("type") == "image" else dict(p)
        for p in content
    ]
    return {**message, "content": parts}
