"""``yichui models …``: list, status, catalog, pull, import, rm, verify, rescan."""

from __future__ import annotations

import sys
import time
from contextlib import AbstractContextManager, nullcontext
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from yichui.cli.output import (
    JsonOpt,
    console,
    err_console,
    human_size,
    human_time,
    print_json,
    warn_degraded,
)
from yichui.errors import ModelNotFoundError, NotFoundError, YichuiError
from yichui.models.catalog import HUB_TITLES, CatalogEntry, load_catalog, pull_target
from yichui.models.importer import bundled_gguf, import_path
from yichui.models.names import validate_name
from yichui.models.pull import pull_model
from yichui.models.sources.base import ProgressFn, PullSpec
from yichui.runtime import Runtime

app = typer.Typer(help="Pull, import, inspect and remove models.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="Model name, e.g. Qwen/Qwen2.5-7B-Instruct.")]


def _rt(ctx: typer.Context) -> Runtime:
    rt: Runtime = ctx.obj
    return rt


COLUMNS = ("name", "kind", "size", "files", "source", "revision", "modified")


def _table(models: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("size", "files") else "left")
    for m in models:
        table.add_row(
            m["name"],
            m["kind"] or "-",
            human_size(m["size"]),
            str(m["files"]),
            m["source"] or "-",
            (m["revision"] or "-")[:12],
            human_time(m["modified"]),
        )
    return table


@app.command("list")
def list_models(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="text, multimodal or unknown.")] = None,
    source: Annotated[
        str | None, typer.Option(help="mirror, huggingface, modelscope, gguf, local.")
    ] = None,
    pattern: Annotated[
        str | None, typer.Option("--name", help="Glob on the name, e.g. 'qwen*'.")
    ] = None,
    refresh: Annotated[bool, typer.Option(help="Rebuild the index from the disk first.")] = False,
    json: bool = JsonOpt,
) -> None:
    """List models (answered from the index in Redis, not by walking the disk)."""
    listing = _rt(ctx).registry.listing(kind=kind, source=source, pattern=pattern, refresh=refresh)
    warn_degraded(listing.degraded)
    if json:
        print_json(listing.models)
        return
    if not listing.models:
        console.print("no models yet: try `yichui models import` or `yichui models pull NAME`")
        return
    console.print(_table(listing.models))


@app.command()
def status(
    ctx: typer.Context,
    name: NameArg,
    refresh: Annotated[bool, typer.Option(help="Bypass the cache and rescan the folder.")] = False,
    json: bool = JsonOpt,
) -> None:
    """Show one model's status (exit 1 if it does not exist)."""
    found = _rt(ctx).registry.status(name, refresh=refresh)
    warn_degraded(found.degraded)
    st = found.status
    if json:
        print_json({**st.to_dict(), "cached": found.cached, "degraded": found.degraded})
        if not st.exists:
            raise typer.Exit(1)
        return
    if not st.exists:
        raise ModelNotFoundError(name)
    table = Table(show_header=False, box=None)
    for key, value in [
        ("name", st.name),
        ("path", st.path),
        ("kind", st.kind),
        ("modalities", ", ".join(st.modalities or ()) or "-"),
        ("size", f"{human_size(st.size)} ({st.size} bytes)"),
        ("files", str(st.files)),
        ("source", st.source),
        ("revision", st.revision or "-"),
        ("modified", human_time(st.modified)),
        ("fingerprint", st.fingerprint),
        ("from", "cache" if found.cached else "disk"),
    ]:
        table.add_row(f"[bold]{key}[/bold]", str(value))
    console.print(table)


class CatalogKind(StrEnum):
    text = "text"
    multimodal = "multimodal"


class CatalogOrigin(StrEnum):
    snapshot = "snapshot"
    swift = "swift"


