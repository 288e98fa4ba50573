"""``yichui bench load|upstream``: the shipped load test and the upstream it loads
(``yichui.bench``; ``docs/benchmarks.md``, *Load test*)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from yichui.errors import ConfigError

app = typer.Typer(
    help="Load tests: the response cache under an open-loop load.", no_args_is_help=True
)


@app.command()
def load(
    out: Annotated[Path, typer.Option(help="Folder for report.md and the plots.")] = Path(
        "loadtest-out"
    ),
    rate: Annotated[float, typer.Option(help="Arrivals per second (upstream arms).")] = 80.0,
    duration: Annotated[float, typer.Option(help="Seconds of load per arm.")] = 60.0,
    arrival: Annotated[str, typer.Option(help="poisson or constant.")] = "poisson",
    seed: Annotated[int, typer.Option(help="Seed of the request sequence.")] = 7,
    new_share: Annotated[
        float,
        typer.Option(help="Probability that a request is a fresh prompt (0.24: 76 % repeats)."),
    ] = 0.24,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of the repeats' popularity.")] = 1.1,
    tenants: Annotated[int, typer.Option(help="Tenants (one API key each).")] = 4,
    stream_share: Annotated[float, typer.Option(help="Share of streamed requests.")] = 0.25,
    image_share: Annotated[float, typer.Option(help="Share of image + question prompts.")] = 0.1,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request.")] = 16,
    arms: Annotated[str, typer.Option(help="Comma-separated: upstream, local.")] = "upstream,local",
    base: Annotated[float, typer.Option(help="The upstream's base service time (s).")] = 0.3,
    slope: Annotated[
        float | None,
        typer.Option(help="The upstream's seconds per request in flight (default: calibrated)."),
    ] = None,
    target_mean: Annotated[
        float, typer.Option(help="Uncached mean latency the calibration aims at (s).")
    ] = 1.8,
    timeout: Annotated[float, typer.Option(help="Per-request time-out (s): an error.")] = 30.0,
    p95_bound: Annotated[float, typer.Option(help="Capacity: the p95 bound (s).")] = 2.0,
    capacity: Annotated[bool, typer.Option(help="Search the capacity, cache off and on.")] = True,
    capacity_duration: Annotated[float, typer.Option(help="Seconds per capacity step.")] = 8.0,
    local_rate: Annotated[
        float | None,
        typer.Option(help="Local engine arms' rate (default: 0.8 x measured capacity)."),
    ] = None,
    local_duration: Annotated[
        float | None, typer.Option(help="Seconds of load per local arm (default --duration).")
    ] = None,
    servers: Annotated[
        int, typer.Option(help="yichui serve processes per upstream arm (local arms: 1).")
    ] = 2,
    target: Annotated[
        str | None, typer.Option(help="Load this running server (base URL) instead.")
    ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="With --target: a key per tenant (repeatable).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="With --target: the model to ask.")] = None,
    allow_remote: Annotated[
        bool, typer.Option(help="Let --target be another host than loopback.")
    ] = False,
    short: Annotated[
        bool,
        typer.Option(
            "--short",
            "--smoke",
            help="A few seconds an arm, no calibration, no capacity search (CI).",
        ),
    ] = False,
) -> None:
    """Open-loop load, cache off vs on, against a loaded-GPU-like upstream and the local engine;
    writes report.md and plots; the last stdout line is one JSON object."""
    from yichui.bench.options import LoadOptions
    from yichui.bench.workload import WorkloadSpec

    try:
        spec = WorkloadSpec(
            rate=rate,
            duration=duration,
            arrival=arrival,  # type: ignore[arg-type]
            seed=seed,
            new_share=new_share,
            zipf=zipf,
            tenants=tenants,
            stream_share=stream_share,
            image_share=image_share,
            max_tokens=max_tokens,
        )
        opts = LoadOptions(
            workload=spec,
            out=out,
            arms=tuple(a.strip() for a in arms.split(",") if a.strip()),
            base=base,
            slope=slope,
            target_mean=target_mean,
            timeout=timeout,
            p95_bound=p95_bound,
            capacity=capacity,
            capacity_duration=capacity_duration,
            local_rate=local_rate,
            local_duration=local_duration,
            target=target,
            api_keys=tuple(api_key or ()),
            model=model,
            allow_remote=allow_remote,
            short=short,
            servers=servers,
        )
        (opts.shortened() if short else opts).check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    from yichui.bench.report import check_plotting
    from yichui.bench.runner import run_load

    check_plotting()
    figures = run_load(opts)
    for name, ok in figures["checks"].items():
        typer.echo(f"  {'PASS' if ok else 'FAIL'}  {name}")
    typer.echo(f"report: {opts.out / 'report.md'}")
    sys.stdout.write(json.dumps(figures, separators=(",", ":")) + "\n")


@app.command()
def upstream(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8100,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    base: Annotated[float, typer.Option(min=0, help="Base service time (s).")] = 0.3,
    slope: Annotated[
        float, typer.Option(min=0, help="Seconds added per request in flight.")
    ] = 0.0104,
) -> None:
    """An OpenAI-compatible server whose service time is base + slope x requests in flight
    (a loaded GPU server, for load tests)."""
    from yichui.bench.upstream import serve_upstream

    serve_upstream(host, port, base, slope)
