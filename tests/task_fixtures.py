"""Fixtures and helpers of the task engine tests (registered in conftest)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from yichui.config import Settings, load_settings
from yichui.runtime import Runtime
from yichui.state.keys import Keys
from yichui.state.task_store import TERMINAL, LogEntry, TaskStore
from yichui.tasks.service import TaskService
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


def burst(worker: Worker, timeout: float = 30.0) -> Counter[str]:
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


def run_burst(rt: Runtime) -> Counter[str]:
    return burst(rt.worker(burst=True))


@contextlib.contextmanager
def worker_thread(worker: Worker) -> Iterator[Worker]:
    """A non-burst worker running in a thread while the test acts."""
    t = threading.Thread(target=lambda: worker.run(install_signals=False))
    t.start()
    try:
        yield worker
    finally:
        worker.stop(hand_back=False)
        t.join(20)
        assert not t.is_alive(), "worker did not stop"


def wait_state(svc: TaskService, task_id: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.get(task_id)["state"] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"{task_id} still {svc.get(task_id)['state']}, expected {state}")


def log_of(store: TaskStore, task_id: str) -> list[LogEntry]:
    return store.log_entries(task_id, count=100_000)


def state_changes(entries: list[LogEntry]) -> list[str]:
    return [e.data["state"] for e in entries if e.kind == "state"]


def terminal_entries(entries: list[LogEntry]) -> int:
    return sum(1 for s in state_changes(entries) if s in TERMINAL)


def claim_one(store: TaskStore, consumer: str, token: str, lease_ms: int = 60_000) -> Any:
    store.ensure_group(Q)
    deliveries = store.read(Q, consumer, block_ms=200)
    assert len(deliveries) == 1
    entry, task_id = deliveries[0]
    claim = store.claim(task_id, entry, queue=Q, worker=consumer, token=token, lease_ms=lease_ms)
    assert claim is not None
    return claim
