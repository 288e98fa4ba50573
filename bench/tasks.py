"""Benchmark of the task engine: yichui vs arq vs RQ, start latency and throughput.

What it measures, in one run, against one throwaway redis-server (flushed between phases),
with every worker in a process of its own, started from this script (``--child``):

(1) enqueue -> start latency on an idle worker with 1 slot: tasks are submitted one at a time,
    each after the previous one finished and a random pause (so arrivals fall at random points
    of a polling worker's cycle), and latency = start - enqueue as each system records it:
    yichui ``started - created`` (Redis clock, ms), arq ``start_time - enqueue_time`` (ms),
    RQ ``started_at - enqueued_at`` (µs). The client polls for the end every 1 ms, for all.
    arq polls its queue every ``poll_delay``: it runs twice, with its default (0.5 s) and with
    ``--arq-poll-delay`` (0.01 s), the default run with fewer samples (each costs ~0.5 s).
    RQ runs :class:`rq.SimpleWorker` (jobs in the worker process; the default ``Worker`` forks
    a work horse per job, which only adds to its figures).
(2) throughput of trivial tasks (yichui ``noop``; arq and RQ a no-op function) with 1 and 2
    worker processes: ``--tasks`` are queued first, then the workers (started, imported and
    connected beforehand) are let go together in burst mode; tasks/s = tasks / (last finish -
    first start), from the recorded timestamps, so start-up is not counted. Per process,
    yichui runs ``--concurrency`` slots and arq ``max_jobs=--concurrency``; an RQ worker runs
    one job at a time (its only mode).
(3) what a task costs, from the same runs: Redis round trips of the client that queues and of
    the workers (socket sends: a pipeline, a MULTI/EXEC block or a Lua script is one), the
    commands Redis executed (``INFO commandstats``: the commands inside a Lua script count one
    by one), the CPU time of Redis and of the workers (and how much of it is system time) and
    the workers' context switches. The JSON line adds the 2-process figures and the command
    mix (``cmd_mix_*``, commands per task).

How to read it: the table gives the figures, the ratios (yichui vs each other system) and
PASS/FAIL against the targets (yichui throughput >= arq's, best arq configuration, at 1 and 2
processes; yichui start latency p50 <= 5 ms). The last line of the output is one JSON object
with every figure, for scripts::

    .venv/bin/python bench/tasks.py [--tasks 2000] [--rq-tasks 500] [--samples 200] [--strict]

arq and RQ are not dependencies of yichui; ``make bench`` installs them (``--no-deps``: arq 0.28
declares ``redis<6``; it runs on redis-py 8, but ``ArqRedis.all_job_results()`` does not past
100 results, so the bench reads arq's results itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import redis
import redis.asyncio.connection as aconnection
import redis.connection as sconnection

from common import end_process, percentile, redis_server
from task_sides import ARQ_DEFAULT_POLL_DELAY, RQ_QUEUE, ArqSide, RqSide, Side, YichuiSide
from yichui.config import load_settings
from yichui.runtime import Runtime

LATENCY_P50_TARGET_MS = 5.0
WARMUP = 5
"""Tasks run before the latency samples (connections, first-task imports)."""
POLL_S = 0.001
"""How often the bench polls for a task's end (latency phase), for every system."""


# -- no-op jobs of the other systems ----------------------------------------------------------
async def arq_noop(ctx: dict[str, Any]) -> None:
    return None


def rq_noop() -> None:
    return None


# -- Redis ------------------------------------------------------------------------------------
class ServerStats:
    """Commands executed and CPU used by the server between two snapshots."""

    def __init__(self, probe: redis.Redis) -> None:
        self.probe = probe
        self.calls, self.cpu = self._snapshot()

    def _snapshot(self) -> tuple[dict[str, int], float]:
        stats: dict[str, dict[str, Any]] = self.probe.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        calls.pop("info", None)  # the probe's own
        cpu: dict[str, Any] = self.probe.info("cpu")
        return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def delta(self) -> tuple[dict[str, int], float]:
        """(commands by name, CPU seconds) since construction."""
        calls, cpu = self._snapshot()
        diff = {k: n - self.calls.get(k, 0) for k, n in calls.items()}
        return {k: n for k, n in diff.items() if n > 0}, cpu - self.cpu


