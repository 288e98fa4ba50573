"""What a model folder is (its kind) and what it takes in (its modalities), read from its files.

Only the small JSON files a model ships are read, never its weights:

* ``config.json``: the architecture (``model_type``), its vision or audio tower
  (``vision_config``, ``audio_config``, …) and the placeholder tokens of each input
  (``image_token_id``, ``video_token_id``, ``audio_token_index``, …). Qwen2.5-Omni keeps these
  in ``thinker_config``, which is read as well.
* ``processor_config.json``: transformers 5 saves a processor's parts in it
  (``image_processor``, ``video_processor``, ``feature_extractor``); older saves hold only
  the processor's own settings there.
* ``preprocessor_config.json``: the image processor (``image_processor_type``, ``image_mean``)
  or the audio feature extractor (``sampling_rate``) as older saves and most hub repos have it;
  SmolVLM2's says how it samples videos (``video_sampling``).
* ``video_preprocessor_config.json``: a video processor saved on its own.

The modalities say what the model takes as its files describe it ("text", then "image",
"video", "audio"); whether an engine serves each is the engine's matter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODALITIES = ("text", "image", "video", "audio")
"""Every modality a model may take, in the order a status lists them."""

# model_type values of multimodal (vision/audio + text) architectures
MULTIMODAL_TYPES = frozenset(
    {
        "llava",
        "llava_next",
        "llava_next_video",
        "llava_onevision",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen2_audio",
        "qwen2_5_omni",
        "idefics",
        "idefics2",
        "idefics3",
        "smolvlm",
        "mllama",
        "paligemma",
        "gemma3",
        "internvl_chat",
        "minicpmv",
        "phi3_v",
        "phi4_multimodal",
        "blip-2",
        "kosmos-2",
        "pixtral",
        "mistral3",
        "llama4",
        "molmo",
        "aria",
        "janus",
        "chameleon",
        "florence2",
    }
)
_AUDIO_TYPES = frozenset({"qwen2_audio"})
"""Of :data:`MULTIMODAL_TYPES`, those that hear rather than see (the rest take images)."""

# config.json keys (non-null) that show each input, besides text
_IMAGE_KEYS = (
    "vision_config",
    "visual",
    "vision_tower",
    "mm_vision_tower",
    "image_token_id",
    "image_token_index",
)
_VIDEO_KEYS = ("video_token_id", "video_token_index")
_AUDIO_KEYS = ("audio_config", "audio_token_id", "audio_token_index")

PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
"""Files only a model with a processor beyond its tokenizer ships (any one makes it
multimodal)."""


@dataclass(frozen=True)
class Description:
    """A folder's kind (``text``, ``multimodal``, ``adapter``, ``unknown``) and, for a full
    model, its modalities (None where the folder does not say: an adapter, an unknown)."""

    kind: str
    modalities: list[str] | None = None


def describe(folder: Path) -> Description:
    """The kind and modalities of the model in ``folder`` (a handful of small JSON reads)."""
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        return Description("adapter")
    config = _read_json(folder / "config.json")
    if config is None:
        return Description("unknown")
    sections = [config]
    thinker = config.get("thinker_config")
    if isinstance(thinker, dict):
        sections.append(thinker)
    processor = _read_json(folder / "processor_config.json") or {}
    preprocessor = _read_json(folder / "preprocessor_config.json") or {}
    model_type = str(config.get("model_type", "")).lower()

    found = {"text"}
    if (
        _has(sections, _IMAGE_KEYS)
        or _is_dict(processor.get("image_processor"))
        or "image_processor_type" in preprocessor
        or "image_mean" in preprocessor
    ):
        found.add("image")
    if (
        _has(sections, _VIDEO_KEYS)
        or _is_dict(processor.get("video_processor"))
        or "video_sampling" in preprocessor
        or (folder / "video_preprocessor_config.json").is_file()
    ):
        found.add("video")
    if (
        _has(sections, _AUDIO_KEYS)
        or _is_dict(processor.get("feature_extractor"))
        or _is_dict(processor.get("audio_processor"))
        or "sampling_rate" in preprocessor
    ):
        found.add("audio")

    multimodal = (
        len(found) > 1
        or model_type in MULTIMODAL_TYPES
        or any((folder / name).is_file() for name in PROCESSOR_FILES)
    )
    if not multimodal:
        return Description("text", ["text"])
    if found == {"text"}:  # multimodal by its type or processor files alone
        found.add("audio" if model_type in _AUDIO_TYPES else "image")
    return Description("multimodal", [m for m in MODALITIES if m in found])


def detect_kind(folder: Path) -> str:
    """``multimodal`` or ``text`` from the model's files; ``adapter`` for a LoRA adapter
    (``adapter_config.json`` and no ``config.json``); ``unknown`` otherwise."""
    return describe(folder).kind


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has(sections: list[dict[str, Any]], keys: tuple[str, ...]) -> bool:
    return any(section.get(key) is not None for section in sections for key in keys)


def _is_dict(value: object) -> bool:
    return isinstance(value, dict)
