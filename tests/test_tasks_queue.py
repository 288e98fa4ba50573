"""The task engine against a real Redis: enqueue, workers, retries, cancels, leases, logs."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.helpers import make_model
from tests.task_fixtures import (
    burst,
    claim_one,
    log_of,
    run_burst,
    state_changes,
    terminal_entries,
    wait_state,
    worker_thread,
)
from yichui.config import Settings
from yichui.errors import (
    InvalidTaskArgsError,
    TaskConflictError,
    TaskNotFoundError,
    TaskStateError,
    UnknownTaskTypeError,
)
from yichui.runtime import Runtime
from yichui.state.keys import Keys
from yichui.state.task_store import GROUP, STATES
from yichui.tasks.context import TaskContext
from yichui.tasks.service import TaskService
from yichui.tasks.types import NoopArgs, TaskType, TaskTypes
from yichui.tasks.worker import Worker

Q = "default"
KEYS = Keys()

# -- enqueue ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "args", "kwargs", "error"),
    [
        ("nope", {}, {}, UnknownTaskTypeError),
        ("selftest", {"steps": "many"}, {}, InvalidTaskArgsError),
        ("selftest", {"steps": 0}, {}, InvalidTaskArgsError),
        ("selftest", {"steps": 3, "bogus": 1}, {}, InvalidTaskArgsError),
        ("noop", {}, {"task_id": "bad id!"}, InvalidTaskArgsError),
        ("noop", {}, {"task_id": "x" * 129}, InvalidTaskArgsError),
        ("noop", {}, {"max_attempts": 0}, InvalidTaskArgsError),
        ("download", {"name": "../etc/passwd"}, {}, InvalidTaskArgsError),
        ("download", {}, {}, InvalidTaskArgsError),
    ],
)
def test_bad_input_writes_nothing(
    svc: TaskService,
    redis_client: redis.Redis,
    type_: str,
    args: dict[str, Any],
    kwargs: dict[str, Any],
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        svc.submit(type_, args, **kwargs)
    assert redis_client.keys("*") == []
    assert svc.counts() == dict.fromkeys(STATES, 0)


def test_enqueue_is_idempotent_per_client_id(svc: TaskService, redis_client: redis.Redis) -> None:
    first = svc.submit("noop", {"echo": "a"}, task_id="job-1")
    assert first["created_now"] and first["state"] == "queued" and first["id"] == "job-1"
    again = svc.submit("noop", {"echo": "a"}, task_id="job-1")
    assert again["created_now"] is False and again["id"] == "job-1"
    assert svc.counts()["queued"] == 1
    assert redis_client.xlen(KEYS.task_queue(Q)) == 1  # queued once, not twice
    with pytest.raises(TaskConflictError):
        svc.submit("noop", {"echo": "b"}, task_id="job-1")
    with pytest.raises(TaskConflictError):
        svc.submit("selftest", {}, task_id="job-1")
    kept = svc.get("job-1")
    assert kept["type"] == "noop" and kept["args"] == {"echo": "a"}
    assert kept["state"] == "queued" and kept["attempt"] == 0
    assert svc.counts()["queued"] == 1
    assert redis_client.xlen(KEYS.task_queue(Q)) == 1


# -- running ----------------------------------------------------------------------------------


def test_burst_worker_runs_selftest(rt: Runtime, svc: TaskService) -> None:
    task = svc.submit("selftest", {"steps": 3, "step_seconds": 0.01})
    stats = run_burst(rt)
    assert stats == Counter({"succeeded": 1})
    status = svc.get(task["id"])
    assert status["state"] == "succeeded" and status["attempt"] == 1
    progress = status["progress"]
    assert progress["step"] == progress["total"] == 3
    assert progress["percent"] == 100.0
    assert status["result"] == {"steps": 3, "attempt": 1, "resumed_from": 0}
    assert "error" not in status and status["finished"] >= status["started"]
    entries = log_of(rt.task_store, task["id"])
    lines = [e.data["line"] for e in entries if e.kind == "log"]
    steps = [line for line in lines if line.startswith("step ")]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"]
    assert state_changes(entries) == ["queued", "running", "succeeded"]
    assert terminal_entries(entries) == 1
    # the state change is the last entry: every log line and progress update precedes it
    assert entries[-1].kind == "state" and entries[-1].data["state"] == "succeeded"


def test_ttl_only_once_finished(make_rt: Callable[..., Runtime], redis_client: redis.Redis) -> None:
    rt = make_rt(task_ttl=60)
    svc = rt.tasks
    task = svc.submit("noop", {})
    status_key, log_key = KEYS.task_status(task["id"]), KEYS.task_log(task["id"])
    assert redis_client.ttl(status_key) == -1
    assert redis_client.ttl(log_key) == -1
    assert run_burst(rt) == Counter({"succeeded": 1})
    jitter = rt.settings.ttl_jitter
    for key in (status_key, log_key):
        ttl = redis_client.ttl(key)
        assert 60 * (1 - jitter) - 1 <= ttl <= 60 * (1 + jitter) + 1, (key, ttl)


def test_retry_resumes_from_checkpoint(rt: Runtime, svc: TaskService) -> None:
    task = svc.submit("selftest", {"steps": 5, "step_seconds": 0, "fail_at": 3, "fail_attempts": 1})
    stats = run_burst(rt)
    assert stats == Counter({"retry": 1, "succeeded": 1})
    status = svc.get(task["id"])
    assert status["state"] == "succeeded" and status["attempt"] == 2
    assert status["result"]["attempt"] == 2
    assert status["result"]["resumed_from"] >= 1
    assert status["last_error"]["type"] == "TaskFailedError"
    assert "step 3" in status["last_error"]["message"]
    states = state_changes(log_of(rt.task_store, task["id"]))
    assert states == ["queued", "running", "queued", "running", "succeeded"]


def test_poison_task_goes_dead_and_worker_keeps_running(rt: Runtime, svc: TaskService) -> None:
    with worker_thread(rt.worker()) as worker:
        poison = svc.submit("selftest", {"steps": 2, "fail_at": 1}, max_attempts=3)
        wait_state(svc, poison["id"], "dead")
        status = svc.get(poison["id"])
        assert status["attempt"] == 3
        message = status["error"]["message"]
        assert "gave up after 3 attempts" in message
        assert "selftest failed at step 1" in message
        assert status["error"]["type"] == "TaskFailedError"
        lines = [e.data["line"] for e in log_of(rt.task_store, poison["id"]) if e.kind == "log"]
        failures = [ln for ln in lines if " failed: TaskFailedError" in ln]
        assert [f.split(" failed")[0] for f in failures] == [f"attempt {i}" for i in (1, 2, 3)]
        after = svc.submit("noop", {"echo": "still here"})
        wait_state(svc, after["id"], "succeeded")
        assert svc.get(after["id"])["result"] == {"echo": "still here"}
    assert worker.stats == Counter({"retry": 2, "dead": 1, "succeeded": 1})


def test_permanent_failure_is_not_retried(rt: Runtime, svc: TaskService) -> None:
    args = {"steps": 2, "step_seconds": 0, "fail_at": 1, "fail_permanent": True}
    task = svc.submit("selftest", args)
    assert run_burst(rt) == Counter({"failed": 1})
    status = svc.get(task["id"])
    assert status["state"] == "failed" and status["attempt"] == 1
    assert status["error"]["type"] == "TaskFailedError"
    assert "gave up" not in status["error"]["message"]


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_queued_task_never_runs(
    rt: Runtime, svc: TaskService, redis_client: redis.Redis
) -> None:
    task = svc.submit("selftest", {"steps": 2})
    cancelled = svc.cancel(task["id"])
    assert cancelled["outcome"] == "cancelled" and cancelled["state"] == "cancelled"
    assert run_burst(rt) == Counter()
    status = svc.get(task["id"])
    assert status["state"] == "cancelled" and status["attempt"] == 0
    assert status["error"]["type"] == "Cancelled"
    stream = KEYS.task_queue(Q)
    assert redis_client.xlen(stream) == 0
    assert redis_client.xpending(stream, GROUP)["pending"] == 0
    assert svc.counts() == {**dict.fromkeys(STATES, 0), "cancelled": 1}


def test_cancel_running_task_stops_within_heartbeats(rt: Runtime, svc: TaskService) -> None:
    with worker_thread(rt.worker()) as worker:
        task = svc.submit("selftest", {"steps": 1000, "step_seconds": 0.05})
        wait_state(svc, task["id"], "running")
        start = time.monotonic()
        answer = svc.cancel(task["id"])
        # the status is read after the request: the worker may have stopped the run already
        assert answer["outcome"] == "requested" and answer["state"] in ("running", "cancelled")
        wait_state(svc, task["id"], "cancelled", timeout=5)
        assert time.monotonic() - start < 2.0
    assert worker.stats == Counter({"cancelled": 1})
    status = svc.get(task["id"])
    assert status["error"]["type"] == "Cancelled"
    assert status["progress"]["step"] < 1000
    entries = log_of(rt.task_store, task["id"])
    assert "cancel requested" in [e.data["line"] for e in entries if e.kind == "log"]
    assert terminal_entries(entries) == 1


def test_cancel_finished_or_unknown(rt: Runtime, svc: TaskService) -> None:
    task = svc.submit("noop", {})
    run_burst(rt)
    answer = svc.cancel(task["id"])
    assert answer["outcome"] == "unchanged" and answer["state"] == "succeeded"
    assert svc.get(task["id"])["state"] == "succeeded"
    assert "error" not in svc.get(task["id"])
    assert terminal_entries(log_of(rt.task_store, task["id"])) == 1
    with pytest.raises(TaskNotFoundError):
        svc.cancel("no-such-task")


# -- manual retry -----------------------------------------------------------------------------


def test_manual_retry_of_dead_task(rt: Runtime, svc: TaskService) -> None:
    args = {"steps": 2, "step_seconds": 0, "fail_at": 1, "fail_attempts": 1}
    task = svc.submit("selftest", args, max_attempts=1)
    assert run_burst(rt) == Counter({"dead": 1})
    assert svc.get(task["id"])["attempt"] == 1
    retried = svc.retry(task["id"], max_attempts=2)
    assert retried["state"] == "queued" and retried["attempt"] == 0
    assert "error" not in retried and "finished" not in retried
    assert retried["max_attempts"] == 2
    # the attempts count from 1 again: attempt 1 fails again (fail_attempts=1), 2 succeeds
    assert run_burst(rt) == Counter({"retry": 1, "succeeded": 1})
    status = svc.get(task["id"])
    assert status["state"] == "succeeded" and status["attempt"] == 2
    with pytest.raises(TaskStateError):
        svc.retry(task["id"])
    assert svc.get(task["id"])["state"] == "succeeded"
    queued = svc.submit("noop", {})
    with pytest.raises(TaskStateError):
        svc.retry(queued["id"])
    assert svc.get(queued["id"])["state"] == "queued"
    with pytest.raises(TaskNotFoundError):
        svc.retry("no-such-task")


# -- listing ----------------------------------------------------------------------------------


def test_listing_by_state(rt: Runtime, svc: TaskService, redis_client: redis.Redis) -> None:
    done: list[str] = []
    with worker_thread(rt.worker()):
        for i in range(3):
            t = svc.submit("noop", {"echo": str(i)})
            wait_state(svc, t["id"], "succeeded")
            done.append(t["id"])
            time.sleep(0.01)  # distinct finish times (ms) for a well-defined order
        failed = svc.submit("selftest", {"steps": 1, "fail_at": 1, "fail_permanent": True})
        wait_state(svc, failed["id"], "failed")
    queued = svc.submit("noop", {})
    cancelled = svc.submit("noop", {})
    svc.cancel(cancelled["id"])

    rows = svc.listing(["succeeded"])
    assert [r["id"] for r in rows] == done[::-1]
    assert all(r["state"] == "succeeded" for r in rows)
    assert svc.counts() == {
        "queued": 1,
        "running": 0,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 1,
        "dead": 0,
    }
    every = svc.listing()
    assert sorted(r["id"] for r in every) == sorted(
        [*done, failed["id"], queued["id"], cancelled["id"]]
    )
    updated = [r["updated"] for r in every]
    assert updated == sorted(updated, reverse=True)
    assert [r["id"] for r in svc.listing(["failed", "cancelled"])] == [
        cancelled["id"],
        failed["id"],
    ]
    with pytest.raises(InvalidTaskArgsError):
        svc.listing(["bogus"])

    # a finished status that expired drops out of the listing and then out of its index
    gone = done[1]
    redis_client.delete(KEYS.task_status(gone))
    assert [r["id"] for r in svc.listing(["succeeded"])] == [done[2], done[0]]
    assert redis_client.zscore(KEYS.task_index("succeeded"), gone) is None
    assert svc.counts()["succeeded"] == 2
    with pytest.raises(TaskNotFoundError):
        svc.get(gone)


# -- progress ---------------------------------------------------------------------------------


def test_progress_reports_are_coalesced(rt: Runtime) -> None:
    store = rt.task_store
    store.enqueue("p1", "selftest", {}, queue=Q, max_attempts=1)
    claim = claim_one(store, "w1", "tok")
    ctx = TaskContext(store, claim, queue=Q, worker="w1", progress_interval=0.5)
    start = time.monotonic()
    for step in range(1, 2001):
        ctx.report(step, 2000, loss=1.0 / step)
    assert time.monotonic() - start < 2.0
    progress = [e for e in log_of(store, "p1") if e.kind == "progress"]
    assert 2 <= len(progress) <= 5, len(progress)
    assert progress[0].data["step"] == 1
    last = progress[-1].data
    assert last["step"] == last["total"] == 2000 and last["percent"] == 100.0
    assert last["unit"] == "step" and last["metrics"]["loss"] == pytest.approx(1 / 2000)
    assert store.get("p1")["progress"]["step"] == 2000  # type: ignore[index]


# -- errors -----------------------------------------------------------------------------------

_LEAK = "cannot reach redis://:s3cret@host:1/0 token=abc123 hf_AbCdEfGhIjKlMnOp"
_SECRETS = ("s3cret", "abc123", "hf_AbCdEfGhIjKlMnOp")


def _leaky(ctx: TaskContext, args: NoopArgs) -> dict[str, Any]:
    raise RuntimeError(_LEAK)


def test_error_messages_are_redacted(rt: Runtime, redis_client: redis.Redis) -> None:
    types = TaskTypes()
    types.register(TaskType("leaky", NoopArgs, "tests.test_tasks_queue:_leaky", max_attempts=1))
    svc = TaskService(rt.task_store, rt.settings, types)
    task = svc.submit("leaky", {})
    worker = Worker(
        rt.task_store, types, lease=1.0, heartbeat=0.1, progress_interval=0.05, burst=True
    )
    assert burst(worker) == Counter({"dead": 1})
    status = svc.get(task["id"])
    assert status["state"] == "dead" and status["attempt"] == 1
    message = status["error"]["message"]
    assert status["error"]["type"] == "RuntimeError"
    assert "cannot reach" in message and "***" in message
    stored = json.dumps(status) + json.dumps([e.data for e in log_of(rt.task_store, task["id"])])
    stored += repr(redis_client.hgetall(KEYS.task_status(task["id"])))
    for secret in _SECRETS:
        assert secret not in stored, secret


# -- download ---------------------------------------------------------------------------------


def test_download_task_pulls_from_mirror(
    rt: Runtime, svc: TaskService, settings: Settings, redis_client: redis.Redis
) -> None:
    assert settings.mirror_dir is not None
    make_model(settings.mirror_dir, "org/small", weight_bytes=4096)
    settings.models_path.mkdir(parents=True, exist_ok=True)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.model_events())
    try:
        task = svc.submit("download", {"name": "org/small", "source": "mirror"})
        assert run_burst(rt) == Counter({"succeeded": 1})
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not any(e["event"] == "pulled" for e in events):
            msg = pubsub.get_message(timeout=0.1)
            if msg is not None:
                events.append(json.loads(msg["data"]))
    finally:
        pubsub.close()
    pulled = [e for e in events if e["event"] == "pulled"]
    assert len(pulled) == 1 and pulled[0]["name"] == "org/small"

    status = svc.get(task["id"])
    assert status["state"] == "succeeded"
    result = status["result"]
    assert result["name"] == "org/small" and result["action"] == "installed"
    assert result["path"] and result["size"] and result["size"] >= 4096
    progress = status["progress"]
    assert progress["unit"] == "bytes"
    assert progress["step"] == progress["total"] and progress["total"] > 0
    assert progress["percent"] == 100.0
    found = rt.registry.status("org/small")
    assert found.status.exists and found.status.source == "mirror"
    assert (settings.models_path / "org/small/model.safetensors").stat().st_size == 4096
