"""The pieces of a LoRA run that every launch path shares: build the Trainer, run it (with OOM
and full-disk turned into clear failures), check the dataset snapshot, and register the adapter
when the run is over. The ``train`` handler (:mod:`yichui.training.lora`) runs them in the
worker; the launchers (:mod:`yichui.training.launch`) in each rank or around ``swift sft``.
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path
from typing import Any

from yichui.errors import TaskFailedError, TrainingError
from yichui.ml.loading import load_model, load_processor, load_tokenizer, resolve_dtype
from yichui.models.install import install_model
from yichui.models.kinds import detect_kind
from yichui.models.status import read_manifest
from yichui.tasks.context import TaskContext
from yichui.training.args import DatasetRef, TrainArgs
from yichui.training.dataset import file_sha256, read_examples, snapshot_problem
from yichui.training.loading import check_qlora
from yichui.training.runs import checkpoint_step, write_json


def finish_run(
    ctx: TaskContext,
    args: TrainArgs,
    base: Any,
    adapter_dir: Path,
    *,
    started: float,
    resume: Path | None,
    steps: int,
    train_loss: float,
    final: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The end of every backend's run: ``result.json``, the adapter registered, the result."""
    summary = {
        "output": args.output,
        "base": args.model,
        "base_fingerprint": base.fingerprint,
        "base_kind": base.kind,
        "steps": steps,
        "train_loss": train_loss,
        "final": final,
        "seconds": round(time.monotonic() - started, 3),
        "resumed_from": checkpoint_step(resume) if resume else 0,
        "attempt": ctx.attempt,
        "run_dir": args.run_dir,
        "task": ctx.id,
        "dataset": args.dataset.model_dump(),
        **extra,
    }
    write_json(Path(args.run_dir) / "result.json", summary)
    status = register_adapter(ctx.services.registry, args, adapter_dir, summary, task_id=ctx.id)
    ctx.log(f"adapter registered as {args.output} ({status.size} bytes)")
    return {**summary, "path": status.path, "fingerprint": status.fingerprint}


def check_snapshot(dataset: DatasetRef) -> None:
    """The dataset is the one that was checked when the task was queued (a task submitted by
    hand with another file, or a snapshot changed since, fails rather than trains on it)."""
    path = Path(dataset.path)
    if not path.is_file():
        raise TaskFailedError(f"the dataset snapshot {path} is gone", retryable=False)
    if file_sha256(path) != dataset.sha256:
        raise TaskFailedError(
            f"the dataset {path} is not the one this task was queued with (SHA-256 differs)",
            retryable=False,
        )
    problem = snapshot_problem(path)
    if problem is not None:
        raise TaskFailedError(f"the dataset {path}: {problem}", retryable=False)