def _catalog_table(entries: list[CatalogEntry], caption: str) -> Table:
    table = Table(caption=caption)
    for col in ("model type", "ModelScope id", "Hugging Face id", "kind", "template"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(
            e.model_type, e.ms_model_id or "-", e.hf_model_id or "-", e.kind, e.template or "-"
        )
    return table


@app.command()
def catalog(
    ctx: typer.Context,
    kind: Annotated[CatalogKind | None, typer.Option(help="text or multimodal.")] = None,
    search: Annotated[
        str | None,
        typer.Option(
            "--search", "-s", help="Words that must all be part of the type, an id or template."
        ),
    ] = None,
    source: Annotated[
        CatalogOrigin,
        typer.Option(help="snapshot (shipped with yichui) or swift (ms-swift's live registry)."),
    ] = CatalogOrigin.snapshot,
    json: bool = JsonOpt,
) -> None:
    """The models ms-swift knows by name; pull one by either of its ids (exit 1: no match)."""
    found = load_catalog(_rt(ctx).settings, source.value)
    entries = found.search(search, kind=kind.value if kind else None)
    if not entries:
        what = " ".join(w for w in (kind.value if kind else None, "model") if w)
        words = f" matches {search!r}" if search else " is there"
        raise NotFoundError(
            f"no {what} of ms-swift {found.ms_swift}'s catalog{words}",
            hint="search with fewer or shorter words",
        )
    if json:
        print_json([e.to_dict() for e in entries])
        return
    console.print(
        _catalog_table(
            entries,
            f"{len(entries)} of {len(found.entries)} models, ms-swift {found.ms_swift} "
            f"({found.origin})",
        )
    )


def byte_progress(out: Console, description: str) -> tuple[Progress, ProgressFn]:
    """A transient byte progress bar (size, speed, time left) on ``out``, and the callback
    a pull reports to (``with bar: pull_model(..., progress=update)``)."""
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=out,
        transient=True,
    )
    task = bar.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


PULL_VERBS = {
    "installed": "pulled",
    "reused": "reused (pulled by another process)",
    "present": "already present",
}
"""How a pull's ``action`` is told to the user."""


def _progress_bar(enabled: bool) -> tuple[AbstractContextManager[object], ProgressFn | None]:
    if not enabled:
        return nullcontext(), None
    return byte_progress(err_console, "pulling")


