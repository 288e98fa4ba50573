"""One arm: a seeded sequence sent open-loop to one or more servers, with and without the
cache; the calibration of the upstream's slope; the capacity search."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from yichui.bench.client import Outcome, Outgoing, run_loop, send_all
from yichui.bench.procs import Upstream
from yichui.bench.stats import arm_figures, over_time, percentile
from yichui.bench.workload import Workload, WorkloadSpec, request_body

OFF_TEMPERATURE = 0.001
"""The cache-off arm's temperature. A request with temperature > 0 and no seed is sampled:
the server answers it without the cache at all (no lookup, no store, no coalescing; header
``bypass``). So small a temperature samples the greedy token, so the work per request is the
cached arm's (the bench upstream ignores it anyway)."""

IDLE_HEALTH_S = 0.05
"""A server whose ``/health`` answers within this is idle enough for the next step."""

Progress = Callable[[str, int], Callable[[int, int], None]]
"""``progress(label, total)`` -> ``on_progress(sent, done)``."""


@dataclass
class Target:
    """Where an arm sends: the servers' base URLs, the model, the tenants' keys, and how to
    count the calls that reached the model (None: from the ``x-yichui-cache`` headers)."""

    urls: list[str]
    model: str
    keys: list[str]
    upstream: Upstream | None = None


@dataclass
class ArmResult:
    name: str
    cached: bool
    figures: dict[str, Any]
    series: list[dict[str, float]]
    latencies: list[float] = field(default_factory=list)
    capacity: dict[str, Any] | None = None


def outgoing(wl: Workload, target: Target, *, cached: bool) -> list[Outgoing]:
    spec = wl.spec
    temperature = 0.0 if cached else OFF_TEMPERATURE
    return [
        Outgoing(
            at=r.at,
            body=request_body(
                r,
                model=target.model,
                max_tokens=spec.max_tokens,
                image_size=spec.image_size,
                temperature=temperature,
            ),
            key=target.keys[r.tenant % len(target.keys)],
            stream=r.stream,
        )
        for r in wl.requests
    ]


def wait_idle(target: Target, timeout: float) -> None:
    """Until the upstream holds no request and every server answers ``/health`` quickly three
    times in a row: what an overloaded step left behind (requests its client gave up on)
    must not weigh on the next one."""
    deadline = time.monotonic() + timeout
    if target.upstream is not None:
        while target.upstream.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
    with httpx.Client(timeout=2) as http:  # one connection: a fresh one costs more than /health
        for url in target.urls:
            quick = 0
            while quick < 3 and time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    ok = http.get(f"{url.rstrip('/')}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                quick = quick + 1 if ok and time.perf_counter() - t0 < IDLE_HEALTH_S else 0
                time.sleep(0.05)


def send(
    wl: Workload,
    target: Target,
    *,
    cached: bool,
    timeout: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Outcome], int]:
    """The whole sequence -> outcomes and the calls that reached the model."""
    requests = outgoing(wl, target, cached=cached)
    before = target.upstream.stats()["requests"] if target.upstream else 0
    outcomes = run_loop(
        lambda: send_all(target.urls, requests, timeout=timeout, on_progress=on_progress)
    )
    assert isinstance(outcomes, list)
    if target.upstream is not None:
        calls = int(target.upstream.stats()["requests"]) - before
    else:
        calls = sum(o.cache in ("miss", "bypass", "") for o in outcomes)
    return outcomes, calls


def warm_up(target: Target, spec: WorkloadSpec, *, cached: bool, timeout: float) -> None:
    """One whole and one streamed request per tenant (connections, keys, the model's
    binding), prompts of their own."""
    warm = replace(
        spec,
        rate=20.0,
        duration=1.0,
        new_share=1.0,
        stream_share=0.5,
        salt="warm-",
        tenants=spec.tenants,
        arrival="constant",
    )
    send(Workload.build(warm), target, cached=cached, timeout=timeout)
    wait_idle(target, timeout)


