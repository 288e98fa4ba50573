"""What ``yichui bench load`` runs: the arms, each on the same seeded sequence, cache off then
on, against the bench upstream and against the local engine (or a ``--target``); then
``report.md``, the plots and one JSON object of the figures."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from yichui.bench import arms
from yichui.bench.arms import ArmResult, Target
from yichui.bench.calibrate import calibrate
from yichui.bench.options import LoadOptions
from yichui.bench.procs import (
    UPSTREAM_MODEL,
    Tenants,
    start_redis,
    start_serve,
    start_upstream,
)
from yichui.bench.stats import checks, ratio
from yichui.bench.workload import Workload

LOCAL_MODEL = "smollm2-135m-instruct"
UPSTREAM_CONNECTIONS = 2048
"""The bench route's ``max_connections``: more than the upstream ever holds at once."""
LOCAL_SHARE_OF_CAPACITY = 0.5
"""The local arms' rate: this share of the engine's measured capacity (16 requests at once).
Arrivals one by one batch less well than 16 at once: at 0.8 the uncached queue kept growing."""


@contextlib.contextmanager
def _progress() -> Iterator[tuple[arms.Progress, Callable[[str], None]]]:
    """A rich progress bar on stderr (stdout's last line stays the JSON) and a logger."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, soft_wrap=True)
    bar = Progress(
        TextColumn("{task.description:<26}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sent {task.fields[sent]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )

    def progress(label: str, total: int) -> Callable[[int, int], None]:
        task = bar.add_task(label, total=total, sent=0)

        def update(sent: int, done: int) -> None:
            bar.update(task, completed=done, sent=sent)
            if done >= total:
                bar.remove_task(task)

        return update

    def log(line: str) -> None:
        console.print(line, highlight=False, markup=False)

    with bar:
        yield progress, log


def _serve_settings(tenants: Tenants, timeout: float, upstream_url: str | None) -> dict[str, str]:
    s = {"auth": "keys", "api_keys": tenants.setting()}
    if upstream_url is not None:
        # a loaded GPU server holds a few hundred requests at once: no pool limit below that
        route = {
            "url": upstream_url,
            "accepts_images": True,
            "timeout": timeout,
            "max_connections": UPSTREAM_CONNECTIONS,
        }
        s["upstreams"] = json.dumps({UPSTREAM_MODEL: route})
    return s


def _servers(
    stack: contextlib.ExitStack, work: Path, n: int, settings: dict[str, str]
) -> list[str]:
    redis_url = start_redis(stack, work / "redis")  # fresh state per arm
    return [
        start_serve(stack, work, redis_url=redis_url, settings=settings, timeout=180)
        for _ in range(n)
    ]


def _pair(off: ArmResult, on: ArmResult) -> dict[str, Any]:
    f_on, f_off = on.figures, off.figures
    return {
        "mean latency, off / on": ratio(f_off["latency"]["mean_ms"], f_on["latency"]["mean_ms"]),
        "p95 latency, off / on": ratio(f_off["latency"]["p95_ms"], f_on["latency"]["p95_ms"]),
        "p99 latency, off / on": ratio(f_off["latency"]["p99_ms"], f_on["latency"]["p99_ms"]),
        "TTFT mean (streams), off / on": ratio(
            f_off["ttft_streams"]["mean_ms"], f_on["ttft_streams"]["mean_ms"]
        ),
        "upstream calls, on / off": ratio(f_on["upstream_calls"], f_off["upstream_calls"]),
        "no-upstream share / ideal": ratio(f_on["no_upstream_share"], f_on["ideal_share"]),
    }


def _both(
    kind: str,
    wl: Workload,
    make_target: Callable[[contextlib.ExitStack, bool], Target],
    opts: LoadOptions,
    progress: arms.Progress,
    log: Callable[[str], None],
    *,
    calibrated: bool = False,
    capacity_start: tuple[float, float] = (0.0, 0.0),
) -> tuple[list[ArmResult], dict[str, Any]]:
    """Cache off then on, each on its own servers and Redis; the same sequence."""
    results: list[ArmResult] = []
    part: dict[str, Any] = {}
    for cached, name in zip((False, True), arms.arm_names(kind), strict=True):
        with contextlib.ExitStack() as stack:
            target = make_target(stack, cached)
            if calibrated and not cached and opts.slope is None:
                slope, history = calibrate(
                    wl,
                    target,
                    base=opts.base,
                    mean=opts.target_mean,
                    timeout=opts.timeout,
                    progress=progress,
                    log=log,
                )
                assert target.upstream is not None
                target.upstream.configure(base=opts.base, slope=slope)
                part["slope"], part["calibration"] = slope, history
                log(f"calibrated slope: {slope:.5f} (base {opts.base} s)")
            log(f"{name}: {len(wl.requests)} requests over {wl.spec.duration:.0f} s")
            result = arms.run_arm(
                name, wl, target, cached=cached, timeout=opts.timeout, progress=progress
            )
            f = result.figures
            log(
                f"  mean {f['latency']['mean_ms']:.1f} ms, p99 {f['latency']['p99_ms']:.1f} ms, "
                f"hit rate {f['hit_rate']:.3f}, upstream calls {f['upstream_calls']}, "
                f"errors {f['errors']}"
            )
            if opts.capacity and capacity_start[cached]:
                result.capacity = arms.capacity_search(
                    wl.spec,
                    target,
                    cached=cached,
                    bound=opts.p95_bound,
                    seconds=opts.capacity_duration,
                    start=capacity_start[cached],
                    factor=1.25 if not cached else 1.5,
                    timeout=opts.timeout,
                    progress=progress,
                    log=log,
                )
                part["capacity_on" if cached else "capacity_off"] = result.capacity
            results.append(result)
    off, on = results
    part["ratios"] = _pair(off, on)
    cap_on = (part.get("capacity_on") or {}).get("capacity_per_s")
    cap_off = (part.get("capacity_off") or {}).get("capacity_per_s")
    if cap_on is not None and cap_off:
        part["ratios"]["capacity, on / off"] = ratio(cap_on, cap_off)
        part["ratios"]["capacity target, 0.9 / (1 - ideal)"] = round(
            0.9 / max(1e-9, 1 - on.figures["ideal_share"]), 2
        )
    part["checks"] = checks(
        on.figures,
        off.figures,
        ideal=on.figures["ideal_share"],
        capacity_on=cap_on,
        capacity_off=cap_off,
    )
    for check, ok in part["checks"].items():
        log(f"  {'PASS' if ok else 'FAIL'}  {kind}: {check}")
    part["off"], part["on"] = off.figures, on.figures
    return results, part


def _local_models(opts: LoadOptions, work: Path, log: Callable[[str], None]) -> Path:
    """A models root holding the bundled SmolLM2 (imported once, kept under the data dir)."""
    from yichui.config import default_data_dir

    root = Path(os.environ.get("YICHUI_BENCH_MODELS") or default_data_dir() / "bench-models")
    if (root / LOCAL_MODEL / "config.json").is_file():
        return root
    log(f"importing the bundled SmolLM2 into {root} (about a minute, once)")
    with contextlib.ExitStack() as stack:
        redis_url = start_redis(stack, work / "import-redis")
        env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
        env.update(
            YICHUI_REDIS_URL=redis_url,
            YICHUI_MODELS_ROOT=str(root),
            YICHUI_DATA_DIR=str(work / "import-data"),
            HF_HUB_OFFLINE="1",
        )
        done = subprocess.run(
            [sys.executable, "-m", "yichui.cli.main", "models", "import", "--name", LOCAL_MODEL],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    if done.returncode:
        raise RuntimeError(f"importing the bundled model failed: {done.stderr.strip()[-300:]}")
    return root


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_load(opts: LoadOptions) -> dict[str, Any]:
    """Run every arm; write report.md and the plots into ``opts.out``; -> the figures."""
    from yichui.bench import report

    opts = opts.shortened() if opts.short else opts
    opts.check()
    report.check_plotting()
    opts.out.mkdir(parents=True, exist_ok=True)
    wl = Workload.build(opts.workload)
    tenants = Tenants.make(opts.workload.tenants)
    results: list[ArmResult] = []
    figures: dict[str, Any] = {"workload": wl.summary(), "arms": {}}
    work = Path(tempfile.mkdtemp(prefix="yichui-loadtest-"))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stop everything, as on Ctrl-C
    try:
        with _progress() as (progress, log):
            log(f"workload: {json.dumps(wl.summary())}")
            if opts.target is not None:
                keys = list(opts.api_keys) or ["none"]
                twl = Workload.build(replace(opts.workload, tenants=len(keys)))
                model = opts.model or UPSTREAM_MODEL

                def remote(stack: contextlib.ExitStack, cached: bool) -> Target:
                    return Target([opts.target or ""], model, keys)

                res, part = _both(
                    "target",
                    twl,
                    remote,
                    opts,
                    progress,
                    log,
                    capacity_start=(twl.spec.rate / 2, twl.spec.rate),
                )
                results += res
                figures["arms"]["target"] = part
            if opts.target is None and "upstream" in opts.arms:
                with contextlib.ExitStack() as stack:
                    up = start_upstream(stack, work, base=opts.base, slope=opts.slope or 0.0)
                    settings = _serve_settings(tenants, opts.timeout, up.url)

                    def upstream(inner: contextlib.ExitStack, cached: bool) -> Target:
                        up.reset()
                        urls = _servers(inner, work / f"up-{int(cached)}", opts.servers, settings)
                        return Target(urls, UPSTREAM_MODEL, tenants.keys, upstream=up)

                    res, part = _both(
                        "upstream",
                        wl,
                        upstream,
                        opts,
                        progress,
                        log,
                        calibrated=True,
                        capacity_start=(wl.spec.rate / 2, wl.spec.rate),
                    )
                    part.setdefault("slope", opts.slope)
                    results += res
                    figures["arms"]["upstream"] = part
            if opts.target is None and "local" in opts.arms:
                root = _local_models(opts, work, log)
                settings = _serve_settings(tenants, opts.timeout, None)
                settings["models_root"] = str(root)
                lspec = replace(opts.workload, image_share=0.0)  # a text model

                def local(inner: contextlib.ExitStack, cached: bool) -> Target:
                    # one process: a second would load the model again and fight for the cores
                    urls = _servers(inner, work / f"local-{int(cached)}", 1, settings)
                    return Target(urls, LOCAL_MODEL, tenants.keys)

                with contextlib.ExitStack() as stack:
                    probe = local(stack, False)
                    capacity = arms.measure_local_capacity(probe, lspec, timeout=opts.timeout)
                rate = opts.local_rate or max(0.1, round(LOCAL_SHARE_OF_CAPACITY * capacity, 2))
                log(f"local engine: {capacity:.2f} req/s with 16 at once -> arms at {rate} req/s")
                duration = opts.local_duration or opts.workload.duration
                lwl = Workload.build(replace(lspec, rate=rate, duration=duration))
                # no capacity search: a step of a few seconds would hold a handful of requests
                # at about one a second (the measured capacity is reported instead)
                res, part = _both("local", lwl, local, opts, progress, log)
                part["measured_capacity_per_s"] = round(capacity, 2)
                part["rate"] = rate
                results += res
                figures["arms"]["local"] = part
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
    figures["setup"] = {
        "mode": "short" if opts.short else "full",
        "rate": opts.workload.rate,
        "duration_s": opts.workload.duration,
        "arrival": opts.workload.arrival,
        "seed": opts.workload.seed,
        "new_share": opts.workload.new_share,
        "zipf": opts.workload.zipf,
        "tenants": opts.workload.tenants,
        "stream_share": opts.workload.stream_share,
        "image_share": opts.workload.image_share,
        "servers": opts.servers,
        "timeout_s": opts.timeout,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
    }
    pngs = report.plots(results, opts.out)
    (opts.out / "report.md").write_text(report.markdown(figures, results, pngs))
    (opts.out / "figures.json").write_text(json.dumps(figures, indent=1))
    figures["checks"] = {
        f"{kind}: {name}": ok
        for kind, part in figures["arms"].items()
        for name, ok in part.get("checks", {}).items()
    }
    return figures
