"""The fleet view: API servers heartbeat what they have loaded; `yichui ps` lists it across
hosts and forgets a server that died within a few heartbeats."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aredis

from tests.api_server import ServerProcess
from tests.redis_proc import free_port
from tests.tiny_model import build_tiny_model
from yichui.config import Settings
from yichui.runtime import Runtime
from yichui.state import fleet
from yichui.state.fleet import ServerStore
from yichui.state.keys import Keys

M = "tiny/llama"
BEAT = 0.3


def _ps(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", "ps", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _ps_json(env: dict[str, str]) -> list[dict[str, Any]]:
    proc = _ps(env, "--json")
    assert proc.returncode == 0, proc.stderr
    servers: list[dict[str, Any]] = json.loads(proc.stdout)["servers"]
    return servers


def _wait(predicate: Any, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(step)
    return time.monotonic() - start


# -- the store: stale entries are pruned by the readers -------------------------------------------
async def test_listing_drops_and_deletes_stale_entries(redis_url: str) -> None:
    keys = Keys("fleet-test")
    sync = redis.Redis.from_url(redis_url)
    client = aredis.Redis.from_url(redis_url)
    try:
        store = ServerStore(sync, keys)
        model = {"model": "m", "engine": "local", "idle_seconds": 5.0, "in_use": 0}
        now = await fleet.beat(client, keys, "live", {"id": "live", "models": [model]}, uptime=60)
        await fleet.beat(client, keys, "dead", {"id": "dead", "models": []})
        old = json.loads(sync.hget(keys.servers(), "dead") or b"{}")
        old["heartbeat"] -= 10  # a server silent for 10 s
        sync.hset(keys.servers(), "dead", json.dumps(old))
        sync.hset(keys.servers(), "garbage", b"not json")

        (live,) = store.listing(stale_after=3.0)
        assert live["id"] == "live" and 0 <= live["age"] < 3.0
        assert live["started"] == pytest.approx(now - 60, abs=0.01)  # on the Redis clock
        (m,) = live["models"]
        assert m["last_used"] == pytest.approx(now - 5.0, abs=0.01)
        assert m["idle_seconds"] >= 5.0  # brought up to the time of the listing
        assert set(sync.hkeys(keys.servers())) == {b"live"}  # the stale ones were deleted

        # a server that beat again after the read is not pruned by that read
        sync.hset(keys.servers(), "back", b'{"heartbeat": 1}')
        store._prune(keys=[keys.servers()], args=["back", b'{"heartbeat": 0}'])
        assert sync.hexists(keys.servers(), "back")
        assert {s["id"] for s in store.listing(stale_after=3.0)} == {"live"}

        store.remove("live")
        assert store.listing(stale_after=3.0) == [] and not sync.exists(keys.servers())
    finally:
        await client.aclose()
        sync.close()


# -- the heartbeat of an API process ---------------------------------------------------------------
async def test_serving_services_beat_and_remove_their_entry(settings: Settings) -> None:
    rt = Runtime(settings.model_copy(update={"server_heartbeat": 0.1}), role="api")
    try:
        async with rt.serving():
            deadline = time.monotonic() + 5
            while not (servers := await asyncio.to_thread(rt.fleet.listing, 0.3)):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            (server,) = servers
            assert server["pid"] == os.getpid() and server["url"].startswith("http://")
            assert server["budget"] == settings.model_memory_budget and server["used"] == 0
            assert server["models"] == [] and server["requests"] == 0
        assert rt.fleet.listing(stale_after=60) == []  # a clean close deletes it at once
    finally:
        rt.close()


async def test_redis_down_never_fails_the_heartbeat(settings: Settings) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    rt = Runtime(settings.model_copy(update={"redis_url": down, "server_heartbeat": 0.05}))
    try:
        async with rt.serving() as services:
            beat = services._fleet
            assert beat is not None
            assert await beat.beat() is False  # logged at debug, not raised
            await asyncio.sleep(0.3)  # a few failed beats later the loop still runs
            assert beat._task is not None and not beat._task.done()
    finally:
        rt.close()


def test_ps_without_redis_is_one_line(settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env.update(
        YICHUI_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        YICHUI_DATA_DIR=str(settings.data_dir),
    )
    proc = _ps(env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and "unreachable" in lines[0] and len(lines) <= 2


# -- a real `yichui serve`, killed -----------------------------------------------------------------
def test_ps_lists_a_loaded_model_and_drops_a_killed_server(redis_url: str, tmp_path: Path) -> None:
    root = tmp_path / "models"
    build_tiny_model(root / M)
    server = ServerProcess(
        tmp_path, redis_url=redis_url, models_root=str(root), server_heartbeat=str(BEAT)
    ).start()
    store = ServerStore(redis.Redis.from_url(redis_url), Keys())
    try:
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert server.proc is not None
        pid = server.proc.pid

        def mine(servers: list[dict[str, Any]]) -> dict[str, Any] | None:
            return next((s for s in servers if s["pid"] == pid), None)

        # the next heartbeat after the answer carries the model
        _wait(lambda: (s := mine(store.listing(3 * BEAT))) and s["models"], timeout=5)
        entry = mine(_ps_json(server.env))
        assert entry is not None
        assert entry["url"] == server.url and entry["port"] == server.port
        assert entry["requests"] >= 1 and entry["budget"] > 0 and entry["used"] > 0
        (model,) = entry["models"]
        assert model["model"] == M and model["engine"] == "local" and model["device"] == "cpu"
        assert model["requests"] >= 1 and model["bytes"] == entry["used"]
        assert model["idle_seconds"] >= 0 and model["last_used"] <= entry["heartbeat"]

        table = _ps({**server.env, "COLUMNS": "200"})
        assert table.returncode == 0, table.stderr
        assert M in table.stdout and f":{server.port}" in table.stdout
        assert "least recently used" in table.stdout

        os.killpg(pid, signal.SIGKILL)  # no goodbye: the readers must notice
        server.proc.wait()
        _wait(lambda: mine(store.listing(3 * BEAT)) is None, timeout=3 * BEAT + 3)
        assert not any(f":{pid}:".encode() in f for f in store.client.hkeys("servers"))
        assert mine(_ps_json(server.env)) is None
    finally:
        store.client.close()
        server.stop()
