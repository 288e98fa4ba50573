"""An EvalScope run's outputs turned into a yichui evaluation report, and its summary for people.

EvalScope writes, under its work folder (``no_timestamp``, model id ``model``)::

    reports/model/<benchmark>.json     the metrics: identity (name, dimensions), score, num
    reviews/model/<benchmark>_<subset>.jsonl   one line per sample: the messages, the target,
                                       the score (value per metric, prediction, main score)
    predictions/…, configs/task_config.yaml, logs/eval_log.log, reports/report.html

Each metric is named here by its identity: ``accuracy``, ``rouge/l/recall`` (the name, then the
values of its dimensions, see :func:`metric_name`), and the report keeps EvalScope's own JSON
beside them (``evalscope.report``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import orjson

from yichui.errors import TaskFailedError

SAMPLES = 20
"""Samples whose question, reference and prediction the report shows."""
MODEL_ID = "model"
"""The model id yichui gives EvalScope: the name of its output folders."""


def metric_name(identity: dict[str, Any]) -> str:
    """``rouge/l/recall`` for ``{"name": "rouge", "dimensions": {"variant": "l", "statistic":
    "recall"}}``: the name, then its dimensions' values by their names, the statistic last
    (EvalScope does not keep one order of them between a metric and its primary selector)."""
    dims = identity.get("dimensions") or {}
    order = sorted(dims, key=lambda k: (k == "statistic", k))
    return "/".join([str(identity.get("name", "?")), *(str(dims[k]) for k in order)])


def read_outputs(work_dir: Path, benchmark: str) -> dict[str, Any]:
    """The figures of one benchmark's run: ``metrics`` (name -> score), ``primary_metric``,
    ``score``, ``records``, ``samples`` and EvalScope's ``report`` (its long description cut)."""
    path = work_dir / "reports" / MODEL_ID / f"{benchmark}.json"
    try:
        raw = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise TaskFailedError(f"EvalScope wrote no readable report ({path}: {exc})") from exc
    metrics: dict[str, float] = {}
    for m in raw.get("metrics") or []:
        if isinstance(m, dict) and isinstance(m.get("score"), int | float):
            metrics[metric_name(m.get("identity") or {})] = float(m["score"])
    if not metrics:
        raise TaskFailedError(f"EvalScope's report {path} has no metrics", retryable=False)
    primary = raw.get("primary_metric_identity")
    name = metric_name(primary) if isinstance(primary, dict) else next(iter(metrics))
    raw.pop("dataset_description", None)
    return {
        "metrics": metrics,
        "primary_metric": name,
        "score": metrics.get(name),
        "records": int(raw.get("num") or 0),
        "samples": read_samples(work_dir / "reviews" / MODEL_ID),
        "report": raw,
    }


def read_samples(folder: Path, limit: int = SAMPLES) -> list[dict[str, Any]]:
    """The first ``limit`` reviewed samples, in the dataset's order (EvalScope writes them as
    they finish): question, answers, prediction, score."""
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        found = []
        for raw in path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                row = orjson.loads(raw)
                if isinstance(row, dict):
                    found.append(row)
        found.sort(key=_index)
        rows += found
    out: list[dict[str, Any]] = []
    for row in rows[:limit]:
        score = (row.get("sample_score") or {}).get("score") or {}
        value = score.get("value") or {}
        target = row.get("target")
        out.append(
            {
                "question": _question(row.get("messages") or []),
                "answers": [str(t) for t in target] if isinstance(target, list) else [target],
                "prediction": score.get("prediction", ""),
                "extracted": score.get("extracted_prediction", ""),
                "score": value.get(score.get("main_score_name"))
                if isinstance(value, dict)
                else None,
            }
        )
    return out


def _index(row: dict[str, Any]) -> int:
    index = row.get("index")
    return index if isinstance(index, int) else 0


def _question(messages: list[Any]) -> str:
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    if isinstance(content, list):  # content parts
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A readable summary of an EvalScope report (what ``yichui eval --backend evalscope``
    prints)."""
    ds = report.get("dataset") or {}
    es = report.get("evalscope") or {}
    sha = str(ds.get("sha256", ""))
    lines = [
        f"model       {report.get('model')}  ({str(report.get('fingerprint', ''))[:16]}…)",
        f"dataset     {ds.get('origin') or ds.get('path')}  (sha256 {sha[:12]}…)",
        f"evalscope   {es.get('version')}, {report.get('format')}, {report.get('records')} records",
    ]
    primary = report.get("primary_metric")
    for name, score in (report.get("metrics") or {}).items():
        mark = "  (primary)" if name == primary else ""
        lines.append(f"{name:<22} {score:.4f}{mark}")
    if report.get("seconds") is not None:
        lines.append(f"computed in {report['seconds']:.1f} s")
    if es.get("outputs"):
        lines.append(f"outputs     {es['outputs']}")
    samples = report.get("samples") or []
    if samples:
        lines.append("samples:")
        for s in samples[:5]:
            score = s.get("score")
            mark = f"{score:.2f}" if isinstance(score, int | float) else "  - "
            question = " ".join(str(s.get("question", "")).split())
            prediction = " ".join(str(s.get("prediction", "")).split())
            lines.append(f"  [{mark}] {question[:60]!r} -> {prediction[:60]!r}")
    return lines
