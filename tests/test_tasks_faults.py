"""Fault tests of the task engine with real worker processes and real redis-server processes:
SIGKILL, SIGSTOP/SIGCONT, SIGTERM, a worker-killing poison task, Redis killed and restarted
with AOF, a reader whose connection is cut, Redis unreachable."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.redis_proc import RedisProcess, free_port, wait_until
from tests.worker_proc import WorkerProcess, worker_env
from yichui.config import load_settings
from yichui.runtime import Runtime
from yichui.state.keys import Keys
from yichui.state.task_store import TERMINAL
from yichui.tasks.service import TaskService

pytestmark = pytest.mark.slow


class Harness:
    """Workers and a TaskService on one Redis."""

    def __init__(self, redis_url: str, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.env = worker_env(redis_url, tmp / "data", **env)
        opts = {
            k.removeprefix("YICHUI_").lower(): v
            for k, v in self.env.items()
            if k.startswith("YICHUI_") and k not in ("YICHUI_REDIS_URL", "YICHUI_DATA_DIR")
        }
        self.rt = Runtime(load_settings(redis_url=redis_url, data_dir=tmp / "data", **opts))
        self.svc: TaskService = self.rt.tasks
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str, *args: str) -> WorkerProcess:
        w = WorkerProcess(self.env, name, self.tmp, *args).start()
        self.workers.append(w)
        return w

    def status(self, task_id: str) -> dict[str, Any]:
        return self.svc.get(task_id)

    def wait_state(self, task_id: str, states: set[str] | frozenset[str], timeout: float) -> dict:
        wait_until(lambda: self.status(task_id)["state"] in states, timeout, f"{task_id} {states}")
        return self.status(task_id)

    def wait_step(self, task_id: str, step: int, timeout: float = 15) -> None:
        def reached() -> bool:
            s = self.status(task_id)
            return s["state"] == "running" and s["progress"]["step"] >= step

        wait_until(reached, timeout, f"{task_id} at step {step}")

    def states(self, task_id: str) -> list[tuple[str, str | None]]:
        return [
            (e.data["state"], e.data.get("worker"))
            for e in self.svc.tail(task_id, 10_000)
            if e.kind == "state"
        ]

    def assert_clean(self) -> None:
        """Nothing pending on the stream, nothing running, no delayed retries left."""
        client = self.rt.redis()[0]
        k = Keys()
        assert client.xpending(k.task_queue("default"), "workers")["pending"] == 0
        assert client.zcard(k.task_running()) == 0
        assert client.zcard(k.task_delayed("default")) == 0

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.rt.close()


@pytest.fixture
def harness(redis_url: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(redis_url, tmp_path)
    yield h
    h.close()


def test_sigkill_mid_task_loses_nothing(harness: Harness) -> None:
    h = harness
    task = h.svc.submit("selftest", {"steps": 30, "step_seconds": 0.05})
    a = h.worker("A")
    h.wait_step(task["id"], 5)
    a.signal(signal.SIGKILL)
    a.wait(5)
    b = h.worker("B")
    final = h.wait_state(task["id"], TERMINAL, 20)
    assert final["state"] == "succeeded"
    assert final["attempt"] == 2 and final["worker"] == "B"
    assert final["result"]["resumed_from"] >= 4  # from the checkpoint, not from scratch
    assert final["last_error"]["type"] == "WorkerLost"
    assert h.states(task["id"]) == [
        ("queued", None),
        ("running", "A"),
        ("queued", None),  # the lease lapsed: requeued by B's housekeeper
        ("running", "B"),
        ("succeeded", None),
    ]
    h.assert_clean()
    b.signal(signal.SIGTERM)
    assert b.wait(10) == 0


def test_stalled_worker_cannot_finish_a_reassigned_task(harness: Harness) -> None:
    h = harness
    task = h.svc.submit("selftest", {"steps": 40, "step_seconds": 0.05})
    a = h.worker("A")
    h.wait_step(task["id"], 3)
    a.signal(signal.SIGSTOP)  # stalls past its lease, holding the task
    h.worker("B")
    wait_until(lambda: h.status(task["id"]).get("worker") == "B", 15, "reassignment to B")
    a.signal(signal.SIGCONT)  # A wakes up believing it still runs the task
    final = h.wait_state(task["id"], TERMINAL, 20)
    assert final["state"] == "succeeded" and final["worker"] == "B" and final["attempt"] == 2
    assert final["result"]["attempt"] == 2
    terminal = [s for s, _ in h.states(task["id"]) if s in TERMINAL]
    assert terminal == ["succeeded"]
    # A found out through its fencing token and wrote nothing more
    wait_until(lambda: "lease" in a.output() or "abandoned" in a.output(), 10, "A noticing")
    a.signal(signal.SIGTERM)
    assert a.wait(10) == 0
    assert "abandoned" in a.output()
    assert h.status(task["id"])["state"] == "succeeded"
    h.assert_clean()


def test_sigterm_hands_running_tasks_back_at_once(redis_url: str, tmp_path: Path) -> None:
    h = Harness(redis_url, tmp_path, YICHUI_TASK_LEASE="60", YICHUI_TASK_HEARTBEAT="0.25")
    try:
        task = h.svc.submit("selftest", {"steps": 200, "step_seconds": 0.05})
        a = h.worker("A")
        h.wait_step(task["id"], 3)
        sent = time.monotonic()
        a.signal(signal.SIGTERM)
        assert a.wait(10) == 0
        status = h.status(task["id"])
        assert status["state"] == "queued"  # at once, not after the 60 s lease
        assert status["attempt"] == 0  # a hand-back is not an attempt
        assert time.monotonic() - sent < 10
        assert "handed back" in a.output()
        h.worker("B")
        h.wait_step(task["id"], 5)
        running = h.status(task["id"])
        assert running["worker"] == "B" and running["attempt"] == 1
        assert running["fence"] == 2  # unlike the attempt, the fence never repeats
        assert h.svc.cancel(task["id"])["outcome"] == "requested"
        final = h.wait_state(task["id"], TERMINAL, 10)
        assert final["state"] == "cancelled"
        h.assert_clean()
    finally:
        h.close()


def test_poison_task_that_kills_its_worker_ends_dead(harness: Harness) -> None:
    h = harness
    task = h.svc.submit(
        "selftest", {"steps": 5, "step_seconds": 0.02, "crash_at": 2}, max_attempts=2
    )
    for name in ("A", "B"):  # each run kills its worker
        w = h.worker(name)
        assert w.wait(20) == 70
    h.worker("C")  # finds the second lease lapsed and gives up
    final = h.wait_state(task["id"], TERMINAL, 20)
    assert final["state"] == "dead"
    assert final["error"]["type"] == "WorkerLost"
    assert "gave up after 2 attempts" in final["error"]["message"]
    assert "worker B" in final["error"]["message"]
    # C is unharmed and keeps working
    after = h.svc.submit("noop", {})
    assert h.wait_state(after["id"], TERMINAL, 10)["state"] == "succeeded"
    h.assert_clean()


def test_long_healthy_task_runs_once_and_its_status_never_expires(
    redis_url: str, tmp_path: Path
) -> None:
    h = Harness(redis_url, tmp_path, YICHUI_TASK_TTL="1")
    try:  # runs 3 s: twice the 1.5 s lease and three times the status TTL
        task = h.svc.submit("selftest", {"steps": 30, "step_seconds": 0.1})
        h.worker("A")
        h.wait_step(task["id"], 2)
        h.worker("B")  # idle, housekeeping: must never take the task from a healthy A
        client = h.rt.redis()[0]
        key = Keys().task_status(task["id"])
        time.sleep(1.5)  # longer than task_ttl
        assert client.ttl(key) == -1 and h.status(task["id"])["state"] == "running"
        beat = h.status(task["id"])["heartbeat"]
        wait_until(lambda: h.status(task["id"])["heartbeat"] > beat, 5, "a newer heartbeat")
        final = h.wait_state(task["id"], TERMINAL, 15)
        assert (final["state"], final["attempt"], final["worker"]) == ("succeeded", 1, "A")
        assert h.states(task["id"]) == [("queued", None), ("running", "A"), ("succeeded", None)]
        assert 0 < client.pttl(key) <= 1100
        assert 0 < client.pttl(Keys().task_log(task["id"])) <= 1100
    finally:
        h.close()


def test_follow_resumes_without_gaps_when_its_connection_drops(harness: Harness) -> None:
    h = harness
    steps = 40
    task = h.svc.submit("selftest", {"steps": steps, "step_seconds": 0.05})
    h.worker("A")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "yichui.cli.main", "tasks", "watch", task["id"], "--json"],
        env=h.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    admin = h.rt.redis()[0]
    stop = threading.Event()
    kills = 0

    def cut_readers() -> None:  # kill every blocked XREAD: the follower's and the watcher's
        nonlocal kills
        while not stop.wait(0.2):
            for c in admin.client_list():
                if c.get("cmd") == "xread":
                    try:
                        admin.client_kill_filter(_id=c["id"])
                        kills += 1
                    except redis.ResponseError:
                        pass

    cutter = threading.Thread(target=cut_readers, daemon=True)
    cutter.start()
    lines = [e.data["line"] for e in h.svc.follow(task["id"]) if e.kind == "log"]
    stop.set()
    cutter.join()
    out, _err = watcher.communicate(timeout=30)
    assert kills >= 3, "the test must actually cut connections"
    expected = [f"step {i}/{steps}" for i in range(1, steps + 1)]
    assert [ln for ln in lines if ln.startswith("step ")] == expected
    assert watcher.returncode == 0
    events = [orjson.loads(line) for line in out.splitlines()]
    watched = [e["line"] for e in events if e["kind"] == "log" and e["line"].startswith("step ")]
    assert watched == expected
    assert events[-1]["kind"] == "state" and events[-1]["state"] == "succeeded"


def test_redis_killed_and_restarted_with_aof(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis", aof=True).start()
    h = Harness(server.url, tmp_path, YICHUI_TASK_LEASE="3", YICHUI_TASK_HEARTBEAT="0.25")
    try:
        ids = [
            h.svc.submit("selftest", {"steps": 10, "step_seconds": 0.05})["id"] for _ in range(4)
        ]
        h.worker("A")
        h.wait_step(ids[0], 3)
        server.kill()  # SIGKILL: only what the AOF holds survives
        time.sleep(1.0)
        server.start()
        for task_id in ids:  # queued and running ones alike are still there and complete
            assert h.wait_state(task_id, TERMINAL, 30)["state"] == "succeeded"
        assert "Redis unreachable" in h.workers[0].output()
        h.assert_clean()
    finally:
        h.close()
        server.stop()


def test_redis_unreachable(tmp_path: Path) -> None:
    port = free_port()
    env = worker_env(
        f"redis://127.0.0.1:{port}/0",
        tmp_path / "data",
        YICHUI_REDIS_CONNECT_TIMEOUT="0.5",
        YICHUI_REDIS_RETRIES="0",
    )
    cli = subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", "tasks", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode != 0
    assert cli.stderr.splitlines()[0].startswith("error: Redis at")
    assert "Traceback" not in cli.stderr
    # a worker started before Redis waits for it, then works
    w = WorkerProcess(env, "early", tmp_path).start()
    try:
        wait_until(lambda: "waiting for it" in w.output(), 15, "the worker to wait")
        assert w.proc is not None and w.proc.poll() is None
        server = RedisProcess(tmp_path / "redis", port=port).start()
        try:
            rt = Runtime(load_settings(redis_url=server.url, data_dir=tmp_path / "data"))
            task = rt.tasks.submit("noop", {})
            wait_until(lambda: rt.tasks.get(task["id"])["state"] == "succeeded", 20, "the task")
            rt.close()
        finally:
            server.stop()
    finally:
        w.stop()
