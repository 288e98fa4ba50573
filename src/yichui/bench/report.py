"""``report.md`` and the plots of a run (matplotlib, the ``bench`` extra, imported here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yichui.bench.arms import ArmResult

PLOTS = ("cdf", "latency", "throughput", "hitrate")


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        from yichui.errors import MissingExtraError

        raise MissingExtraError("bench", "the load test's plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    """MissingExtraError (one line, with the pip command) before anything starts."""
    _matplotlib()


def plots(results: Sequence[ArmResult], out: Path) -> list[Path]:
    """``loadtest-<plot>.png`` in ``out``: the latency CDF, then mean latency, throughput and
    hit share per second of the run."""
    plt = _matplotlib()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        lat = r.latencies
        if lat:
            ax.plot(
                [x * 1000 for x in lat], [(i + 1) / len(lat) for i in range(len(lat))], label=r.name
            )
    ax.set_xscale("log")
    smallest = min((r.latencies[0] for r in results if r.latencies), default=1e-3)
    ax.set_xlim(left=max(0.1, smallest * 1000 * 0.8))
    ax.set_xlabel("latency from scheduled arrival (ms, log)")
    ax.set_ylabel("share of requests")
    ax.set_title("Latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "loadtest-cdf.png", plt))
    for name, key, label, log in (
        ("latency", "mean_ms", "mean latency (ms, log)", True),
        ("throughput", "throughput", "answers completed per second", False),
        ("hitrate", "hit_share", "share answered by the cache (hit + coalesced)", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for r in results:
            if name == "hitrate" and not r.cached:
                continue
            xs = [row["t"] for row in r.series]
            ys = [row[key] for row in r.series]
            ax.plot(xs, ys, label=r.name)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("seconds into the arm (scheduled arrival)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / f"loadtest-{name}.png", plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


ROWS = (
    ("requests", lambda f: f["requests"]),
    ("offered rate (req/s)", lambda f: f["offered_per_s"]),
    ("throughput (req/s)", lambda f: f["throughput_per_s"]),
    ("latency mean (ms)", lambda f: f["latency"]["mean_ms"]),
    ("latency p50 (ms)", lambda f: f["latency"]["p50_ms"]),
    ("latency p95 (ms)", lambda f: f["latency"]["p95_ms"]),
    ("latency p99 (ms)", lambda f: f["latency"]["p99_ms"]),
    ("TTFT mean, streams (ms)", lambda f: f["ttft_streams"]["mean_ms"]),
    ("TTFT p95, streams (ms)", lambda f: f["ttft_streams"]["p95_ms"]),
    ("TTFT p99, streams (ms)", lambda f: f["ttft_streams"]["p99_ms"]),
    ("hit rate", lambda f: f["hit_rate"]),
    ("coalesced share", lambda f: f["coalesced_share"]),
    ("answered without an upstream call", lambda f: f["no_upstream_share"]),
    ("ideal share (repeats within a tenant)", lambda f: f["ideal_share"]),
    ("upstream / engine calls", lambda f: f["upstream_calls"]),
    ("hits p99 (ms)", lambda f: f["hits_p99_ms"]),
    ("errors (time-outs)", lambda f: f"{f['errors']} ({f['timeouts']})"),
)


def markdown(figures: dict[str, Any], results: Sequence[ArmResult], plots_: Sequence[Path]) -> str:
    lines = ["# Load test", ""]
    setup = figures["setup"]
    lines += [f"- {k}: {v}" for k, v in setup.items()]
    lines += [
        "",
        "| | " + " | ".join(r.name for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for label, get in ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt(get(r.figures)) for r in results) + " |")
    for kind, part in figures.get("arms", {}).items():
        lines += ["", f"## {kind}", ""]
        if part.get("calibration"):
            lines.append(
                "Calibration of the upstream's slope (uncached probes on the arm's first seconds):"
            )
            lines.append("")
            lines += [
                f"- slope {c['slope']:.5f}: probe mean {c['probe_mean_s']:.3f} s (model "
                f"{c['model_mean_s']:.3f} s), predicted arm mean "
                f"{c['predicted_arm_mean_s']:.3f} s, {c['errors']} errors"
                for c in part["calibration"]
            ]
            lines.append("")
        for name, value in part.get("ratios", {}).items():
            lines.append(f"- {name}: {_fmt(value)}")
        for label in ("capacity_off", "capacity_on"):
            cap = part.get(label)
            if cap:
                steps = ", ".join(
                    f"{s['rate']}/s {'✓' if s['pass'] else '✗'} (p95 {s['p95_ms']} ms"
                    f"{', ' + str(s['errors']) + ' errors' if s['errors'] else ''})"
                    for s in cap["steps"]
                )
                lines.append(
                    f"- {label.replace('_', ' ')}: **{cap['capacity_per_s']} req/s** "
                    f"(p95 < {cap['bound_ms']:.0f} ms, no errors): {steps}"
                )
        if part.get("checks"):
            lines += ["", "| target | |", "|---|---|"]
            lines += [
                f"| {name} | {'PASS' if ok else 'FAIL'} |" for name, ok in part["checks"].items()
            ]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots_] + [""]
    return "\n".join(lines)
