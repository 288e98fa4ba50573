"""Training in child processes: torchrun / accelerate (several GPUs or nodes) and ms-swift.

The worker's task stays the one place that talks to Redis. It starts the training processes,
follows the ``logging.jsonl`` they write (rank 0 only; one JSON object per logged step) and
turns each line into task progress, exactly as the in-process Trainer does. A cancel or a
hand-back writes a ``STOP`` file into the run folder: the processes notice it at the next step
(agreed on by every rank through one ``all_reduce``, so no rank is left waiting in a
collective), save a checkpoint and exit; a lost lease kills them at once.

The processes die with the worker, even when it is SIGKILLed: the launcher is SIGKILLed when
the worker dies, and each rank (torchrun and accelerate start them in sessions of their own)
ties itself to the launcher (see :mod:`yichui.supervise`). ms-swift's training runs in the
``swift_python`` environment through :mod:`yichui.training.swift_runner`, in the very process
the worker started (not ``swift sft``, whose trainer is a child nothing ties): it dies with the
worker too, and reads the same ``STOP`` file.

Several nodes: the worker that runs the task is node 0; every other node runs the command the
task prints into its log (the same ``torchrun`` line with its own ``--node_rank``). The run
folder must be on storage every node sees.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yichui.errors import SwiftMissingError, TaskFailedError, TrainingError
from yichui.models.targets import resolve_target
from yichui.supervise import Child, spawn, spawned_pid, tie_to_parent
from yichui.swift_env import swift_env
from yichui.tasks.context import HandedBack, LeaseLost, TaskCancelled, TaskContext
from yichui.training.args import TrainArgs
from yichui.training.dataset import IMAGE_TAG, Example, content_text, read_examples
from yichui.training.runs import checkpoint_step, latest_checkpoint, read_json, write_json

STOP_FILE = "STOP"
POLL = 0.2
STOP_GRACE = 600.0
"""Seconds the processes get to save a checkpoint and exit after a cancel."""

_ADAPTER_FILES = (
    "adapter_", "tokenizer", "special_tokens_map", "chat_template", "processor_config",
    "preprocessor_config", "args.json", "additional_config.json",
)  # fmt: skip
"""What of a swift checkpoint the adapter folder keeps: the weights, the tokenizer, (a
multimodal base) the processor, and the arguments ``swift export`` merges it with."""

Parser = Callable[[dict[str, Any]], tuple[int, int, dict[str, float]] | None]


# -- the worker's side ----------------------------------------------------------------------------
def distributed_train(ctx: TaskContext, args: TrainArgs) -> dict[str, Any]:
    """Run ``train`` under torchrun (or accelerate) with ``nproc_per_node`` × ``nnodes``."""
    from yichui.training.trainer import finish_run

    rt = ctx.services
    s = rt.settings
    run_dir = Path(args.run_dir)
    base = resolve_target(rt.registry, args.model).base
    spec = run_dir / "launch.json"
    write_json(
        spec,
        {
            "args": args.model_dump(mode="json"),
            "base_path": base.path,
            "device": s.inference_device,
        },
    )
    if args.nnodes > 1 and not s.train_master_addr:
        raise TrainingError(
            "training on several nodes needs train_master_addr (this node's address)",
            hint="set YICHUI_TRAIN_MASTER_ADDR on the worker of node 0",
        )
    port = s.train_master_port or _free_port()
    addr = s.train_master_addr or "127.0.0.1"
    from yichui.ml.loading import resolve_device

    gpu = resolve_device(s.inference_device).startswith("cuda")
    launch = functools.partial(
        launch_command,
        s.train_launcher,
        spec,
        args.nproc_per_node,
        args.nnodes,
        addr,
        port,
        gpu=gpu,
    )
    cmd = launch(node_rank=0)
    if args.nnodes > 1:
        other = launch(node_rank=1)
        ctx.log("on every other node run (with its own node rank): " + " ".join(other))
    resume = latest_checkpoint(run_dir)
    ctx.log(
        f"attempt {ctx.attempt}: {s.train_launcher} with {args.nproc_per_node} process(es)"
        f" × {args.nnodes} node(s)" + (f", resuming from {resume.name}" if resume else "")
    )
    started = time.monotonic()
    follow_process(ctx, cmd, run_dir, run_dir / "logging.jsonl", parse_trainer_line)
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").exists():
        raise TaskFailedError(f"the training processes wrote no adapter into {adapter_dir}")
    ctx.flush()
    final = read_json(run_dir / "result.json") or {}
    return finish_run(
        ctx,
        args,
        base,
        adapter_dir,
        started=started,
        resume=resume,
        steps=int(final.get("steps", 0)),
        train_loss=float(final.get("train_loss", 0.0)),
        final=final.get("final", {}),
        processes=args.nproc_per_node * args.nnodes,
        world_size=final.get("world_size"),  # the processes that trained, as rank 0 saw them
    )


def launch_command(
    launcher: str,
    spec: Path,
    nproc: int,
    nnodes: int,
    addr: str,
    port: int,
    *,
    node_rank: int,
    gpu: bool = False,
) -> list[str]:
    """The command that starts the training processes of one node."""
    if launcher == "accelerate":
        return [  # this interpreter's accelerate, whatever PATH says
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            f"--num_processes={nproc * nnodes}",
            f"--num_machines={nnodes}",
            f"--machine_rank={node_rank}",
            f"--main_process_ip={addr}",
            f"--main_process_port={port}",
            # accelerate's --cpu runs one process: several go through its torchrun launcher
            # (gloo on CPUs), and the Trainer's own arguments decide the precision
            "--multi_gpu" if gpu or nproc * nnodes > 1 else "--cpu",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            "-m",
            "yichui.training.launch",
            str(spec),
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={addr}",
        f"--master_port={port}",
        "-m",
        "yichui.training.launch",
        str(spec),
    ]


def follow_process(
    ctx: TaskContext,
    cmd: list[str],
    run_dir: Path,
    log_file: Path | Callable[[], Path | None],
    parse: Parser,
) -> None:
    """Run ``cmd`` (its own session, tied to this process), turning ``log_file`` lines into
    progress and its output into log lines, until it exits; cancel and hand-back ask it to stop
    (``STOP``)."""
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    out_path = run_dir / "launch.log"
    with open(out_path, "ab") as out:
        try:
            proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
        except OSError as exc:  # the launcher is not installed on this worker
            raise TrainingError(f"cannot start {cmd[0]!r}: {exc.strerror or exc}") from exc
    offset, out_offset = 0, out_path.stat().st_size if out_path.exists() else 0
    tail: deque[str] = deque(maxlen=20)
    stop_asked: float | None = None
    try:
        while True:
            code = proc.poll()
            path = log_file() if callable(log_file) else log_file
            if path is not None and path.exists():
                offset = _read_progress(ctx, path, offset, parse, quiet=stop_asked is not None)
            out_offset = _read_output(ctx, out_path, out_offset, tail, quiet=stop_asked is not None)
            if code is not None:
                break
            reason = ctx.stopping
            if reason is LeaseLost:
                _kill(proc)
                raise LeaseLost(LeaseLost.__doc__)
            if reason is not None and stop_asked is None:
                (run_dir / STOP_FILE).write_text(reason.__name__)
                stop_asked = time.monotonic()
            if stop_asked is not None and time.monotonic() - stop_asked > STOP_GRACE:
                _kill(proc)
            time.sleep(POLL)
    except BaseException:
        _kill(proc)
        raise
    if stop_asked is not None:
        kept = latest_checkpoint(run_dir)
        ctx.log(f"stopping: checkpoint {kept.name if kept else 'none'} kept in {run_dir}")
        ctx.check()
    if code != 0:
        last = " | ".join(list(tail)[-3:]) or f"see {out_path}"
        raise TaskFailedError(f"training processes exited with status {code}: {last}")


def _read_progress(ctx: TaskContext, path: Path, offset: int, parse: Parser, *, quiet: bool) -> int:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next round
    for raw in data[:end].splitlines():
        try:
            row = json.loads(raw)
        except ValueError:
            continue
        parsed = parse(row) if isinstance(row, dict) else None
        if parsed is None:
            continue
        step, total, metrics = parsed
        if quiet:  # winding down after a cancel: the step the checkpoint is saved at
            ctx.report_final(step, total, unit="step", **metrics)
            continue
        # a cancel or hand-back noticed here is acted on by the caller's loop (ctx.stopping)
        with contextlib.suppress(TaskCancelled, HandedBack):
            ctx.report(step, total, unit="step", **metrics)
    return offset + end


def _read_output(
    ctx: TaskContext, path: Path, offset: int, tail: deque[str], *, quiet: bool
) -> int:
    if not path.exists():
        return offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(1 << 20)
    end = data.rfind(b"\n") + 1
    for raw in data[:end].decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if line:
            tail.append(line[:500])
            if not quiet:
                with contextlib.suppress(TaskCancelled, HandedBack):  # see _read_progress
                    ctx.log(line[:500])
    return offset + end


def _kill(proc: Child) -> None:
    proc.kill_tree()  # the ranks too: they run in sessions of their own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_trainer_line(row: dict[str, Any]) -> tuple[int, int, dict[str, float]] | None:
    """A ``logging.jsonl`` line of ours -> (step, total, metrics)."""
    if "step" not in row or "loss" not in row:
        return None
    metrics = {
        k: float(row[k])
        for k in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch")
        if isinstance(row.get(k), int | float)
    }
    return int(row["step"]), int(row.get("total") or 0), metrics


# -- ms-swift -------------------------------------------------------------------------------------
SWIFT_RUNNER = Path(__file__).with_name("swift_runner.py")
"""Run by the ms-swift environment's interpreter: ``sft`` in that process (see its docstring)."""


