"""``yichui train``, ``yichui merge`` and ``yichui eval``: queue the task, print its id.

Without ``--wait`` the id goes to stdout alone (``TASK=$(yichui train …)``) and how to watch
it to stderr; ``--json`` prints the task as an object with ``id``; ``--wait`` follows it with a
progress bar and exits as ``yichui tasks watch`` does (0 succeeded, 1 failed, 3 cancelled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from yichui.cli.output import JsonOpt, console, err_console, print_json
from yichui.cli.tasks import EXIT_CODES, watch_task
from yichui.runtime import Runtime
from yichui.state.task_store import TaskState
from yichui.training.service import TrainingService

WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="Follow it until it ends.")]
QueueOpt = Annotated[str | None, typer.Option(help="Queue (default: task_queue).")]
ReplaceOpt = Annotated[bool, typer.Option("--replace", help="Replace a model of the output name.")]


def _svc(ctx: typer.Context) -> tuple[Runtime, TrainingService]:
    rt: Runtime = ctx.obj
    return rt, rt.training


def _queued(rt: Runtime, t: dict[str, Any], *, wait: bool, json: bool, what: str) -> None:
    if wait:
        state = watch_task(rt, t["id"], json=json)
        if state == TaskState.SUCCEEDED and not json:
            result = rt.tasks.get(t["id"]).get("result") or {}
            if result.get("path"):
                console.print(f"{what}: {result.get('output')} ({result['path']})", highlight=False)
        raise typer.Exit(EXIT_CODES.get(state, 1))
    if json:
        print_json(t)
        return
    typer.echo(t["id"])
    err_console.print(f"watch it with: yichui tasks watch {t['id']}", highlight=False)


def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Base model to fine-tune.")],
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="JSONL file of examples.")],
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Adapter name (default: <model>-lora-<time>)."),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank r. [default: 8]")] = None,
    alpha: Annotated[int | None, typer.Option(help="LoRA alpha. [default: 16]")] = None,
    dropout: Annotated[float | None, typer.Option(help="LoRA dropout. [default: 0.05]")] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(help="Comma-separated module names, or all-linear (default: peft's)."),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate. [default: 2e-4]")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs. [default: 1]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Steps (overrides --epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-device batch. [default: 4]")] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Gradient accumulation. [default: 1]")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per example. [default: 512]")
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Warm-up steps. [default: 0]")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed. [default: 42]")] = None,
    save_steps: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps. [default: 50]")
    ] = None,
    qlora: Annotated[
        bool, typer.Option("--qlora", help="4-bit base (CUDA + bitsandbytes).")
    ] = False,
    lr_scheduler: Annotated[
        str | None, typer.Option(help="linear, cosine, constant, constant_with_warmup.")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[default: 0]")] = None,
    keep_checkpoints: Annotated[
        int | None, typer.Option(help="Newest checkpoints kept. [default: 2]")
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Less memory, slower steps.")
    ] = False,
    nnodes: Annotated[int | None, typer.Option(help="Nodes (see docs/training.md).")] = None,
    backend: Annotated[
        str | None, typer.Option(help="peft (default) or swift (ms-swift, docs/ms-swift.md).")
    ] = None,
    swift_model_type: Annotated[
        str | None, typer.Option(help="--backend swift: ms-swift's --model_type.")
    ] = None,
    swift_template: Annotated[
        str | None, typer.Option(help="--backend swift: ms-swift's --template.")
    ] = None,
    nproc_per_node: Annotated[
        int | None, typer.Option(help="Processes on the node: >1 launches torchrun.")
    ] = None,
    train_projector: Annotated[
        bool,
        typer.Option("--train-projector", help="Vision-language base: train its projector too."),
    ] = False,
    replace: ReplaceOpt = False,
    queue: QueueOpt = None,
    wait: WaitOpt = False,
    json: bool = JsonOpt,
) -> None:
    """Fine-tune MODEL with LoRA on a JSONL dataset (checked before anything is queued)."""
    rt, svc = _svc(ctx)
    targets = (
        tuple(t.strip() for t in target_modules.split(",") if t.strip()) if target_modules else None
    )
    t = svc.train(
        model,
        dataset,
        output=output,
        replace=replace,
        queue=queue,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=targets,
        learning_rate=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        warmup_steps=warmup_steps,
        seed=seed,
        save_steps=save_steps,
        qlora=qlora or None,
        lr_scheduler=lr_scheduler,
        weight_decay=weight_decay,
        keep_checkpoints=keep_checkpoints,
        gradient_checkpointing=gradient_checkpointing or None,
        nnodes=nnodes,
        backend=backend,
        swift_model_type=swift_model_type,
        swift_template=swift_template,
        nproc_per_node=nproc_per_node,
        train_projector=train_projector or None,
    )
    if not json and not wait:
        err_console.print(f"run folder: {t['run_dir']}; adapter: {t['output']}", highlight=False)
    _queued(rt, t, wait=wait, json=json, what="adapter")


def merge(
    ctx: typer.Context,
    adapter: Annotated[str, typer.Argument(help="Adapter made by `yichui train`.")],
    base: Annotated[
        str | None, typer.Option(help="Base model (default: the one it was trained on).")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="New model's name (default: <adapter>-merged)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="auto (the base's), bfloat16, float16, float32.")
    ] = "auto",
    backend: Annotated[
        str,
        typer.Option(help="auto (the one it was trained with), peft, or swift (swift export)."),
    ] = "auto",
    replace: ReplaceOpt = False,
    queue: QueueOpt = None,
    wait: WaitOpt = False,
    json: bool = JsonOpt,
) -> None:
    """Merge an adapter into its base and register the result as a new model."""
    rt, svc = _svc(ctx)
    t = svc.merge(
        adapter,
        base=base,
        output=output,
        replace=replace,
        dtype=dtype,
        backend=backend,
        queue=queue,
    )
    _queued(rt, t, wait=wait, json=json, what="model")


def eval_(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model, or base@adapter.")],
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="JSONL evaluation set.")],
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N records.")] = None,
    generate: Annotated[
        bool, typer.Option(help="Generate answers for exact-match/contains accuracy.")
    ] = True,
    max_new_tokens: Annotated[int | None, typer.Option(help="Per answer. [default: 64]")] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per example. [default: 1024]")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per batch. [default: 8]")] = None,
    backend: Annotated[
        str, typer.Option(help="yichui (built in) or evalscope (EvalScope, in the swift env).")
    ] = "yichui",
    format_: Annotated[
        str | None,
        typer.Option("--format", help="evalscope: general_qa or general_mcq (default: guessed)."),
    ] = None,
    prompt_template: Annotated[
        str | None, typer.Option(help="evalscope: the prompt, with {question} (and {choices}).")
    ] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Run again even if cached.")] = False,
    queue: QueueOpt = None,
    wait: WaitOpt = False,
    json: bool = JsonOpt,
) -> None:
    """Evaluate MODEL on a JSONL set: loss, perplexity, exact-match and contains accuracy;
    or, with --backend evalscope, EvalScope's metrics on a general_qa / general_mcq set.

    The same evaluation asked again (same model files, dataset and parameters) is answered at
    once from the cache."""
    rt, svc = _svc(ctx)
    own = {"--format": format_ is not None, "--prompt-template": prompt_template is not None}
    if backend == "evalscope":
        from yichui.training.evalscope_backend import evaluate

        _refuse({"--no-generate": not generate, "--max-length": max_length is not None}, backend)
        sub = evaluate(
            svc,
            model,
            dataset,
            format=format_,
            queue=queue,
            refresh=refresh,
            limit=limit,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            prompt_template=prompt_template,
        )
    elif backend == "yichui":
        _refuse(own, backend)
        sub = svc.evaluate(
            model,
            dataset,
            queue=queue,
            refresh=refresh,
            limit=limit,
            generate=generate,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            batch_size=batch_size,
        )
    else:
        raise typer.BadParameter(f"{backend!r}: use yichui or evalscope", param_hint="--backend")
    if sub.cached:
        if json:
            print_json(sub.to_dict())
        else:
            _print_report(sub.report or {}, note=f"cached ({sub.source})")
        return
    assert sub.task is not None
    if not wait:
        if json:
            print_json(sub.to_dict())
        else:
            typer.echo(sub.task["id"])
            err_console.print(
                f"watch it with: yichui tasks watch {sub.task['id']}", highlight=False
            )
        return
    state = watch_task(rt, sub.task["id"], json=json)
    if state == TaskState.SUCCEEDED and not json:
        _print_report(rt.tasks.get(sub.task["id"]).get("result") or {}, note="computed")
    raise typer.Exit(EXIT_CODES.get(state, 1))


def _refuse(given: dict[str, bool], backend: str) -> None:
    """A usage error for an option of the other evaluation backend."""
    for flag, used in given.items():
        if used:
            other = "evalscope" if backend == "yichui" else "yichui"
            raise typer.BadParameter(f"an option of --backend {other} only", param_hint=flag)


def _print_report(report: dict[str, Any], *, note: str) -> None:
    from yichui.training import evalscope_report
    from yichui.training import report as builtin

    shown = evalscope_report if report.get("backend") == "evalscope" else builtin
    for line in shown.summary_lines(report):
        console.print(line, highlight=False, markup=False)
    err_console.print(f"({note})", highlight=False)
