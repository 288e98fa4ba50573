"""Write ms-swift's model catalog snapshot (src/yichui/models/swift_catalog.json) from the
ms-swift of the ``swift_python`` environment (``make swift``: .venv-swift).

    .venv/bin/python tools/swift_catalog.py                 # regenerate it
    .venv/bin/python tools/swift_catalog.py --check         # exit 1 if it is not what ms-swift has
    .venv/bin/python tools/swift_catalog.py --python PATH   # another interpreter with ms-swift

Runs in yichui's environment and reads the registry through the configured interpreter
(``yichui.models.catalog.live``), so the snapshot records the ms-swift version it came from.
One entry per line, so that a new ms-swift's changes read as a short diff.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from yichui.config import load_settings
from yichui.errors import YichuiError
from yichui.models import catalog

SNAPSHOT = Path(catalog.__file__).with_name(catalog.SNAPSHOT)
REPO_SWIFT = Path(__file__).resolve().parent.parent / ".venv-swift" / "bin" / "python"
"""``make swift``'s interpreter: the default when neither --python nor swift_python is set."""


def render(dump: dict[str, Any]) -> str:
    """The snapshot's text: the version, then one model per line."""
    lines = ",\n".join(json.dumps(m, ensure_ascii=False) for m in dump["models"])
    return f'{{"ms_swift": {json.dumps(dump["ms_swift"])}, "models": [\n{lines}\n]}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", type=Path, help="interpreter with ms-swift (swift_python)")
    parser.add_argument("--check", action="store_true", help="compare; write nothing")
    parser.add_argument("--output", type=Path, default=SNAPSHOT, help="where to write it")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        python = args.python or settings.swift_python
        if python is None and REPO_SWIFT.exists():
            python = REPO_SWIFT
        found = catalog.live(settings.model_copy(update={"swift_python": python}))
    except YichuiError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    text = render(found.to_dump())
    kinds = [e.kind for e in found.entries]
    summary = (
        f"ms-swift {found.ms_swift}: {len(kinds)} models, {kinds.count('multimodal')} multimodal, "
        f"{len({e.model_type for e in found.entries})} model types"
    )
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"error: {args.output} is not {summary}", file=sys.stderr)
            print("hint: run .venv/bin/python tools/swift_catalog.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({summary})")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
