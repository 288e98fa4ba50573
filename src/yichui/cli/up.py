"""``yichui up``: the main job on the embedded default (what ``make run`` runs)."""

from __future__ import annotations

import typer

from yichui.cli.models import _table
from yichui.cli.output import JsonOpt, console, err_console, print_json
from yichui.models.importer import bundled_gguf, import_gguf
from yichui.runtime import Runtime


def up(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """Start Redis (embedded unless a URL is set), import the default model, show the registry."""
    rt: Runtime = ctx.obj
    _client, target = rt.redis()
    name = rt.settings.default_model
    registry = rt.registry
    if not registry.status(name).status.exists:
        with err_console.status(f"importing the bundled model as {name} (about a minute)…"):
            import_gguf(registry, bundled_gguf(), name)
    listing = registry.listing()
    counts = rt.tasks.counts()
    workers = rt.tasks.alive_workers()
    if json:
        print_json(
            {
                "redis": target.display,
                "models": listing.models,
                "tasks": counts,
                "workers": len(workers),
            }
        )
        return
    console.print(f"Redis: {target.display}")
    console.print(_table(listing.models, title=f"models in {rt.settings.models_path}"))
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none yet"
    console.print(f"tasks: {summary}; workers alive: {len(workers)}", highlight=False)
    if not workers:
        err_console.print(
            "run background jobs with `yichui worker` "
            "(try `yichui tasks selftest --wait` beside it)",
            highlight=False,
        )
