"""Entry point: the root app, shared options, and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from yichui import __version__
from yichui.cli import (
    bench_cmd,
    cache_cmd,
    chat,
    doctor,
    keys,
    models,
    ps,
    redis_cmd,
    serve,
    tasks,
    train,
    up,
    worker,
)
from yichui.cli.output import err_console
from yichui.config import load_settings
from yichui.errors import YichuiError
from yichui.runtime import Runtime

app = typer.Typer(
    name="yichui",
    help="一锤 yichui: pull, serve, fine-tune and evaluate LLMs, with Redis as the state bus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models.app, name="models")
app.add_typer(redis_cmd.app, name="redis")
app.add_typer(tasks.app, name="tasks")
app.command("worker")(worker.worker)
app.command("serve")(serve.serve)
app.command("chat")(chat.chat)
app.command("train")(train.train)
app.command("merge")(train.merge)
app.command("eval")(train.eval_)
app.add_typer(cache_cmd.app, name="cache")
app.command("doctor")(doctor.doctor)
app.command("up")(up.up)
app.command("ps")(ps.ps)
app.add_typer(keys.app, name="keys")
app.add_typer(bench_cmd.app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"yichui {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (also YICHUI_CONFIG)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Build the settings once; services are created lazily by the commands that need them."""
    ctx.obj = Runtime(load_settings(config))
    ctx.call_on_close(ctx.obj.close)


def _usage_error(exc: typer.TyperException) -> NoReturn:
    """Typer's own errors (usage, bad parameter, file): one line, a hint, click's exit code."""
    # typer builds NoArgsIsHelpError's message with ctx.get_help(), which (rich) has printed the
    # help already; without rich the message is the help. Asking for nothing is asking for help.
    if type(exc).__name__ == "NoArgsIsHelpError":
        if exc.message.strip():
            typer.echo(exc.message)
        sys.exit(0)
    err_console.print(f"[red]error:[/red] {escape(exc.format_message())}", highlight=False)
    ctx = getattr(exc, "ctx", None)  # a usage error's command, for the hint
    if ctx is not None:
        hint = f"hint: {escape(ctx.command_path)} --help shows the usage"
        err_console.print(hint, highlight=False)
    sys.exit(exc.exit_code)


def _on_terminal() -> bool:
    """``yichui`` alone opens the menu on a terminal; off one (a pipe, a script) the help."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; map every error to one line on stderr and a non-zero exit code."""
    debug = os.environ.get("YICHUI_DEBUG", "") not in ("", "0", "false")
    command = typer.main.get_command(app)
    try:
        if not (sys.argv[1:] if argv is None else argv) and _on_terminal():
            from yichui.cli.menu import run_menu  # questionary is imported by the menu only

            code = run_menu(load_settings())
        else:
            code = command.main(args=argv, prog_name="yichui", standalone_mode=False)
    except YichuiError as exc:
        if debug:
            raise
        err_console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        if exc.hint:
            err_console.print(f"hint: {exc.hint}", highlight=False)
        sys.exit(exc.exit_code)
    # typer 0.29 vendors click: its usage errors are TyperExceptions (not click's), its Exit
    # and Abort its own; with standalone_mode=False it raises them for us to print.
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:
        _usage_error(exc)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {first}\n"
            "(set YICHUI_DEBUG=1 for the traceback)",
            highlight=False,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
