"""The task engine against a real Redis: leases and fencing, orphaned deliveries, stale
workers, and regressions found in review."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import redis

from tests.task_fixtures import (
    burst,
    claim_one,
    log_of,
    run_burst,
    state_changes,
    terminal_entries,
)
from yichui.runtime import Runtime
from yichui.state.keys import Keys
from yichui.state.task_store import GROUP
from yichui.tasks.context import TaskContext
from yichui.tasks.service import TaskService
from yichui.tasks.types import NoopArgs, TaskType, TaskTypes
from yichui.tasks.worker import Worker

Q = "default"
KEYS = Keys()

# -- leases and deliveries --------------------------------------------------------------------


def test_lost_lease_fences_the_old_holder(rt: Runtime, redis_client: redis.Redis) -> None:
    store = rt.task_store
    store.enqueue("fenced", "noop", {}, queue=Q, max_attempts=3)
    first = claim_one(store, "wa", "A", lease_ms=1)
    assert first.attempt == 1
    time.sleep(0.05)
    counts = store.housekeep(Q, "keeper", orphan_idle_ms=60_000)
    assert counts["expired"] == 1
    status = store.get("fenced")
    assert status is not None and status["state"] == "queued"
    assert status["last_error"]["type"] == "WorkerLost"
    second = claim_one(store, "wb", "B")
    assert second.attempt == 2

    key, log_key = KEYS.task_status("fenced"), KEYS.task_log("fenced")
    before, log_len = redis_client.hgetall(key), redis_client.xlen(log_key)
    assert store.report("fenced", Q, "A", progress={"step": 1}, logs=[{"line": "stale"}]) == 0
    assert store.finish("fenced", Q, "A", "succeeded", {"by": "A"}) is False
    assert store.finish("fenced", Q, "A", "retry", {"type": "X"}, retry_delay=0) is False
    assert store.release("fenced", Q, "A") == 0
    assert store.heartbeat(Q, "wa", 60_000, {"id": "wa"}, [("fenced", "A")]) == [0]
    assert redis_client.hgetall(key) == before
    assert redis_client.xlen(log_key) == log_len

    assert store.finish("fenced", Q, "B", "succeeded", {"by": "B"}) is True
    final = store.get("fenced")
    assert final is not None
    assert final["state"] == "succeeded" and final["result"] == {"by": "B"}
    assert final["attempt"] == 2
    entries = log_of(store, "fenced")
    assert state_changes(entries) == ["queued", "running", "queued", "running", "succeeded"]
    assert terminal_entries(entries) == 1
    assert redis_client.xpending(KEYS.task_queue(Q), GROUP)["pending"] == 0
    assert redis_client.xlen(KEYS.task_queue(Q)) == 0


def test_orphaned_delivery_is_redelivered(rt: Runtime, redis_client: redis.Redis) -> None:
    store = rt.task_store
    store.enqueue("orphan", "noop", {"echo": "hi"}, queue=Q, max_attempts=3)
    store.ensure_group(Q)
    assert [tid for _, tid in store.read(Q, "ghost", block_ms=200)] == ["orphan"]
    stream = KEYS.task_queue(Q)
    assert redis_client.xpending(stream, GROUP)["pending"] == 1
    time.sleep(0.1)
    counts = store.housekeep(Q, "other", orphan_idle_ms=50)
    assert counts["orphans"] == 1
    assert redis_client.xpending(stream, GROUP)["pending"] == 0
    assert redis_client.xlen(stream) == 1  # a fresh delivery, not yet read
    assert run_burst(rt) == Counter({"succeeded": 1})
    status = store.get("orphan")
    assert status is not None
    assert status["state"] == "succeeded" and status["attempt"] == 1
    assert status["result"] == {"echo": "hi"}


# -- regressions ------------------------------------------------------------------------------


def test_cancel_requested_then_retryable_failure_ends_cancelled(rt: Runtime) -> None:
    store = rt.task_store
    store.enqueue("c1", "noop", {}, queue=Q, max_attempts=3)
    claim_one(store, "w1", "T")
    assert store.cancel("c1") == ("requested", "running")
    # the run failed (retryably) before it noticed the cancel: the worker asks for a retry
    assert store.finish("c1", Q, "T", "retry", {"type": "RuntimeError", "message": "x"})
    status = store.get("c1")
    assert status is not None
    assert status["state"] == "cancelled"


def test_burst_worker_stops_when_its_own_queue_is_empty(rt: Runtime, svc: TaskService) -> None:
    svc.submit("noop", {}, queue="elsewhere")
    assert burst(rt.worker(burst=True), timeout=3.0) == Counter()


def _unstorable(ctx: TaskContext, args: NoopArgs) -> dict[str, Any]:
    return {"handle": object()}


def test_result_that_cannot_be_stored_fails_without_retries(rt: Runtime) -> None:
    types = TaskTypes()
    types.register(TaskType("unstorable", NoopArgs, "tests.test_tasks_leases:_unstorable"))
    svc = TaskService(rt.task_store, rt.settings, types)
    task = svc.submit("unstorable", {})
    worker = Worker(rt.task_store, types, lease=1.0, heartbeat=0.1, burst=True)
    assert burst(worker) == Counter({"failed": 1})
    status = svc.get(task["id"])
    assert (status["state"], status["attempt"]) == ("failed", 1)
    assert "cannot be stored as JSON" in status["error"]["message"]


def test_follow_of_a_retried_task_goes_on_past_the_old_end(rt: Runtime, svc: TaskService) -> None:
    task = svc.submit("noop", {"echo": "again"})
    svc.cancel(task["id"])
    svc.retry(task["id"])
    assert run_burst(rt) == Counter({"succeeded": 1})
    states = [e.data["state"] for e in svc.follow(task["id"]) if e.kind == "state"]
    assert states == ["queued", "cancelled", "queued", "running", "succeeded"]


def test_silent_workers_are_forgotten(rt: Runtime, redis_client: redis.Redis) -> None:
    store = rt.task_store
    store.ensure_group(Q)
    now_ms = int(redis_client.time()[0]) * 1000
    store.heartbeat(Q, "alive", 1000, {"id": "alive", "queue": Q, "running": []}, [])
    redis_client.hset(
        KEYS.task_workers(),
        "killed",
        json.dumps({"id": "killed", "queue": Q, "running": [], "heartbeat": now_ms - 600_000}),
    )
    store.read(Q, "killed", block_ms=1)  # the killed worker's consumer, nothing pending
    time.sleep(0.2)
    assert store.forget_workers(Q, stale_ms=100_000) == ["killed"]
    assert [w["id"] for w in store.workers()] == ["alive"]
    assert store.workers()[0]["running"] == []  # a list, though Lua writes {} for []
    consumers = redis_client.xinfo_consumers(KEYS.task_queue(Q), GROUP)
    assert consumers == [] or all(c["idle"] < 100_000 for c in consumers)
    store.forget_workers(Q, stale_ms=100)
    assert redis_client.xinfo_consumers(KEYS.task_queue(Q), GROUP) == []
