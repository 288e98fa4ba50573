"""``yichui tasks …``: list, show, watch, logs, cancel, retry, submit, selftest, workers."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Annotated, Any

import orjson
import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from yichui.cli.output import JsonOpt, console, err_console, human_size, print_json, warn
from yichui.errors import InvalidTaskArgsError
from yichui.runtime import Runtime
from yichui.state.task_store import STATES, TERMINAL, LogEntry, TaskState

app = typer.Typer(help="Long jobs: list, watch, cancel and retry tasks.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(help="Task id (from `yichui tasks list`).")]

# Keyed by state, looked up by the plain string a status holds (a StrEnum member equals it).
_STATE_STYLE: dict[str, str] = {
    TaskState.QUEUED: "cyan",
    TaskState.RUNNING: "blue",
    TaskState.SUCCEEDED: "green",
    TaskState.FAILED: "red",
    TaskState.DEAD: "red bold",
    TaskState.CANCELLED: "yellow",
}
EXIT_CODES: dict[str, int] = {
    TaskState.SUCCEEDED: 0,
    TaskState.FAILED: 1,
    TaskState.DEAD: 1,
    TaskState.CANCELLED: 3,
}
"""Exit status of ``watch`` and ``selftest --wait`` for the task's final state."""


def _rt(ctx: typer.Context) -> Runtime:
    rt: Runtime = ctx.obj
    return rt


def _age(ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, time.time() - ts)
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _progress_text(p: dict[str, Any]) -> str:
    step, total, unit = p.get("step") or 0, p.get("total"), p.get("unit") or "step"
    if unit == "bytes":
        done = f"{human_size(step)}/{human_size(total)}" if total else human_size(step)
    else:
        done = f"{step}/{total}" if total else str(step)
    if p.get("percent") is not None:
        done += f" ({p['percent']:.0f}%)"
    return done


def _metrics_text(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in (p.get("metrics") or {}).items())


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", "-s", help=f"Only these states (repeat): {', '.join(STATES)}."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many.")] = 50,
    json: bool = JsonOpt,
) -> None:
    """Tasks, newest first, from the per-state indexes (no keyspace scan)."""
    svc = _rt(ctx).tasks
    tasks = svc.listing(state, limit=limit)
    if json:
        print_json({"tasks": tasks, "counts": svc.counts()})
        return
    table = Table()
    for col in ("id", "type", "state", "attempt", "progress", "metrics", "age", "worker"):
        table.add_column(col)
    for t in tasks:
        st = t["state"]
        table.add_row(
            t["id"],
            t.get("type", "?"),
            f"[{_STATE_STYLE.get(st, '')}]{st}[/]",
            f"{t.get('attempt', 0)}/{t.get('max_attempts', '?')}",
            _progress_text(t["progress"]),
            _metrics_text(t["progress"]),
            _age(t.get("created")),
            t.get("worker", "-") if st == TaskState.RUNNING else "-",
        )
    console.print(table)
    counts = svc.counts()
    console.print("  ".join(f"{s}: {n}" for s, n in counts.items() if n), highlight=False)


def _pairs(values: dict[str, Any], width: int = 72) -> str:
    """``key=value`` pairs, long values cut (``tasks show --json`` has them whole)."""
    out = []
    for k, v in values.items():
        text = v if isinstance(v, str) else orjson.dumps(v).decode()
        out.append(f"{k}={text if len(text) <= width else text[: width - 1] + '…'}")
    return " ".join(out)


