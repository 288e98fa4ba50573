"""Tiny random-weights vision-language models of real architectures, for fast engine and
training tests.

::

    path = build_qwen2_vl(tmp_path / "qwen", seed=0)
    for family, build in FAMILIES.items():
        build(tmp_path / family)

Each builder writes what a downloaded model folder holds: ``config.json`` of the real
architecture (LLaVA, Qwen2-VL, Idefics3) shrunk to a few layers of width 32-64, safetensors
weights, the processor's files (image processor, tokenizer, chat template). The registry reads
the folder as kind ``multimodal``; it loads with ``yichui.ml.loading.load_model(...,
kind="multimodal")`` and ``load_processor``, and generates from
``processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
return_dict=True, return_tensors="pt")``. A folder builds in about a second.

The tokenizer is the one of :mod:`tests.tiny_model` with the family's image tokens added. The
output rows of EOS and of every special token are shrunk so that a random model writes visible
text: it would otherwise often stop at once or write only image tokens, which decode to nothing
(and an empty answer is never cached). The chat template takes content as a string or as parts
``[{"type": "image"}, {"type": "text", "text": ...}]``.

SmolVLM is left out: its processor needs the ``num2words`` package, which is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.tiny_model import build_tokenizer


def _template(image: str) -> str:
    """A ChatML template whose image parts become ``image`` (the family's placeholder, which
    the processor expands into the image's tokens)."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image + "{% elif part['type'] == 'text' %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _tokenizer(tokens: list[str]) -> Any:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(tokens, special_tokens=True)
    return tokenizer


def _text_config(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """A tiny decoder's settings (as ``tests/tiny_model.py``'s Llama)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **extra,
    }


def _save(model: Any, processor: Any, path: Path) -> Path:
    """Shrink the output rows of the special tokens (EOS, image tokens...), then save the
    model and its processor into ``path``."""
    import torch

    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for token_id in sorted(special):
            if token_id < head.shape[0]:
                head[token_id].mul_(0.05)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_llava(path: Path, seed: int = 0) -> Path:
    """A tiny LLaVA (CLIP vision tower 56x56 in 14-pixel patches, Llama decoder): every image
    is resized to 56x56 and becomes 16 image tokens. Returns ``path``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(["<image>"])
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=_template("<image>"),
    )
    return _save(model, processor, path)


def build_qwen2_vl(path: Path, seed: int = 0) -> Path:
    """A tiny Qwen2-VL (vision depth 2, 14-pixel patches merged 2x2, multimodal RoPE): an
    image becomes one token per 28x28 pixels, between ``min_pixels`` 56*56 and
    ``max_pixels`` 224*224 as saved (the engine sets its own bounds). Returns ``path``."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    from yichui.ml.loading import image_only

    tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(tokens)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}
    config = Qwen2VLConfig(
        text_config=_text_config(
            tokenizer,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    processor = image_only(Qwen2VLProcessor)(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224),
        tokenizer=tokenizer,
        chat_template=_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return _save(model, processor, path)


def build_idefics3(path: Path, seed: int = 0) -> Path:
    """A tiny Idefics3 (SigLIP vision tower 56x56, pixel shuffle by 2, Llama decoder): an
    image is resized to a longest edge of 112 and split into 56x56 tiles plus a global view,
    4 image tokens each. Returns ``path``."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = _tokenizer(
        ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *grid]
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        text_config=_text_config(tokenizer, model_type="llama"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": 112}, max_image_size={"longest_edge": 56}
        ),
        tokenizer=tokenizer,
        image_seq_len=4,  # (56 / 14) ** 2 / scale_factor ** 2
        chat_template=_template("<image>"),
    )
    return _save(model, processor, path)


FAMILIES: dict[str, Callable[..., Path]] = {
    "llava": build_llava,
    "qwen2_vl": build_qwen2_vl,
    "idefics3": build_idefics3,
}
"""Each family's builder by name: ``FAMILIES[name](path, seed=0) -> path``."""
