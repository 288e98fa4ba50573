"""What an EvalScope evaluation reads: a local dataset in one of EvalScope's custom formats, and
the arguments of its ``evalscope`` task.

Two of EvalScope's custom formats, as JSONL (one object per line) or CSV (a header row)::

    general_qa    {"question": "What is the capital of France?", "answer": "Paris is."}
                  (``query`` for ``question``, ``response`` for ``answer``; or ``messages``, a
                  chat without the answer; ``system`` optional)
    general_mcq   {"question": "Which animal barks?", "A": "Dog", "B": "Cat", "answer": "A"}
                  (choices ``A`` to ``J``, at least two, no gaps; ``answer`` one of their letters)

The file is checked here, in the caller's process, before anything is queued: a bad record is
refused with its line number, as yichui's own datasets are. Then it is copied to
``<data_dir>/datasets/<sha256>.<jsonl|csv>``, the file the task hands EvalScope, and its SHA-256
is what the result cache keys on. Nothing here imports EvalScope.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator, model_validator

from yichui.errors import DatasetError
from yichui.tasks.types import TaskArgs
from yichui.training.args import DatasetRef, validate_target

Format = Literal["general_qa", "general_mcq"]
FORMATS: tuple[str, ...] = ("general_qa", "general_mcq")
SUFFIXES = (".jsonl", ".csv")
CHOICES = "ABCDEFGHIJ"
"""The choice columns of ``general_mcq``, in order (EvalScope reads up to the first missing)."""
HINT = "see docs/training.md#evalscope for EvalScope's dataset formats"
_CHAT_ROLES = frozenset({"system", "user", "assistant"})


class EvalScopeArgs(TaskArgs):
    """``evalscope``: EvalScope's rule-based metrics of ``model`` on a local custom dataset."""

    backend: Literal["evalscope"] = "evalscope"
    """Always ``evalscope``: keeps these keys apart from yichui's own evaluation's."""
    model: str
    """A model, or ``base@adapter`` (merged into its base in the ms-swift environment first)."""
    dataset: DatasetRef
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    """The result-cache key: model fingerprint, dataset hash and the parameters below."""
    format: Format
    evalscope_version: str = Field(pattern=r"^[0-9A-Za-z.+!-]{1,40}$")
    """The EvalScope that computes it (part of the key: another version may score otherwise)."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate only the first N records."""
    max_new_tokens: int = Field(default=64, ge=1, le=8192)
    batch_size: int = Field(default=8, ge=1, le=512)
    """Prompts per ``generate`` call (left-padded)."""
    prompt_template: str | None = Field(default=None, min_length=1, max_length=8000)
    """The user prompt, with ``{question}`` (``general_mcq``: and ``{choices}``, maybe
    ``{letters}``). Default: the question as it is (``general_qa``), EvalScope's English
    single-answer template (``general_mcq``)."""

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return validate_target(value)

    @model_validator(mode="after")
    def _template(self) -> EvalScopeArgs:
        t = self.prompt_template
        needs = ("{question}",) if self.format == "general_qa" else ("{question}", "{choices}")
        missing = [n for n in needs if t is not None and n not in t]
        if missing:
            raise ValueError(f"a {self.format} prompt_template needs {' and '.join(missing)}")
        return self


@dataclass(frozen=True)
class EvalScopeDataset:
    """A checked dataset file."""

    path: Path
    sha256: str
    records: int
    format: str
    suffix: str
    """``.jsonl`` or ``.csv``: EvalScope picks its reader by the file's name."""

    def ref(self, path: Path | None = None) -> dict[str, Any]:
        """The task's ``dataset`` argument: the snapshot ``path`` (default: the file itself)."""
        return {
            "path": str(path or self.path),
            "sha256": self.sha256,
            "records": self.records,
            "origin": str(self.path),
        }