def _show_text(t: dict[str, Any]) -> None:
    st = t["state"]
    console.print(f"[bold]{t['id']}[/bold]  {t.get('type')}  [{_STATE_STYLE.get(st, '')}]{st}[/]")
    rows: list[tuple[str, str]] = [
        ("attempt", f"{t.get('attempt', 0)} of {t.get('max_attempts', '?')}"),
        ("progress", _progress_text(t["progress"])),
    ]
    if t["progress"].get("metrics"):
        rows.append(("metrics", _metrics_text(t["progress"])))
    if t["progress"].get("eta") is not None and st == TaskState.RUNNING:
        rows.append(("eta", _duration(t["progress"]["eta"])))
    rows.append(("args", _pairs(t.get("args") or {})))
    for key in ("created", "started", "finished"):
        if t.get(key):
            rows.append((key, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t[key]))))
    if st == TaskState.RUNNING:
        rows.append(("worker", str(t.get("worker"))))
        if t.get("heartbeat"):
            rows.append(("heartbeat", f"{_age(t['heartbeat'])} ago"))
        if t.get("cancel"):
            rows.append(("cancel", "requested"))
    if t.get("retry_at"):
        rows.append(("retry in", _duration(max(0.0, t["retry_at"] - time.time()))))
    for key in ("error", "last_error"):
        if t.get(key):
            rows.append((key.replace("_", " "), f"{t[key]['type']}: {t[key]['message']}"))
    if t.get("result"):
        result = t["result"]
        rows.append(("result", _pairs(result) if isinstance(result, dict) else str(result)))
    for k, v in rows:
        console.print(f"  {k:<10} {v}", highlight=False)


@app.command()
def show(ctx: typer.Context, task_id: IdArg, json: bool = JsonOpt) -> None:
    """One task: state, attempt, progress, ETA, error, result."""
    t = _rt(ctx).tasks.get(task_id)
    if json:
        print_json(t)
    else:
        _show_text(t)


def _log_line(e: LogEntry) -> str:
    d = e.data
    if e.kind == "log":
        stamp = time.strftime("%H:%M:%S", time.localtime(d.get("ts", 0)))
        level = "" if d.get("level", "info") == "info" else f"{d['level']}: "
        return f"{stamp} {level}{d.get('line', '')}"
    if e.kind == "state":
        stamp = time.strftime("%H:%M:%S", time.localtime(d.get("ts", 0)))
        extra = f" on {d['worker']}" if d.get("worker") else ""
        if d.get("reason"):
            extra += f" ({d['reason']})"
        return f"{stamp} -- {d.get('state')} (attempt {d.get('attempt')}){extra}"
    return f"progress {_progress_text(d)} {_metrics_text(d)}".rstrip()


@app.command()
def logs(
    ctx: typer.Context,
    task_id: IdArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until it ends.")
    ] = False,
    tail: Annotated[int, typer.Option(min=1, help="Start with the last N entries.")] = 200,
    progress: Annotated[bool, typer.Option(help="Include progress entries.")] = False,
    json: bool = JsonOpt,
) -> None:
    """A task's log lines and state changes (``-f`` follows, resuming across disconnects)."""
    svc = _rt(ctx).tasks
    entries = svc.tail(task_id, tail)
    after = entries[-1].id if entries else "0-0"
    stream = entries if not follow else [*entries, *svc.follow(task_id, after=after)]
    _print_entries(stream, progress=progress, json=json)


def _print_entries(entries: Any, *, progress: bool, json: bool) -> None:
    for e in entries:
        if e.kind == "progress" and not progress:
            continue
        if json:
            line = {**e.data, "entry": e.id, "kind": e.kind}
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
        else:
            console.print(_log_line(e), highlight=False, markup=False)
        sys.stdout.flush()


def watch_task(rt: Runtime, task_id: str, *, json: bool = False, lines: int = 10) -> str:
    """Follow a task to its end -> its final state. Ctrl-C stops watching, not the task."""
    try:
        return _watch(rt, task_id, json=json, lines=lines)
    except KeyboardInterrupt:
        err_console.print(
            f"stopped watching; {task_id} goes on (`yichui tasks watch {task_id}` to come back, "
            f"`yichui tasks cancel {task_id}` to stop it)",
            highlight=False,
        )
        raise typer.Exit(130) from None


