"""Run folders: one versioned folder per training run, under ``<data_dir>/runs``.

::

    runs/<output>/v0-20261125-101500/
        args.json            what was asked (the task's arguments)
        checkpoints/         checkpoint-<step>/ (adapter, optimizer, scheduler, RNG, state)
        adapter/             the final adapter, copied into the models root as <output>
        logging.jsonl        one JSON object per logged step (loss, lr, grad norm, tokens/s)
        result.json          final metrics, once the run succeeded

``v<N>`` counts the runs of one output name, so re-training an adapter never overwrites the
earlier run's checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from yichui.models.names import validate_name

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_VERSION = re.compile(r"^v(\d+)-")
# a checkpoint is whole once these are written (Trainer writes trainer_state.json last)
_CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json")


def runs_root(data_dir: Path) -> Path:
    return data_dir / "runs"


def datasets_root(data_dir: Path) -> Path:
    """Content-addressed snapshots of the datasets tasks were queued with."""
    return data_dir / "datasets"


def evals_root(data_dir: Path) -> Path:
    """Evaluation reports on disk (``<key>.json``): the truth behind the Redis result cache."""
    return data_dir / "evals"


def new_run_dir(data_dir: Path, output: str, args: dict[str, Any]) -> Path:
    """Create ``runs/<output>/v<N>-<stamp>`` (N one more than any before) with ``args.json``."""
    parent = runs_root(data_dir) / validate_name(output).replace("/", "--")
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for e in os.listdir(parent) if (m := _VERSION.match(e))]
        n = max(taken, default=-1) + 1
        folder = parent / f"v{n}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            folder.mkdir()
        except FileExistsError:  # another submit took this version meanwhile
            continue
        write_json(folder / "args.json", args)
        return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The whole checkpoint with the highest step, or None."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for entry in folder.iterdir():
        m = CHECKPOINT.match(entry.name)
        if m and all((entry / f).exists() for f in _CHECKPOINT_FILES):
            found.append((int(m.group(1)), entry))
    return max(found)[1] if found else None


def checkpoint_step(path: Path) -> int:
    m = CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else 0


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
