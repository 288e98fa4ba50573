"""Benchmark of live stream fan-out: when a streaming request is coalesced onto another one
that is still generating, how soon after the leader does the follower get its first token?

In one run, against one and then two ``yichui serve`` processes on one throwaway redis-server
(the servers and the upstream as in ``bench/cache.py``: the model ``echo`` routed to the API
tests' OpenAI-compatible double, in a child process; here it waits ``--delay`` seconds before
its first piece and ``--chunk-delay`` between its ``--words`` pieces). Each of ``--trials``
trials asks a fresh question: a leader streams it from the first process, and a follower asks
the same ``--offset-max``·U(0, 1) seconds later (seeded), from the same process (1 process) or
from the second one (2 processes), so it arrives before the leader's first token, or after it
and catches up. For each follower::

    lag = follower's first token - max(follower's arrival, leader's first token)

the time the follower waits beyond what it must (target: p50 <= 20 ms over 2 processes; before
fan-out it waited for the leader's last token). Also the leader's and the follower's time to
first token, each from its own arrival, and the answers checked: the follower's text equals the
leader's, and it was ``coalesced``. The last line of the output is one JSON object::

    .venv/bin/python bench/fanout.py [--trials 40] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from cache import MODEL, start_server, upstream_process
from common import finish, percentile, redis_server


async def _stream(
    client: httpx.AsyncClient, url: str, prompt: str, start_at: float
) -> dict[str, Any]:
    """Stream ``prompt`` at ``start_at`` (perf_counter) -> arrival, first token, text, cache."""
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 256,
        "stream": True,
    }
    arrived = time.perf_counter()
    first: float | None = None
    text = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        cache = r.headers.get("x-yichui-cache", "")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            for choice in event["choices"]:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
    if first is None:
        raise RuntimeError(f"no token (status {r.status_code})")
    return {"arrived": arrived, "first": first, "text": text, "cache": cache}


async def trials(
    args: argparse.Namespace, leader_url: str, follower_url: str, tag: str
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    lags, leader_ttft, follower_ttft, bad = [], [], [], []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
        for i in range(args.trials):
            words = " ".join(f"{tag}s{args.seed}t{i}w{j}" for j in range(args.words))
            now = time.perf_counter() + 0.05
            offset = args.offset_max * rng.random()
            leader, follower = await asyncio.gather(
                _stream(client, leader_url, words, now),
                _stream(client, follower_url, words, now + offset),
            )
            if follower["text"] != leader["text"] or follower["cache"] != "coalesced":
                bad.append({"trial": i, "cache": follower["cache"]})
            lags.append(follower["first"] - max(follower["arrived"], leader["first"]))
            leader_ttft.append(leader["first"] - leader["arrived"])
            follower_ttft.append(follower["first"] - follower["arrived"])
    ms = 1000.0
    return {
        "lag_p50_ms": round(percentile(lags, 0.5) * ms, 2),
        "lag_p95_ms": round(percentile(lags, 0.95) * ms, 2),
        "lag_max_ms": round(max(lags) * ms, 2),
        "leader_ttft_p50_ms": round(statistics.median(leader_ttft) * ms, 1),
        "follower_ttft_p50_ms": round(statistics.median(follower_ttft) * ms, 1),
        "not_coalesced_or_differing": len(bad),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--words", type=int, default=40, help="pieces of each answer")
    parser.add_argument("--delay", type=float, default=0.25, help="s before the first piece")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="s between pieces")
    parser.add_argument("--offset-max", type=float, default=0.6, help="follower offset, s")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.words < 1 or min(args.delay, args.chunk_delay) < 0:
        parser.error("--trials and --words must be >= 1, the delays >= 0")
    figures: dict[str, Any] = {"trials": args.trials, "words": args.words}
    with (
        tempfile.TemporaryDirectory(prefix="yichui-fanout-") as tmp,
        redis_server(Path(tmp)) as url,
        upstream_process(args.delay) as up,
    ):
        up.set_chunk_delay(args.chunk_delay)
        base = Path(tmp)
        (base / "a").mkdir()
        (base / "b").mkdir()
        a = start_server(base / "a", url, up, {})
        b = start_server(base / "b", url, up, {})
        try:
            for procs, follower in ((1, a), (2, b)):
                got = asyncio.run(trials(args, a.url, follower.url, f"p{procs}"))
                for name, value in got.items():
                    figures[f"p{procs}_{name}"] = value
                print(
                    f"{procs} process(es): lag p50 {got['lag_p50_ms']} ms, p95 "
                    f"{got['lag_p95_ms']} ms; time to first token: leader "
                    f"{got['leader_ttft_p50_ms']} ms, follower {got['follower_ttft_p50_ms']} ms"
                )
        finally:
            a.stop()
            b.stop()
    checks = {
        "follower's first token within 20 ms (p50) over 2 processes": figures["p2_lag_p50_ms"]
        <= 20.0,
        "every follower coalesced, same text": figures["p1_not_coalesced_or_differing"]
        + figures["p2_not_coalesced_or_differing"]
        == 0,
    }
    return finish(figures, checks, args.strict)


if __name__ == "__main__":
    sys.exit(main())
