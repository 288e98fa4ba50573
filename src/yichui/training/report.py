"""Scoring answers and writing an evaluation report for people (no torch here)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    p = normalize(prediction)
    return any(p == normalize(a) for a in answers)


def contains(prediction: str, answers: Iterable[str]) -> bool:
    """The prediction mentions one of the answers (chat models answer in sentences)."""
    p = f" {normalize(prediction)} "
    return any(f" {normalize(a)} " in p for a in answers if normalize(a))


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A readable summary of an evaluation report."""
    ds = report.get("dataset") or {}
    sha = str(ds.get("sha256", ""))
    lines = [
        f"model       {report.get('model')}  ({report.get('fingerprint', '')[:16]}…)",
        f"dataset     {ds.get('origin') or ds.get('path')}  (sha256 {sha[:12]}…)",
        f"records     {report.get('records')}  ({report.get('tokens')} answer tokens)",
    ]
    if report.get("loss") is not None:
        lines.append(f"loss        {report['loss']:.4f}")
        lines.append(f"perplexity  {report['perplexity']:.3f}")
    if report.get("exact_match") is not None:
        lines.append(f"exact match {100 * report['exact_match']:.1f}%")
        lines.append(f"contains    {100 * report['contains']:.1f}%")
    if report.get("seconds") is not None:
        lines.append(f"computed in {report['seconds']:.1f} s")
    samples = report.get("samples") or []
    if samples:
        lines.append("samples:")
        for s in samples[:5]:
            mark = "=" if s.get("exact") else ("~" if s.get("contains") else "x")
            lines.append(f"  [{mark}] {s['question'][:60]!r} -> {s['prediction'][:60]!r}")
    return lines
