"""Loading models for inference and training alike, on one device rule and one dtype rule.

::

    require_ml("local inference", peft=False)
    device = resolve_device(settings.inference_device)   # "auto" -> "cuda" or "cpu"
    dtype = resolve_dtype(device, settings.inference_dtype)  # "auto" -> "bfloat16"/"float32"
    tokenizer = load_tokenizer(path, name, adapter=adapter)
    model = load_model(path, name, device=device, dtype=dtype)
    model = apply_adapter(model, adapter, name, merge=True)

The rules, in one place so a model is evaluated as it is served and trained:

- **device** ``auto``: CUDA when there is one, else the CPU; anything else as given.
- **dtype** ``auto``: bfloat16 on a CUDA GPU that supports it, else float32. CPU kernels in
  half precision are slow or missing, and float16's narrow range overflows in models trained
  in bfloat16, so a GPU without bfloat16 gets float32 rather than float16.

Each loader raises :class:`~yichui.errors.ModelLoadError` for a folder that does not load, the
cause chained. torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from yichui.errors import MissingExtraError, ModelLoadError

ModelKind = Literal["text", "multimodal"]
"""What a model folder holds, which picks the transformers class that loads it: ``text``
(``AutoModelForCausalLM``) or ``multimodal`` (``AutoModelForImageTextToText``, or the class its
``config.json`` names where the auto class does not cover the architecture; a processor is
loaded beside it with :func:`load_processor`)."""


def require_ml(feature: str, *, peft: bool = True) -> None:
    """Raise :class:`~yichui.errors.MissingExtraError` (extra ``ml``) unless torch and
    transformers (and peft, unless ``peft=False``) are installed; ``feature`` says what needs
    them. Looks for the packages without importing them."""
    modules = ("torch", "transformers", "peft") if peft else ("torch", "transformers")
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError("ml", feature)


def resolve_device(device: str) -> str:
    """``device`` with ``auto`` resolved: ``cuda`` when a GPU is there, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(device: str, dtype: str = "auto") -> str:
    """The name of the torch dtype to load weights in on ``device`` (``auto`` resolved)."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"


def load_tokenizer(path: Path, name: str, *, adapter: Path | None = None) -> Any:
    """The tokenizer of the model at ``path``; an ``adapter`` that has its own tokenizer (a
    chat template it was trained with) wins. ``name`` is the model's, for the error."""
    from transformers import AutoTokenizer

    source = (
        adapter if adapter is not None and (adapter / "tokenizer_config.json").exists() else path
    )
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(name, f"{type(exc).__name__}: {exc}") from exc


def load_processor(path: Path, name: str, *, adapter: Path | None = None) -> Any:
    """The processor (image processor and tokenizer) of the vision-language model at ``path``;
    an ``adapter`` with its own tokenizer (the chat template it was trained with) wins for the
    tokenizer.

    Processors that also take videos (Qwen2-VL, SmolVLM) need torchvision for their video part
    in transformers 5; without it they are loaded without one, for images only
    (:func:`image_only`)."""
    from transformers import AutoProcessor

    try:
        try:
            processor = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                str(path), local_files_only=True
            )
        except Exception as first:
            # a video part that cannot be built (no torchvision, or a folder saved without
            # one): the same processor for images only, else the first error stands
            try:
                cls = _processor_class(path)
            except ValueError:
                raise first from None
            if image_only(cls) is cls:
                raise
            processor = image_only(cls).from_pretrained(str(path), local_files_only=True)
        if adapter is not None and (adapter / "tokenizer_config.json").exists():
            processor.tokenizer = load_tokenizer(path, name, adapter=adapter)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(name, f"{type(exc).__name__}: {exc}") from exc
    return processor


def image_only(cls: Any) -> Any:
    """A subclass of the processor class ``cls`` without its video processor (whose
    transformers class needs torchvision): the same processor for images and text.

    ``ProcessorMixin`` finds a processor's parts in its ``__init__`` signature, so leaving
    ``video_processor`` out of it is all it takes; the class keeps its name, so what it saves
    loads with ``AutoProcessor`` where torchvision is installed."""
    import inspect

    if "video_processor" not in inspect.signature(cls.__init__).parameters:
        return cls

    def __init__(
        self: Any,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        cls.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def _processor_class(path: Path) -> Any:
    """The processor class a model folder names (``processor_config.json``, else
    ``preprocessor_config.json``), from transformers."""
    import json

    import transformers

    for file in ("processor_config.json", "preprocessor_config.json"):
        try:
            named = json.loads((path / file).read_text()).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(named, str) and hasattr(transformers, named):
            return getattr(transformers, named)
    raise ValueError(f"no processor class named in {path}")


def load_model(
    path: Path,
    name: str,
    *,
    device: str,
    dtype: str,
    kind: ModelKind = "text",
    qlora: bool = False,
) -> Any:
    """The model at ``path`` on ``device`` in ``dtype`` (a torch dtype's name), loaded with
    the class for ``kind``; with ``qlora``, quantized to 4-bit NF4 (a CUDA GPU and
    bitsandbytes needed) and computing in ``dtype``."""
    import torch

    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
    if qlora or device.startswith("cuda"):
        # straight onto the GPU: no second copy of the weights in host memory
        kwargs["device_map"] = {"": device}
    try:
        model: Any = _model_class(kind, path).from_pretrained(str(path), **kwargs)
    except Exception as exc:
        # transformers raises all sorts for a broken or incomplete folder (OSError, ValueError,
        # KeyError, the tokenizers library's bare Exception), torch a RuntimeError when out of
        # memory: one error to report, the cause chained
        raise ModelLoadError(name, f"{type(exc).__name__}: {exc}") from exc
    if not device.startswith("cuda"):
        model.to(device)
    return model


def apply_adapter(model: Any, adapter: Path, name: str, *, merge: bool) -> Any:
    """``model`` with the LoRA adapter at ``adapter`` on it, frozen; with ``merge``, folded
    into the weights (as fast per token as the base alone, and no longer separable)."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:
        raise ModelLoadError(name, f"{type(exc).__name__}: {exc}") from exc
    return wrapped.merge_and_unload() if merge else wrapped


def _model_class(kind: ModelKind, path: Path) -> Any:
    """The transformers class that loads the model of ``kind`` at ``path``: the auto class, or
    for a multimodal architecture the auto class does not map, the class its config names."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if kind == "text":
        return AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    import transformers

    for architecture in getattr(config, "architectures", None) or ():
        found = getattr(transformers, str(architecture), None)
        if found is not None:
            return found
    return AutoModelForImageTextToText  # its error says what is missing
