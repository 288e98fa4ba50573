"""The calibration of the bench upstream's slope: the slope for which the uncached arm, at its
rate, on its own seeded sequence, measures a given mean latency.

Near ``slope x rate = 1`` the mean is steep in the slope, and the queue takes long to fill (its
time constant is ``mean / (1 - slope x rate)``, about 11 s at the defaults), so a short probe
does not measure the steady mean, nor what a 60-s arm measures from an empty server. The
calibration therefore models the upstream exactly (service time ``base + slope x in flight`` at
each arrival, an event simulation over the arm's own arrival times) and measures only what the
model leaves out: the overhead ``c`` that the proxy, the client and the shared cores add to each
request. Each probe sends the first ``probe_seconds`` of the arm's sequence, uncached, and sets
``c`` = measured mean - simulated mean of that prefix; the slope is then solved, on the model,
for simulated mean of the whole arm + ``c`` = the target. Two or three probes settle it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from yichui.bench.arms import Progress, Target, send, wait_idle
from yichui.bench.workload import Workload


def simulated_mean(arrivals: Sequence[float], base: float, slope: float) -> float:
    """Mean latency of the upstream model for requests arriving at ``arrivals`` (sorted)."""
    ends: list[float] = []
    total = 0.0
    for t in arrivals:
        while ends and ends[0] <= t:
            heapq.heappop(ends)
        service = base + slope * (len(ends) + 1)
        heapq.heappush(ends, t + service)
        total += service
    return total / len(arrivals) if arrivals else 0.0


def solve_slope(arrivals: Sequence[float], base: float, mean: float, rate: float) -> float:
    """The slope whose simulated mean over ``arrivals`` is ``mean`` (bisection)."""
    if mean <= base or not arrivals:
        return 0.0
    low, high = 0.0, 1.5 / rate
    for _ in range(50):
        mid = (low + high) / 2
        if simulated_mean(arrivals, base, mid) < mean:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def calibrate(
    wl: Workload,
    target: Target,
    *,
    base: float,
    mean: float,
    timeout: float,
    progress: Progress,
    log: Callable[[str], None],
    probe_seconds: float = 20.0,
    probes: int = 3,
    settle: float = 0.01,
) -> tuple[float, list[dict[str, Any]]]:
    """-> the slope and one record per probe."""
    assert target.upstream is not None
    arrivals = [r.at for r in wl.requests]
    rate = len(arrivals) / wl.spec.duration
    prefix_spec = replace(wl.spec, duration=min(probe_seconds, wl.spec.duration))
    overhead = 0.0
    slope = solve_slope(arrivals, base, mean, rate)
    history: list[dict[str, Any]] = []
    for i in range(probes):
        # the arm's own first seconds, other prompt texts (the cache is off anyway)
        probe = Workload.build(replace(prefix_spec, salt=f"cal{i}-"))
        target.upstream.configure(base=base, slope=slope)
        wait_idle(target, timeout)
        outcomes, _ = send(
            probe,
            target,
            cached=False,
            timeout=timeout,
            on_progress=progress(f"calibrate {i + 1}", len(probe.requests)),
        )
        measured = sum(o.latency for o in outcomes) / len(outcomes)
        modelled = simulated_mean([r.at for r in probe.requests], base, slope)
        overhead = measured - modelled
        errors = sum(bool(o.error) for o in outcomes)
        predicted = simulated_mean(arrivals, base, slope) + overhead
        history.append(
            {
                "slope": round(slope, 6),
                "probe_mean_s": round(measured, 4),
                "model_mean_s": round(modelled, 4),
                "overhead_s": round(overhead, 4),
                "predicted_arm_mean_s": round(predicted, 4),
                "errors": errors,
            }
        )
        log(
            f"calibration {i + 1}: slope {slope:.5f}: probe mean {measured:.3f} s, model "
            f"{modelled:.3f} s (overhead {overhead * 1000:+.0f} ms) -> arm mean {predicted:.3f} s"
            f"{f', {errors} errors' if errors else ''}"
        )
        new = solve_slope(arrivals, base, mean - overhead, rate)
        if abs(new - slope) <= settle * slope:
            break
        slope = new
    return slope, history
