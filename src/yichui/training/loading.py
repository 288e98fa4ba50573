"""Loading a base model (and an adapter on it) for training, merging and evaluation.

Workers only: this imports torch, transformers and peft. ``device`` is the setting
``inference_device`` (``auto``: CUDA when present); weights are float32 on the CPU and bfloat16
on a GPU that supports it, unless a dtype is asked for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from yichui.errors import MissingExtraError, ModelLoadError, TrainingError


def require_ml(feature: str) -> None:
    for module in ("torch", "transformers", "peft"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError("ml", feature)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(device: str, dtype: str = "auto") -> Any:
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_qlora(device: str) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: a clear error (not retried) otherwise."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError(
            "QLoRA needs the bitsandbytes package, which this worker does not have",
            hint="pip install bitsandbytes on a GPU worker, or train without --qlora",
        )
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise TrainingError(
            "QLoRA needs a CUDA GPU; this worker has none",
            hint="queue it for a GPU worker (--queue), or train without --qlora",
        )


def load_tokenizer(path: Path, name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(name, f"{type(exc).__name__}: {exc}") from exc


def load_model(
    path: Path,
    name: str,
    *,
    device: str,
    dtype: Any,
    qlora: bool = False,
) -> Any:
    """The causal LM at ``path`` on ``device`` (4-bit NF4 with ``qlora``)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    elif device.startswith("cuda"):
        kwargs["device_map"] = {"": device}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(name, f"{type(exc).__name__}: {exc}") from exc
    if not device.startswith("cuda"):
        model.to(device)
    return model


def apply_adapter(model: Any, adapter: Path, name: str, *, merge: bool) -> Any:
    """``model`` with the LoRA adapter at ``adapter`` on it (folded in when ``merge``)."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:
        raise ModelLoadError(name, f"{type(exc).__name__}: {exc}") from exc
    return wrapped.merge_and_unload() if merge else wrapped
