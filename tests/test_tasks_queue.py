"""The task engine against a real Redis: enqueue, workers, retries, cancels, leases, logs."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.helpers import make_model
from yichui.config import Settings, load_settings
from yichui.errors import (
    InvalidTaskArgsError,
    TaskConflictError,
    TaskNotFoundError,
    TaskStateError,
    UnknownTaskTypeError,
)
from yichui.runtime import Runtime
from yichui.state.keys import Keys
from yichui.state.task_store import GROUP, STATES, TERMINAL, LogEntry, TaskStore
from yichui.tasks.context import TaskContext
from yichui.tasks.service import TaskService
from yichui.tasks.types import NoopArgs, TaskType, TaskTypes
from yichui.tasks.worker import Worker

Q = "default"
KEYS = Keys()

# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def make_rt(settings: Settings) -> Iterator[Callable[..., Runtime]]:
    """Runtimes on the test's Redis with fast leases, heartbeats and backoff; closed after."""
    made: list[Runtime] = []

    def make(**overrides: Any) -> Runtime:
        fast: dict[str, Any] = {
            "task_heartbeat": 0.1,
            "task_lease": 1.0,
            "task_backoff": 0.05,
            "task_backoff_max": 0.2,
            "task_progress_interval": 0.05,
            **overrides,
        }
        rt = Runtime(
            load_settings(
                data_dir=settings.data_dir,
                models_root=settings.models_path,
                redis_url=settings.redis_url,
                mirror_dir=settings.mirror_dir,
                **fast,
            )
        )
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


@pytest.fixture
def rt(make_rt: Callable[..., Runtime]) -> Runtime:
    return make_rt()


@pytest.fixture
def svc(rt: Runtime) -> TaskService:
    return rt.tasks


def _burst(worker: Worker, timeout: float = 30.0) -> Counter[str]:
    """Run a burst worker to completion, failing (not hanging) if it does not stop."""
    out: list[Counter[str]] = []
    t = threading.Thread(target=lambda: out.append(worker.run(install_signals=False)))
    t.start()
    t.join(timeout)
    if t.is_alive():
        worker.stop(hand_back=False)
        t.join(15)
        pytest.fail(f"burst worker still running after {timeout}s")
    return out[0]


def _run_burst(rt: Runtime) -> Counter[str]:
    return _burst(rt.worker(burst=True))


@contextlib.contextmanager
def _worker_thread(worker: Worker) -> Iterator[Worker]:
    """A non-burst worker running in a thread while the test acts."""
    t = threading.Thread(target=lambda: worker.run(install_signals=False))
    t.start()
    try:
        yield worker
    finally:
        worker.stop(hand_back=False)
        t.join(20)
        assert not t.is_alive(), "worker did not stop"


def _wait_state(svc: TaskService, task_id: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.get(task_id)["state"] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"{task_id} still {svc.get(task_id)['state']}, expected {state}")


def _log(store: TaskStore, task_id: str) -> list[LogEntry]:
    return store.log_entries(task_id, count=100_000)


def _states(entries: list[LogEntry]) -> list[str]:
    return [e.data["state"] for e in entries if e.kind == "state"]


def _terminal_entries(entries: list[LogEntry]) -> int:
    return sum(1 for s in _states(entries) if s in TERMINAL)


def _claim_one(store: TaskStore, consumer: str, token: str, lease_ms: int = 60_000) -> Any:
    store.ensure_group(Q)
    deliveries = store.read(Q, consumer, block_ms=200)
    assert len(deliveries) == 1
    entry, task_id = deliveries[0]
    claim = store.claim(task_id, entry, queue=Q, worker=consumer, token=token, lease_ms=lease_ms)
    assert claim is not None
    return claim


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
    stats = _run_burst(rt)
    assert stats == Counter({"succeeded": 1})
    status = svc.get(task["id"])
    assert status["state"] == "succeeded" and status["attempt"] == 1
    progress = status["progress"]
    assert progress["step"] == progress["total"] == 3
    assert progress["percent"] == 100.0
    assert status["result"] == {"steps": 3, "attempt": 1, "resumed_from": 0}
    assert "error" not in status and status["finished"] >= status["started"]
    entries = _log(rt.task_store, task["id"])
    lines = [e.data["line"] for e in entries if e.kind == "log"]
    steps = [line for line in lines if line.startswith("step ")]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"]
    assert _states(entries) == ["queued", "running", "succeeded"]
    assert _terminal_entries(entries) == 1
    # the state change is the last entry: every log line and progress update precedes it
    assert entries[-1].kind == "state" and entries[-1].data["state"] == "succeeded"


def test_ttl_only_once_finished(make_rt: Callable[..., Runtime], redis_client: redis.Redis) -> None:
    rt = make_rt(task_ttl=60)
    svc = rt.tasks
    task = svc.submit("noop", {})
    status_key, log_key = KEYS.task_status(task["id"]), KEYS.task_log(task["id"])
    assert redis_client.ttl(status_key) == -1
    assert redis_client.ttl(log_key) == -1
    assert _run_burst(rt) == Counter({"succeeded": 1})
    jitter = rt.settings.ttl_jitter
    for key in (status_key, log_key):
        ttl = redis_client.ttl(key)
        assert 60 * (1 - jitter) - 1 <= ttl <= 60 * (1 + jitter) + 1, (key, ttl)


def test_retry_resumes_from_checkpoint(rt: Runtime, svc: TaskService) -> None:
    task = svc.submit("selftest", {"steps": 5, "step_seconds": 0, "fail_at": 3, "fail_attempts": 1})
    stats = _run_burst(rt)
    assert stats == Counter({"retry": 1, "succeeded": 1})
    status = svc.get(task["id"])
    assert status["state"] == "succeeded" and status["attempt"] == 2
    assert status["result"]["attempt"] == 2
    assert status["result"]["resumed_from"] >= 1
    assert status["last_error"]["type"] == "TaskFailedError"
    assert "step 3" in status["last_error"]["message"]
    states = _states(_log(rt.task_store, task["id"]))
    assert states == ["queued", "running", "queued", "running", "succeeded"]


def test_poison_task_goes_dead_and_worker_keeps_running(rt: Runtime, svc: TaskService) -> None:
    with _worker_thread(rt.worker()) as worker:
        poison = svc.submit("selftest", {"steps": 2, "fail_at": 1}, max_attempts=3)
        _wait_state(svc, poison["id"], "dead")
        status = svc.get(poison["id"])
        assert status["attempt"] == 3
        message = status["error"]["message"]
        assert "gave up after 3 attempts" in message
        assert "selftest failed at step 1" in message
        assert status["error"]["type"] == "TaskFailedError"
        lines = [e.data["line"] for e in _log(rt.task_store, poison["id"]) if e.kind == "log"]
        failures = [ln for ln in lines if " failed: TaskFailedError" in ln]
        assert [f.split(" failed")[0] for f in failures] == [f"attempt {i}" for i in (1, 2, 3)]
        after = svc.submit("noop", {"echo": "still here"})
        _wait_state(svc, after["id"], "succeeded")
        assert svc.get(after["id"])["result"] == {"echo": "still here"}
    assert worker.stats == Counter({"retry": 2, "dead": 1, "succeeded": 1})


def test_permanent_failure_is_not_retried(rt: Runtime, svc: TaskService) -> None:
    args = {"steps": 2, "step_seconds": 0, "fail_at": 1, "fail_permanent": True}
    task = svc.submit("selftest", args)
    assert _run_burst(rt) == Counter({"failed": 1})
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
    assert _run_burst(rt) == Counter()
    status = svc.get(task["id"])
    assert status["state"] == "cancelled" and status["attempt"] == 0
    assert status["error"]["type"] == "Cancelled"
    stream = KEYS.task_queue(Q)
    assert redis_client.xlen(stream) == 0
    assert redis_client.xpending(stream, GROUP)["pending"] == 0
    assert svc.counts() == {**dict.fromkeys(STATES, 0), "cancelled": 1}


def test_cancel_running_task_stops_within_heartbeats(rt: Runtime, svc: TaskService) -> None:
    with _worker_thread(rt.worker()) as worker:
        task = svc.submit("selftest", {"steps": 1000, "step_seconds": 0.05})
        _wait_state(svc, task["id"], "running")
        start = time.monotonic()
        answer = svc.cancel(task["id"])
        # the status is read after the request: the worker may have stopped the run already
        assert answer["outcome"] == "requested" and answer["state"] in ("running", "cancelled")
        _wait_state(svc, task["id"], "cancelled", timeout=5)
        assert time.monotonic() - start < 2.0
    assert worker.stats == Counter({"cancelled": 1})
    status = svc.get(task["id"])
    assert status["error"]["type"] == "Cancelled"
    assert status["progress"]["step"] < 1000
    entries = _log(rt.task_store, task["id"])
    assert "cancel requested" in [e.data["line"] for e in entries if e.kind == "log"]
    assert _terminal_entries(entries) == 1


def test_cancel_finished_or_unknown(rt: Runtime, svc: TaskService) -> None:
    task = svc.submit("noop", {})
    _run_burst(rt)
    answer = svc.cancel(task["id"])
    assert answer["outcome"] == "unchanged" and answer["state"] == "succeeded"
    assert svc.get(task["id"])["state"] == "succeeded"
    assert "error" not in svc.get(task["id"])
    assert _terminal_entries(_log(rt.task_store, task["id"])) == 1
    with pytest.raises(TaskNotFoundError):
        svc.cancel("no-such-task")


# -- manual retry -----------------------------------------------------------------------------


