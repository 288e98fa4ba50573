"""``yichui eval --backend evalscope``: EvalScope on a local dataset, as a yichui task whose
report is cached like yichui's own evaluation's.

EvalScope lives in the ms-swift environment (``swift_python``, ``make swift``), never in
yichui's: :func:`evaluate` (the caller's process) checks the model, that environment and the
dataset (:mod:`yichui.training.evalscope_data`), answers from the result cache when the same
evaluation ran before, else snapshots the dataset and queues an ``evalscope`` task. Its handler
:func:`run` (a worker) starts :mod:`yichui.training.evalscope_runner` in that environment, turns
EvalScope's progress file and log into the task's progress and log, reads its report
(:mod:`yichui.training.evalscope_report`) and stores it under the same kind of key as yichui's
own: the model's fingerprint, the dataset's SHA-256 and every parameter, the EvalScope version
included. Each task has a run folder, ``<data_dir>/evals/evalscope/<task id>/``::

    spec.json      what the runner is asked to do
    runner.log     the runner's output (EvalScope's console, tracebacks)
    work/          EvalScope's outputs: reports/, reviews/, predictions/, logs/, configs/
    error.json     EvalScope's reason, when it failed
    cache/, tmp/, merged/   its caches, temporary files and a merged base@adapter (removed
                   when the run ends)

A run of EvalScope that fails (a record it cannot read, a model it cannot load) fails the task at
once with EvalScope's own reason and stores nothing; only a runner that dies without a reason (a
kill, out of memory) is worth another attempt.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from yichui.config import Settings
from yichui.errors import SwiftMissingError, TaskFailedError, TrainingError
from yichui.models.targets import Target, resolve_target
from yichui.supervise import Child, spawn
from yichui.swift_env import SwiftEnv, swift_env
from yichui.tasks.context import TaskContext
from yichui.tasks.service import LOCAL_TENANT
from yichui.training.dataset import file_sha256
from yichui.training.evalscope_data import EvalScopeArgs, inspect_evalscope_dataset, snapshot
from yichui.training.evalscope_report import MODEL_ID, read_outputs
from yichui.training.runs import datasets_root, evals_root, read_json, write_json
from yichui.training.service import EvalSubmission, TrainingService, eval_key
from yichui.training.tasks import TrainingServices

TASK_TYPE = "evalscope"
RUNNER = Path(__file__).with_name("evalscope_runner.py")
POLL = 0.5
"""Seconds between two looks at the runner's progress file and logs."""
_PLACEHOLDER_SHA = "0" * 64
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)? - evalscope - (\w+): (.*)$")
_LEVELS = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NOTE = "[yichui] "


def evaluate(
    svc: TrainingService,
    model: str,
    dataset: str | Path,
    *,
    format: str | None = None,
    queue: str | None = None,
    refresh: bool = False,
    tenant: str = LOCAL_TENANT,
    **params: Any,
) -> EvalSubmission:
    """The report from the cache when this evaluation ran before; else queue it. Refused
    before anything is queued: an unknown model, a multimodal one, no EvalScope (``make
    swift``), a dataset that is not in ``format`` (None: guessed from its first record)."""
    target = resolve_target(svc.registry, model)
    _text_only(target)
    version = str(evalscope_env(svc.settings).versions["evalscope"])
    info = inspect_evalscope_dataset(dataset, format)
    task_type = svc.tasks.types.get(TASK_TYPE)
    probe = {
        "model": model,
        "dataset": info.ref(),
        "key": _PLACEHOLDER_SHA,
        "format": info.format,
        "evalscope_version": version,
        **{k: v for k, v in params.items() if v is not None},
    }
    parsed = task_type.parse(probe)
    key = eval_key(target.fingerprint, info.sha256, parsed.model_dump(mode="json"))
    if not refresh:
        found = svc.cached_report(key)
        if found is not None:
            return EvalSubmission(key, True, report=found[0], source=found[1])
    snap = snapshot(info, datasets_root(svc.settings.data_dir))
    args = {**probe, "dataset": info.ref(snap), "key": key}
    task = svc.tasks.submit(TASK_TYPE, args, queue=queue, tenant=tenant)
    return EvalSubmission(key, False, task=task)


