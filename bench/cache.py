"""Benchmark of the response cache: hit-path throughput and latency, coalescing, misses.

What it measures, in one run, against one ``yichui serve`` process (uvicorn's default: one
process; uvloop and httptools when installed; log level warning; started as the API tests start
it, :class:`tests.api_server.ServerProcess`) and one throwaway redis-server. The model ``echo``
is routed (setting ``upstreams``) to the API tests' OpenAI-compatible test double
(``tests/fake_upstream.py``), run by uvicorn in a child process of this script (``--upstream``,
so that its work never shares the load generator's interpreter) with two routes added: one
counts the requests it received (= engine calls), one sets its ``delay``: every answer takes
``--delay`` seconds (0.5), so a miss is expensive and a hit is not.

(1) hit-path throughput vs the cheapest endpoint: closed loop, ``--clients`` concurrent clients
    on keep-alive connections, ``--seconds`` per window, on ``GET /health`` and on
    ``POST /v1/chat/completions`` with temperature 0 that is a cache hit (warmed first); the two
    alternate for ``--rounds`` rounds (order swapped each round) and the medians are reported,
    with the ratio hit/health, the CPU µs per request of the server, of Redis and of the load
    generator (from /proc and ``INFO cpu``: the load generator shares the 2 cores) and the
    Redis commands per request (``INFO commandstats``). Each client has a prompt of its own;
    a third series sends one body from all clients (identical requests in flight coalesce).
(2) hit latency, open loop: ``--rate`` hit requests/s for ``--duration`` s on a fixed schedule
    (sent at their scheduled time whatever the answers do, on as many connections as needed);
    latency runs from the *scheduled* send time to the end of the response, so a stall of the
    server or of the client counts (no coordinated omission). p50, p99, max, and the client's
    own send lag (actual - scheduled send) to show it is not the client that is late. The same
    schedule on ``/health`` (half as long) is the reference: what any request costs here.
(3) coalescing: ``--burst`` identical misses sent at once (a fresh prompt each round,
    ``--burst-rounds`` rounds): engine calls (requests the upstream received) and the
    ``x-yichui-cache`` headers (miss / coalesced / hit / bypass); factor = requests / engine
    calls. Then the same with a second ``yichui serve`` on the same Redis, the requests dealt
    alternately to the two processes (the second one warmed by one request first): coalescing
    across processes (Redis lock + pub/sub). The JSON line keeps each burst's engine calls,
    milliseconds and answers per process (``coalesce_*_bursts``).
(4) for context: miss latency (one request at a time, fresh prompts: the upstream's delay plus
    the cache's work) and the throughput of the uncached path (temperature 1: ``bypass``) with
    the same clients, at the upstream's delay and with the delay at 0 (what the proxying alone
    costs, the upstream then working on the same 2 cores).

The load generator is kept cheap on purpose: a minimal HTTP/1.1 keep-alive client on asyncio
streams (uvloop when installed) that writes pre-serialised request bytes and reads
Content-Length bodies (no httpx, no openai client in the hot loop), with the garbage collector
off during each window. Every answer is checked: HTTP status and ``x-yichui-cache`` counted.

How to read it: the table gives the figures and PASS/FAIL against the targets (hit throughput
>= 0.8 x /health's; open-loop hit latency p50 <= 2 ms and p99 <= 10 ms; one engine call per
burst). The last line of the output is one JSON object with every figure, for scripts::

    .venv/bin/python bench/cache.py [--clients 16] [--rounds 3] [--rate 80] [--strict]
        [--set cache_timeout=0.2 ...]   # server settings (YICHUI_*), e.g. to compare configs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import redis

from cache_load import (
    MODEL,
    Meter,
    burst,
    chat_request,
    closed_loop,
    health_request,
    one_by_one,
    open_conns,
    open_loop,
)
from common import end_process, percentile, redis_server

if TYPE_CHECKING:
    from tests.api_server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RATIO_TARGET = 0.8
P50_TARGET_MS = 2.0
P99_TARGET_MS = 10.0


def _import_tests() -> None:
    """``tests`` (the API tests' server launcher and upstream double) from the repo root."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# -- the upstream, a child process ------------------------------------------------------------
def upstream_child(delay: float) -> int:
    """Run the test double on a free port; print ``PORT <n>``; serve until terminated."""
    _import_tests()
    import uvicorn
    from tests.fake_upstream import FakeUpstream, build_app

    state = FakeUpstream(delay=delay)
    app = build_app(state)

    @app.get("/_bench/requests")
    async def received() -> dict[str, int]:
        return {"requests": len(state.requests)}

    @app.post("/_bench/delay/{seconds}")
    async def set_delay(seconds: float) -> dict[str, float]:
        state.delay = seconds
        return {"delay": seconds}

    @app.post("/_bench/chunk_delay/{seconds}")  # bench/fanout.py: seconds between pieces
    async def set_chunk_delay(seconds: float) -> dict[str, float]:
        state.chunk_delay = seconds
        return {"chunk_delay": seconds}

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    state.port = int(sock.getsockname()[1])
    print(f"PORT {state.port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


class Upstream:
    """The parent's handle on the upstream child."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> int:
        return int(self.http.get("/_bench/requests").json()["requests"])

    def set_delay(self, seconds: float) -> None:
        self.http.post(f"/_bench/delay/{seconds}").raise_for_status()

    def set_chunk_delay(self, seconds: float) -> None:
        self.http.post(f"/_bench/chunk_delay/{seconds}").raise_for_status()


@contextlib.contextmanager
def upstream_process(delay: float) -> Iterator[Upstream]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--upstream", str(delay)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the upstream did not start (rc {proc.poll()})")
        up = Upstream(proc, int(line.split()[1]))
        deadline = time.monotonic() + 20
        while True:
            try:
                up.requests()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the upstream did not answer") from None
                time.sleep(0.05)
        yield up
        up.http.close()
    finally:
        end_process(proc)


def start_server(
    workdir: Path, redis_url: str, upstream: Upstream, extra: dict[str, str]
) -> ServerProcess:
    """``yichui serve`` (one uvicorn process, log level warning) with ``echo`` -> upstream,
    and the ``--set`` settings."""
    _import_tests()
    from tests.api_server import ServerProcess

    route = {"url": upstream.url, "model": "echo-up"}
    server = ServerProcess(workdir, redis_url=redis_url, upstreams={MODEL: route}, **extra)
    return server.start()


def _answers(f: dict[str, Any], key: str, seen: Counter[str], expected: set[str]) -> None:
    """Record the answers of a phase as ``<key>_answers``. An HTTP error or an answer the phase
    cannot give ends the run; ``bypass`` (a Redis call of the cache timed out: the request went
    uncached, to the upstream) is counted and shown, not fatal."""
    f[f"{key}_answers"] = dict(seen)
    bad = {k: v for k, v in seen.items() if k not in expected | {"bypass"}}
    if bad:
        raise RuntimeError(f"{key}: unexpected answers {bad} (all: {dict(seen)})")


# -- main -------------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, base: Path, url: str, up: Upstream) -> dict[str, Any]:
    f: dict[str, Any] = {}
    probe = redis.Redis.from_url(url)
    f["redis_version"] = probe.info("server")["redis_version"]
    run_id = secrets.token_hex(4)
    server = start_server(base / "serve", url, up, args.settings)
    second: ServerProcess | None = None
    try:
        port = server.port
        meter = Meter([server.proc.pid] if server.proc else [], probe)
        # one warmed prompt per client: each hit is a GET of its own entry in Redis (identical
        # requests in flight at once would share one GET: "coalesced", measured apart)
        hit_raws = [chat_request(port, f"cached {run_id} {i}", 0) for i in range(args.clients)]
        hit_raw = hit_raws[0]
        first, seen = await one_by_one(port, hit_raws + hit_raws)
        if seen != Counter(miss=args.clients, hit=args.clients):
            raise RuntimeError(f"warming the hits: expected a miss then a hit, got {dict(seen)}")
        f["warm_miss_ms"] = round(statistics.median(first[: args.clients]), 1)

        # (1) closed loop: /health vs cache hits (vs identical hits), alternated
        conns = await open_conns(port, args.clients)
        ops: dict[str, list[bytes]] = {
            "health": [health_request(port)],
            "hit": hit_raws,
            "same": [hit_raw],
        }
        for raws in ops.values():  # warm-up: connections, code paths, the allocator
            await closed_loop(conns, raws, 0.5, meter)
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in ops}
        seen_tp: dict[str, Counter[str]] = {k: Counter() for k in ops}
        for r in range(args.rounds):
            order = list(ops)[r % len(ops) :] + list(ops)[: r % len(ops)]
            for label in order:
                got = await closed_loop(conns, ops[label], args.seconds, meter)
                rounds[label].append(got)
                seen_tp[label].update(got["seen"])
        for conn in conns:
            conn.close()
        _answers(f, "health", seen_tp["health"], {"ok"})
        _answers(f, "hit", seen_tp["hit"], {"hit"})
        _answers(f, "same", seen_tp["same"], {"hit", "coalesced"})
        for label in ops:
            rs = rounds[label]
            f[f"{label}_rps"] = round(statistics.median(r["per_s"] for r in rs), 1)
            f[f"{label}_rps_rounds"] = [round(r["per_s"], 1) for r in rs]
            for k in ("server_us", "redis_us", "client_us", "redis_cmds"):
                f[f"{label}_{k}"] = round(statistics.median(r[k] for r in rs), 3)
        same = seen_tp["same"]
        f["same_coalesced_share"] = round(same["coalesced"] / max(same.total(), 1), 3)
        for label in ("hit", "same"):
            f[f"{label}_health_ratio"] = round(f[f"{label}_rps"] / f["health_rps"], 3)
            f[f"{label}_health_ratio_rounds"] = [
                round(h["per_s"] / g["per_s"], 3)
                for h, g in zip(rounds[label], rounds["health"], strict=True)
            ]

        # (2) open loop at a fixed rate
        ol = await open_loop(port, hit_raw, args.rate, args.duration)
        _answers(f, "open", ol["seen"], {"hit", "coalesced"})
        for k in ("requests", "connections"):
            f[f"open_{k}"] = ol[k]
        for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "lag_p99_ms", "lag_max_ms"):
            f[f"open_{k}"] = round(ol[k], 3)
        # the same schedule on /health, for reference (half as long): what any request costs
        ol = await open_loop(port, health_request(port), args.rate, args.duration / 2)
        _answers(f, "open_health", ol["seen"], {"ok"})
        f["open_health_requests"] = ol["requests"]
        for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            f[f"open_health_{k}"] = round(ol[k], 3)

        # (4) context: misses one at a time, the uncached path
        misses = [chat_request(port, f"miss {run_id} {i}", 0) for i in range(args.misses)]
        miss_ms, seen = await one_by_one(port, misses)
        _answers(f, "miss", seen, {"miss"})
        f["miss_p50_ms"] = round(percentile(miss_ms, 0.5), 1)
        f["miss_max_ms"] = round(max(miss_ms), 1)
        f["miss_overhead_ms"] = round(f["miss_p50_ms"] - args.delay * 1000, 1)
        conns = await open_conns(port, args.clients)
        bypass_raw = chat_request(port, f"sampled {run_id}", 1)
        got = await closed_loop(conns, [bypass_raw], args.seconds, meter)
        _answers(f, "bypass", got["seen"], {"bypass"})
        f["bypass_rps"] = round(got["per_s"], 1)
        up.set_delay(0)
        try:
            await closed_loop(conns, [bypass_raw], 0.5, meter)
            got = await closed_loop(conns, [bypass_raw], args.seconds, meter)
        finally:
            up.set_delay(args.delay)
        _answers(f, "bypass_nodelay", got["seen"], {"bypass"})
        f["bypass_nodelay_rps"] = round(got["per_s"], 1)
        f["bypass_nodelay_server_us"] = round(got["server_us"], 1)
        for conn in conns:
            conn.close()
        f["hit_speedup_vs_bypass"] = round(f["hit_rps"] / f["bypass_rps"], 1)
        f["hit_speedup_vs_bypass_nodelay"] = round(f["hit_rps"] / f["bypass_nodelay_rps"], 2)
        f["miss_vs_hit_latency"] = round(f["miss_p50_ms"] / max(f["open_p50_ms"], 1e-3), 1)

        # (3) coalescing: one process, then two on the same Redis
        async def coalesce(ports: list[int], key: str) -> None:
            calls, walls, bursts = 0, [], []
            seen_all: Counter[str] = Counter()
            for r in range(args.burst_rounds):
                got = await burst(ports, args.burst, f"burst {run_id} {key} {r}", up)
                calls += got["engine_calls"]
                walls.append(got["wall_s"] * 1000)
                seen_all.update(got["seen"])
                # each burst: engine calls, ms, the answers of each server process
                bursts.append([got["engine_calls"], round(walls[-1]), got["by_server"]])
            f[f"coalesce_{key}_bursts"] = bursts
            sent = args.burst * args.burst_rounds
            f[f"coalesce_{key}_requests"] = sent
            f[f"coalesce_{key}_engine_calls"] = calls
            for status in ("miss", "coalesced", "hit", "bypass"):
                f[f"coalesce_{key}_{status}"] = seen_all.pop(status, 0)
            f[f"coalesce_{key}_other"] = dict(seen_all)
            f[f"coalesce_{key}_factor"] = round(sent / max(calls, 1), 1)
            f[f"coalesce_{key}_burst_ms"] = round(statistics.median(walls), 1)

        await coalesce([port], "1p")
        second = start_server(base / "serve", url, up, args.settings)
        # one request first: its Redis connection opens (a cold process's first cache call can
        # outlast cache_timeout and go uncached; that is start-up, not coalescing)
        await one_by_one(second.port, [chat_request(second.port, f"cached {run_id} 0", 0)])
        await coalesce([port, second.port], "2p")
    finally:
        if second is not None:
            second.stop()
        server.stop()
        probe.close()
    return f


def run(args: argparse.Namespace) -> dict[str, Any]:
    for key in [k for k in os.environ if k.startswith("YICHUI_")]:
        del os.environ[key]  # the figures must not depend on the caller's settings
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    figures: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "client_loop": "uvloop" if uvloop is not None else "asyncio",
        "server_stack": "+".join(  # what uvicorn's "auto" loop and http pick
            [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m)] or ["asyncio"]
        ),
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "rate": args.rate,
        "duration_s": args.duration,
        "delay_s": args.delay,
        "burst": args.burst,
        "burst_rounds": args.burst_rounds,
        "settings": args.settings,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yichui-bench-") as tmp:
        base = Path(tmp)
        (base / "redis").mkdir()
        (base / "serve").mkdir()
        with redis_server(base / "redis") as url, upstream_process(args.delay) as up:
            factory: Callable[[], asyncio.AbstractEventLoop] | None = None
            if uvloop is not None:
                factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                figures.update(runner.run(measure(args, base, url, up)))
    figures["wall_s"] = round(time.perf_counter() - t0, 1)
    figures["ratio_target_met"] = figures["hit_health_ratio"] >= RATIO_TARGET
    figures["latency_target_met"] = (
        figures["open_p50_ms"] <= P50_TARGET_MS and figures["open_p99_ms"] <= P99_TARGET_MS
    )
    figures["coalescing_target_met"] = all(
        figures[f"coalesce_{k}_engine_calls"] == args.burst_rounds for k in ("1p", "2p")
    )
    figures["targets_met"] = (
        figures["ratio_target_met"]
        and figures["latency_target_met"]
        and figures["coalescing_target_met"]
    )
    return figures


def report(f: dict[str, Any]) -> None:
    """The human-readable table (the JSON line follows it)."""

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def bypassed(key: str) -> str:
        n = f[f"{key}_answers"].get("bypass", 0)
        return f"  ! {n} bypass (a cache Redis call timed out)" if n else ""

    print(
        f"\nresponse cache: one `yichui serve` (uvicorn, 1 process, {f['server_stack']}),"
        f" redis-server"
        f" {f['redis_version']}, {f['cpus']} CPUs shared with the load generator"
        f" (raw HTTP/1.1 on {f['client_loop']}); upstream answers in {f['delay_s']:g} s;"
        f" {f['wall_s']} s in all"
        + (f"; server settings {f['settings']}" if f["settings"] else "")
        + "\n"
    )
    print(
        f"(1) closed loop, {f['clients']} keep-alive clients, {f['rounds']} rounds x"
        f" {f['seconds']:g} s, alternated; medians; CPU µs and Redis commands per request"
    )
    print(
        f"{'endpoint':<34}{'req/s':>9}{'server':>9}{'redis':>8}{'client':>8}{'Redis cmds':>11}"
        "  rounds req/s"
    )
    for label, key in (
        ("GET /health", "health"),
        ("POST chat, cache hit", "hit"),
        ("  same, 1 body for all clients", "same"),
    ):
        rs = ", ".join(f"{x:.0f}" for x in f[f"{key}_rps_rounds"])
        print(
            f"{label:<34}{f[f'{key}_rps']:>9.0f}{f[f'{key}_server_us']:>9.0f}"
            f"{f[f'{key}_redis_us']:>8.0f}{f[f'{key}_client_us']:>8.0f}"
            f"{f[f'{key}_redis_cmds']:>11.3f}  {rs}{bypassed(key)}"
        )
    rr = ", ".join(f"{x:.2f}" for x in f["hit_health_ratio_rounds"])
    print(
        f"{'  hit / health':<34}{f['hit_health_ratio']:>9.2f}  target >= {RATIO_TARGET}"
        f"  {verdict(f['ratio_target_met'])}  (rounds: {rr})"
    )
    print(
        f"  (cache hit: a warmed prompt per client, no two identical requests in flight; with 1"
        f" body for all,\n   {f['same_coalesced_share']:.0%} are `coalesced` onto an identical"
        f" request in flight: {f['same_health_ratio']:.2f}x /health)"
    )

    print(
        f"\n(2) open loop, {f['rate']:g} hits/s for {f['duration_s']:g} s"
        f" ({f['open_requests']} requests, {f['open_connections']} connections);"
        " latency from the scheduled send"
    )
    print(f"{'':<34}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for label, key in (
        ("POST chat, cache hit", "open"),
        (f"  GET /health ({f['open_health_requests']}, reference)", "open_health"),
    ):
        print(
            f"{label:<34}{f[f'{key}_p50_ms']:>9.2f}{f[f'{key}_p90_ms']:>9.2f}"
            f"{f[f'{key}_p99_ms']:>9.2f}{f[f'{key}_max_ms']:>9.2f}{bypassed(key)}"
        )
    print(
        f"  targets p50 <= {P50_TARGET_MS:g} ms, p99 <= {P99_TARGET_MS:g} ms:"
        f" {verdict(f['latency_target_met'])}  (client send lag p99 {f['open_lag_p99_ms']:.2f}"
        f" ms, max {f['open_lag_max_ms']:.2f} ms)"
    )

    print(
        f"\n(3) coalescing: {f['burst']} identical misses at once, {f['burst_rounds']} rounds"
        " (fresh prompt each)"
    )
    print(
        f"{'':<34}{'sent':>6}{'engine':>8}{'miss':>6}{'coal.':>7}{'hit':>5}{'bypass':>7}"
        f"{'factor':>8}{'burst ms':>10}"
    )
    for label, key in (("1 server process", "1p"), ("2 server processes, 1 Redis", "2p")):
        p = f"coalesce_{key}_"
        other = f"  other: {f[p + 'other']}" if f[p + "other"] else ""
        print(
            f"{label:<34}{f[p + 'requests']:>6}{f[p + 'engine_calls']:>8}{f[p + 'miss']:>6}"
            f"{f[p + 'coalesced']:>7}{f[p + 'hit']:>5}{f[p + 'bypass']:>7}"
            f"{f[p + 'factor']:>7.1f}x{f[p + 'burst_ms']:>10.0f}{other}"
        )
    print(f"  one engine call per burst: {verdict(f['coalescing_target_met'])}")
    for key in ("1p", "2p"):
        bursts = f[f"coalesce_{key}_bursts"]
        if any(b[0] != 1 for b in bursts):  # which bursts, and what each process answered
            print(f"  {key} bursts [engine calls, ms, answers per process]: {bursts}")

    print("\n(4) for context")
    print(
        f"{'miss, one at a time':<34}p50 {f['miss_p50_ms']:.1f} ms, max {f['miss_max_ms']:.1f} ms"
        f" ({f['miss_overhead_ms']:+.1f} ms over the upstream's {f['delay_s']:g} s);"
        f" {f['miss_vs_hit_latency']:.0f}x a hit's p50"
    )
    print(
        f"{'uncached (bypass, temperature 1)':<34}{f['bypass_rps']:.0f} req/s with the delay"
        f" (hits: {f['hit_speedup_vs_bypass']:.0f}x);"
        f" {f['bypass_nodelay_rps']:.0f} req/s at delay 0"
        f" (hits: {f['hit_speedup_vs_bypass_nodelay']:.2f}x,"
        f" server {f['bypass_nodelay_server_us']:.0f} µs/req)"
    )
    print(f"\ntargets: {verdict(f['targets_met'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--seconds", type=float, default=3.0, help="closed-loop window (s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per endpoint")
    parser.add_argument("--rate", type=float, default=80.0, help="open-loop hits/s")
    parser.add_argument("--duration", type=float, default=10.0, help="open-loop seconds")
    parser.add_argument("--delay", type=float, default=0.5, help="upstream answer time (s)")
    parser.add_argument("--burst", type=int, default=50, help="identical misses at once")
    parser.add_argument("--burst-rounds", type=int, default=3, help="bursts per configuration")
    parser.add_argument("--misses", type=int, default=6, help="miss latency samples")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the servers (YICHUI_KEY), e.g. cache_timeout=0.2; repeatable",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--upstream", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.upstream is not None:
        return upstream_child(args.upstream)
    if min(args.clients, args.rounds, args.burst, args.burst_rounds, args.misses) < 1:
        parser.error("counts must be >= 1")
    if min(args.seconds, args.rate, args.duration, args.delay) <= 0:
        parser.error("--seconds, --rate, --duration and --delay must be > 0")
    if any("=" not in kv for kv in args.set):
        parser.error("--set takes KEY=VALUE")
    args.settings = dict(kv.split("=", 1) for kv in args.set)
    figures = run(args)
    report(figures)
    print(json.dumps(figures, separators=(", ", ": ")))
    return 1 if args.strict and not figures["targets_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