def _watch(rt: Runtime, task_id: str, *, json: bool, lines: int) -> str:
    svc = rt.tasks
    status = svc.get(task_id)
    state = status["state"]
    if state == TaskState.QUEUED:
        queue = status.get("queue") or rt.settings.task_queue
        if not any(w.get("queue") == queue for w in svc.alive_workers()):
            warn(
                f"no worker is alive on queue {queue!r}: it waits until one starts "
                "(`yichui worker`)"
            )
    if json:
        for e in svc.follow(task_id):
            line = {**e.data, "entry": e.id, "kind": e.kind}
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            sys.stdout.flush()
            if e.kind == "state":
                state = e.data.get("state", state)
        return str(svc.get(task_id)["state"]) if state not in TERMINAL else state
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[done]}"),
        TextColumn("eta {task.fields[eta]}"),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        auto_refresh=False,
    )
    p = status["progress"]
    handle = bar.add_task(
        f"{task_id} {status.get('type')}",
        total=p.get("total") or None,
        completed=p.get("step") or 0,
        done=_progress_text(p),
        eta="-",
        metrics="",
    )
    tail: deque[str] = deque(maxlen=lines)
    header = Text(f"{state} · attempt {status.get('attempt', 0)}")

    def render() -> Group:
        return Group(header, bar, Text("\n".join(tail), style="dim"))

    if not console.is_terminal:  # a log, not an animation
        for e in svc.follow(task_id):
            if e.kind != "progress":
                console.print(_log_line(e), highlight=False, markup=False)
    else:
        with Live(render(), console=console, refresh_per_second=8, transient=True) as live:
            for e in svc.follow(task_id):
                if e.kind == "progress":
                    bar.update(
                        handle,
                        total=e.data.get("total") or None,
                        completed=e.data.get("step") or 0,
                        done=_progress_text(e.data),
                        eta=_duration(e.data.get("eta")),
                        metrics=_metrics_text(e.data),
                    )
                else:
                    tail.append(_log_line(e))
                    if e.kind == "state":
                        st = e.data.get("state", "?")
                        header.plain = f"{st} · attempt {e.data.get('attempt', 0)}"
                live.update(render())
        console.print(render())
    final = svc.get(task_id)
    console.print(f"{task_id}: [{_STATE_STYLE.get(final['state'], '')}]{final['state']}[/]")
    if final.get("error"):
        console.print(f"  {final['error']['type']}: {final['error']['message']}", highlight=False)
    return str(final["state"])


@app.command()
def watch(
    ctx: typer.Context,
    task_id: IdArg,
    lines: Annotated[int, typer.Option(min=0, help="Log lines shown under the bar.")] = 10,
    json: Annotated[bool, typer.Option("--json", help="Print events as JSON lines.")] = False,
) -> None:
    """Live progress bar (step/total, percent, ETA, metrics) and log tail until the task ends.

    Exits 0 when it succeeded, 1 when it failed or died, 3 when it was cancelled."""
    state = watch_task(_rt(ctx), task_id, json=json, lines=lines)
    raise typer.Exit(EXIT_CODES.get(state, 1))


@app.command()
def cancel(ctx: typer.Context, task_id: IdArg, json: bool = JsonOpt) -> None:
    """Cancel: a queued task never runs; a running one stops within about a heartbeat."""
    t = _rt(ctx).tasks.cancel(task_id)
    if json:
        print_json(t)
        return
    msg = {
        "cancelled": "cancelled",
        "requested": "cancel requested; the worker stops it within a heartbeat",
        "unchanged": f"already {t['state']}; nothing to cancel",
    }[t["outcome"]]
    console.print(f"{task_id}: {msg}", highlight=False)


@app.command()
def retry(
    ctx: typer.Context,
    task_id: IdArg,
    max_attempts: Annotated[int | None, typer.Option(min=1, help="New attempt budget.")] = None,
    json: bool = JsonOpt,
) -> None:
    """Queue a failed, dead or cancelled task again (same id, fresh attempts)."""
    t = _rt(ctx).tasks.retry(task_id, max_attempts=max_attempts)
    if json:
        print_json(t)
    else:
        console.print(f"{task_id}: queued again", highlight=False)