def swift_train(ctx: TaskContext, args: TrainArgs) -> dict[str, Any]:
    """Run ms-swift's ``sft`` (LoRA) in the ms-swift environment and follow its
    ``logging.jsonl``; a retry resumes from swift's newest checkpoint."""
    from yichui.training.trainer import finish_run

    rt = ctx.services
    try:
        env = swift_env(rt.settings)
    except SwiftMissingError as exc:  # this worker has none: another one may
        raise TrainingError(exc.message, hint=exc.hint) from exc
    run_dir = Path(args.run_dir)
    base = resolve_target(rt.registry, args.model).base
    data = run_dir / "swift_dataset.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for ex in read_examples(args.dataset.path):
            fh.write(json.dumps(swift_record(ex), ensure_ascii=False) + "\n")
    out_dir = run_dir / "swift"
    resume = latest_swift_checkpoint(out_dir)
    spec = run_dir / "swift_spec.json"
    argv = swift_arguments(
        args, str(base.path), data, out_dir, resume, dtype=_swift_dtype(rt.settings, args, base)
    )
    write_json(
        spec,
        {
            "run_dir": str(run_dir),
            "model_dir": str(base.path),
            "model_type": args.swift_model_type,
            "template": args.swift_template,
            "stop_file": STOP_FILE,
            "argv": argv,
        },
    )
    ctx.log(
        f"attempt {ctx.attempt}: ms-swift {env.swift_version} ({env.python}): sft "
        + " ".join(argv)
        + (f"; resuming from {resume.parent.name}/{resume.name}" if resume else "")
    )
    started = time.monotonic()
    error_file = run_dir / "error.json"
    try:
        follow_process(
            ctx,
            [str(env.python), str(SWIFT_RUNNER), str(spec)],
            run_dir,
            lambda: _newest(out_dir, "logging.jsonl"),
            parse_swift_line,
        )
    except TaskFailedError as exc:
        failed = read_json(error_file)
        if failed:  # swift's own reason, and whether another attempt could do better
            raise TaskFailedError(
                f"ms-swift sft failed: {failed.get('reason')}",
                retryable=bool(failed.get("retryable", True)),
            ) from exc
        raise
    last = latest_swift_checkpoint(out_dir)
    if last is None:
        raise TaskFailedError(f"ms-swift sft wrote no checkpoint under {out_dir}")
    adapter_dir = run_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    adapter_dir.mkdir()
    for f in last.iterdir():
        if f.is_file() and f.name.startswith(_ADAPTER_FILES):
            shutil.copy2(f, adapter_dir / f.name)
    ctx.flush()
    final = _swift_final(last.parent / "logging.jsonl")
    return finish_run(
        ctx,
        args,
        base,
        adapter_dir,
        started=started,
        resume=resume,
        steps=checkpoint_step(last),
        train_loss=float(final.get("train_loss", 0.0)),
        final={k: v for k, v in final.items() if isinstance(v, int | float)},
        backend="swift",
        swift={"version": env.swift_version, "checkpoint": str(last)},
    )