def run_training(trainer: Any, resume: Path | None) -> Any:
    """``trainer.train()``, out-of-memory and a full disk turned into reasons (not retried:
    the same run would fail the same way; the checkpoints stay for ``tasks retry``)."""
    import torch

    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.OutOfMemoryError as exc:
        raise TaskFailedError(
            f"out of memory at step {trainer.state.global_step}: lower batch_size or max_length"
            " (the last checkpoint is kept)",
            retryable=False,
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise TaskFailedError(
                f"no space left on the device at step {trainer.state.global_step}"
                " (the last checkpoint is kept)",
                retryable=False,
            ) from exc
        raise


def build_trainer(
    args: TrainArgs,
    base_path: Path,
    base_name: str,
    device: str,
    callbacks: list[Any],
    *,
    output_dir: Path | None = None,
) -> tuple[Any, Any]:
    """A Trainer for ``args`` on the model at ``base_path``, with the peft model inside, and
    what the adapter folder carries beside the weights: the tokenizer (its chat template), or a
    multimodal model's processor (image processor, tokenizer, chat template)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from yichui.training.targets import lora_targets

    if args.qlora:
        check_qlora(device)
    dtype = resolve_dtype(device)
    multimodal = detect_kind(base_path) == "multimodal"
    dataset, collator, carried = _training_data(args, base_path, base_name, multimodal=multimodal)
    model = load_model(
        base_path,
        base_name,
        device=device,
        dtype=dtype,
        kind="multimodal" if multimodal else "text",
        qlora=args.qlora,
    )
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=args.gradient_checkpointing
        )
    targets, to_save = lora_targets(
        model, args.target_modules, multimodal=multimodal, train_projector=args.train_projector
    )
    try:
        lora = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=targets,
            modules_to_save=to_save,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    except ValueError as exc:  # target modules that the architecture does not have
        raise TrainingError(f"LoRA cannot be applied: {exc}") from exc
    cuda = device.startswith("cuda")
    targs = TrainingArguments(
        output_dir=str(output_dir or Path(args.run_dir) / "checkpoints"),
        max_steps=args.max_steps or -1,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.keep_checkpoints,
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",  # cuda and mps: the Trainer's own device placement
        bf16=cuda and dtype == "bfloat16",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
    )
    # our progress goes to the task; the Trainer's own printing would only clutter the log
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer, carried


def _training_data(
    args: TrainArgs, base_path: Path, base_name: str, *, multimodal: bool
) -> tuple[Any, Any, Any]:
    """(dataset, collator, tokenizer or processor) for the base's kind: text examples encoded
    at once; examples with images one by one as the Trainer asks
    (:mod:`yichui.training.vision_data`)."""
    from yichui.training.data import Collator, EncodedDataset, encode, pad_id

    examples = read_examples(args.dataset.path)
    if not multimodal:
        tokenizer = load_tokenizer(base_path, base_name)
        rows = [encode(tokenizer, ex, args.max_length) for ex in examples]
        return EncodedDataset(rows), Collator(pad_id(tokenizer)), tokenizer
    from yichui.training.vision_data import VisionCollator, VisionDataset, VisionEncoder

    encoder = VisionEncoder(
        load_processor(base_path, base_name),
        model=base_name,
        max_length=args.max_length,
        bounds=vision_bounds(args.vision_min_pixels, args.vision_max_pixels),
    )
    # the adapter carries the processor as the base has it (the bounds are the engine's)
    carried = load_processor(base_path, base_name)
    return VisionDataset(examples, encoder), VisionCollator(pad_id(encoder.tokenizer)), carried


def vision_bounds(min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(min, max) pixels of an image, the settings' defaults for a task queued without them."""
    from yichui.config import Settings

    fields = Settings.model_fields
    low = min_pixels or int(fields["vision_min_pixels"].default)
    high = max_pixels or int(fields["vision_max_pixels"].default)
    return min(low, high), high


def register_adapter(
    registry: Any, args: TrainArgs, adapter_dir: Path, summary: dict[str, Any], *, task_id: str
) -> Any:
    """Install the adapter as model ``args.output`` (idempotent for a retried task)."""

    def produce(staging: Path, _lock: Any) -> dict[str, Any]:
        for f in adapter_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, staging / f.name)
        return {
            "source": "train",
            "revision": f"task:{task_id}",
            "base": args.model,
            "base_fingerprint": summary["base_fingerprint"],
            "task": task_id,
            "run_dir": args.run_dir,
            "dataset": summary["dataset"],
            "train_loss": summary["train_loss"],
            "steps": summary["steps"],
            "backend": args.backend,
            "lora": {
                "rank": args.rank,
                "alpha": args.alpha,
                "dropout": args.dropout,
                "target_modules": list(args.target_modules),
                "train_projector": args.train_projector,
            },
            "base_kind": summary.get("base_kind") or "text",
            "vision_max_pixels": args.vision_max_pixels,
            "vision_min_pixels": args.vision_min_pixels,
        }

    def ours(status: Any) -> bool:
        return bool(read_manifest(Path(status.path or "")).get("task") == task_id)

    existing = registry.status(args.output).status
    if existing.exists and not ours(existing) and not args.replace:
        raise TrainingError(
            f"a model named {args.output!r} appeared meanwhile; the adapter stays in {adapter_dir}",
            hint="import it under another name with `yichui models import`",
        )
    result = install_model(
        registry, args.output, produce, event="trained", is_current=ours, replace=False
    )
    return result.status
