"""Where models come from: a local mirror folder, Hugging Face, ModelScope, GGUF files.

Sources are found by name through :class:`Sources`, which the composition root builds from
every capability's ``sources()`` seam (yichui's own, below, and the extensions')::

    rt.sources.get("hf")          # HuggingFaceSource, configured from the settings
    rt.sources.get(None)          # the default: the mirror folder if one is set, else Hugging Face
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from yichui.errors import ConfigError
from yichui.models.sources.base import ModelSource

if TYPE_CHECKING:
    from yichui.config import Settings

SourceFactory = Callable[["Settings"], ModelSource]
"""Builds a source from the settings (its endpoint, token, folder)."""

ALIASES = {"hf": "huggingface", "ms": "modelscope"}
"""Short names ``models pull --source`` accepts too."""


def _mirror(settings: Settings) -> ModelSource:
    from yichui.models.sources.mirror import MirrorSource

    if settings.mirror_dir is None:
        raise ConfigError("source 'mirror' needs a mirror folder", hint="set YICHUI_MIRROR_DIR")
    return MirrorSource(settings.mirror_dir)


def _huggingface(settings: Settings) -> ModelSource:
    from yichui.models.sources.huggingface import HuggingFaceSource

    return HuggingFaceSource.from_settings(settings)


def _modelscope(settings: Settings) -> ModelSource:
    from yichui.models.sources.modelscope import ModelScopeSource

    return ModelScopeSource.from_settings(settings)


def sources() -> dict[str, SourceFactory]:
    """The capability seam: yichui's own sources, by name (SDKs imported when one is used)."""
    return {"mirror": _mirror, "huggingface": _huggingface, "modelscope": _modelscope}


class Sources:
    """The model sources of a deployment, by name."""

    def __init__(self, factories: Mapping[str, SourceFactory], settings: Settings) -> None:
        self._factories = dict(factories)
        self.settings = settings

    def names(self) -> list[str]:
        return sorted(self._factories)

    def canonical(self, name: str | None) -> str:
        """The name of the source ``name`` means (an alias resolved; None: the default, the
        mirror folder if one is set, else Hugging Face), without building it."""
        if name is None:
            name = "mirror" if self.settings.mirror_dir else "huggingface"
        return ALIASES.get(name, name)

    def get(self, name: str | None) -> ModelSource:
        """The source called ``name`` (or an alias); by default the mirror folder if one is
        set, else Hugging Face."""
        name = self.canonical(name)
        factory = self._factories.get(name)
        if factory is None:
            raise ConfigError(
                f"unknown source {name!r}", hint=f"use one of: {', '.join(self.names())}"
            )
        return factory(self.settings)
