"""What a model name points at: a model of the registry, or ``base@adapter``.

``base@adapter`` serves (or evaluates) a LoRA adapter on top of its base without merging them.
The pair's fingerprint combines both fingerprints, so re-training the adapter or replacing the
base changes every cache key built on it::

    target = resolve_target(registry, "smollm2@smollm2-lora-v0")
    target.base.path, target.adapter.path, target.fingerprint
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from yichui.errors import ModelKindError, ModelNotFoundError
from yichui.models.names import validate_name
from yichui.models.registry import ModelRegistry
from yichui.models.status import ModelStatus

ADAPTER_KIND = "adapter"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    base: ModelStatus
    adapter: ModelStatus | None = None

    @property
    def fingerprint(self) -> str:
        if self.adapter is None:
            return self.base.fingerprint or ""
        both = f"{self.base.fingerprint}\0{self.adapter.fingerprint}".encode()
        return "fp1a-" + hashlib.sha256(both).hexdigest()[:32]

    @property
    def kind(self) -> str | None:
        return self.base.kind


def split_target(name: str) -> tuple[str, str | None]:
    """``base@adapter`` -> (base, adapter); a plain name -> (name, None). Both validated."""
    base, sep, adapter = name.partition("@")
    validate_name(base)
    if not sep:
        return base, None
    validate_name(adapter)
    return base, adapter


def resolve_target(registry: ModelRegistry, name: str) -> Target:
    """The statuses behind ``name``; ModelNotFoundError when a part does not exist."""
    base_name, adapter_name = split_target(name)
    base = registry.status(base_name).status
    if not base.exists:
        raise ModelNotFoundError(base_name)
    if base.kind == ADAPTER_KIND:
        raise ModelKindError(
            f"{base_name!r} is an adapter, not a base model",
            name=base_name,
            hint=f"use it on its base: <base>@{base_name}",
        )
    if adapter_name is None:
        return Target(name, base)
    adapter = registry.status(adapter_name).status
    if not adapter.exists:
        raise ModelNotFoundError(adapter_name)
    if adapter.kind != ADAPTER_KIND:
        raise ModelKindError(
            f"{adapter_name!r} is not a LoRA adapter (kind {adapter.kind})",
            name=adapter_name,
            hint="the part after '@' must be an adapter made by `yichui train`",
        )
    return Target(name, base, adapter)