def _swift_dtype(settings: Any, args: TrainArgs, base: Any) -> str:
    """The dtype ms-swift loads the base in: the one asked for, else float32 on a CPU (bf16
    steps are slow there) and the model's own on an accelerator."""
    if args.swift_dtype != "auto":
        return args.swift_dtype
    from yichui.ml.loading import resolve_device

    if not resolve_device(settings.inference_device).startswith("cuda"):
        return "float32"
    config = read_json(Path(str(base.path)) / "config.json") or {}
    found = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return found if found in ("bfloat16", "float16", "float32") else "bfloat16"


def _swift_final(log: Path) -> dict[str, Any]:
    """The end-of-training figures of a swift run's ``logging.jsonl`` (``train_loss``,
    ``train_runtime``): its last such line, or the last such entry of the closing summary's
    ``log_history``."""
    try:
        lines = log.read_text().strip().splitlines()
    except OSError:
        return {}
    for raw in reversed(lines):
        try:
            row = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        rows = [row, *reversed(row.get("log_history") or [])]
        for found in rows:
            if isinstance(found, dict) and isinstance(found.get("train_loss"), int | float):
                return found
    return {}


def swift_record(ex: Example) -> dict[str, Any]:
    """An example in ms-swift's format: text messages, each image an ``<image>`` tag in its
    text and a path in ``images`` (a snapshot's images are files)."""
    messages = [
        {"role": m["role"], "content": content_text(m["content"], image=IMAGE_TAG)}
        for m in ex.messages
    ]
    record: dict[str, Any] = {"messages": messages}
    if ex.images:
        record["images"] = [str(s.path) for s in ex.images if s.path is not None]
    return record


