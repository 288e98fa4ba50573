"""``yichui cache stats|clear``: the response cache in Redis."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from yichui.cli.output import JsonOpt, console, print_json
from yichui.runtime import Runtime
from yichui.runtime.serving import cache_store
from yichui.state.response_store import ResponseStore

app = typer.Typer(help="The response cache: counters, entries, clearing.", no_args_is_help=True)


def _run(ctx: typer.Context, fn: Any) -> Any:
    rt: Runtime = ctx.obj

    async def go() -> Any:
        async with cache_store(rt) as store:  # one line and exit 1 when Redis is unreachable
            return await fn(store)

    return asyncio.run(go())


@app.command()
def stats(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Count one model's entries only.")] = None,
    json: bool = JsonOpt,
) -> None:
    """Counters of every server (hits, misses, coalesced, bypassed, faults) and entries."""

    async def go(store: ResponseStore) -> dict[str, Any]:
        counters = await store.stats()
        lookups = sum(counters.get(k, 0) for k in ("hit", "miss", "coalesced", "bypass"))
        served = counters.get("hit", 0) + counters.get("coalesced", 0)
        return {
            "entries": await store.count(model),
            "counters": counters,
            "hit_rate": round(served / lookups, 4) if lookups else None,
        }

    out = _run(ctx, go)
    if json:
        print_json(out)
        return
    console.print(f"entries: {out['entries']}" + (f" (model {model})" if model else ""))
    for name, n in sorted(out["counters"].items()):
        console.print(f"  {name:<18} {n}", highlight=False)
    if out["hit_rate"] is not None:
        console.print(f"hit rate (hits + coalesced): {out['hit_rate']:.1%}")


@app.command()
def clear(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Only this model's entries.")] = None,
    json: bool = JsonOpt,
) -> None:
    """Delete cached responses (all, or one model's), with SCAN, never KEYS."""
    deleted = _run(ctx, lambda store: store.clear(model))
    if json:
        print_json({"deleted": deleted, "model": model})
    else:
        console.print(f"deleted {deleted} cached responses" + (f" of {model}" if model else ""))
