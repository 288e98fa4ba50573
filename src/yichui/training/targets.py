"""Which modules LoRA adapts: peft's choice for a text model, the language model alone for a
vision-language one.

A vision-language model's vision tower uses the same layer names as its language model
(CLIP's and SigLIP's attention has ``q_proj`` / ``v_proj`` too), so plain names would put
adapters on the tower. For such a model the targets become one regular expression over the
language model's modules (``model.language_model`` for LLaVA and Qwen2-VL,
``model.text_model`` for Idefics3), found as the module ``get_decoder()`` returns::

    model\\.language_model\\..*\\.(?:q_proj|v_proj)

which peft matches against each module's full name. The vision tower is frozen and untouched;
with ``train_projector`` the projector between the two (LLaVA's ``multi_modal_projector``,
Qwen2-VL's ``visual.merger``, Idefics3's ``connector``) is trained whole (peft's
``modules_to_save``) and saved in the adapter.
"""

from __future__ import annotations

import re
from typing import Any

from yichui.errors import TrainingError

PROJECTORS = ("multi_modal_projector", "merger", "connector", "mm_projector")
"""Leaf names of the multimodal projectors of the families transformers has."""
DEFAULT_TARGETS = ["q_proj", "v_proj"]
"""A language model's targets when peft has no default for its architecture."""


def lora_targets(
    model: Any, targets: tuple[str, ...], *, multimodal: bool, train_projector: bool = False
) -> tuple[Any, list[str] | None]:
    """(``target_modules``, ``modules_to_save``) of the LoRA config for ``model``: ``targets``
    as asked (empty: peft's default; ``all-linear``), for a multimodal model restricted to its
    language model."""
    asked: Any = list(targets) or None
    if asked == ["all-linear"]:
        asked = "all-linear"
    if not multimodal:
        return asked, None
    prefix = language_model_prefix(model)
    inside = {
        name: module for name, module in model.named_modules() if name.startswith(prefix + ".")
    }
    leaves = {name.rsplit(".", 1)[-1] for name in inside}
    if asked == "all-linear":
        import torch

        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in inside.items() if isinstance(m, torch.nn.Linear)}
        )
    elif asked is None:
        names = _peft_default(model) or DEFAULT_TARGETS
    else:
        names = asked
    missing = [n for n in names if n not in leaves]
    if missing or not names:
        raise TrainingError(
            f"LoRA cannot be applied: the language model ({prefix}) has no module named"
            f" {', '.join(missing) or '(none asked)'}",
            hint="name its layers with --target-modules (e.g. q_proj,v_proj), or all-linear",
        )
    pattern = rf"{re.escape(prefix)}\..*\.(?:{'|'.join(re.escape(n) for n in names)})"
    return pattern, [projector(model)] if train_projector else None


def language_model_prefix(model: Any) -> str:
    """The full module name of a vision-language model's language model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder and name:
            return str(name)
    for name, _module in model.named_modules():  # no get_decoder(): the usual names
        if name.rsplit(".", 1)[-1] in ("language_model", "text_model"):
            return str(name)
    raise TrainingError(
        f"cannot find the language model inside {type(model).__name__}",
        hint="name the layers to adapt with --target-modules",
    )


def projector(model: Any) -> str:
    """The full module name of the multimodal projector, for ``train_projector``."""
    prefix = language_model_prefix(model)
    found = [
        name
        for name, _module in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTORS and not name.startswith(prefix + ".")
    ]
    if not found:
        raise TrainingError(
            f"--train-projector: {type(model).__name__} has no projector named"
            f" {', '.join(PROJECTORS)}"
        )
    return str(min(found, key=len))


def _peft_default(model: Any) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    for kind in (getattr(text, "model_type", None), getattr(config, "model_type", None)):
        if kind in known:
            return list(known[kind])
    return None