def test_manual_retry_of_dead_task(rt: Runtime, svc: TaskService) -> None:
    args = {"steps": 2, "step_seconds": 0, "fail_at": 1, "fail_attempts": 1}
    task = svc.submit("selftest", args, max_attempts=1)
    assert _run_burst(rt) == Counter({"dead": 1})
    assert svc.get(task["id"])["attempt"] == 1
    retried = svc.retry(task["id"], max_attempts=2)
    assert retried["state"] == "queued" and retried["attempt"] == 0
    assert "error" not in retried and "finished" not in retried
    assert retried["max_attempts"] == 2
    # the attempts count from 1 again: attempt 1 fails again (fail_attempts=1), 2 succeeds
    assert _run_burst(rt) == Counter({"retry": 1, "succeeded": 1})
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
    with _worker_thread(rt.worker()):
        for i in range(3):
            t = svc.submit("noop", {"echo": str(i)})
            _wait_state(svc, t["id"], "succeeded")
            done.append(t["id"])
            time.sleep(0.01)  # distinct finish times (ms) for a well-defined order
        failed = svc.submit("selftest", {"steps": 1, "fail_at": 1, "fail_permanent": True})
        _wait_state(svc, failed["id"], "failed")
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
    claim = _claim_one(store, "w1", "tok")
    ctx = TaskContext(store, claim, queue=Q, worker="w1", progress_interval=0.5)
    start = time.monotonic()
    for step in range(1, 2001):
        ctx.report(step, 2000, loss=1.0 / step)
    assert time.monotonic() - start < 2.0
    progress = [e for e in _log(store, "p1") if e.kind == "progress"]
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
    assert _burst(worker) == Counter({"dead": 1})
    status = svc.get(task["id"])
    assert status["state"] == "dead" and status["attempt"] == 1
    message = status["error"]["message"]
    assert status["error"]["type"] == "RuntimeError"
    assert "cannot reach" in message and "***" in message
    stored = json.dumps(status) + json.dumps([e.data for e in _log(rt.task_store, task["id"])])
    stored += repr(redis_client.hgetall(KEYS.task_status(task["id"])))
    for secret in _SECRETS:
        assert secret not in stored, secret


# -- leases and deliveries --------------------------------------------------------------------


def test_lost_lease_fences_the_old_holder(rt: Runtime, redis_client: redis.Redis) -> None:
    store = rt.task_store
    store.enqueue("fenced", "noop", {}, queue=Q, max_attempts=3)
    first = _claim_one(store, "wa", "A", lease_ms=1)
    assert first.attempt == 1
    time.sleep(0.05)
    counts = store.housekeep(Q, "keeper", orphan_idle_ms=60_000)
    assert counts["expired"] == 1
    status = store.get("fenced")
    assert status is not None and status["state"] == "queued"
    assert status["last_error"]["type"] == "WorkerLost"
    second = _claim_one(store, "wb", "B")
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
    entries = _log(store, "fenced")
    assert _states(entries) == ["queued", "running", "queued", "running", "succeeded"]
    assert _terminal_entries(entries) == 1
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
    assert _run_burst(rt) == Counter({"succeeded": 1})
    status = store.get("orphan")
    assert status is not None
    assert status["state"] == "succeeded" and status["attempt"] == 1
    assert status["result"] == {"echo": "hi"}


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
        assert _run_burst(rt) == Counter({"succeeded": 1})
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


# -- regressions ------------------------------------------------------------------------------


def test_cancel_requested_then_retryable_failure_ends_cancelled(rt: Runtime) -> None:
    store = rt.task_store
    store.enqueue("c1", "noop", {}, queue=Q, max_attempts=3)
    _claim_one(store, "w1", "T")
    assert store.cancel("c1") == ("requested", "running")
    # the run failed (retryably) before it noticed the cancel: the worker asks for a retry
    assert store.finish("c1", Q, "T", "retry", {"type": "RuntimeError", "message": "x"})
    status = store.get("c1")
    assert status is not None
    assert status["state"] == "cancelled"


def test_burst_worker_stops_when_its_own_queue_is_empty(rt: Runtime, svc: TaskService) -> None:
    svc.submit("noop", {}, queue="elsewhere")
    assert _burst(rt.worker(burst=True), timeout=3.0) == Counter()


def _unstorable(ctx: TaskContext, args: NoopArgs) -> dict[str, Any]:
    return {"handle": object()}


def test_result_that_cannot_be_stored_fails_without_retries(rt: Runtime) -> None:
    types = TaskTypes()
    types.register(TaskType("unstorable", NoopArgs, "tests.test_tasks_queue:_unstorable"))
    svc = TaskService(rt.task_store, rt.settings, types)
    task = svc.submit("unstorable", {})
    worker = Worker(rt.task_store, types, lease=1.0, heartbeat=0.1, burst=True)
    assert _burst(worker) == Counter({"failed": 1})
    status = svc.get(task["id"])
    assert (status["state"], status["attempt"]) == ("failed", 1)
    assert "cannot be stored as JSON" in status["error"]["message"]


def test_follow_of_a_retried_task_goes_on_past_the_old_end(rt: Runtime, svc: TaskService) -> None:
    task = svc.submit("noop", {"echo": "again"})
    svc.cancel(task["id"])
    svc.retry(task["id"])
    assert _run_burst(rt) == Counter({"succeeded": 1})
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
