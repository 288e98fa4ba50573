"""What the CLI and the API call: queue, inspect, cancel and retry tasks, follow their logs."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from yichui.config import Settings, check_queue_name
from yichui.errors import (
    InvalidTaskArgsError,
    TaskConflictError,
    TaskNotFoundError,
    TaskStateError,
)
from yichui.metrics import Metrics
from yichui.state.task_store import STATES, LogEntry, TaskState, TaskStore
from yichui.tasks.types import TaskTypes, builtin_types

LOCAL_TENANT = "local"
"""The tenant of the CLI and of ``auth = "local"``: the owner of tasks nobody else submitted."""

_LISTING_CAP = 5000
"""Most tasks one listing reads to find a tenant's own."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def new_task_id() -> str:
    """Time-ordered and unique: ``t`` + ms since the epoch (base 36) + 48 random bits."""
    ms = int(time.time() * 1000)
    digits = ""
    while ms:
        ms, r = divmod(ms, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
    return f"t{digits}-{secrets.token_hex(6)}"


def _task_state(name: str) -> TaskState:
    """``name`` as a state; a user's typo is refused with the list of states."""
    try:
        return TaskState(name)
    except ValueError:
        raise InvalidTaskArgsError(
            f"unknown state {name!r}", hint=f"states: {', '.join(STATES)}"
        ) from None


class TaskService:
    """Tasks of one deployment::

    svc = TaskService(store, settings)
    task = svc.submit("selftest", {"steps": 5})
    svc.get(task["id"])["state"]      # 'queued', then 'running', ...
    """

    def __init__(
        self,
        store: TaskStore,
        settings: Settings,
        types: TaskTypes | None = None,
        *,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.settings = settings
        self.types = types or builtin_types()
        self.metrics = metrics or Metrics()

    def submit(
        self,
        type_: str,
        args: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        delay: float = 0.0,
        tenant: str = LOCAL_TENANT,
    ) -> dict[str, Any]:
        """Validate and queue a task; idempotent for a given ``task_id`` -> its status.
        ``tenant`` (who submits it) is recorded in the status."""
        task_type = self.types.get(type_)
        parsed = task_type.parse(args or {})
        stored_args = parsed.model_dump(mode="json")
        if task_id is not None and not _ID.fullmatch(task_id):
            raise InvalidTaskArgsError(
                f"invalid task id {task_id!r}: use 1-128 letters, digits, '_', '.', ':' or '-'"
            )
        if queue is not None:
            try:
                check_queue_name(queue)
            except ValueError as exc:
                raise InvalidTaskArgsError(f"invalid queue name {queue!r}: {exc}") from None
        if delay < 0:
            raise InvalidTaskArgsError("delay must be 0 or more seconds")
        if max_attempts is not None and max_attempts < 1:
            raise InvalidTaskArgsError("max_attempts must be at least 1")
        tid = task_id or new_task_id()
        attempts = max_attempts or task_type.max_attempts or self.settings.task_max_attempts
        created, stored_type, existing = self.store.enqueue(
            tid,
            type_,
            stored_args,
            queue=queue or self.settings.task_queue,
            max_attempts=attempts,
            delay=delay,
            tenant=tenant,
        )
        if created:
            self.metrics.tasks_submitted.labels(type_).inc()
        if not created and (stored_type != type_ or existing != stored_args):
            raise TaskConflictError(
                f"task id {tid!r} is taken by a {stored_type!r} task with other arguments",
                task_id=tid,
            )
        status = self.store.get(tid)
        if status is None:  # finished and expired between the two calls
            raise TaskNotFoundError(tid)
        status["created_now"] = created
        return status

    def get(self, task_id: str) -> dict[str, Any]:
        status = self.store.get(task_id)
        if status is None:
            raise TaskNotFoundError(task_id)
        return status

    def listing(
        self,
        states: Sequence[str] | None = None,
        *,
        limit: int = 50,
        offset: int = 0,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """The newest tasks in ``states`` (default: every state), newest first: ``limit`` of
        them after skipping ``offset``; only ``tenant``'s when given."""
        wanted = tuple(_task_state(s) for s in states) if states else STATES
        if tenant is None:
            return self.store.listing(wanted, limit=offset + limit)[offset:]
        want = offset + limit
        fetch = want
        while True:  # other tenants' tasks are skipped: read further until enough are found
            rows = self.store.listing(wanted, limit=fetch)
            mine = [t for t in rows if t.get("tenant", LOCAL_TENANT) == tenant]
            if len(mine) >= want or len(rows) < fetch or fetch >= _LISTING_CAP:
                return mine[offset:want]
            fetch = min(fetch * 4, _LISTING_CAP)

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def workers(self) -> list[dict[str, Any]]:
        """Every worker entry, each with ``alive``: a heartbeat within three intervals."""
        stale_after = 3 * self.settings.task_heartbeat
        out = self.store.workers()
        for w in out:
            w["heartbeat"] = w.get("heartbeat", 0) / 1000.0
            w["alive"] = time.time() - w["heartbeat"] < stale_after
        return out

    def alive_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.workers() if w["alive"]]

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel: a queued task never runs; a running one is told within a heartbeat."""
        outcome, _state = self.store.cancel(task_id)
        if outcome == "missing":
            raise TaskNotFoundError(task_id)
        status = self.get(task_id)
        status["outcome"] = outcome
        return status

    def retry(self, task_id: str, *, max_attempts: int | None = None) -> dict[str, Any]:
        """Run a failed, dead or cancelled task again, with a fresh attempt budget."""
        requeued, state = self.store.retry(task_id, max_attempts)
        if not requeued:
            if state == "missing":
                raise TaskNotFoundError(task_id)
            raise TaskStateError(
                f"task {task_id!r} is {state}; only failed, dead or cancelled tasks are retried",
                task_id=task_id,
            )
        return self.get(task_id)

    def follow(self, task_id: str, *, after: str = "0-0") -> Iterator[LogEntry]:
        """Log lines, progress and state changes until the task ends (see TaskStore.follow)."""
        self.get(task_id)
        return self.store.follow(task_id, after=after)

    def tail(self, task_id: str, n: int) -> list[LogEntry]:
        self.get(task_id)
        return self.store.log_tail(task_id, n)
