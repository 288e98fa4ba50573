"""Arguments of the ``train``, ``merge`` and ``evaluate`` task types (validated when queued).

Ranges are checked here, so an out-of-range hyper-parameter is refused with the field named
before anything is queued. The dataset and run-folder fields are filled in by
:class:`~yichui.training.service.TrainingService`, which validates the file first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from yichui.models.names import validate_name
from yichui.tasks.types import TaskArgs

Backend = Literal["peft", "swift"]


def validate_target(name: str) -> str:
    """``base`` or ``base@adapter``: each part a valid model name."""
    base, sep, adapter = name.partition("@")
    validate_name(base)
    if sep:
        validate_name(adapter)
    return name


class DatasetRef(TaskArgs):
    """A validated dataset: its snapshot under ``<data_dir>/datasets`` and where it came from."""

    path: str
    """The snapshot the task reads (content-addressed: ``<sha256>.jsonl``)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    records: int = Field(ge=1)
    origin: str = ""
    """The file the user named (for display)."""


class TrainArgs(TaskArgs):
    """``train``: LoRA (or QLoRA) fine-tuning of ``model`` on a JSONL dataset."""

    model: str
    dataset: DatasetRef
    output: str
    """Name the adapter is registered under in the models root."""
    run_dir: str
    """The run's versioned folder: arguments, checkpoints, the final adapter."""
    replace: bool = False
    """Replace an existing model of the ``output`` name."""

    rank: int = Field(default=8, ge=1, le=1024)
    alpha: int = Field(default=16, ge=1, le=16384)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ()
    """Module names LoRA adapts (empty: peft's default for the architecture; ``all-linear``)."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    epochs: float = Field(default=1.0, gt=0, le=10_000)
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    """Overrides ``epochs`` when set."""
    batch_size: int = Field(default=4, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=4096)
    max_length: int = Field(default=512, ge=8, le=1_048_576)
    """Longest sequence in tokens; longer examples are cut (their answer first kept)."""
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    save_steps: int = Field(default=50, ge=1)
    """A checkpoint every this many steps (and when cancelled or handed back)."""
    keep_checkpoints: int = Field(default=2, ge=1, le=1000)
    qlora: bool = False
    """4-bit base weights (bitsandbytes, CUDA only)."""
    gradient_checkpointing: bool = False
    backend: Backend = "peft"
    """``peft`` (transformers Trainer, in the worker) or ``swift`` (ms-swift's ``sft``, in the
    ``swift_python`` environment)."""
    swift_model_type: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The swift backend: ms-swift's ``--model_type`` (default: ms-swift's match of the base's
    name, else its ``config.json`` model type)."""
    swift_template: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The swift backend: ms-swift's ``--template`` (default: the model type's, else
    ``chatml`` for a ChatML chat template)."""
    swift_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """The swift backend: ``--torch_dtype`` (``auto``: float32 on a CPU, else the base's)."""
    nproc_per_node: int = Field(default=1, ge=1, le=64)
    """Processes (GPUs) on this node: more than one launches ``torchrun``."""
    nnodes: int = Field(default=1, ge=1, le=1024)
    train_projector: bool = False
    """A multimodal base: train its projector (LLaVA's ``multi_modal_projector``, Qwen2-VL's
    ``visual.merger``, Idefics3's ``connector``) whole, beside the language model's LoRA. The
    vision tower stays frozen either way."""
    vision_max_pixels: int | None = Field(default=None, gt=0)
    """A multimodal base: the most pixels of an image the model is shown (larger ones are
    scaled down). Set from the ``vision_max_pixels`` setting when queued, so a resumed run
    sees its images as it began, and as they are served."""
    vision_min_pixels: int | None = Field(default=None, gt=0)
    """A multimodal base: the fewest (Qwen2-VL scales smaller images up); from the setting."""

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for t in value:
            if not t or not all(c.isalnum() or c in "._-" for c in t):
                raise ValueError(f"invalid module name {t!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainArgs:
        if self.warmup_steps and self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError("warmup_steps must not exceed max_steps")
        if self.output == self.model:
            raise ValueError("output must differ from the base model")
        swift_only = (self.swift_model_type, self.swift_template, self.swift_dtype != "auto")
        if self.backend != "swift" and any(swift_only):
            raise ValueError("swift_model_type, swift_template and swift_dtype need backend swift")
        return self


class MergeArgs(TaskArgs):
    """``merge``: fold an adapter into its base and register the result as a new model."""

    adapter: str
    base: str
    output: str
    replace: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """``auto``: the base model's own dtype."""
    backend: Literal["auto", "peft", "swift"] = "auto"
    """``swift``: ms-swift's ``export --merge_lora``; ``auto``: the one the adapter was trained
    with."""

    @field_validator("adapter", "base", "output")
    @classmethod
    def _names(cls, value: str) -> str:
        return validate_name(value)


class EvalArgs(TaskArgs):
    """``evaluate``: loss/perplexity and answer accuracy of ``model`` on a JSONL set."""

    model: str
    """A model, or ``base@adapter``."""
    dataset: DatasetRef
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    """The result-cache key: model fingerprint, dataset hash and the parameters below."""
    limit: int | None = Field(default=None, ge=1)
    """Score only the first N records."""
    generate: bool = True
    """Generate answers (greedy) for exact-match / contains accuracy."""
    max_new_tokens: int = Field(default=64, ge=1, le=8192)
    max_length: int = Field(default=1024, ge=8, le=1_048_576)
    batch_size: int = Field(default=8, ge=1, le=4096)
    vision_max_pixels: int | None = Field(default=None, gt=0)
    """A multimodal model: the most pixels of an image it is shown (the setting's value when
    queued; part of the cache key)."""
    vision_min_pixels: int | None = Field(default=None, gt=0)
    """A multimodal model: the fewest (the setting's value when queued; part of the key)."""

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return validate_target(value)
