"""The ``merge`` task: fold a LoRA adapter into its base and register a new model.

The merged weights are written in the base's dtype (or the one asked for) into the model's
staging folder and moved into place by :func:`~yichui.models.install.install_model`, which
publishes the new ``model_status`` entry in the same step: the model is listed, and servable,
the moment the task succeeds.

A multimodal base gives a multimodal model: the merged weights (vision tower, projector and
language model) with the processor the adapter was trained with (image processor, tokenizer,
chat template), registered as kind ``multimodal``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from yichui.errors import SwiftMissingError, TaskFailedError, TrainingError
from yichui.ml.loading import (
    ModelKind,
    apply_adapter,
    load_model,
    load_processor,
    load_tokenizer,
    require_ml,
)
from yichui.models.install import install_model
from yichui.models.status import read_manifest
from yichui.models.targets import resolve_target
from yichui.swift_env import swift_env
from yichui.tasks.context import TaskContext
from yichui.training.args import MergeArgs
from yichui.training.tasks import TrainingServices

STEPS = 4


def merge(ctx: TaskContext[TrainingServices], args: MergeArgs) -> dict[str, Any]:
    require_ml("merging")
    rt = ctx.services
    target = resolve_target(rt.registry, f"{args.base}@{args.adapter}")
    assert target.adapter is not None
    base_path, adapter_path = Path(target.base.path or ""), Path(target.adapter.path or "")
    dtype = _dtype(base_path, args.dtype)
    kind: ModelKind = "multimodal" if target.base.kind == "multimodal" else "text"

    trained_with = read_manifest(adapter_path).get("backend") or "peft"
    backend = trained_with if args.backend == "auto" else args.backend

    def produce(staging: Path, _lock: Any) -> dict[str, Any]:
        if backend == "swift":
            _swift_export(ctx, base_path, adapter_path, staging, dtype)
        else:
            _peft_merge(staging)
        trained = read_manifest(adapter_path)
        return {
            "source": "merge",
            "revision": f"merge:{target.fingerprint}",
            "base": args.base,
            "base_fingerprint": target.base.fingerprint,
            "adapter": args.adapter,
            "adapter_fingerprint": target.adapter.fingerprint if target.adapter else None,
            "dataset": trained.get("dataset"),
            "task": ctx.id,
            "merged_with": backend,
        }

    def _peft_merge(staging: Path) -> None:
        ctx.log(f"loading {args.base} ({dtype})")
        model = load_model(base_path, args.base, device="cpu", dtype=dtype, kind=kind)
        ctx.report(1, STEPS)
        ctx.log(f"applying {args.adapter}")
        model = apply_adapter(model, adapter_path, args.adapter, merge=False)
        ctx.report(2, STEPS)
        model = model.merge_and_unload()
        ctx.report(3, STEPS)
        ctx.flush()  # a run whose lease was lost stops before writing the model
        model.save_pretrained(str(staging))
        if kind == "multimodal":  # its tokenizer and chat template, with the image processor
            load_processor(base_path, args.adapter, adapter=adapter_path).save_pretrained(
                str(staging)
            )
        else:
            load_tokenizer(base_path, args.adapter, adapter=adapter_path).save_pretrained(
                str(staging)
            )
        ctx.report(4, STEPS)

    def current(status: Any) -> bool:
        return bool(read_manifest(Path(status.path or "")).get("task") == ctx.id)

    result = install_model(
        rt.registry, args.output, produce, event="merged", is_current=current, replace=False
    )
    status = result.status
    ctx.log(f"registered {args.output} ({status.size} bytes, {result.action})")
    return {
        "output": args.output,
        "path": status.path,
        "size": status.size,
        "fingerprint": status.fingerprint,
        "base": args.base,
        "adapter": args.adapter,
        "dtype": dtype,
        "kind": status.kind,
        "backend": backend,
    }


def _swift_export(
    ctx: TaskContext[TrainingServices], base: Path, adapter: Path, staging: Path, dtype: str
) -> None:
    """ms-swift's ``export --merge_lora`` into ``staging`` (an adapter trained with ms-swift
    carries the ``args.json`` it reads its model type and template from)."""
    from yichui.training.launch import follow_process

    try:
        env = swift_env(ctx.services.settings)
    except SwiftMissingError as exc:
        raise TrainingError(exc.message, hint=exc.hint) from exc
    work = Path(ctx.services.settings.data_dir) / "merges" / ctx.id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "merged"
    cmd = env.module(
        "swift.cli.export",
        "--adapters", str(adapter),
        "--model", str(base),
        "--merge_lora", "true",
        "--torch_dtype", dtype,
        "--output_dir", str(out),
    )  # fmt: skip
    ctx.log(f"ms-swift {env.swift_version} ({env.python}): " + " ".join(cmd[2:]))
    ctx.report(1, STEPS)
    try:
        follow_process(ctx, cmd, work, lambda: None, lambda _row: None)
    except TaskFailedError as exc:  # the same export would fail the same way: not retried
        raise TaskFailedError(f"ms-swift export failed: {exc}", retryable=False) from exc
    if not (out / "config.json").exists():
        raise TaskFailedError(f"ms-swift export wrote no model into {out}")
    ctx.report(3, STEPS)
    ctx.flush()  # a run whose lease was lost stops before writing the model
    for f in out.iterdir():
        if f.name != "args.json":  # ms-swift's own record of the export
            shutil.move(str(f), staging / f.name)
    shutil.rmtree(work, ignore_errors=True)
    ctx.report(4, STEPS)


def _dtype(base: Path, asked: str) -> str:
    if asked != "auto":
        return asked
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    found = str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "float32")
    return found if found in ("bfloat16", "float16", "float32") else "float32"