@app.command()
def pull(
    ctx: typer.Context,
    name: NameArg,
    source: Annotated[
        str | None,
        typer.Option(help="mirror, huggingface (hf) or modelscope (ms). Default: mirror if set."),
    ] = None,
    repo: Annotated[
        str | None, typer.Option(help="Repository id at the source (default: the name).")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", "-i", help="Glob of files to fetch (repeat).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", "-x", help="Glob of files to skip (repeat).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Show what would be fetched; write nothing.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Fetch again even if the model is present.")] = False,
    detach: Annotated[
        bool,
        typer.Option(help="Run it as a task on the workers; print the task id and return."),
    ] = False,
    json: bool = JsonOpt,
) -> None:
    """Fetch a model; concurrent pulls of one model (any host) download it once. A name of
    ms-swift's catalog (`yichui models catalog`) is fetched by its id at the source."""
    validate_name(name)
    if repo is not None:
        validate_name(repo)
    rt = _rt(ctx)
    target = pull_target(name, rt.sources.canonical(source), repo)
    name = target.name
    if target.entry is not None:
        repo = target.repo
        if not json:
            at = HUB_TITLES.get(rt.sources.canonical(source), source)
            err_console.print(
                f"{name}: {target.entry.model_type} in ms-swift's catalog, {at} id {repo}",
                highlight=False,
            )
    if detach and not dry_run:  # a dry run is instant: answer it here
        args = {
            "name": name,
            "source": source,
            "repo": repo,
            "revision": revision,
            "include": include or [],
            "exclude": exclude or [],
            "force": force,
        }
        task = rt.tasks.submit("download", args)
        if json:
            print_json(task)
        else:
            console.print(f"{task['id']}: download of {name} queued", highlight=False)
            err_console.print(f"watch it with: yichui tasks watch {task['id']}", highlight=False)
        return
    src = rt.sources.get(source)
    spec = PullSpec(
        repo=validate_name(repo or name),
        revision=revision,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
    )
    bar, progress = _progress_bar(not json and sys.stderr.isatty() and not dry_run)
    started = time.monotonic()
    with bar:
        result = pull_model(
            rt.registry, src, name, spec, dry_run=dry_run, force=force, progress=progress
        )
    if json:
        print_json({**result.to_dict(), "seconds": round(time.monotonic() - started, 3)})
        return
    if result.plan is not None:
        plan = result.plan
        console.print(
            f"would fetch {len(plan.files)} files ({human_size(plan.size)}) of {plan.repo} "
            f"at {plan.revision or 'latest'} from {plan.source}"
        )
        for f in plan.files:
            console.print(f"  {f.path}  {human_size(f.size)}")
        return
    assert result.status is not None
    console.print(
        f"{name}: {PULL_VERBS.get(result.action, result.action)} — "
        f"{human_size(result.status.size)}, {result.status.files} files"
    )


@app.command("import")
def import_(
    ctx: typer.Context,
    path: Annotated[
        Path | None,
        typer.Argument(help="A .gguf file or a model folder. Default: the bundled SmolLM2."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name to import as.")] = None,
    replace: Annotated[
        bool, typer.Option(help="Import again even if the source is unchanged.")
    ] = False,
    json: bool = JsonOpt,
) -> None:
    """Import a local GGUF file or model folder (converted to safetensors)."""
    rt = _rt(ctx)
    if path is None:
        path = bundled_gguf()
        name = name or rt.settings.default_model
    if name is None:
        raise YichuiError("--name is required when importing a path")
    validate_name(name)
    with err_console.status(f"importing {path.name} as {name}…") if not json else nullcontext():
        result = import_path(rt.registry, path, name, replace=replace)
    if json:
        print_json({"name": name, "action": result.action, "status": result.status.to_dict()})
        return
    verb = {
        "installed": "imported",
        "reused": "imported by another process",
        "present": "already present",
    }
    console.print(
        f"{name}: {verb.get(result.action, result.action)} — {human_size(result.status.size)}"
        f" at {result.status.path}"
    )


@app.command()
def rm(
    ctx: typer.Context,
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json: bool = JsonOpt,
) -> None:
    """Delete a model's files and mark it missing in the cache."""
    validate_name(name)
    if not yes:
        if not sys.stdin.isatty():
            raise YichuiError(
                f"refusing to delete {name!r} without confirmation", hint="pass --yes"
            )
        typer.confirm(f"delete model {name!r} and all its files?", abort=True)
    before = _rt(ctx).registry.remove(name)
    if json:
        print_json({"name": name, "removed": True, "freed": before.size})
        return
    console.print(f"{name}: removed ({human_size(before.size)} freed)")


@app.command()
def verify(ctx: typer.Context, name: NameArg, json: bool = JsonOpt) -> None:
    """Re-hash a model's files against its manifest; exit 1 if anything is damaged."""
    report = _rt(ctx).registry.verify(validate_name(name))
    if json:
        print_json(report.to_dict())
    else:
        if not report.manifest:
            console.print(f"{name}: no manifest (not pulled by yichui); sizes refreshed only")
        for label, files in (("missing", report.missing), ("changed", report.changed)):
            for f in files:
                console.print(f"  [red]{label}[/red] {f}")
        for f in report.extra:
            console.print(f"  [yellow]extra[/yellow] {f}")
        console.print(
            f"{name}: "
            + ("[green]ok[/green]" if report.ok else "[red]damaged[/red]")
            + f" ({report.checked} files checked)"
        )
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def rescan(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """Walk the models root and rebuild every cache entry and the index."""
    started = time.monotonic()
    listing = _rt(ctx).registry.rescan()
    warn_degraded(listing.degraded)
    seconds = round(time.monotonic() - started, 3)
    if json:
        print_json(
            {"models": len(listing.models), "seconds": seconds, "degraded": listing.degraded}
        )
        return
    console.print(f"rescanned {len(listing.models)} models in {seconds:.2f} s")
