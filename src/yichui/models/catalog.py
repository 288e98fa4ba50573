"""ms-swift's model catalog: the 1,100-odd models ms-swift knows by name, to search and pull.

Two origins, the same entries::

    cat = snapshot()                           # swift_catalog.json, shipped with yichui (instant)
    cat = load_catalog(settings, "swift")      # the live registry, through swift_python (~8 s)
    cat.search("qwen2.5 7b", kind="text")      # every term in the type, either id or template
    cat.find("qwen/qwen2.5-7b-instruct")       # by ModelScope or Hugging Face id, any case

The snapshot is what ``tools/swift_catalog.py`` wrote from the ms-swift it ran
(``ms_swift`` says which); the live registry is read by running ``swift_registry.py`` as a file
in ms-swift's own interpreter (:mod:`yichui.swift_env`), where yichui is not importable.

A pull of a catalog name goes to the id of the source it is pulled from
(:func:`pull_target`): ``models pull ZhipuAI/glm-4-9b-chat --source hf`` fetches
``zai-org/glm-4-9b-chat``. Names are ids only, never a bare model type: a type is a family
(``qwen2_5`` is dozens of repos), and one that is a single repo today stops being one when
ms-swift adds a model to it.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from yichui.config import Settings
from yichui.errors import RequestError, SourceNotFoundError
from yichui.swift_env import swift_env

KINDS = ("text", "multimodal")
ORIGINS = ("snapshot", "swift")
SNAPSHOT = "swift_catalog.json"
"""The snapshot's file name, next to this module (package data)."""
DUMP_SCRIPT = Path(__file__).with_name("swift_registry.py")
"""The dump the live registry is read with, run as a file by ms-swift's interpreter."""

HUB_IDS = {"modelscope": "ms_model_id", "huggingface": "hf_model_id"}
"""The sources the catalog has ids for, and the entry field that holds each one's."""
HUB_TITLES = {"modelscope": "ModelScope", "huggingface": "Hugging Face"}
_OTHER = {"modelscope": "huggingface", "huggingface": "modelscope"}

# `python -c` of this, with the script's path after it: run it as __main__, not as a module
_RUN_FILE = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


