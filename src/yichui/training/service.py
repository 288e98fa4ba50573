"""What the CLI and the API call to fine-tune, merge and evaluate: check, then queue.

Everything that can be checked before a task is queued is checked here, in the caller's
process: the base model and adapter exist, the output name is free, the dataset parses line by
line, the hyper-parameters are in range. Only then is the dataset snapshotted, the run folder
made and the task queued; if queuing fails the run folder is removed again::

    svc = runtime.training       # built by the composition root
    svc.train("smollm2-135m-instruct", "data.jsonl", max_steps=20)["id"]
    svc.evaluate("smollm2-135m-instruct@my-adapter", "qa.jsonl")   # cached or queued
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from yichui.errors import DatasetError, ModelNotFoundError, StateError, TrainingError
from yichui.models.names import validate_name
from yichui.models.status import read_manifest
from yichui.models.targets import ADAPTER_KIND, resolve_target
from yichui.swift_env import swift_env
from yichui.tasks.service import LOCAL_TENANT
from yichui.training.dataset import DatasetInfo, inspect_dataset, snapshot
from yichui.training.dataset_images import ImageRules
from yichui.training.runs import datasets_root, evals_root, new_run_dir, read_json, write_json

if TYPE_CHECKING:
    from yichui.config import Settings
    from yichui.models.registry import ModelRegistry
    from yichui.state.eval_store import EvalResultStore
    from yichui.tasks.service import TaskService

EVAL_KEY_VERSION = 1
_PLACEHOLDER_SHA = "0" * 64
_UNSET_UNKEYED = ("vision_max_pixels", "vision_min_pixels")
"""Parameters added after key version 1: they enter the key only when set, so the reports of
text models cached before them are still found."""
MULTIMODAL_KIND = "multimodal"


@dataclass
class EvalSubmission:
    """An evaluation asked for: answered from the cache (``report``) or queued (``task``)."""

    key: str
    cached: bool
    report: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    source: str | None = None
    """Where a cached report came from: ``redis`` or ``disk``."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "cached": self.cached}
        if self.cached:
            out["source"] = self.source
            out["report"] = self.report
        else:
            out["id"] = self.task["id"] if self.task else None
            out["task"] = self.task
        return out


class TrainingService:
    """Fine-tuning, merging and evaluation of one deployment (see the module docstring).

    ``eval_store`` gives the Redis side of the evaluation cache, or None while Redis is
    unreachable (reports are then read from and written to disk only)."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        tasks: TaskService,
        eval_store: Callable[[], EvalResultStore | None],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.tasks = tasks
        self._eval_store = eval_store

    # -- train ------------------------------------------------------------------------------
    def train(
        self,
        model: str,
        dataset: str | Path,
        *,
        output: str | None = None,
        replace: bool = False,
        queue: str | None = None,
        task_id: str | None = None,
        tenant: str = LOCAL_TENANT,
        **params: Any,
    ) -> dict[str, Any]:
        """Check and queue a ``train`` task -> its status, with ``run_dir`` and ``output``."""
        target = resolve_target(self.registry, model)
        if target.adapter is not None:
            raise TrainingError(
                "train on a base model; continuing an adapter's training is not supported",
                hint=f"use --model {target.base.name}",
            )
        out = validate_name(output) if output else _default_output(model)
        self._check_free(out, replace)
        rules = ImageRules.from_settings(self.settings)
        info = inspect_dataset(dataset, rules)
        params = self._vision_params(model, target.kind, info, params)
        if params.get("train_projector") and target.kind != MULTIMODAL_KIND:
            raise TrainingError(
                f"--train-projector needs a multimodal base; {model!r} is a {target.kind} model"
            )
        task_type = self.tasks.types.get("train")
        # every other argument is validated before a folder or a snapshot is written
        probe = {
            "model": model,
            "dataset": _dataset_ref(info, str(info.path)),
            "output": out,
            "run_dir": "-",
            "replace": replace,
            **{k: v for k, v in params.items() if v is not None},
        }
        if task_type.parse(probe).backend == "swift":  # a clear refusal, nothing queued
            swift_env(self.settings)
        snap = snapshot(info, datasets_root(self.settings.data_dir), rules)
        args = {**probe, "dataset": _dataset_ref(info, str(snap))}
        run_dir = new_run_dir(self.settings.data_dir, out, args)
        args["run_dir"] = str(run_dir)
        # every argument, defaults included: what the run was asked to do
        write_json(run_dir / "args.json", task_type.parse(args).model_dump(mode="json"))
        try:
            status = self.tasks.submit("train", args, task_id=task_id, queue=queue, tenant=tenant)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        status["run_dir"] = str(run_dir)
        status["output"] = out
        return status

    # -- merge ------------------------------------------------------------------------------
    def merge(
        self,
        adapter: str,
        *,
        base: str | None = None,
        output: str | None = None,
        replace: bool = False,
        dtype: str = "auto",
        backend: str = "auto",
        queue: str | None = None,
        tenant: str = LOCAL_TENANT,
    ) -> dict[str, Any]:
        """Check and queue a ``merge`` task -> its status, with ``output``."""
        a = self.registry.status(validate_name(adapter)).status
        if not a.exists:
            raise ModelNotFoundError(adapter)
        if a.kind != ADAPTER_KIND:
            raise TrainingError(f"{adapter!r} is not a LoRA adapter (kind {a.kind})")
        base = base or read_manifest(Path(a.path or "")).get("base")
        if not base:
            raise TrainingError(
                f"adapter {adapter!r} does not say which base it was trained on",
                hint="name it with --base",
            )
        resolve_target(self.registry, f"{base}@{adapter}")
        out = validate_name(output) if output else f"{adapter}-merged"
        self._check_free(out, replace)
        args = {
            "adapter": adapter,
            "base": base,
            "output": out,
            "replace": replace,
            "dtype": dtype,
            "backend": backend,
        }
        parsed = self.tasks.types.get("merge").parse(args)
        trained_with = read_manifest(Path(a.path or "")).get("backend") or "peft"
        if (trained_with if parsed.backend == "auto" else parsed.backend) == "swift":
            swift_env(self.settings)  # a clear refusal, nothing queued
        status = self.tasks.submit("merge", args, queue=queue, tenant=tenant)
        status["output"] = out
        return status

    # -- evaluate ---------------------------------------------------------------------------
    def evaluate(
        self,
        model: str,
        dataset: str | Path,
        *,
        queue: str | None = None,
        refresh: bool = False,
        tenant: str = LOCAL_TENANT,
        **params: Any,
    ) -> EvalSubmission:
        """The report from the cache when this evaluation ran before; else queue it."""
        target = resolve_target(self.registry, model)
        rules = ImageRules.from_settings(self.settings)
        info = inspect_dataset(dataset, rules)
        params = self._vision_params(model, target.kind, info, params)
        task_type = self.tasks.types.get("evaluate")
        probe = {
            "model": model,
            "dataset": _dataset_ref(info, str(info.path)),
            "key": _PLACEHOLDER_SHA,
            **{k: v for k, v in params.items() if v is not None},
        }
        parsed = task_type.parse(probe)
        key = eval_key(target.fingerprint, info.sha256, parsed.model_dump(mode="json"))
        if not refresh:
            found = self.cached_report(key)
            if found is not None:
                report, source = found
                return EvalSubmission(key, True, report=report, source=source)
        snap = snapshot(info, datasets_root(self.settings.data_dir), rules)
        args = {**probe, "dataset": _dataset_ref(info, str(snap)), "key": key}
        task = self.tasks.submit("evaluate", args, queue=queue, tenant=tenant)
        return EvalSubmission(key, False, task=task)

    def eval_store(self) -> EvalResultStore | None:
        return self._eval_store()

    def cached_report(self, key: str) -> tuple[dict[str, Any], str] | None:
        """(report, ``redis`` or ``disk``) of an evaluation that ran before, or None."""
        store = self.eval_store()
        if store is not None:
            try:
                report = store.get(key)
            except StateError:
                report = None
            if report is not None:
                return report, "redis"
        report = read_json(evals_root(self.settings.data_dir) / f"{key}.json")
        if not isinstance(report, dict):
            return None
        if store is not None:
            with contextlib.suppress(StateError):  # warm the cache again for the next asker
                store.put(key, report)
        return report, "disk"

    def store_report(self, key: str, report: dict[str, Any]) -> None:
        """The file first (the truth), then the cache entry."""
        folder = evals_root(self.settings.data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{key}.json", report)
        store = self.eval_store()
        if store is not None:
            with contextlib.suppress(StateError):
                store.put(key, report)

    # -- helpers ----------------------------------------------------------------------------
    def _vision_params(
        self, model: str, kind: str | None, info: DatasetInfo, params: dict[str, Any]
    ) -> dict[str, Any]:
        """``params`` with a multimodal model's image size bounds (the settings', unless
        given); a dataset with images for a model that cannot see them is refused."""
        if kind == MULTIMODAL_KIND:
            s = self.settings
            bounds = {
                "vision_max_pixels": s.vision_max_pixels,
                "vision_min_pixels": s.vision_min_pixels,
            }
            return {**params, **{k: v for k, v in bounds.items() if params.get(k) is None}}
        if info.images:
            raise DatasetError(
                f"has {info.images} image(s) (the first on line {info.image_line}), but"
                f" {model!r} is a {kind} model, which cannot see them; use a multimodal model",
                path=info.path,
            )
        return params

    def _check_free(self, name: str, replace: bool) -> None:
        if replace:
            return
        if self.registry.status(name).status.exists:
            raise TrainingError(
                f"a model named {name!r} exists already",
                hint="choose another --output, or pass --replace to replace it",
            )


def eval_key(fingerprint: str, dataset_sha256: str, args: dict[str, Any]) -> str:
    """The cache key of an evaluation: what decides its result, canonical, versioned."""
    params = {
        k: v
        for k, v in sorted(args.items())
        if k not in ("model", "dataset", "key") and not (k in _UNSET_UNKEYED and v is None)
    }
    doc = {
        "v": EVAL_KEY_VERSION,
        "fingerprint": fingerprint,
        "dataset": dataset_sha256,
        "params": params,
    }
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _dataset_ref(info: DatasetInfo, path: str) -> dict[str, Any]:
    return {"path": path, "sha256": info.sha256, "records": info.records, "origin": str(info.path)}


def _default_output(model: str) -> str:
    return f"{model.split('/')[-1][:72]}-lora-{time.strftime('%Y%m%d-%H%M%S')}"
