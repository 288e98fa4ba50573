"""``yichui doctor``: is everything yichui needs in place?"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from yichui.cli.output import JsonOpt, console, human_size, print_json
from yichui.errors import SourceNotFoundError, SwiftMissingError, YichuiError
from yichui.models.importer import bundled_gguf
from yichui.runtime import Runtime
from yichui.swift_env import TESTED, swift_env

EXTRAS = {
    "ml": ("torch", "transformers", "safetensors", "gguf", "peft", "accelerate"),
    "hub": ("huggingface_hub", "modelscope"),
    "bench": ("matplotlib",),
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _writable_dir(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _workers_check(rt: Runtime) -> Check:
    alive = rt.tasks.alive_workers()
    counts = rt.tasks.counts()
    queued = f"{counts['queued']} queued, {counts['running']} running"
    if not alive:
        return Check(
            "task workers",
            False,
            f"none alive ({queued}); start one with `yichui worker`",
            required=False,
        )
    slots = sum(int(w.get("concurrency", 1)) for w in alive)
    return Check(
        "task workers", True, f"{len(alive)} alive, {slots} slots ({queued})", required=False
    )


def run_checks(rt: Runtime) -> list[Check]:
    s = rt.settings
    checks: list[Check] = []
    try:
        client, target = rt.redis()
        version = client.info("server").get("redis_version", "?")
        mode = "embedded" if not s.redis_url else target.kind
        checks.append(Check("redis", True, f"{target.display} ({mode}), Redis {version}"))
        checks.append(_workers_check(rt))
    except YichuiError as exc:
        checks.append(Check("redis", False, exc.message))

    for label, path in (("data dir", s.data_dir), ("models root", s.models_path)):
        base = _writable_dir(path)
        writable = os.access(base, os.W_OK)
        free = shutil.disk_usage(base).free
        state = "exists" if path.exists() else "will be created"
        detail = f"{path} ({state}, {human_size(free)} free)"
        checks.append(Check(label, writable, detail if writable else detail + ", not writable"))

    for extra, modules in EXTRAS.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        detail = "installed" if not missing else f"missing {', '.join(missing)}"
        checks.append(Check(f"extra [{extra}]", not missing, detail, required=False))
    try:
        checks.append(Check("bundled model", True, str(bundled_gguf()), required=False))
    except SourceNotFoundError as exc:
        checks.append(Check("bundled model", False, exc.message, required=False))
    checks.append(_swift_check(rt))
    return checks


def _swift_check(rt: Runtime) -> Check:
    """The ms-swift environment (``swift_python``): its interpreter and versions; a version the
    tests did not run is a warning."""
    try:
        env = swift_env(rt.settings)
    except SwiftMissingError as exc:
        return Check("ms-swift", False, exc.message + (f"; {exc.hint}" if exc.hint else ""), False)
    found = ", ".join(f"{k} {v}" for k, v in env.versions.items() if v is not None)
    detail = f"{found} in {env.python} (Python {env.python_version})"
    untested = env.untested()
    if untested:
        tested = ", ".join(f"{k} {'/'.join(v)}" for k, v in TESTED.items())
        return Check("ms-swift", False, f"{detail}; untested: {', '.join(untested)} "
                     f"(the tests ran {tested})", required=False)  # fmt: skip
    return Check("ms-swift", True, detail, required=False)


def doctor(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """Check Redis, disk space, the models root and the optional extras (exit 1 on a failure)."""
    checks = run_checks(ctx.obj)
    failed = any(not c.ok and c.required for c in checks)
    if json:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        table = Table(show_header=False, box=None)
        for c in checks:
            mark = "[green]ok[/green]" if c.ok else "[red]FAIL[/red]"
            if not c.ok and not c.required:
                mark = "[yellow]--[/yellow]"
            table.add_row(mark, f"[bold]{escape(c.name)}[/bold]", escape(c.detail))
        console.print(table)
    if failed:
        raise typer.Exit(1)