def _parse_args(pairs: list[str] | None, raw: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if raw:
        try:
            loaded = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidTaskArgsError(f"--args is not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InvalidTaskArgsError("--args must be a JSON object")
        args.update(loaded)
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidTaskArgsError(f"--arg {pair!r}: use KEY=VALUE")
        try:
            args[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            args[key] = value  # a bare string
    return args


def _submitted(rt: Runtime, t: dict[str, Any], *, wait: bool, json: bool) -> None:
    if wait:
        state = watch_task(rt, t["id"], json=json)
        raise typer.Exit(EXIT_CODES.get(state, 1))
    if json:
        print_json(t)
        return
    verb = "queued" if t.get("created_now", True) else f"already exists ({t['state']})"
    console.print(f"{t['id']}: {verb}", highlight=False)
    err_console.print(f"watch it with: yichui tasks watch {t['id']}", highlight=False)


WaitOpt = Annotated[bool, typer.Option("--wait", "-w", help="Watch it until it ends.")]


@app.command()
def submit(
    ctx: typer.Context,
    task_type: Annotated[str, typer.Argument(help="Task type, e.g. selftest or download.")],
    arg: Annotated[
        list[str] | None, typer.Option("--arg", "-a", help="KEY=VALUE (JSON value or string).")
    ] = None,
    args: Annotated[str | None, typer.Option(help="All arguments as one JSON object.")] = None,
    task_id: Annotated[
        str | None, typer.Option("--id", help="Your own id: submitting it again is a no-op.")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1)] = None,
    queue: Annotated[str | None, typer.Option(help="Queue (default: task_queue).")] = None,
    delay: Annotated[
        float, typer.Option(min=0, help="Seconds before a worker may start it.")
    ] = 0.0,
    wait: WaitOpt = False,
    json: bool = JsonOpt,
) -> None:
    """Queue a task of any type; arguments are checked before anything is queued."""
    rt = _rt(ctx)
    t = rt.tasks.submit(
        task_type,
        _parse_args(arg, args),
        task_id=task_id,
        max_attempts=max_attempts,
        queue=queue,
        delay=delay,
    )
    _submitted(rt, t, wait=wait, json=json)


@app.command()
def selftest(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(min=1, help="Steps to count.")] = 10,
    step_seconds: Annotated[float, typer.Option(min=0, help="Seconds per step.")] = 0.5,
    fail_at: Annotated[
        int | None, typer.Option(min=1, help="Fire drill: raise at this step.")
    ] = None,
    fail_attempts: Annotated[
        int | None, typer.Option(min=1, help="…only in the first N attempts.")
    ] = None,
    crash_at: Annotated[
        int | None, typer.Option(min=1, help="Fire drill: kill the worker at this step.")
    ] = None,
    crash_attempts: Annotated[
        int | None, typer.Option(min=1, help="…only in the first N attempts.")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1)] = None,
    wait: WaitOpt = False,
    json: bool = JsonOpt,
) -> None:
    """Check the workers end to end: a task that reports progress every step."""
    rt = _rt(ctx)
    args: dict[str, Any] = {"steps": steps, "step_seconds": step_seconds}
    drills = {
        "fail_at": fail_at,
        "fail_attempts": fail_attempts,
        "crash_at": crash_at,
        "crash_attempts": crash_attempts,
    }
    args.update({k: v for k, v in drills.items() if v is not None})
    t = rt.tasks.submit("selftest", args, max_attempts=max_attempts)
    _submitted(rt, t, wait=wait, json=json)


@app.command()
def workers(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """Workers that have sent a heartbeat, with what they run."""
    ws = _rt(ctx).tasks.workers()
    if json:
        print_json({"workers": ws})
        return
    table = Table()
    for col in ("id", "queue", "slots", "running", "heartbeat", "alive"):
        table.add_column(col)
    for w in ws:
        table.add_row(
            w["id"],
            w.get("queue", "?"),
            str(w.get("concurrency", "?")),
            ", ".join(w.get("running", [])) or "-",
            f"{_age(w['heartbeat'])} ago",
            "yes" if w["alive"] else "[red]no[/]",
        )
    console.print(table)
