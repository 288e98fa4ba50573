"""Where models come from: a local mirror folder, Hugging Face, ModelScope, GGUF files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from yichui.errors import ConfigError
from yichui.models.sources.base import ModelSource

if TYPE_CHECKING:
    from yichui.config import Settings

SOURCE_NAMES = ("mirror", "huggingface", "modelscope")
"""Sources ``models pull`` accepts (``hf`` and ``ms`` are accepted as aliases)."""
_ALIASES = {"hf": "huggingface", "ms": "modelscope"}


def get_source(name: str | None, settings: Settings) -> ModelSource:
    """The source called ``name``; by default the mirror folder if one is set, else Hugging Face."""
    if name is None:
        name = "mirror" if settings.mirror_dir else "huggingface"
    name = _ALIASES.get(name, name)
    if name == "mirror":
        from yichui.models.sources.mirror import MirrorSource

        if settings.mirror_dir is None:
            raise ConfigError("source 'mirror' needs a mirror folder", hint="set YICHUI_MIRROR_DIR")
        return MirrorSource(settings.mirror_dir)
    if name == "huggingface":
        from yichui.models.sources.huggingface import HuggingFaceSource

        source: ModelSource = HuggingFaceSource.from_settings(settings)
        return source
    if name == "modelscope":
        from yichui.models.sources.modelscope import ModelScopeSource

        source = ModelScopeSource.from_settings(settings)
        return source
    raise ConfigError(f"unknown source {name!r}", hint=f"use one of: {', '.join(SOURCE_NAMES)}")