# -- counting round trips ---------------------------------------------------------------------
class RoundTrips:
    """Counts socket sends of every redis-py connection, sync and asyncio (one send = one
    request/reply exchange: a pipeline, a MULTI/EXEC block or a Lua script is one)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def _add(self) -> None:
        with self._lock:
            self.count += 1

    @contextlib.contextmanager
    def counting(self) -> Iterator[RoundTrips]:
        sync_send: Callable[..., None] = sconnection.AbstractConnection.send_packed_command
        async_send: Callable[..., Coroutine[Any, Any, None]] = (
            aconnection.AbstractConnection.send_packed_command
        )

        def send(conn: Any, command: Any, check_health: bool = True) -> None:
            self._add()
            sync_send(conn, command, check_health)

        async def asend(conn: Any, command: Any, check_health: bool = True) -> None:
            self._add()
            await async_send(conn, command, check_health)

        sconnection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        aconnection.AbstractConnection.send_packed_command = asend  # type: ignore[method-assign]
        try:
            yield self
        finally:
            sconnection.AbstractConnection.send_packed_command = sync_send  # type: ignore[method-assign]
            aconnection.AbstractConnection.send_packed_command = async_send  # type: ignore[method-assign]


# -- worker processes -------------------------------------------------------------------------
def _usage() -> dict[str, float]:
    """This process's CPU seconds (user + system, and system alone) and context switches."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "sys_s": ru.ru_stime,
        "switches": ru.ru_nvcsw + ru.ru_nivcsw,
    }


def child_main(spec: dict[str, Any]) -> int:
    """A worker process: build the worker, print READY, wait for GO on stdin, work, then print
    STATS (round trips and CPU since GO) as one JSON line."""
    counter = RoundTrips()
    mark: dict[str, float] = {}

    def go() -> None:
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            sys.exit(0)  # the parent gave up
        counter.count = 0
        mark.update(_usage(), wall=time.perf_counter())

    with counter.counting():
        {"yichui": _child_yichui, "arq": _child_arq, "rq": _child_rq}[spec["system"]](spec, go)
    stats: dict[str, float] = {k: v - mark[k] for k, v in _usage().items()}
    stats.update(round_trips=counter.count, wall_s=time.perf_counter() - mark["wall"])
    print("STATS " + json.dumps(stats), flush=True)
    return 0


def _child_yichui(spec: dict[str, Any], go: Callable[[], None]) -> None:
    import yichui.tasks.builtin  # noqa: F401  (the handler module, imported ahead as the others)

    rt = Runtime(load_settings(redis_url=spec["url"], data_dir=spec["data_dir"]))
    worker = rt.worker(concurrency=spec["concurrency"], burst=spec["burst"])  # connects
    go()
    worker.run(install_signals=False)
    rt.close()


def _child_arq(spec: dict[str, Any], go: Callable[[], None]) -> None:
    from arq import Worker
    from arq.connections import RedisSettings, create_pool

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pool = loop.run_until_complete(create_pool(RedisSettings.from_dsn(spec["url"])))
    worker = Worker(
        functions=[arq_noop],  # type: ignore[list-item]
        redis_pool=pool,
        burst=spec["burst"],
        max_jobs=spec["concurrency"],
        poll_delay=spec["poll_delay"],
        handle_signals=False,
    )
    go()
    worker.run()


def _child_rq(spec: dict[str, Any], go: Callable[[], None]) -> None:
    from rq import Queue, SimpleWorker

    conn = redis.Redis.from_url(spec["url"])
    worker = SimpleWorker([Queue(RQ_QUEUE, connection=conn)], connection=conn)
    go()
    worker.work(burst=spec["burst"], logging_level="WARNING")


