"""Builders of model folders for tests (small files, real layouts)."""

from __future__ import annotations

import json
from pathlib import Path


def make_model(
    root: Path,
    name: str,
    *,
    kind: str = "text",
    weight_bytes: int = 1024,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Create ``root/<name>`` with a config.json of ``kind`` and a weights file."""
    folder = root.joinpath(*name.split("/"))
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if kind == "multimodal":
        config = {
            "model_type": "qwen2_vl",
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "vision_config": {"depth": 2},
        }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x01" * weight_bytes)
    (folder / "tokenizer.json").write_text("{}")
    for rel, data in (extra_files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder
