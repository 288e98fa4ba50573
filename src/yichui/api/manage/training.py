"""``/api/datasets``, ``/api/train``, ``/api/merge``, ``/api/eval``, ``/api/runs``,
``/api/evals``: fine-tuning, merging and evaluation (yichui's own, or ``"backend":
"evalscope"``), with the CLI's validation (a bad dataset line is a 400 naming the line, before
anything is queued).

Datasets come from the ``datasets_dir`` folder, or are uploaded (``POST /api/datasets``, at
most ``upload_max_bytes``, validated record by record, stored under
``<data_dir>/uploads/<sha256>.jsonl`` only when whole and valid). Training reads only those:
a request cannot point a task at any other file of the server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from yichui.api.auth import PrincipalDep
from yichui.api.manage.common import Limit, Offset, page, runtime_of
from yichui.config import Settings
from yichui.errors import DatasetError, NotFoundError, RequestError
from yichui.runtime import Runtime
from yichui.training.evalscope_backend import evaluate as evalscope_evaluate

router = APIRouter(tags=["training"])

_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.()-]{0,127}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_KEY = re.compile(r"^[0-9a-f]{64}$")


def uploads_root(settings: Settings) -> Path:
    return settings.data_dir / "uploads"


def _datasets(settings: Settings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    folder = settings.datasets_dir
    if folder is not None and folder.is_dir():
        for path in sorted(folder.rglob("*.jsonl")):
            if path.is_file():
                out.append(
                    {
                        "name": str(path.relative_to(folder)),
                        "path": str(path),
                        "bytes": path.stat().st_size,
                        "source": "folder",
                    }
                )
    uploads = uploads_root(settings)
    if uploads.is_dir():
        for path in sorted(uploads.glob("*.jsonl"), key=lambda p: -p.stat().st_mtime):
            meta = path.with_suffix(".name")
            name = meta.read_text().strip() if meta.exists() else path.name
            out.append(
                {"name": name, "path": str(path), "bytes": path.stat().st_size, "source": "upload"}
            )
    return out


def _allowed_dataset(settings: Settings, given: str) -> Path:
    """``given`` if it is one of the datasets offered (folder or upload); else 400."""
    if "\0" in given:
        raise RequestError("a dataset path cannot hold a NUL character", param="dataset")
    path = Path(given)
    roots = [uploads_root(settings)]
    if settings.datasets_dir is not None:
        roots.append(settings.datasets_dir)
    if not path.is_absolute() and settings.datasets_dir is not None:
        path = settings.datasets_dir / path
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        resolved = path
    for root in roots:
        with contextlib.suppress(ValueError, OSError):
            resolved.relative_to(root.resolve())
            if resolved.is_file():
                return resolved
    raise RequestError(
        f"dataset {given!r} is not one of the datasets offered: upload it, or pick one of "
        "GET /api/datasets",
        param="dataset",
    )


@router.get("/datasets")
def list_datasets(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """The datasets the training form offers: ``datasets_dir``'s JSONL files and uploads."""
    settings = runtime_of(request).settings
    return {"data": _datasets(settings), "max_upload_bytes": settings.upload_max_bytes}


@router.post("/datasets", status_code=201)
async def upload_dataset(
    request: Request,
    principal: PrincipalDep,
    filename: Annotated[str, Query(max_length=128)],
) -> dict[str, Any]:
    """Upload a JSONL dataset (the raw body). Validated record by record; stored only when
    it is whole and valid; 400 naming the line otherwise."""
    from yichui.training.dataset import inspect_dataset

    settings = runtime_of(request).settings
    if not _FILENAME.fullmatch(filename) or not filename.endswith(".jsonl"):
        raise RequestError(
            f"invalid file name {filename!r}: a .jsonl name of letters, digits, ' _.()-'",
            param="filename",
        )
    limit = settings.upload_max_bytes
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestError(f"dataset over the {limit} byte upload limit", param="body")
    chunks: list[bytes] = []
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise RequestError(f"dataset over the {limit} byte upload limit", param="body")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip():
        raise RequestError(f"{filename}: the upload is empty", param="body")
    folder = uploads_root(settings)
    incoming = folder / f".incoming-{secrets.token_hex(6)}"

    def store() -> dict[str, Any]:
        incoming.mkdir(parents=True)
        tmp = incoming / filename
        try:
            tmp.write_bytes(data)
            try:
                info = inspect_dataset(tmp)
            except DatasetError as exc:
                where = f", line {exc.line}" if exc.line is not None else ""
                raise RequestError(f"{filename}{where}: {exc.problem}", param="body") from None
            digest = hashlib.sha256(data).hexdigest()
            dest = folder / f"{digest}.jsonl"
            os.replace(tmp, dest)
            dest.with_suffix(".name").write_text(filename)
            return {
                "name": filename,
                "path": str(dest),
                "rows": info.records,
                "bytes": info.size,
                "format": list(info.shapes),
                "sha256": digest,
            }
        finally:
            for leftover in incoming.glob("*"):
                leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                incoming.rmdir()

    return await asyncio.to_thread(store)


class Train(BaseModel):
    """The ``yichui train`` options, by the names of the task's arguments."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    dataset: str = Field(max_length=4096, description="A path from GET /api/datasets.")
    output: str | None = Field(default=None, max_length=256)
    replace: bool = False
    queue: str | None = None
    rank: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None
    learning_rate: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    max_length: int | None = None
    warmup_steps: int | None = None
    lr_scheduler: str | None = None
    weight_decay: float | None = None
    seed: int | None = None
    save_steps: int | None = None
    keep_checkpoints: int | None = None
    qlora: bool | None = None
    gradient_checkpointing: bool | None = None
    backend: str | None = None


@router.post("/train", status_code=202)
def train(body: Train, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Check and queue a LoRA fine-tune -> its task status, ``run_dir`` and ``output``."""
    rt = runtime_of(request)
    dataset = _allowed_dataset(rt.settings, body.dataset)
    params = body.model_dump(exclude={"model", "dataset", "output", "replace", "queue"})
    if params.get("target_modules") is not None:
        params["target_modules"] = tuple(params["target_modules"])
    return rt.training.train(
        body.model,
        dataset,
        output=body.output,
        replace=body.replace,
        queue=body.queue,
        tenant=principal.tenant,
        **{k: v for k, v in params.items() if v is not None},
    )


class Merge(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(max_length=256)
    base: str | None = Field(default=None, max_length=256)
    output: str | None = Field(default=None, max_length=256)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    replace: bool = False
    queue: str | None = None


@router.post("/merge", status_code=202)
def merge(body: Merge, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Queue the merge of an adapter into its base -> its task status and ``output``."""
    return runtime_of(request).training.merge(
        body.adapter,
        base=body.base,
        output=body.output,
        replace=body.replace,
        dtype=body.dtype,
        queue=body.queue,
        tenant=principal.tenant,
    )


class Evaluate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=600, description="A model, or base@adapter.")
    dataset: str = Field(max_length=4096, description="A path from GET /api/datasets.")
    backend: Literal["yichui", "evalscope"] = Field(
        default="yichui", description="yichui's own evaluation, or EvalScope (docs/training.md)."
    )
    limit: int | None = None
    generate: bool = True
    max_new_tokens: int | None = None
    max_length: int | None = None
    batch_size: int | None = None
    format: Literal["general_qa", "general_mcq"] | None = Field(
        default=None, description="evalscope: the dataset's format (default: guessed)."
    )
    prompt_template: str | None = Field(
        default=None, max_length=8000, description="evalscope: the prompt, with {question}."
    )
    refresh: bool = False
    queue: str | None = None


_EVALSCOPE_ONLY = ("format", "prompt_template")
_YICHUI_ONLY = ("max_length",)


@router.post("/eval", status_code=202)
def evaluate(body: Evaluate, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """The report when this evaluation ran before (``cached``), else its queued task."""
    rt = runtime_of(request)
    dataset = _allowed_dataset(rt.settings, body.dataset)
    other = (*_YICHUI_ONLY, "generate") if body.backend == "evalscope" else _EVALSCOPE_ONLY
    for name in other:
        if getattr(body, name) != Evaluate.model_fields[name].default:
            raise RequestError(f"{name} is not an option of the {body.backend} backend", param=name)
    if body.backend == "evalscope":
        return evalscope_evaluate(
            rt.training,
            body.model,
            dataset,
            format=body.format,
            queue=body.queue,
            refresh=body.refresh,
            tenant=principal.tenant,
            limit=body.limit,
            max_new_tokens=body.max_new_tokens,
            batch_size=body.batch_size,
            prompt_template=body.prompt_template,
        ).to_dict()
    sub = rt.training.evaluate(
        body.model,
        dataset,
        queue=body.queue,
        refresh=body.refresh,
        tenant=principal.tenant,
        limit=body.limit,
        generate=body.generate,
        max_new_tokens=body.max_new_tokens,
        max_length=body.max_length,
        batch_size=body.batch_size,
    )
    return sub.to_dict()


# -- runs and reports ---------------------------------------------------------------------------


def _runs(rt: Runtime) -> list[dict[str, Any]]:
    from yichui.training.runs import read_json, runs_root

    root = runs_root(rt.settings.data_dir)
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for parent in root.iterdir():
        if not parent.is_dir():
            continue
        for run in parent.iterdir():
            args = read_json(run / "args.json") if run.is_dir() else None
            if not isinstance(args, dict):
                continue
            result = read_json(run / "result.json")
            out.append(
                {
                    "id": f"{parent.name}/{run.name}",
                    "output": args.get("output"),
                    "model": args.get("model"),
                    "run_dir": str(run),
                    "created": run.stat().st_mtime,
                    "finished": result is not None,
                    "result": result,
                    "args": args,
                }
            )
    out.sort(key=lambda r: -float(r["created"]))
    return out


@router.get("/runs")
def list_runs(
    request: Request, principal: PrincipalDep, limit: Limit = 50, offset: Offset = 0
) -> dict[str, Any]:
    """Training runs (newest first): their arguments and, once finished, their result."""
    return page(_runs(runtime_of(request)), limit, offset)


@router.get("/runs/{folder}/{version}/loss")
def run_loss(
    folder: str, version: str, request: Request, principal: PrincipalDep
) -> dict[str, Any]:
    """The loss (and learning rate, grad norm) at each logged step, from the run's own log
    file: there after the task's status has expired."""
    import orjson

    from yichui.training.runs import runs_root

    if not (_SEGMENT.fullmatch(folder) and _SEGMENT.fullmatch(version)):
        raise NotFoundError(f"no training run {folder}/{version}")
    run = runs_root(runtime_of(request).settings.data_dir) / folder / version
    if not (run / "args.json").is_file():
        raise NotFoundError(f"no training run {folder}/{version}")
    points: list[dict[str, Any]] = []
    log_file = run / "logging.jsonl"
    if log_file.is_file():
        for line in log_file.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                row = orjson.loads(line)
                if isinstance(row, dict) and "loss" in row:
                    points.append(row)
    return {"id": f"{folder}/{version}", "points": points}


@router.get("/evals")
def list_evals(
    request: Request, principal: PrincipalDep, limit: Limit = 50, offset: Offset = 0
) -> dict[str, Any]:
    """Evaluation reports on disk, newest first."""
    from yichui.training.runs import evals_root, read_json

    folder = evals_root(runtime_of(request).settings.data_dir)
    files = (
        sorted(folder.glob("*.json"), key=lambda p: -p.stat().st_mtime) if folder.is_dir() else []
    )
    rows = []
    for path in files[offset : offset + limit]:
        report = read_json(path)
        if isinstance(report, dict):
            rows.append({"key": path.stem, **report})
    return {"data": rows, "total": len(files), "limit": limit, "offset": offset}


@router.get("/evals/{key}")
def show_eval(key: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """One evaluation report (from Redis, else its file)."""
    if not _KEY.fullmatch(key):
        raise NotFoundError(f"no evaluation report {key!r}")
    found = runtime_of(request).training.cached_report(key)
    if found is None:
        raise NotFoundError(f"no evaluation report {key!r}")
    report, source = found
    return {"key": key, "source": source, **report}