def evalscope_env(settings: Settings) -> SwiftEnv:
    """The ms-swift environment with EvalScope, or SwiftMissingError saying ``make swift``."""
    try:
        return swift_env(settings, needs="evalscope")
    except SwiftMissingError as exc:
        raise SwiftMissingError(
            f"the evalscope backend needs EvalScope: {exc.message}; run `make swift`",
            hint=exc.hint,
        ) from exc


def run_folder(settings: Settings, task_id: str) -> Path:
    """``<data_dir>/evals/evalscope/<task id>``: everything one task's EvalScope writes."""
    return evals_root(settings.data_dir) / "evalscope" / task_id.replace(":", "_")


def run(ctx: TaskContext[TrainingServices], args: EvalScopeArgs) -> dict[str, Any]:
    """The ``evalscope`` task: run EvalScope, store its report, return it."""
    rt = ctx.services
    _check_snapshot(args.dataset.path, args.dataset.sha256)
    target = resolve_target(rt.registry, args.model)
    _text_only(target)
    env = evalscope_env(rt.settings)
    version = str(env.versions["evalscope"])
    if version != args.evalscope_version:
        ctx.log(f"this worker has EvalScope {version}, not {args.evalscope_version}: keyed by it")
        args = args.model_copy(update={"evalscope_version": version})
    key = eval_key(target.fingerprint, args.dataset.sha256, args.model_dump(mode="json"))
    if key != args.key and version == args.evalscope_version:
        ctx.log("the model changed since this evaluation was queued: scoring the current files")
    found = rt.training.cached_report(key)
    if found is not None:  # an identical evaluation finished meanwhile
        ctx.log(f"answered from the cache ({found[1]})")
        return found[0]
    folder = run_folder(rt.settings, ctx.id)
    work = folder / "work"
    for stale in ("work", "merged"):  # an earlier attempt's
        shutil.rmtree(folder / stale, ignore_errors=True)
    for stale in ("error.json", "result.json"):
        (folder / stale).unlink(missing_ok=True)
    for sub in ("cache", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    total = min(args.dataset.records, args.limit or args.dataset.records)
    spec = {
        "model_dir": str(target.base.path),
        "adapter_dir": str(target.adapter.path) if target.adapter is not None else None,
        "merged_dir": str(folder / "merged"),
        "model_id": MODEL_ID,
        "dataset": args.dataset.path,
        "dataset_dir": str(folder / "cache" / "datasets"),
        "format": args.format,
        "limit": args.limit,
        "total": total,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "prompt_template": args.prompt_template,
        "device": rt.settings.inference_device,
        "work_dir": str(work),
        "result_file": str(folder / "result.json"),
        "error_file": str(folder / "error.json"),
    }
    write_json(folder / "spec.json", spec)
    ctx.log(
        f"attempt {ctx.attempt}: EvalScope {version} ({env.python}): {args.format} on"
        f" {args.model}, {total} records; outputs in {work}"
    )
    started = time.monotonic()
    try:
        _follow(ctx, [str(env.python), str(RUNNER), str(folder / "spec.json")], folder, total)
        ran = read_json(folder / "result.json") or {}
        out = read_outputs(work, args.format)
    finally:
        for sub in ("merged", "cache", "tmp"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    report: dict[str, Any] = {
        "backend": "evalscope",
        "model": args.model,
        "fingerprint": target.fingerprint,
        "key": key,
        "dataset": args.dataset.model_dump(),
        "format": args.format,
        "params": args.model_dump(mode="json", exclude={"model", "dataset", "key", "backend"}),
        **{k: out[k] for k in ("records", "metrics", "primary_metric", "score", "samples")},
        "evalscope": {
            "version": version,
            "benchmark": args.format,
            "device": ran.get("device"),
            "dtype": ran.get("dtype"),
            "outputs": str(work),
            "report": out["report"],
        },
        "seconds": round(time.monotonic() - started, 3),
        "created": time.time(),
    }
    ctx.flush()  # a run whose lease was lost stops before storing anything
    rt.training.store_report(key, report)
    ctx.log(f"{report['primary_metric']} {report['score']} over {report['records']} records")
    return report


def child_env(folder: Path) -> dict[str, str]:
    """The runner's environment: offline, every cache and temporary file in the run folder,
    none of yichui's interpreter's module paths."""
    cache = folder / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(cache / "huggingface"),
        MODELSCOPE_CACHE=str(cache / "modelscope"),
        EVALSCOPE_CACHE=str(cache / "evalscope"),
        XDG_CACHE_HOME=str(cache),
        MPLCONFIGDIR=str(cache / "matplotlib"),
        TMPDIR=str(folder / "tmp"),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _follow(ctx: TaskContext[Any], cmd: list[str], folder: Path, total: int) -> None:
    """Run the runner until it exits, its progress and log lines into the task's; a cancel, a
    lost lease or a hand-back kills it (an evaluation keeps nothing worth a checkpoint)."""
    out_path = folder / "runner.log"
    start = out_path.stat().st_size if out_path.exists() else 0
    with open(out_path, "ab") as out:
        try:
            proc = spawn(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(folder), cwd=folder
            )
        except OSError as exc:
            raise TaskFailedError(f"cannot start {cmd[0]}: {exc}", retryable=False) from exc
    eval_log = folder / "work" / "logs" / "eval_log.log"
    offsets = {out_path: start, eval_log: 0}
    tail: collections.deque[str] = collections.deque(maxlen=12)
    done = -1
    try:
        while True:
            code = proc.poll()
            done = _progress(ctx, folder / "work" / "progress.json", total, done)
            for line in _new_lines(out_path, offsets, tail):
                if line.startswith(_NOTE):
                    ctx.log(line[len(_NOTE) :])
            for line in _new_lines(eval_log, offsets, None):
                m = _LOG_LINE.match(line)
                if m and m.group(2).strip() not in ("", "{"):
                    ctx.log(f"evalscope: {m.group(2)}"[:500], level=_LEVELS.get(m.group(1), "info"))
            if code is not None:
                break
            ctx.sleep(POLL)
    except BaseException:
        _kill(proc)
        raise
    if code == 0:
        return
    failed = read_json(folder / "error.json")
    if isinstance(failed, dict) and failed.get("reason"):
        raise TaskFailedError(f"EvalScope failed: {failed['reason']}", retryable=False)
    last = " | ".join(list(tail)[-3:]) or f"see {out_path}"
    raise TaskFailedError(f"the EvalScope runner exited with status {code}: {last}")


def _progress(ctx: TaskContext[Any], path: Path, total: int, done: int) -> int:
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("processed_count"), int):
        return done
    n = min(int(state["processed_count"]), total)
    if n != done:
        ctx.report(n, total, unit="sample")
    return n


def _new_lines(
    path: Path, offsets: dict[Path, int], tail: collections.deque[str] | None
) -> list[str]:
    """The whole lines appended to ``path`` since the last call (ANSI colours and progress
    bars' carriage-return frames taken out)."""
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        fh.seek(offsets[path])
        data = fh.read(1 << 20)
    end = data.rfind(b"\n") + 1
    offsets[path] += end
    lines = []
    for raw in data[:end].decode("utf-8", "replace").splitlines():
        line = _ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()
        if line:
            lines.append(line)
            if tail is not None:
                tail.append(line[:500])
    return lines


def _kill(proc: Child) -> None:
    with contextlib.suppress(OSError):
        proc.kill_tree()


def _check_snapshot(path: str, sha256: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise TaskFailedError(f"the dataset snapshot {p} is gone", retryable=False)
    if file_sha256(p) != sha256:
        raise TaskFailedError(
            f"the dataset {p} is not the one this task was queued with (SHA-256 differs)",
            retryable=False,
        )


def _text_only(target: Target) -> None:
    if target.kind == "multimodal":
        raise TrainingError(
            f"the evalscope backend evaluates text models; {target.name!r} is multimodal",
            hint="evaluate it with yichui's own backend (no --backend)",
        )