@dataclass(frozen=True)
class CatalogEntry:
    """One model ms-swift knows: its type, its ids at either hub and what ms-swift runs it
    with (``template``, the effective one; ``requires``: package pins)."""

    model_type: str
    ms_model_id: str | None
    hf_model_id: str | None
    kind: str
    """``text`` or ``multimodal`` (ms-swift's ``is_multimodal``)."""
    template: str | None = None
    architectures: tuple[str, ...] = ()
    task: str | None = None
    """``embedding``, ``reranker``, ``reward``, ``prm``, ``decision``; None: a causal LM."""
    tags: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CatalogEntry:
        return cls(
            model_type=str(d["model_type"]),
            ms_model_id=d.get("ms_model_id") or None,
            hf_model_id=d.get("hf_model_id") or None,
            kind=str(d["kind"]),
            template=d.get("template") or None,
            architectures=tuple(d.get("architectures") or ()),
            task=d.get("task") or None,
            tags=tuple(d.get("tags") or ()),
            requires=tuple(d.get("requires") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "ms_model_id": self.ms_model_id,
            "hf_model_id": self.hf_model_id,
            "kind": self.kind,
            "template": self.template,
            "architectures": list(self.architectures),
            "task": self.task,
            "tags": list(self.tags),
            "requires": list(self.requires),
        }

    @property
    def ids(self) -> tuple[str, ...]:
        """Its hub ids, ModelScope's first."""
        return tuple(i for i in (self.ms_model_id, self.hf_model_id) if i)

    def repo_for(self, source: str) -> str | None:
        """Its id at ``source`` (``modelscope`` or ``huggingface``); None: it has none there."""
        attr = HUB_IDS.get(source)
        return getattr(self, attr) if attr else None

    def matches(self, terms: Iterable[str]) -> bool:
        """Whether every (lower-case) term is part of its type, either id or template."""
        text = " ".join(v.lower() for v in (self.model_type, *self.ids, self.template or "") if v)
        return all(t in text for t in terms)


@dataclass(frozen=True)
class Catalog:
    """The entries of one ms-swift version, from the snapshot or the live registry."""

    ms_swift: str
    """The ms-swift version the entries come from."""
    origin: str
    """``snapshot`` or ``swift``."""
    entries: tuple[CatalogEntry, ...] = field(repr=False)

    @classmethod
    def from_dump(cls, dump: dict[str, Any], origin: str) -> Catalog:
        """From what ``swift_registry.py`` prints (and the snapshot holds)."""
        return cls(
            ms_swift=str(dump["ms_swift"]),
            origin=origin,
            entries=tuple(CatalogEntry.from_dict(m) for m in dump["models"]),
        )

    def to_dump(self) -> dict[str, Any]:
        return {"ms_swift": self.ms_swift, "models": [e.to_dict() for e in self.entries]}

    def search(self, query: str | None = None, *, kind: str | None = None) -> list[CatalogEntry]:
        """The entries of ``kind`` (any: None) that every word of ``query`` is part of
        (case-insensitive, over the model type, both ids and the template), in order."""
        if kind is not None and kind not in KINDS:
            raise RequestError(f"unknown kind {kind!r}: use {' or '.join(KINDS)}", param="kind")
        terms = (query or "").lower().split()
        return [
            e
            for e in self.entries
            if (kind is None or e.kind == kind) and (not terms or e.matches(terms))
        ]

    def find(self, name: str) -> list[CatalogEntry]:
        """The entries whose ModelScope or Hugging Face id is ``name``, in any case."""
        return list(self._by_id.get(name.lower(), ()))

    @functools.cached_property
    def _by_id(self) -> dict[str, tuple[CatalogEntry, ...]]:
        index: dict[str, list[CatalogEntry]] = {}
        for e in self.entries:
            for key in dict.fromkeys(i.lower() for i in e.ids):
                index.setdefault(key, []).append(e)
        return {k: tuple(v) for k, v in index.items()}


@functools.lru_cache(maxsize=1)
def snapshot() -> Catalog:
    """The snapshot shipped with yichui (read once per process)."""
    data = importlib.resources.files(__package__).joinpath(SNAPSHOT).read_bytes()
    return Catalog.from_dump(orjson.loads(data), "snapshot")


def live(settings: Settings) -> Catalog:
    """ms-swift's registry as the ``swift_python`` environment has it now (seconds).

    Raises :class:`~yichui.errors.SwiftMissingError`, with how to install it, where ms-swift
    is missing."""
    env = swift_env(settings)
    return Catalog.from_dump(env.run_json(_RUN_FILE, str(DUMP_SCRIPT)), "swift")


def load_catalog(settings: Settings, origin: str = "snapshot") -> Catalog:
    """The catalog from ``origin``: ``snapshot`` (shipped) or ``swift`` (the live registry)."""
    if origin == "snapshot":
        return snapshot()
    if origin == "swift":
        return live(settings)
    raise RequestError(f"unknown catalog source {origin!r}: use snapshot or swift", param="source")


@dataclass(frozen=True)
class PullTarget:
    """What a pull fetches: model ``name`` (in the models root) from ``repo`` at the source,
    and the catalog entry the name was found as (None: not a catalog name)."""

    name: str
    repo: str
    entry: CatalogEntry | None = None


def pull_target(
    name: str, source: str, repo: str | None = None, *, catalog: Catalog | None = None
) -> PullTarget:
    """Where a pull of ``name`` from ``source`` (a canonical source name) goes.

    Only a pull from ``modelscope`` or ``huggingface`` with no ``repo`` given is mapped; when
    ``name`` is a catalog id (either hub's, any case) it fetches the entry's id at that source,
    and the model is named with the catalog's spelling of ``name``. Anything else fetches
    ``repo`` (default ``name``) as before. Raises :class:`~yichui.errors.SourceNotFoundError`
    when the entry has no id at that source, and a :class:`~yichui.errors.RequestError` when
    the name is models with different ids there.
    """
    if repo or source not in HUB_IDS:
        return PullTarget(name, repo or name)
    found = (catalog or snapshot()).find(name)
    if not found:
        return PullTarget(name, name)
    spelling = next(i for e in found for i in e.ids if i.lower() == name.lower())
    canonical = name if any(name in e.ids for e in found) else spelling
    repos: dict[str, str] = {}  # by its lower case: the hubs' ids are not case-sensitive
    for e in found:
        if (r := e.repo_for(source)) is not None:
            repos.setdefault(r.lower(), r)
    title = HUB_TITLES[source]
    if not repos:
        raise SourceNotFoundError(
            f"{canonical!r} has no {title} id in ms-swift's catalog",
            name=canonical,
            source=source,
            hint=f"pull it with --source {_OTHER[source]}, or name the {title} repository "
            "with --repo",
        )
    if len(repos) > 1:
        raise RequestError(
            f"{canonical!r} is {len(repos)} models at {title} in ms-swift's catalog: "
            + ", ".join(repos.values()),
            param="name",
            code="ambiguous_model",
            hint="name the one you mean with --repo",
        )
    (repo,) = repos.values()
    entry = next(e for e in found if e.repo_for(source) == repo)
    return PullTarget(canonical, repo, entry)