def swift_arguments(
    args: TrainArgs,
    base_path: str,
    data: Path,
    out_dir: Path,
    resume: Path | None,
    *,
    dtype: str,
) -> list[str]:
    """``swift sft``'s arguments for ``args`` (ms-swift 4.x names; the runner adds the model
    type and template)."""
    cmd = [
        "--model", base_path,
        "--torch_dtype", dtype,
        "--tuner_type", "lora",
        "--dataset", str(data),
        "--output_dir", str(out_dir),
        "--lora_rank", str(args.rank),
        "--lora_alpha", str(args.alpha),
        "--lora_dropout", str(args.dropout),
        "--learning_rate", str(args.learning_rate),
        "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", str(args.grad_accum),
        "--max_length", str(args.max_length),
        "--seed", str(args.seed),
        "--save_steps", str(args.save_steps),
        "--save_total_limit", str(args.keep_checkpoints),
        "--warmup_steps", str(args.warmup_steps),
        "--lr_scheduler_type", args.lr_scheduler,
        "--weight_decay", str(args.weight_decay),
        "--logging_steps", "1",
        "--target_modules", *(args.target_modules or ("all-linear",)),
        "--dataloader_num_workers", "0",  # no forks: the training dies with the worker
        "--dataset_num_proc", "1",
        "--report_to", "none",
        "--check_model", "false",  # no call to ModelScope's hub (offline here)
    ]  # fmt: skip
    if args.max_steps:
        cmd += ["--max_steps", str(args.max_steps)]
    if args.gradient_checkpointing:
        cmd += ["--gradient_checkpointing", "true"]
    if args.qlora:
        cmd += ["--quant_bits", "4", "--quant_method", "bnb"]
    if resume is not None:
        cmd += ["--resume_from_checkpoint", str(resume)]
    return cmd