def run_arm(
    name: str,
    wl: Workload,
    target: Target,
    *,
    cached: bool,
    timeout: float,
    progress: Progress,
) -> ArmResult:
    warm_up(target, wl.spec, cached=cached, timeout=timeout)
    outcomes, calls = send(
        wl,
        target,
        cached=cached,
        timeout=timeout,
        on_progress=progress(name, len(wl.requests)),
    )
    figures = arm_figures(outcomes, upstream_calls=calls, duration=wl.spec.duration)
    figures["ideal_share"] = round(wl.ideal_share, 4)
    return ArmResult(
        name, cached, figures, over_time(outcomes), sorted(o.latency for o in outcomes)
    )


def capacity_search(
    spec: WorkloadSpec,
    target: Target,
    *,
    cached: bool,
    bound: float,
    seconds: float,
    start: float,
    factor: float,
    timeout: float,
    progress: Progress,
    log: Callable[[str], None],
    max_steps: int = 9,
    refine: int = 2,
) -> dict[str, Any]:
    """The highest arrival rate whose p95 latency stays under ``bound`` with no error:
    ``start`` x ``factor`` ^ k until a step fails, then ``refine`` bisections between the
    last rate that passed and the first that failed. Each step its own prompts (a salt)."""
    steps: list[dict[str, Any]] = []
    step_timeout = min(timeout, 3 * bound)  # past it the step fails anyway: do not wait more

    def step(rate: float) -> bool:
        i = len(steps)
        wl = Workload.build(
            replace(spec, rate=rate, duration=seconds, salt=f"cap{i}-", seed=spec.seed + 1000 + i)
        )
        wait_idle(target, timeout)
        outcomes, _ = send(
            wl,
            target,
            cached=cached,
            timeout=step_timeout,
            on_progress=progress(f"capacity {rate:.0f}/s", len(wl.requests)),
        )
        p95 = percentile([o.latency for o in outcomes], 0.95)
        errors = sum(bool(o.error) for o in outcomes)
        passed = p95 < bound and errors == 0
        steps.append(
            {
                "rate": round(rate, 2),
                "p95_ms": round(p95 * 1000, 1),
                "errors": errors,
                "pass": passed,
            }
        )
        log(
            f"capacity {'cache on ' if cached else 'cache off'} {rate:7.1f}/s: p95 "
            f"{p95 * 1000:8.1f} ms, {errors} errors -> {'pass' if passed else 'fail'}"
        )
        return passed

    good, bad = 0.0, None
    rate = start
    for _ in range(max_steps):
        if step(rate):
            good = rate
            rate *= factor
        else:
            bad = rate
            break
    if bad is not None and good == 0.0:  # the first step failed: step down instead
        for _ in range(max_steps):
            rate /= factor
            if step(rate):
                good = rate
                break
            bad = rate
    if bad is not None and good:
        for _ in range(refine):
            mid = (good + bad) / 2
            if step(mid):
                good = mid
            else:
                bad = mid
    return {"capacity_per_s": round(good, 2), "bound_ms": bound * 1000, "steps": steps}


def measure_local_capacity(
    target: Target, spec: WorkloadSpec, *, timeout: float, concurrency: int = 16
) -> float:
    """Requests/s the engine sustains: ``concurrency`` fresh uncached requests at once, twice
    (the first pass loads the model), answers per second of the second."""
    rate = 0.0
    for i in range(2):
        burst = replace(
            spec,
            rate=1e6,
            duration=concurrency / 1e6,
            arrival="constant",
            new_share=1.0,
            stream_share=0.0,
            salt=f"capacity{i}-",
        )
        wl = Workload.build(burst)
        outcomes, _ = send(wl, target, cached=False, timeout=timeout)
        ok = [o for o in outcomes if not o.error]
        if ok:
            rate = len(ok) / max(o.done for o in ok)
    return rate


def arm_names(kind: str) -> tuple[str, str]:
    return f"{kind}, cache off", f"{kind}, cache on"


def latencies_of(results: Sequence[ArmResult]) -> dict[str, list[float]]:
    return {r.name: r.latencies for r in results}