def inspect_evalscope_dataset(path: str | Path, fmt: str | None = None) -> EvalScopeDataset:
    """Check every record of ``path`` for ``fmt`` (None: ``general_mcq`` when the first record
    has an ``A`` choice, else ``general_qa``) -> what it is; DatasetError naming the line."""
    path = Path(path).expanduser()
    if fmt is not None and fmt not in FORMATS:
        raise _bad(f"unknown format {fmt!r}; EvalScope's are {', '.join(FORMATS)}", path)
    if not path.exists():
        raise _bad("does not exist", path)
    if not path.is_file():
        raise _bad("is not a file", path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise _bad(
            f"must be a .jsonl or .csv file for EvalScope (not {suffix or 'no suffix'})", path
        )
    data = path.read_bytes()
    if not data.strip():
        raise _bad("is empty", path)
    records = 0
    for line, record in _records(data, suffix, path):
        if fmt is None:
            fmt = "general_mcq" if "A" in record else "general_qa"
        problem = _qa_problem(record) if fmt == "general_qa" else _mcq_problem(record)
        if problem is not None:
            raise _bad(f"a {fmt} record {problem}", path, line)
        records += 1
    if records == 0:
        raise _bad("has no records", path)
    assert fmt is not None
    return EvalScopeDataset(path, hashlib.sha256(data).hexdigest(), records, fmt, suffix)


def snapshot(info: EvalScopeDataset, folder: Path) -> Path:
    """Copy the file to ``folder/<sha256><suffix>`` once; a queued task reads exactly that."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{info.sha256}{info.suffix}"
    if dest.is_file() and dest.stat().st_size == info.path.stat().st_size:
        return dest
    data = info.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise _bad("changed while it was being queued; try again", info.path)
    tmp = folder / f".{info.sha256}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def _records(data: bytes, suffix: str, path: Path) -> Any:
    """(line number, record) of each record (blank JSONL lines skipped)."""
    if suffix == ".jsonl":
        for lineno, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise _bad(f"not valid JSON ({exc})", path, lineno) from None
            if not isinstance(obj, dict):
                raise _bad("expected a JSON object", path, lineno)
            yield lineno, obj
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _bad("is not UTF-8 text", path) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        if not header or any(not h for h in header):
            raise _bad("needs a header row naming every column", path, 1)
        for row in reader:
            if None in row:
                raise _bad("has more fields than the header", path, reader.line_num)
            yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}
    except csv.Error as exc:
        raise _bad(f"not valid CSV ({exc})", path, reader.line_num) from None


def _qa_problem(record: dict[str, Any]) -> str | None:
    answer = record.get("answer", record.get("response"))
    if not isinstance(answer, str) or not answer.strip():
        return "needs an 'answer' (or 'response'): a non-empty string, the reference"
    messages = record.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            return "has 'messages' that is not a list of messages"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES:
                return f"has messages[{i}] without a role of {', '.join(sorted(_CHAT_ROLES))}"
            if not isinstance(m.get("content"), str):
                return f"has messages[{i}] whose content is not a string"
        return None
    question = record.get("question", record.get("query"))
    if not isinstance(question, str) or not question.strip():
        return "needs a 'question' (or 'query', or 'messages'): a non-empty string"
    if not isinstance(record.get("system", ""), str):
        return "has a 'system' that is not a string"
    return None


def _mcq_problem(record: dict[str, Any]) -> str | None:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        return "needs a 'question': a non-empty string"
    letters = ""
    for letter in CHOICES:
        if letter not in record:
            break
        if not isinstance(record[letter], str):
            return f"has a choice {letter!r} that is not a string"
        letters += letter
    if len(letters) < 2:
        return "needs at least two choices, 'A' and 'B'"
    after = [c for c in CHOICES[len(letters) :] if c in record]
    if after:
        return f"has choice {after[0]!r} after a missing {CHOICES[len(letters)]!r}"
    answer = record.get("answer")
    if answer not in tuple(letters):
        return f"needs an 'answer': the letter of the right choice, one of {', '.join(letters)}"
    return None


def _bad(problem: str, path: Path, line: int | None = None) -> DatasetError:
    err = DatasetError(problem, path=path, line=line)
    err.hint = HINT
    return err