def parse_swift_line(row: dict[str, Any]) -> tuple[int, int, dict[str, float]] | None:
    """A line of ms-swift's ``logging.jsonl`` (``"global_step/max_steps": "5/100"``, loss,
    grad_norm, learning_rate, epoch, ``train_speed(iter/s)``) -> (step, total, metrics)."""
    where = row.get("global_step/max_steps")
    if not isinstance(where, str) or "/" not in where or "loss" not in row:
        return None
    try:
        step, total = (int(x) for x in where.split("/", 1))
    except ValueError:
        return None
    metrics = {
        k: float(row[k])
        for k in ("loss", "learning_rate", "grad_norm", "epoch")
        if isinstance(row.get(k), int | float)
    }
    return step, total, metrics


def latest_swift_checkpoint(out_dir: Path) -> Path | None:
    """The newest ``v*/checkpoint-N`` swift saved (it makes a versioned folder per run)."""
    found = [
        (checkpoint_step(p), p)
        for p in out_dir.glob("v*/checkpoint-*")
        if (p / "adapter_config.json").exists()
    ]
    return max(found)[1] if found else None


def _newest(folder: Path, name: str) -> Path | None:
    found = sorted(folder.glob(f"v*/{name}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# -- the training processes' side ------------------------------------------------------------------
def _child_main(spec_path: str) -> None:
    """One training process (``python -m yichui.training.launch SPEC``), under torchrun."""
    # first, before the slow imports: a rank whose launcher is gone has no one to report to
    # (the task is reclaimed and resumed from the last checkpoint elsewhere)
    tie_to_parent(signal.SIGKILL, parent=spawned_pid())
    import torch.distributed as dist
    from transformers import TrainerCallback

    from yichui.training.progress import TaskProgress
    from yichui.training.trainer import build_trainer

    spec = json.loads(Path(spec_path).read_text())
    args = TrainArgs.model_validate(spec["args"])
    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    stop_file = run_dir / STOP_FILE

    class StopFile(TrainerCallback):
        """Every rank stops at the same step: rank 0's view of STOP is all-reduced."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            import torch

            flag = torch.tensor([1.0 if stop_file.exists() else 0.0])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                control.should_save = True
                control.should_training_stop = True

    from yichui.ml.loading import resolve_device

    device = resolve_device(spec.get("device") or "auto")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    callbacks: list[Any] = [StopFile()]
    progress = TaskProgress(None, run_dir if rank == 0 else None)
    callbacks.append(progress)
    trainer, preprocessor = build_trainer(
        args, Path(spec["base_path"]), args.model, device, callbacks
    )
    resume = latest_checkpoint(run_dir)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    progress.close()
    if stop_file.exists():
        return
    if rank == 0:
        trainer.save_model(str(run_dir / "adapter"))
        preprocessor.save_pretrained(str(run_dir / "adapter"))
        write_json(
            run_dir / "result.json",
            {
                "steps": int(trainer.state.global_step),
                "train_loss": float(result.training_loss),
                "final": progress.last,
                "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            },
        )


if __name__ == "__main__":
    _child_main(sys.argv[1])
