"""Many processes on several simulated hosts against one Redis (issue 16, item 3): two real
``yichui serve`` processes and three real ``yichui worker`` processes on three hosts (each
with its own data dir; the models root and the mirror on one shared folder, the "NAS"; see
tests/multihost.py). The upstream is the fake OpenAI server of this process, which counts
what it computes.

The tests share one fleet and run in file order; the last one kills a host."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_upstream import FakeUpstream, fake_upstream
from tests.helpers import make_model
from tests.multihost import Host, client_runtime
from tests.redis_proc import RedisProcess, wait_until
from tests.worker_proc import FAST
from yichui.runtime import Runtime
from yichui.state.task_store import TERMINAL
from yichui.tasks.service import TaskService

pytestmark = pytest.mark.slow

WORKERS = {"a": "a1", "b": "b1", "c": "c1"}  # host -> its worker's name
SLOTS = "2"  # each worker runs two tasks at once


@dataclass
class Fleet:
    redis: RedisProcess
    upstream: FakeUpstream
    hosts: dict[str, Host]
    rt: Runtime
    nas: Path

    @property
    def svc(self) -> TaskService:
        return self.rt.tasks

    def states(self, task_id: str) -> list[tuple[str, str | None]]:
        return [
            (e.data["state"], e.data.get("worker"))
            for e in self.svc.tail(task_id, 10_000)
            if e.kind == "state"
        ]

    def wait_all(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        wait_until(
            lambda: all(self.svc.get(t)["state"] in TERMINAL for t in ids),
            timeout,
            f"{len(ids)} tasks to end",
        )
        return [self.svc.get(t) for t in ids]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("multihost")
    redis = RedisProcess(tmp / "redis").start()  # the module's own: no other test flushes it
    nas = tmp / "nas"
    (nas / "models").mkdir(parents=True)
    (nas / "mirror").mkdir()
    hosts = {h: Host(tmp / f"host-{h}", h, redis.url, nas) for h in WORKERS}
    rt = client_runtime(redis.url, tmp / "client", nas)
    with fake_upstream() as upstream:
        try:
            for name, host in hosts.items():
                host.worker(WORKERS[name], "-n", SLOTS)
            route = {"echo": {"url": upstream.url, "model": "echo-up"}}
            for name in ("a", "b"):  # API processes on hosts a and b; c runs a worker only
                hosts[name].server(upstreams=route).start()
            wait_until(
                lambda: {w["id"] for w in rt.tasks.alive_workers()} == set(WORKERS.values()),
                30,
                "three workers",
            )
            yield Fleet(redis, upstream, hosts, rt, nas)
        finally:
            for host in hosts.values():
                host.stop()
            rt.close()
            redis.stop()


def _ask(base_url: str, text: str, **params: Any) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}], **params}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)


def test_coalescing_holds_across_api_processes(fleet: Fleet) -> None:
    fleet.upstream.reset()
    fleet.upstream.delay = 1.0  # everyone arrives while the one computation runs
    urls = [fleet.hosts[h].servers[0].url for h in ("a", "b")]
    results: list[tuple[int, str, str, str]] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        r = _ask(urls[i % 2], "thirty on two servers", temperature=0)
        with lock:
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
            results.append((r.status_code, r.headers.get("x-yichui-cache", ""), text, urls[i % 2]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    computed = len(fleet.upstream.requests)
    fleet.upstream.reset()
    assert len(results) == 30 and {r[0] for r in results} == {200}
    assert computed == 1  # the upstream's own count
    statuses = [r[1] for r in results]
    assert statuses.count("miss") == 1, statuses
    assert set(statuses) <= {"miss", "coalesced", "hit"}
    assert {r[2] for r in results} == {"servers two on thirty"}  # everyone got the one answer
    # each server answered requests it did not compute: coalescing crossed the processes
    for url in urls:
        assert any(r[3] == url and r[1] != "miss" for r in results)


def test_one_download_per_model_across_workers(fleet: Fleet) -> None:
    size = 96 << 20  # a sparse file: the copy and the manifest's hash take a while
    folder = make_model(fleet.nas / "mirror", "org/shared")
    with open(folder / "model-00002.safetensors", "wb") as fh:
        fh.truncate(size)
    ids = [fleet.svc.submit("download", {"name": "org/shared"})["id"] for _ in range(6)]
    done = fleet.wait_all(ids, 90)
    assert {t["state"] for t in done} == {"succeeded"}, [t.get("error") for t in done]
    actions = sorted(t["result"]["action"] for t in done)
    print(f"pull actions: {actions}")
    assert actions.count("installed") == 1, actions  # exactly one download
    assert "reused" in actions, actions  # someone waited on the lock instead of downloading
    assert set(actions) <= {"installed", "reused", "present"}
    assert len({t["worker"] for t in done}) >= 2  # the pulls ran on several hosts
    installed = fleet.nas / "models/org/shared"
    assert (installed / "model-00002.safetensors").stat().st_size == size
    partial = fleet.nas / "models/.partial"
    assert not partial.exists() or not any(partial.iterdir())  # no half-written folder
    assert fleet.rt.registry.status("org/shared").status.exists


def test_tasks_spread_over_workers_and_run_once(fleet: Fleet) -> None:
    ids = [
        fleet.svc.submit("selftest", {"steps": 2, "step_seconds": 0.05})["id"] for _ in range(30)
    ]
    done = fleet.wait_all(ids, 60)
    per_worker: dict[str, int] = {}
    for t in done:
        assert (t["state"], t["attempt"]) == ("succeeded", 1)
        assert fleet.states(t["id"]) == [
            ("queued", None),
            ("running", t["worker"]),
            ("succeeded", None),
        ]
        per_worker[t["worker"]] = per_worker.get(t["worker"], 0) + 1
    print(f"tasks per worker: {per_worker}")
    assert set(per_worker) == set(WORKERS.values()), per_worker


def test_lost_host_tasks_finish_elsewhere(fleet: Fleet) -> None:
    """Host b (its API process and its worker) is SIGKILLed while it runs long tasks."""
    ids = [
        fleet.svc.submit("selftest", {"steps": 40, "step_seconds": 0.05})["id"] for _ in range(6)
    ]

    def on_b(past: int) -> list[str]:
        rows = [fleet.svc.get(t) for t in ids]
        return [
            r["id"]
            for r in rows
            if r["state"] == "running" and r.get("worker") == "b1" and r["progress"]["step"] >= past
        ]

    def ready() -> bool:
        return bool(on_b(3)) and all(fleet.svc.get(t)["state"] == "running" for t in ids)

    wait_until(ready, 20, "all six running, host b's past step 3")
    lost = on_b(0)  # every task host b runs
    deep = on_b(3)  # those past step 3
    api_a = fleet.hosts["a"].servers[0].url
    failures: list[str] = []
    stop = threading.Event()

    def keep_asking() -> None:  # the other API process must keep answering
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = _ask(api_a, f"still here {i}", temperature=0)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            time.sleep(0.05)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        killed = time.monotonic()
        fleet.hosts["b"].kill()
        wait_until(
            lambda: all(fleet.svc.get(t).get("worker") not in (None, "b1") for t in lost),
            20,
            "host b's tasks claimed elsewhere",
        )
        claimed = time.monotonic() - killed
        done = fleet.wait_all(ids, 30)
        finished = time.monotonic() - killed
    finally:
        stop.set()
        asker.join(30)
    print(f"host b SIGKILLed with {len(lost)} tasks: claimed elsewhere after {claimed:.2f} s,")
    print(f"all six done after {finished:.2f} s")
    assert not failures, failures[:3]
    assert claimed < float(FAST["YICHUI_TASK_LEASE"]) + 3.0  # a lease and a few heartbeats
    for t in done:
        assert t["state"] == "succeeded"
        terminal = [s for s, _ in fleet.states(t["id"]) if s in TERMINAL]
        assert terminal == ["succeeded"]  # exactly one final state
        if t["id"] in lost:
            assert t["attempt"] == 2 and t["worker"] in ("a1", "c1")
            assert t["last_error"]["type"] == "WorkerLost"
            if t["id"] in deep:
                assert t["result"]["resumed_from"] >= 3  # from b's checkpoint, not from scratch
        else:
            assert t["attempt"] == 1 and t["worker"] in ("a1", "c1")
    assert httpx.get(f"{api_a}/health", timeout=5).status_code == 200
