"""Training and evaluation datasets: JSONL files, checked line by line before anything is queued.

Each non-blank line is one JSON object in one of these shapes::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"instruction": "Translate to French", "input": "cat", "output": "chat", "system": "..."}
    {"prompt": "2 + 2 =", "completion": " 4"}
    {"question": "Capital of France?", "answer": "Paris"}        # answer may be a list

All shapes become a chat conversation that ends with the assistant's answer: training learns
that answer (the prompt tokens are masked out of the loss); evaluation scores it. A file that is
missing, empty, not JSONL, or has a record of the wrong shape is refused with the line number.

Records for vision-language models carry images, in either of two ways::

    {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "cats/1.png"},                  # or "url" / "path"
        {"type": "image_url", "image_url": {"url": "cats/2.png"}},   # OpenAI's form
        {"type": "text", "text": "Which is bigger?"}]},
      {"role": "assistant", "content": "The first."}]}
    {"question": "<image>What colour is it?", "answer": "red", "images": ["red.png"]}   # ms-swift

A top-level ``images`` list fills the ``<image>`` tags of the user text in order (any shape; no
tag at all: the images open the first user message). Where an image may be and what it must be
is :mod:`yichui.training.dataset_images`. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from yichui.errors import DatasetError
from yichui.training.dataset_images import (
    ImageRules,
    ImageSource,
    check,
    resolve,
    store,
    stored_name,
    verify_stored,
)

ROLES = frozenset({"system", "user", "assistant", "tool"})
SHAPES = "'messages', 'instruction' + 'output', 'prompt' + 'completion' or 'question' + 'answer'"
MAX_LINE_BYTES = 16 * 1024**2
IMAGE_TAG = "<image>"
"""ms-swift's placeholder for the next of a record's top-level ``images``."""
_IMAGE_KEYS = ("image", "url", "path")
"""Where a ``{"type": "image"}`` part names its image (Hugging Face chat templates' keys)."""


@dataclass(frozen=True, slots=True)
class Example:
    """One record as a conversation: ``messages`` end with the assistant's answer;
    ``answers`` are the accepted answers (one, or the list a QA record gives).

    A message's ``content`` is its text, or (a record with images) a list of parts
    ``{"type": "text", "text": ...}`` and ``{"type": "image"}``; ``images`` are the pictures of
    the image parts, in order. The answer is always text."""

    messages: tuple[dict[str, Any], ...]
    answers: tuple[str, ...]
    images: tuple[ImageSource, ...] = ()

    @property
    def prompt(self) -> list[dict[str, Any]]:
        """The conversation without its final answer (what a model is asked)."""
        return list(self.messages[:-1])

    @property
    def question(self) -> str:
        """The last prompt message's text (an image part shown as ``<image>``), for reports."""
        if not self.prompt:
            return ""
        return content_text(self.prompt[-1]["content"], image=IMAGE_TAG)


def content_text(content: Any, *, image: str = "") -> str:
    """A message's text: ``content`` itself, or its text parts joined (images as ``image``)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else image for p in content)


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    path: Path
    sha256: str
    """What the tasks and the evaluation cache key on: the SHA-256 of the snapshot (the file
    itself, or with images, the file rewritten to name them by their own SHA-256)."""
    records: int
    shapes: tuple[str, ...]
    """The record shapes found (``messages``, ``instruction``, ``prompt``, ``question``)."""
    size: int
    images: int = 0
    """Image references in all records (0: a text dataset)."""
    source_sha256: str = ""
    """The SHA-256 of the file as the user wrote it."""
    image_line: int | None = None
    """The first line with an image."""


@dataclass(slots=True)
class _Refs:
    """The image references of one record as they are parsed: where each sits in the decoded
    line (to rewrite it for the snapshot), what it names, and how many each message has."""

    line: int
    path: Path
    rules: ImageRules
    found: list[tuple[Any, Any, str, str, ImageSource]] = field(default_factory=list)
    """(container, key, the reference, where, source)."""

    def add(self, container: Any, key: Any, where: str) -> ImageSource:
        ref = container[key]
        source = resolve(ref, where, self.line, self.path, self.rules)
        self.found.append((container, key, ref, where, source))
        return source


def _text(value: Any, field: str, line: int, path: Path, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"'{field}' must be a string", path=path, line=line)
    if not empty_ok and not value.strip():
        raise DatasetError(f"'{field}' is empty", path=path, line=line)
    return value


def _parts(
    value: list[Any], where: str, refs: _Refs, *, role: str
) -> tuple[list[dict[str, str]], list[ImageSource]]:
    """A content list -> parts as chat templates take them, and the images of its parts."""
    line, path = refs.line, refs.path
    parts: list[dict[str, str]] = []
    images: list[ImageSource] = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(
                {
                    "type": "text",
                    "text": _text(part.get("text"), f"{at}.text", line, path, empty_ok=True),
                }
            )
            continue
        if kind not in ("image", "image_url"):
            raise DatasetError(
                f"{at} must be a part of type 'text', 'image' or 'image_url'", path=path, line=line
            )
        if role != "user":
            raise DatasetError(f"{at}: images belong in user messages", path=path, line=line)
        if kind == "image_url":
            inner = part.get("image_url")
            container, key = (part, "image_url") if not isinstance(inner, dict) else (inner, "url")
            if key not in container:
                raise DatasetError(f"{at}.image_url needs a 'url'", path=path, line=line)
        else:
            named = next((k for k in _IMAGE_KEYS if k in part), None)
            if named is None:
                raise DatasetError(f"{at} needs 'image' (a path or URL)", path=path, line=line)
            container, key = part, named
        images.append(refs.add(container, key, at))
        parts.append({"type": "image"})
    return parts, images


def _split_tags(text: str) -> list[dict[str, str]]:
    """ms-swift text with ``<image>`` tags -> parts (each tag an image part)."""
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(text.split(IMAGE_TAG)):
        if k:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _top_level_images(
    obj: dict[str, Any], msgs: list[dict[str, Any]], refs: _Refs
) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    """Apply a record's ``images`` list (ms-swift's form) to its user messages."""
    line, path = refs.line, refs.path
    listed = obj["images"]
    if not isinstance(listed, list):
        raise DatasetError("'images' must be a list of paths", path=path, line=line)
    if any(not isinstance(m["content"], str) for m in msgs):
        raise DatasetError(
            "give images either as content parts or as 'images' with <image> tags, not both",
            path=path,
            line=line,
        )
    sources: list[ImageSource] = []
    for i, item in enumerate(listed):
        if isinstance(item, dict) and "path" in item:
            sources.append(refs.add(item, "path", f"images[{i}].path"))
        else:
            sources.append(refs.add(listed, i, f"images[{i}]"))
    tags = sum(m["content"].count(IMAGE_TAG) for m in msgs if m["role"] == "user")
    out = [dict(m) for m in msgs]
    if tags == 0 and sources:
        first = next(i for i, m in enumerate(out) if m["role"] == "user")
        out[first]["content"] = IMAGE_TAG * len(sources) + out[first]["content"]
    elif tags != len(sources):
        raise DatasetError(
            f"{tags} <image> tag(s) in the user text for {len(sources)} image(s)",
            path=path,
            line=line,
        )
    for m in out:
        if m["role"] == "user" and IMAGE_TAG in m["content"]:
            m["content"] = _split_tags(m["content"])
    return out, sources


def _check_counts(msgs: list[dict[str, Any]], refs: _Refs) -> None:
    limits = refs.rules.limits
    total = 0
    for i, m in enumerate(msgs):
        n = (
            sum(1 for p in m["content"] if p["type"] == "image")
            if isinstance(m["content"], list)
            else 0
        )
        total += n
        if n > limits.per_message:
            raise DatasetError(
                f"messages[{i}] has {n} images, more than the {limits.per_message} allowed"
                " (images_per_message)",
                path=refs.path,
                line=refs.line,
            )
    if total > limits.per_request:
        raise DatasetError(
            f"the record has {total} images, more than the {limits.per_request} allowed"
            " (images_per_request)",
            path=refs.path,
            line=refs.line,
        )


def _messages(obj: dict[str, Any], refs: _Refs) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    line, path = refs.line, refs.path
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DatasetError("'messages' must be a non-empty list", path=path, line=line)
    out: list[dict[str, Any]] = []
    images: list[ImageSource] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DatasetError(
                f"messages[{i}] must be an object with 'role' and 'content'", path=path, line=line
            )
        role = m["role"]
        if role not in ROLES:
            raise DatasetError(
                f"messages[{i}].role {role!r} is not one of {', '.join(sorted(ROLES))}",
                path=path,
                line=line,
            )
        field_name = f"messages[{i}].content"
        content: Any
        if isinstance(m["content"], list):
            content, found = _parts(m["content"], field_name, refs, role=role)
            images += found
            if role == "assistant":
                content = content_text(content)
                if not content.strip():
                    raise DatasetError(f"'{field_name}' is empty", path=path, line=line)
        else:
            content = _text(m["content"], field_name, line, path, empty_ok=role != "assistant")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DatasetError("the last message must be the assistant's answer", path=path, line=line)
    if not any(m["role"] == "user" for m in out):
        raise DatasetError("the conversation has no user message", path=path, line=line)
    return out, images


def parse_record(
    obj: Any, line: int, path: Path, rules: ImageRules | None = None
) -> tuple[str, Example]:
    """One decoded line -> (its shape, the example); DatasetError naming the line otherwise."""
    shape, example, _refs = _parse(obj, line, path, rules or ImageRules())
    return shape, example


def _parse(obj: Any, line: int, path: Path, rules: ImageRules) -> tuple[str, Example, _Refs]:
    refs = _Refs(line, path, rules)
    if not isinstance(obj, dict):
        raise DatasetError(
            f"expected a JSON object, got {type(obj).__name__}", path=path, line=line
        )
    images: list[ImageSource] = []
    answers: tuple[str, ...]
    if "messages" in obj:
        shape = "messages"
        msgs, images = _messages(obj, refs)
        answers = (msgs[-1]["content"],)
    elif "instruction" in obj:
        if "output" not in obj:
            raise DatasetError("an 'instruction' record needs an 'output'", path=path, line=line)
        shape = "instruction"
        instruction = _text(obj["instruction"], "instruction", line, path)
        extra = obj.get("input") or ""
        user = instruction if not extra else f"{instruction}\n\n{_text(extra, 'input', line, path)}"
        output = _text(obj["output"], "output", line, path)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if obj.get("system"):
            msgs.insert(
                0, {"role": "system", "content": _text(obj["system"], "system", line, path)}
            )
        answers = (output,)
    elif "prompt" in obj:
        if "completion" not in obj:
            raise DatasetError("a 'prompt' record needs a 'completion'", path=path, line=line)
        shape = "prompt"
        prompt = _text(obj["prompt"], "prompt", line, path)
        completion = _text(obj["completion"], "completion", line, path)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        answers = (completion,)
    elif "question" in obj:
        if "answer" not in obj:
            raise DatasetError("a 'question' record needs an 'answer'", path=path, line=line)
        shape = "question"
        question = _text(obj["question"], "question", line, path)
        raw = obj["answer"]
        listed = raw if isinstance(raw, list) else [raw]
        if not listed:
            raise DatasetError("'answer' is an empty list", path=path, line=line)
        answers = tuple(_text(a, "answer", line, path) for a in listed)
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]}]
    else:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise DatasetError(
            f"unknown record shape (keys: {keys}); expected {SHAPES}", path=path, line=line
        )
    if "images" in obj:
        msgs, images = _top_level_images(obj, msgs, refs)
    if images:
        _check_counts(msgs, refs)
    return shape, Example(tuple(msgs), answers, tuple(images)), refs


def read_examples(path: str | Path, rules: ImageRules | None = None) -> list[Example]:
    """Every example of a JSONL file, validated (DatasetError with the line number). Images are
    resolved, not decoded (unless ``rules.check``): a worker reads a snapshot checked when its
    task was queued."""
    rules = rules or ImageRules(check=False)
    return [ex for _shape, ex, _line in _lines(Path(path), rules, None)]


def inspect_dataset(path: str | Path, rules: ImageRules | None = None) -> DatasetInfo:
    """Validate the whole file, every image decoded under ``rules`` (the request limits), and
    describe it (records, shapes, images, the SHA-256 of its snapshot)."""
    path = Path(path).expanduser()
    rules = rules or ImageRules()
    shapes: set[str] = set()
    records = images = 0
    image_line: int | None = None
    snap, source = hashlib.sha256(), hashlib.sha256()
    for lineno, (shape, ex, (raw, out)) in enumerate(_lines(path, rules, None), 1):
        shapes.add(shape)
        if ex is not None:
            records += 1
            images += len(ex.images)
            if ex.images and image_line is None:
                image_line = lineno
        source.update(raw)
        snap.update(out)
    if records == 0:
        raise DatasetError("has no records (only blank lines)", path=path)
    return DatasetInfo(
        path,
        snap.hexdigest(),
        records,
        tuple(sorted(s for s in shapes if s)),
        path.stat().st_size,
        images,
        source.hexdigest(),
        image_line,
    )


def _lines(path: Path, rules: ImageRules, store_in: Path | None) -> Iterator[Any]:
    """(shape, example, (raw line, snapshot line)) for every line (blank ones: shape "" and
    no example). Each image is read (decoded when ``rules.check``) and named by its hash in
    the snapshot line; with ``store_in``, also written there."""
    if not path.exists():
        raise DatasetError("does not exist", path=path)
    if not path.is_file():
        raise DatasetError("is not a file", path=path)
    if path.stat().st_size == 0:
        raise DatasetError("is empty", path=path)
    names: dict[Path, str] = {}  # one file named by many records is read once
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(
                    f"longer than {MAX_LINE_BYTES >> 20} MiB", path=path, line=lineno
                )
            if not raw.strip():
                yield "", None, (raw, raw)
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise DatasetError(f"not valid JSON ({exc})", path=path, line=lineno) from None
            shape, example, refs = _parse(obj, lineno, path, rules)
            if not refs.found:
                yield shape, example, (raw, raw)
                continue
            for container, key, ref, where, source in refs.found:
                name = names.get(source.path) if source.path is not None else None
                if name is None:
                    data = check(source, str(ref), where, lineno, path, rules)
                    name = stored_name(data, source)
                    if store_in is not None:
                        store(data, name, store_in)
                    if source.path is not None:
                        names[source.path] = name
                container[key] = name
            yield shape, example, (raw, orjson.dumps(obj) + b"\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def snapshot(info: DatasetInfo, folder: Path, rules: ImageRules | None = None) -> Path:
    """Copy the dataset to ``folder/<sha256>.jsonl`` (once): a queued or resumed run reads
    exactly the file that was validated, whatever happens to the original afterwards. Its
    images are copied to ``folder/images/<sha256><suffix>`` and the copy names them there."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{info.sha256}.jsonl"
    if info.images == 0 and dest.exists() and dest.stat().st_size == info.size:
        return dest
    tmp = folder / f".{info.sha256}.{uuid.uuid4().hex[:8]}.tmp"
    if info.images == 0:
        data = info.path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        tmp.write_bytes(data)
    else:  # the lines again, each image stored as it is read: the hash says nothing changed
        base = rules or ImageRules()
        resolve_only = ImageRules(base.limits, base.roots, check=False)
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for _shape, _ex, (_raw, line) in _lines(info.path, resolve_only, folder):
                h.update(line)
                out.write(line)
        digest = h.hexdigest()
    if digest != info.sha256:
        tmp.unlink(missing_ok=True)
        raise DatasetError("changed while it was being queued; try again", path=info.path)
    os.replace(tmp, dest)
    return dest


def snapshot_problem(path: Path) -> str | None:
    """What is wrong with a snapshot's images (one missing, or not the bytes its name is the
    hash of), or None: a task reads exactly the images it was queued with, or none."""
    names: list[str] = []
    folder = Path(os.path.realpath(path.parent))
    for ex in read_examples(path):
        names += [
            str(s.path.relative_to(folder))
            for s in ex.images
            if s.path is not None and s.path.is_relative_to(folder)
        ]
    bad = verify_stored(folder, sorted(set(names)))
    return None if bad is None else f"the snapshot's image {bad} is missing or changed"