@contextlib.contextmanager
def workers(spec: dict[str, Any], procs: int) -> Iterator[list[subprocess.Popen[str]]]:
    """Start ``procs`` worker processes, wait until each is ready, let them all go at once."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    children = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(procs)
    ]
    watchdog = threading.Timer(60, lambda: [c.kill() for c in children])  # a child that hangs
    watchdog.start()
    try:
        for child in children:
            assert child.stdout is not None
            while (line := child.stdout.readline()) and line.strip() != "READY":
                pass
            if not line:
                raise RuntimeError(f"a worker process did not start (rc {child.wait()})")
        watchdog.cancel()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("GO\n")
            child.stdin.flush()
        yield children
    finally:
        watchdog.cancel()
        for child in children:
            end_process(child)


def collect(children: list[subprocess.Popen[str]], timeout: float) -> dict[str, float]:
    """Wait for burst workers to exit; their STATS summed."""
    total = {"round_trips": 0.0, "cpu_s": 0.0, "sys_s": 0.0, "switches": 0.0}
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            out, _ = child.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError("burst workers did not finish in time") from None
        if child.returncode != 0:
            raise RuntimeError(f"a worker process failed (rc {child.returncode})")
        lines = [ln for ln in out.splitlines() if ln.startswith("STATS ")]
        if not lines:
            raise RuntimeError("a worker process reported no STATS")
        stats = json.loads(lines[-1].removeprefix("STATS "))
        for key in total:
            total[key] += stats[key]
    return total


# -- the two measurements ---------------------------------------------------------------------
def measure_latency(
    side: Side, probe: redis.Redis, samples: int, gap: float, rng: random.Random
) -> dict[str, float]:
    """Start latency on one idle 1-slot worker, one task at a time (ms)."""
    probe.flushall()
    out: list[float] = []
    with workers(side.child_spec(1, burst=False), 1):
        for i in range(WARMUP + samples):
            time.sleep(rng.uniform(0, gap))  # arrive at a random point of a polling cycle
            handle = side.submit()
            deadline = time.monotonic() + 30
            while not side.done(handle):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{side.label}: a task did not finish in 30 s")
                time.sleep(POLL_S)
            if i >= WARMUP:
                out.append(side.latency_ms(handle))
    return {
        "samples": len(out),
        "p50_ms": round(percentile(out, 0.5), 3),
        "p99_ms": round(percentile(out, 0.99), 3),
        "mean_ms": round(statistics.fmean(out), 3),
        "max_ms": round(max(out), 3),
    }


def measure_throughput(
    side: Side, probe: redis.Redis, tasks: int, procs: int, concurrency: int
) -> dict[str, Any]:
    """Burst workers over ``tasks`` queued no-op tasks: tasks/s and per-task costs."""
    probe.flushall()
    counter = RoundTrips()
    server = ServerStats(probe)
    with counter.counting():
        handles = side.enqueue(tasks)
    enqueue_calls, _ = server.delta()
    server = ServerStats(probe)
    with workers(side.child_spec(concurrency, burst=True), procs) as children:
        stats = collect(children, timeout=120)
    calls, redis_cpu = server.delta()
    spans = side.spans(handles)
    first = min(s for s, _ in spans)
    last = max(f for _, f in spans)
    n = len(handles)
    return {
        "tasks": n,
        "procs": procs,
        "window_s": round(last - first, 4),
        "per_s": round(n / max(last - first, 1e-3), 1),
        "enqueue_round_trips": round(counter.count / n, 3),
        "enqueue_server_cmds": round(sum(enqueue_calls.values()) / n, 2),
        "round_trips": round(stats["round_trips"] / n, 3),
        "server_cmds": round(sum(calls.values()) / n, 2),
        "redis_cpu_us": round(redis_cpu / n * 1e6, 1),
        "worker_cpu_us": round(stats["cpu_s"] / n * 1e6, 1),
        "worker_sys_us": round(stats["sys_s"] / n * 1e6, 1),
        "worker_switches": round(stats["switches"] / n, 2),
        "cmd_mix": {
            k: round(v / n, 2)
            for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
            if v >= n / 20
        },
    }


# -- main -------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"{dist} is not installed: .venv/bin/pip install --no-deps arq rq croniter"
            " (or: make bench)"
        ) from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    for key in [k for k in os.environ if k.startswith("YICHUI_")]:
        del os.environ[key]  # this process and its workers: the figures must not depend on it
    versions = {d: _version(d) for d in ("arq", "rq", "redis")}
    figures: dict[str, Any] = {
        "versions": versions,
        "cpus": os.cpu_count(),
        "concurrency": args.concurrency,
        "tasks": args.tasks,
        "rq_tasks": args.rq_tasks,
        "arq_poll_delay_s": ARQ_DEFAULT_POLL_DELAY,
        "arq_tuned_poll_delay_s": args.arq_poll_delay,
        "rq_worker": "SimpleWorker",
    }
    with tempfile.TemporaryDirectory(prefix="yichui-bench-") as tmp:
        base = Path(tmp)
        (base / "redis").mkdir()
        with redis_server(base / "redis") as url:
            probe = redis.Redis.from_url(url)
            figures["redis_version"] = probe.info("server")["redis_version"]
            sides: list[Side] = [
                YichuiSide(url, base / "data"),
                ArqSide(url, ARQ_DEFAULT_POLL_DELAY, "arq"),
                ArqSide(url, args.arq_poll_delay, "arq_tuned"),
                RqSide(url),
            ]
            try:
                figures["labels"] = {s.key: s.label for s in sides}
                for side in sides:
                    polled = side.poll_delay if isinstance(side, ArqSide) else 0.0
                    gap = max(args.gap, polled)  # a random point of arq's polling cycle
                    samples = args.samples
                    if side.key == "arq":
                        samples = args.arq_default_samples
                    lat = measure_latency(side, probe, samples, gap, rng)
                    for k, v in lat.items():
                        figures[f"latency_{side.key}_{k}"] = v
                for side in sides:
                    n = args.rq_tasks if side.key == "rq" else args.tasks
                    for procs in (1, 2):
                        tp = measure_throughput(side, probe, n, procs, args.concurrency)
                        pre = f"{side.key}_{procs}p"
                        figures[f"throughput_{pre}"] = tp["per_s"]
                        for k in (
                            "window_s",
                            "round_trips",
                            "server_cmds",
                            "redis_cpu_us",
                            "worker_cpu_us",
                            "worker_sys_us",
                            "worker_switches",
                        ):
                            figures[f"{k}_{pre}"] = tp[k]
                        if procs == 1:
                            figures[f"enqueue_round_trips_{side.key}"] = tp["enqueue_round_trips"]
                            figures[f"enqueue_server_cmds_{side.key}"] = tp["enqueue_server_cmds"]
                            figures[f"cmd_mix_{side.key}"] = tp["cmd_mix"]
                probe.flushall()
                probe.close()
            finally:
                for side in sides:
                    side.close()

    y50, ymean = figures["latency_yichui_p50_ms"], figures["latency_yichui_mean_ms"]
    for other in ("arq", "arq_tuned", "rq"):
        # latency: how many times longer the other system takes (on the mean: yichui's p50 can
        # be 0 at the 1 ms resolution of its timestamps, the mean of ms differences is not)
        figures[f"latency_ratio_{other}"] = round(
            figures[f"latency_{other}_mean_ms"] / max(ymean, 0.001), 2
        )
        for procs in (1, 2):
            figures[f"throughput_ratio_{other}_{procs}p"] = round(
                figures[f"throughput_yichui_{procs}p"] / figures[f"throughput_{other}_{procs}p"], 2
            )
    figures["throughput_target_met"] = all(
        figures[f"throughput_yichui_{p}p"]
        >= max(figures[f"throughput_arq_{p}p"], figures[f"throughput_arq_tuned_{p}p"])
        for p in (1, 2)
    )
    figures["latency_target_met"] = y50 <= LATENCY_P50_TARGET_MS
    figures["targets_met"] = figures["throughput_target_met"] and figures["latency_target_met"]
    return figures


def report(f: dict[str, Any]) -> None:
    """The human-readable table (the JSON line follows it)."""

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    keys = ("yichui", "arq", "arq_tuned", "rq")
    labels = f["labels"]
    v = f["versions"]
    print(
        f"\ntask engine: yichui vs arq {v['arq']} vs RQ {v['rq']} (redis-py {v['redis']}),"
        f" one redis-server {f['redis_version']}, {f['cpus']} CPUs\n"
    )
    print("(1) enqueue -> start latency, idle worker with 1 slot, one task at a time")
    print(f"{'system':<28}{'samples':>8}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'vs yichui':>11}")
    for key in keys:
        ratio = "" if key == "yichui" else f"{f[f'latency_ratio_{key}']:>10.1f}x"
        print(
            f"{labels[key]:<28}{f[f'latency_{key}_samples']:>8}{f[f'latency_{key}_p50_ms']:>9.2f}"
            f"{f[f'latency_{key}_p99_ms']:>9.2f}{f[f'latency_{key}_mean_ms']:>9.2f}{ratio:>11}"
        )
    print(
        "  (yichui and arq record ms timestamps, RQ µs; 'vs yichui' = mean latency / yichui's;"
        f"\n   yichui p50 {f['latency_yichui_p50_ms']:.2f} ms, target <= "
        f"{LATENCY_P50_TARGET_MS:.0f} ms  {verdict(f['latency_target_met'])})"
    )

    c = f["concurrency"]
    print(
        f"\n(2) throughput of no-op tasks, burst workers: {f['tasks']} tasks"
        f" ({f['rq_tasks']} for RQ); {c} slots / max_jobs={c} per process, RQ 1 job at a time"
    )
    print(f"{'system':<28}{'1 proc/s':>10}{'2 procs/s':>11}{'yichui ÷ 1p':>13}{'yichui ÷ 2p':>13}")
    for key in keys:
        r1 = "" if key == "yichui" else f"{f[f'throughput_ratio_{key}_1p']:.2f}x"
        r2 = "" if key == "yichui" else f"{f[f'throughput_ratio_{key}_2p']:.2f}x"
        print(
            f"{labels[key]:<28}{f[f'throughput_{key}_1p']:>10.0f}{f[f'throughput_{key}_2p']:>11.0f}"
            f"{r1:>13}{r2:>13}"
        )
    best = "yichui >= the better arq run at 1 and 2 processes"
    print(f"  ({best}: {verdict(f['throughput_target_met'])})")

    print(
        "\n(3) cost per task, 1 worker process: Redis round trips (RT: a pipeline or a script is"
        "\n    one) and commands executed by Redis (Lua's inner ones included); CPU µs"
    )
    print(
        f"{'system':<28}{'enq RT':>7}{'enq cmds':>9}{'work RT':>8}{'cmds':>6}"
        f"{'redis µs':>9}{'worker µs':>10}{'(sys)':>7}{'ctx sw':>7}"
    )
    for key in keys:
        print(
            f"{labels[key]:<28}{f[f'enqueue_round_trips_{key}']:>7.2f}"
            f"{f[f'enqueue_server_cmds_{key}']:>9.1f}{f[f'round_trips_{key}_1p']:>8.2f}"
            f"{f[f'server_cmds_{key}_1p']:>6.1f}{f[f'redis_cpu_us_{key}_1p']:>9.0f}"
            f"{f[f'worker_cpu_us_{key}_1p']:>10.0f}{f[f'worker_sys_us_{key}_1p']:>7.0f}"
            f"{f[f'worker_switches_{key}_1p']:>7.1f}"
        )
    print(f"\ntargets: {verdict(f['targets_met'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per throughput run")
    parser.add_argument("--rq-tasks", type=int, default=500, help="the same for RQ (slower)")
    parser.add_argument("--samples", type=int, default=200, help="latency samples per system")
    parser.add_argument(
        "--arq-default-samples", type=int, default=30, help="the same, arq at poll_delay 0.5 s"
    )
    parser.add_argument("--arq-poll-delay", type=float, default=0.01, help="arq's tuned run")
    parser.add_argument("--concurrency", type=int, default=8, help="slots / max_jobs per process")
    parser.add_argument(
        "--gap", type=float, default=0.01, help="max random pause before each latency task (s)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if min(args.tasks, args.rq_tasks, args.samples, args.arq_default_samples) < 1:
        parser.error("counts must be >= 1")
    figures = run(args)
    report(figures)
    print(json.dumps(figures, separators=(", ", ": ")))
    return 1 if args.strict and not figures["targets_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
