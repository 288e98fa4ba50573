"""Benchmark of the model status cache: Redis answers vs scanning the models root.

What it measures, in one run, against a throwaway redis-server and a temp models root of
``--models`` folders (2/3 text, 1/3 multimodal, a third under ``org/name``, some with a
``.yichui.json`` manifest), wired exactly as :class:`yichui.runtime.Runtime` does:

(a) one model's status, over every name in random order: ``registry.status(name)`` (a cache
    hit), ``registry.scan(name)`` (the folder scan alone) and ``status(name, refresh=True)``
    (scan + the pipelined write back). The three are interleaved per name, their order rotated,
    so a noisy neighbour hurts all of them alike. p50/p99 in µs.
(b) the full listing: ``registry.listing()`` (one GET of ``model_listing``) vs ``registry.walk()``
    (a scan of every folder), alternated pair by pair; median ms. The page cache is warm (a cold
    one needs root), so the walk figures are the best case for walking: on a cold NAS mount
    the gap is far wider.
(c) Redis round trips per call, counted twice: client side (socket sends, i.e. request/reply
    exchanges, health-check PINGs included) and server side (``INFO commandstats`` deltas).

How to read it: the table gives the figures, the ratios and PASS/FAIL against the targets
(listing speed-up >= 100x, <= 2 round trips for a cache-hit status). The last line of the output
is one JSON object with every figure, for scripts::

    .venv/bin/python bench/model_status.py [--models 900] [--repeat 5] [--strict]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from redis.connection import AbstractConnection

from common import redis_server
from yichui.config import load_settings
from yichui.models.registry import ModelRegistry
from yichui.models.status import MANIFEST
from yichui.runtime import Runtime

LIST_SPEEDUP_TARGET = 100.0
ROUND_TRIP_TARGET = 2

_ORGS = ("Qwen", "meta-llama", "mistralai", "google", "microsoft", "THUDM", "deepseek-ai", "01-ai")
_FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi", "glm", "deepseek", "yi")


# -- fixtures ---------------------------------------------------------------------------------
def build_models(root: Path, count: int, rng: random.Random) -> list[str]:
    """Create ``count`` model folders under ``root``; return their names."""
    names: list[str] = []
    n_multimodal = count // 3
    for i in range(count):
        kind = "multimodal" if i < n_multimodal else "text"
        family = _FAMILIES[i % len(_FAMILIES)]
        suffix = "VL" if kind == "multimodal" else "Instruct"
        if i % 3 == 0:
            name = f"{_ORGS[i % len(_ORGS)]}/{family}-{i:04d}-{suffix}"
        else:
            name = f"{family}-{i:04d}-{suffix.lower()}"
        _make_model(root, name, kind, shards=1 + (i % 2), manifest=i % 4 == 0, rng=rng)
        names.append(name)
    return names


def _make_model(
    root: Path, name: str, kind: str, *, shards: int, manifest: bool, rng: random.Random
) -> None:
    folder = root.joinpath(*name.split("/"))
    folder.mkdir(parents=True)
    config: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if kind == "multimodal":  # as tests/helpers.py
        config = {
            "model_type": "qwen2_vl",
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "vision_config": {"depth": 2},
        }
    files: dict[str, bytes] = {
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": b"{}",
    }
    for s in range(shards):
        weight = rng.randbytes(rng.randint(512, 4096))
        rel = (
            "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        )
        files[rel] = weight
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    if manifest:
        digests = {
            rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in files.items()
        }
        body = {
            "source": "hf",
            "revision": hashlib.sha1(name.encode()).hexdigest(),
            "files": digests,
        }
        (folder / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True))


# -- counting ---------------------------------------------------------------------------------
class RoundTrips:
    """Counts socket sends of every redis-py connection (one send = one request/reply)."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[RoundTrips]:
        original: Callable[..., None] = AbstractConnection.send_packed_command

        def send(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            self.count += 1
            original(conn, command, check_health)

        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        try:
            yield self
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def server_calls(probe: redis.Redis) -> int:
    """Commands the server has executed, the probe's own INFO calls left out."""
    stats: dict[str, dict[str, Any]] = probe.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def count_round_trips(
    fn: Callable[[], object], calls: int, probe: redis.Redis
) -> tuple[int, float, float]:
    """(max client round trips in one call, mean client, mean server commands) over ``calls``."""
    counter = RoundTrips()
    per_call: list[int] = []
    before_server = server_calls(probe)
    with counter.counting():
        for _ in range(calls):
            start = counter.count
            fn()
            per_call.append(counter.count - start)
    server = server_calls(probe) - before_server
    return max(per_call), sum(per_call) / calls, server / calls


# -- timing -----------------------------------------------------------------------------------
def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_statuses(
    registry: ModelRegistry, names: list[str], passes: int, rng: random.Random
) -> dict[str, list[float]]:
    """µs per call of cache / scan / refresh, interleaved per name with rotating order."""
    ops: dict[str, Callable[[str], object]] = {
        "cache": registry.status,
        "scan": registry.scan,
        "refresh": lambda n: registry.status(n, refresh=True),
    }
    labels = list(ops)
    out: dict[str, list[float]] = {k: [] for k in labels}
    clock = time.perf_counter_ns
    for _ in range(passes):
        order = names[:]
        rng.shuffle(order)
        gc.collect()
        for i, name in enumerate(order):
            for j in range(len(labels)):
                label = labels[(i + j) % len(labels)]
                fn = ops[label]
                t0 = clock()
                got = fn(name)
                out[label].append((clock() - t0) / 1e3)
                if label == "cache" and not getattr(got, "cached", False):
                    raise RuntimeError(f"status({name!r}) was not a cache hit")
    return out


def time_listings(registry: ModelRegistry, pairs: int, expect: int) -> dict[str, list[float]]:
    """ms per full listing from the cache vs per walk of the root, alternated pair by pair."""
    ops: dict[str, Callable[[], int]] = {
        "cache": lambda: len(registry.listing().models),
        "walk": lambda: len(registry.walk()),
    }
    out: dict[str, list[float]] = {"cache": [], "walk": []}
    for i in range(pairs):
        order = ["cache", "walk"] if i % 2 == 0 else ["walk", "cache"]
        for label in order:
            gc.collect()
            t0 = time.perf_counter_ns()
            got = ops[label]()
            out[label].append((time.perf_counter_ns() - t0) / 1e6)
            if got != expect:
                raise RuntimeError(f"{label} listing returned {got} models, expected {expect}")
    return out


# -- main -------------------------------------------------------------------------------------
def run(models: int, repeat: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    for key in [k for k in os.environ if k.startswith("YICHUI_")]:
        del os.environ[key]  # this process only: the figures must not depend on the caller
    with tempfile.TemporaryDirectory(prefix="yichui-bench-") as tmp:
        base = Path(tmp)
        root = base / "models"
        root.mkdir()
        t0 = time.perf_counter()
        names = build_models(root, models, rng)
        build_s = time.perf_counter() - t0
        (base / "redis").mkdir()
        with redis_server(base / "redis") as url:
            settings = load_settings(
                data_dir=base / "data", models_root=root, redis_url=url, namespace="bench"
            )
            runtime = Runtime(settings)
            try:
                registry = runtime.registry
                if registry.store is None:
                    raise RuntimeError(f"Redis unreachable: {runtime.redis_error}")
                indexed = len(registry.rescan().models)
                if indexed != models:
                    raise RuntimeError(f"rescan found {indexed} models, expected {models}")
                probe = redis.Redis.from_url(url)
                # warm-up: connections, imports, page cache, Python caches
                for name in names[:50]:
                    registry.status(name)
                    registry.scan(name)
                registry.listing()
                registry.walk()

                status_us = time_statuses(registry, names, repeat, rng)
                list_ms = time_listings(registry, max(6, 4 * repeat), models)
                hit_max, hit_mean, hit_server = count_round_trips(
                    lambda: registry.status(rng.choice(names)), 300, probe
                )
                _, list_rt, list_server = count_round_trips(registry.listing, 10, probe)
                probe.close()
            finally:
                runtime.close()

    def p(label: str, q: float) -> float:
        return round(_pct(status_us[label], q), 1)

    cache_ms = statistics.median(list_ms["cache"])
    walk_ms = statistics.median(list_ms["walk"])
    figures: dict[str, Any] = {
        "models": models,
        "repeat": repeat,
        "build_s": round(build_s, 2),
        "status_samples": len(status_us["cache"]),
        "status_cache_p50_us": p("cache", 0.5),
        "status_cache_p99_us": p("cache", 0.99),
        "status_scan_p50_us": p("scan", 0.5),
        "status_scan_p99_us": p("scan", 0.99),
        "status_refresh_p50_us": p("refresh", 0.5),
        "status_refresh_p99_us": p("refresh", 0.99),
        "status_speedup": round(p("scan", 0.5) / p("cache", 0.5), 2),
        "status_refresh_speedup": round(p("refresh", 0.5) / p("cache", 0.5), 2),
        "list_pairs": len(list_ms["cache"]),
        "list_cache_ms": round(cache_ms, 3),
        "list_walk_ms": round(walk_ms, 3),
        "list_speedup": round(walk_ms / cache_ms, 1),
        "status_round_trips": hit_max,
        "status_round_trips_mean": round(hit_mean, 3),
        "status_server_commands": round(hit_server, 3),
        "list_round_trips": round(list_rt, 3),
        "list_server_commands": round(list_server, 3),
        "walk_cache": "warm",
    }
    figures["targets_met"] = (
        figures["list_speedup"] >= LIST_SPEEDUP_TARGET
        and figures["status_round_trips"] <= ROUND_TRIP_TARGET
    )
    return figures


def report(f: dict[str, Any]) -> None:
    """The human-readable table (the JSON line follows it)."""

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    print(
        f"\nmodel status cache: {f['models']} models; {f['status_samples']} samples per status"
        f" op, {f['list_pairs']} listing pairs; folders built in {f['build_s']} s\n"
    )
    print(f"{'(a) one status':<26}{'p50 µs':>10}{'p99 µs':>10}")
    for label, key in (
        ("status(), cache hit", "cache"),
        ("scan(), the folder", "scan"),
        ("status(refresh=True)", "refresh"),
    ):
        print(f"{label:<26}{f[f'status_{key}_p50_us']:>10.1f}{f[f'status_{key}_p99_us']:>10.1f}")
    print(
        f"{'  cache speed-up (p50)':<26}{f['status_speedup']:>9.2f}x"
        f"  (vs refresh {f['status_refresh_speedup']:.2f}x)"
    )

    ok_list = f["list_speedup"] >= LIST_SPEEDUP_TARGET
    print(f"\n{'(b) all models':<26}{'median ms':>10}")
    print(f"{'listing(), cache':<26}{f['list_cache_ms']:>10.3f}")
    print(f"{'walk(), disk':<26}{f['list_walk_ms']:>10.3f}  (warm page cache: best case for walk)")
    print(
        f"{'  cache speed-up':<26}{f['list_speedup']:>9.1f}x"
        f"  target >= {LIST_SPEEDUP_TARGET:.0f}x  {verdict(ok_list)}"
    )

    ok_rt = f["status_round_trips"] <= ROUND_TRIP_TARGET
    print(
        f"\n(c) Redis round trips, cache-hit status: max {f['status_round_trips']}"
        f" (mean {f['status_round_trips_mean']}, server commands {f['status_server_commands']})"
        f"  target <= {ROUND_TRIP_TARGET}  {verdict(ok_rt)}"
    )
    print(
        f"    Redis round trips, listing: {f['list_round_trips']}"
        f" (server commands {f['list_server_commands']})"
    )

    print(f"\ntargets: {verdict(f['targets_met'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=900, help="model folders to create")
    parser.add_argument("--repeat", type=int, default=5, help="passes over every name")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.models < 3 or args.repeat < 1:
        parser.error("need --models >= 3 and --repeat >= 1")
    figures = run(args.models, args.repeat, args.seed)
    report(figures)
    print(json.dumps(figures, separators=(", ", ": ")))
    return 1 if args.strict and not figures["targets_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
