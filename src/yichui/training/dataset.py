"""Training and evaluation datasets: JSONL files, checked line by line before anything is queued.

Each non-blank line is one JSON object in one of these shapes::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"instruction": "Translate to French", "input": "cat", "output": "chat", "system": "..."}
    {"prompt": "2 + 2 =", "completion": " 4"}
    {"question": "Capital of France?", "answer": "Paris"}        # answer may be a list

All shapes become a chat conversation that ends with the assistant's answer: training learns
that answer (the prompt tokens are masked out of the loss); evaluation scores it. A file that is
missing, empty, not JSONL, or has a record of the wrong shape is refused with the line number.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from yichui.errors import DatasetError

ROLES = frozenset({"system", "user", "assistant", "tool"})
SHAPES = "'messages', 'instruction' + 'output', 'prompt' + 'completion' or 'question' + 'answer'"
MAX_LINE_BYTES = 16 * 1024**2


@dataclass(frozen=True, slots=True)
class Example:
    """One record as a conversation: ``messages`` end with the assistant's answer;
    ``answers`` are the accepted answers (one, or the list a QA record gives)."""

    messages: tuple[dict[str, str], ...]
    answers: tuple[str, ...]

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation without its final answer (what a model is asked)."""
        return list(self.messages[:-1])


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    path: Path
    sha256: str
    records: int
    shapes: tuple[str, ...]
    """The record shapes found (``messages``, ``instruction``, ``prompt``, ``question``)."""
    size: int


def _text(value: Any, field: str, line: int, path: Path, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"'{field}' must be a string", path=path, line=line)
    if not empty_ok and not value.strip():
        raise DatasetError(f"'{field}' is empty", path=path, line=line)
    return value


def parse_record(obj: Any, line: int, path: Path) -> tuple[str, Example]:
    """One decoded line -> (its shape, the example); DatasetError naming the line otherwise."""
    if not isinstance(obj, dict):
        raise DatasetError(
            f"expected a JSON object, got {type(obj).__name__}", path=path, line=line
        )
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError("'messages' must be a non-empty list", path=path, line=line)
        out: list[dict[str, str]] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DatasetError(
                    f"messages[{i}] must be an object with 'role' and 'content'",
                    path=path,
                    line=line,
                )
            role = m["role"]
            if role not in ROLES:
                raise DatasetError(
                    f"messages[{i}].role {role!r} is not one of {', '.join(sorted(ROLES))}",
                    path=path,
                    line=line,
                )
            out.append(
                {
                    "role": role,
                    "content": _text(
                        m["content"],
                        f"messages[{i}].content",
                        line,
                        path,
                        empty_ok=role != "assistant",
                    ),
                }
            )
        if out[-1]["role"] != "assistant":
            raise DatasetError(
                "the last message must be the assistant's answer", path=path, line=line
            )
        if not any(m["role"] == "user" for m in out):
            raise DatasetError("the conversation has no user message", path=path, line=line)
        return "messages", Example(tuple(out), (out[-1]["content"],))
    if "instruction" in obj:
        if "output" not in obj:
            raise DatasetError("an 'instruction' record needs an 'output'", path=path, line=line)
        instruction = _text(obj["instruction"], "instruction", line, path)
        extra = obj.get("input") or ""
        user = instruction if not extra else f"{instruction}\n\n{_text(extra, 'input', line, path)}"
        output = _text(obj["output"], "output", line, path)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if obj.get("system"):
            msgs.insert(
                0, {"role": "system", "content": _text(obj["system"], "system", line, path)}
            )
        return "instruction", Example(tuple(msgs), (output,))
    if "prompt" in obj:
        if "completion" not in obj:
            raise DatasetError("a 'prompt' record needs a 'completion'", path=path, line=line)
        prompt = _text(obj["prompt"], "prompt", line, path)
        completion = _text(obj["completion"], "completion", line, path)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return "prompt", Example(tuple(msgs), (completion,))
    if "question" in obj:
        if "answer" not in obj:
            raise DatasetError("a 'question' record needs an 'answer'", path=path, line=line)
        question = _text(obj["question"], "question", line, path)
        raw = obj["answer"]
        answers = raw if isinstance(raw, list) else [raw]
        if not answers:
            raise DatasetError("'answer' is an empty list", path=path, line=line)
        texts = tuple(_text(a, "answer", line, path) for a in answers)
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": texts[0]}]
        return "question", Example(tuple(msgs), texts)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
    raise DatasetError(
        f"unknown record shape (keys: {keys}); expected {SHAPES}", path=path, line=line
    )


def read_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file, validated (DatasetError with the line number)."""
    return [ex for _shape, ex in _iter(Path(path))]


def inspect_dataset(path: str | Path) -> DatasetInfo:
    """Validate the whole file and describe it (records, shapes, SHA-256)."""
    path = Path(path).expanduser()
    shapes: set[str] = set()
    records = 0
    for shape, _ex in _iter(path):
        shapes.add(shape)
        records += 1
    if records == 0:
        raise DatasetError("has no records (only blank lines)", path=path)
    return DatasetInfo(path, file_sha256(path), records, tuple(sorted(shapes)), path.stat().st_size)


def _iter(path: Path) -> Any:
    if not path.exists():
        raise DatasetError("does not exist", path=path)
    if not path.is_file():
        raise DatasetError("is not a file", path=path)
    if path.stat().st_size == 0:
        raise DatasetError("is empty", path=path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(
                    f"longer than {MAX_LINE_BYTES >> 20} MiB", path=path, line=lineno
                )
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise DatasetError(f"not valid JSON ({exc})", path=path, line=lineno) from None
            yield parse_record(obj, lineno, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def snapshot(info: DatasetInfo, folder: Path) -> Path:
    """Copy the dataset to ``folder/<sha256>.jsonl`` (once): a queued or resumed run reads
    exactly the file that was validated, whatever happens to the original afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{info.sha256}.jsonl"
    if dest.exists() and dest.stat().st_size == info.size:
        return dest
    tmp = folder / f".{info.sha256}.{uuid.uuid4().hex[:8]}.tmp"
    data = info.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise DatasetError("changed while it was being queued; try again", path=info.path)
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest
