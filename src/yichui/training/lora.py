"""The ``train`` task: LoRA (QLoRA on a GPU) with peft and the transformers Trainer.

A run lives in its folder (see :mod:`yichui.training.runs`). Each attempt resumes from the
newest whole checkpoint there, so a worker killed mid-training costs at most ``save_steps``
steps: the step count, optimizer, scheduler and RNG states continue where they stopped. At the
end the adapter (with the tokenizer, for its chat template; a multimodal base's processor) is
registered in the models root under ``output``; its ``model_status`` entry exists the moment
the task succeeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from yichui.ml.loading import require_ml, resolve_device
from yichui.models.targets import resolve_target
from yichui.tasks.context import TaskContext
from yichui.training.args import TrainArgs
from yichui.training.runs import checkpoint_step, latest_checkpoint
from yichui.training.tasks import TrainingServices
from yichui.training.trainer import build_trainer, check_snapshot, finish_run, run_training


def train(ctx: TaskContext[TrainingServices], args: TrainArgs) -> dict[str, Any]:
    require_ml("fine-tuning")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.backend == "swift":
        from yichui.training.launch import swift_train

        return swift_train(ctx, args)
    if args.nproc_per_node > 1 or args.nnodes > 1:
        from yichui.training.launch import distributed_train

        return distributed_train(ctx, args)
    check_snapshot(args.dataset)
    rt = ctx.services
    base = resolve_target(rt.registry, args.model).base
    device = resolve_device(rt.settings.inference_device)
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        ctx.log(
            f"attempt {ctx.attempt}: resuming from {resume.name} (step {checkpoint_step(resume)})"
        )
    else:
        ctx.log(f"attempt {ctx.attempt}: LoRA on {args.model} ({device}), run {run_dir}")
    from yichui.training.progress import TaskProgress

    progress = TaskProgress(ctx, run_dir)
    started = time.monotonic()
    try:
        trainer, preprocessor = build_trainer(
            args, Path(base.path or ""), args.model, device, [progress]
        )
        ctx.log(f"{len(trainer.train_dataset)} examples, batch {args.batch_size}×{args.grad_accum}")
        result = run_training(trainer, resume)
    finally:
        progress.close()
    if progress.stopped is not None:
        kept = latest_checkpoint(run_dir)
        ctx.log(f"stopping: checkpoint {kept.name if kept else 'none'} kept in {run_dir}")
        ctx.check()  # raises the cancel or the hand-back
    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    preprocessor.save_pretrained(str(adapter_dir))  # the tokenizer, or a processor
    ctx.flush()  # a run whose lease was lost stops here, before registering anything
    return finish_run(
        ctx,
        args,
        base,
        adapter_dir,
        started=started,
        resume=resume,
        steps=int(trainer.state.global_step),
        train_loss=float(result.training_loss),
        final=progress.last,
    )
