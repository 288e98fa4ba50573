"""Dump ms-swift's model registry as one JSON line: run as a file by ms-swift's interpreter.

This file is shipped inside yichui but is never imported by it: ms-swift lives in an
environment of its own (``swift_python``) where yichui is not installed, so this needs the
standard library and ms-swift only. :mod:`yichui.models.catalog` runs it through
:class:`yichui.swift_env.SwiftEnv`; ``tools/swift_catalog.py`` writes its answer to the
snapshot ``swift_catalog.json``::

    .venv-swift/bin/python src/yichui/models/swift_registry.py
    {"ms_swift": "4.6.0", "models": [{"model_type": "baichuan", "ms_model_id": …}, …]}

One entry per model of every model group of ``swift.model.MODEL_MAPPING``, model types in
alphabetical order and ms-swift's own order inside a type (a family reads in sequence). The
fields a group sets override its model type's, as ms-swift's ``get_matched_model_meta`` does
(``template``, ``requires``); ``tags`` are the type's and the group's together.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from typing import Any

FIELDS = (
    "model_type",
    "ms_model_id",
    "hf_model_id",
    "kind",
    "template",
    "architectures",
    "task",
    "tags",
    "requires",
)
"""The keys of each entry, in this order."""


def _strings(values: Any) -> list[str]:
    return [str(v) for v in values or ()]


def entry(model_type: str, meta: Any, group: Any, model: Any) -> dict[str, Any]:
    """One model as the catalog describes it (``meta`` a ModelMeta, ``group`` its ModelGroup)."""
    template = group.template if group.template is not None else meta.template
    requires = group.requires if group.requires is not None else meta.requires
    task = meta.task_type or ("reward" if getattr(meta, "is_reward", False) else None)
    values = {
        "model_type": model_type,
        "ms_model_id": model.ms_model_id or None,
        "hf_model_id": model.hf_model_id or None,
        "kind": "multimodal" if meta.is_multimodal else "text",
        "template": template or None,
        # "null" is what ms-swift's own lookup writes into a type without architectures
        "architectures": [a for a in _strings(meta.architectures) if a != "null"],
        "task": task or None,
        "tags": list(dict.fromkeys(_strings(meta.tags) + _strings(group.tags))),
        "requires": _strings(requires),
    }
    return {key: values[key] for key in FIELDS}


def entries(mapping: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model of ``mapping`` (model type -> ModelMeta) that has a hub id, in order."""
    out = []
    for model_type in sorted(mapping):
        meta = mapping[model_type]
        for group in meta.model_groups:
            for model in group.models:
                if model.ms_model_id or model.hf_model_id:  # a local path only: nothing to pull
                    out.append(entry(model_type, meta, group, model))
    return out


def swift_version() -> str:
    try:
        return importlib.metadata.version("ms-swift")
    except importlib.metadata.PackageNotFoundError:
        import swift  # a source checkout: no distribution metadata

        return str(getattr(swift, "__version__", "unknown"))


def main() -> int:
    from swift.model import MODEL_MAPPING  # imports torch and transformers: seconds

    answer = {"ms_swift": swift_version(), "models": entries(dict(MODEL_MAPPING))}
    sys.stdout.write(json.dumps(answer) + "\n")  # the last line: the answer
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
