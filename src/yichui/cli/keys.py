"""``yichui keys create|list|revoke``: the API keys kept in Redis (digests only).

A new key is printed once, on stdout alone (``KEY=$(yichui keys create --tenant t)`` captures
just the key); what it is and the note that it cannot be shown again go to stderr. Redis keeps
only the key's SHA-256 digest. Every ``yichui serve`` process reloads its copy of the keys
within a second of a create or revoke. The CLI acts as the local admin; creates and revokes
are written to the audit log.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from yichui.access import LOCAL_TENANT, Principal, check_role, check_tenant
from yichui.cli.output import JsonOpt, console, err_console, human_time, print_json, warn
from yichui.config import ROLES
from yichui.runtime import Runtime

app = typer.Typer(
    help="API keys with roles (stored as SHA-256 digests in Redis).", no_args_is_help=True
)

CLI = Principal(LOCAL_TENANT, "admin", None, "cli")
"""Who the CLI acts as, in the audit log: the local admin, marked as the CLI."""
FIELDS = ("id", "name", "tenant", "role", "created")
"""What a listing shows of a key: never the key, never its digest."""


def _rt(ctx: typer.Context) -> Runtime:
    rt: Runtime = ctx.obj
    return rt


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {field: record.get(field) for field in FIELDS}


def _local_mode_note(rt: Runtime) -> None:
    if rt.settings.auth == "local":
        warn("auth is 'local': no server asks for a key until you set auth = 'keys'")


@app.command()
def create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    role: Annotated[str, typer.Option(help=f"What the key may do: {' or '.join(ROLES)}.")] = "user",
    name: Annotated[
        str | None, typer.Option(help="A name to find the key by (unique; revoke takes it).")
    ] = None,
    json: bool = JsonOpt,
) -> None:
    """Make a new key and print it once; only its SHA-256 digest is stored."""
    check_tenant(tenant)  # bad input is refused before Redis is asked anything
    check_role(role)
    rt = _rt(ctx)
    secret, record = rt.key_store.create(tenant, role, name=name)
    rt.audit.record(CLI, "keys.create", str(record["id"]), f"{role} of {tenant}")
    if json:
        print_json({"key": secret, "record": _public(record)})
    else:
        label = f" ({escape(name)})" if name else ""
        err_console.print(
            f"created key {record['id']}{label}: tenant {escape(tenant)}, role {role}",
            highlight=False,
        )
        typer.echo(secret)
        err_console.print(
            "store it now: it cannot be shown again (Redis keeps only its SHA-256 digest)",
            highlight=False,
        )
    _local_mode_note(rt)


@app.command("list")
def list_(ctx: typer.Context, json: bool = JsonOpt) -> None:
    """The keys in Redis, oldest first: id, name, tenant, role, created (no secrets)."""
    rows = [_public(r) for r in _rt(ctx).key_store.listing()]
    if json:
        print_json(rows)
        return
    if not rows:
        console.print("no API keys in Redis (create one: yichui keys create --tenant T)")
        return
    table = Table()
    for col in FIELDS:
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["id"]),
            escape(str(r["name"])) if r["name"] else "-",
            escape(str(r["tenant"])),
            str(r["role"]),
            human_time(r["created"]),
        )
    console.print(table)


@app.command()
def revoke(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="ID_OR_NAME", help="The key's id or name.")],
    json: bool = JsonOpt,
) -> None:
    """Revoke a key: every server refuses it within a second."""
    rt = _rt(ctx)
    record = rt.key_store.revoke(ref)  # one line and exit 1 for a key nobody has
    rt.audit.record(CLI, "keys.revoke", str(record["id"]), str(record.get("name") or ""))
    if json:
        print_json({"revoked": _public(record)})
    else:
        label = f" ({escape(str(record['name']))})" if record.get("name") else ""
        console.print(
            f"revoked key {record['id']}{label} of tenant {escape(str(record['tenant']))}",
            highlight=False,
        )
