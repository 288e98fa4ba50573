"""The task engine's Redis side: queue stream, statuses, leases, logs and indexes.

Workers and the CLI speak to :class:`TaskStore`; it speaks Redis. Every state change is one Lua
script from :mod:`yichui.state.task_lua`, so a status, its index entries, its log and the stream
acknowledgement never disagree, even when a worker dies between two commands.
"""

from __future__ import annotations

import contextlib
import enum
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from yichui.errors import StateError
from yichui.state import task_lua
from yichui.state.codec import dumps, loads
from yichui.state.connection import REDIS_ERRORS, SyncRedis, state_errors
from yichui.state.durability import Durability
from yichui.state.keys import Keys

GROUP = "workers"
"""The consumer group every worker of a queue joins."""


class TaskState(enum.StrEnum):
    """Where a task is in its life.

    The values are what the Lua scripts of :mod:`yichui.state.task_lua` write into a status
    and its per-state index, and what users read in ``tasks list``; as a ``StrEnum`` a member
    equals its value, so a state read back from Redis compares and looks up as one.
    """

    QUEUED = "queued"
    """Waiting for a worker, or waiting out a retry backoff."""
    RUNNING = "running"
    """Claimed by a worker, which holds a lease on it."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """The handler raised an error that is not retryable."""
    CANCELLED = "cancelled"
    DEAD = "dead"
    """Retries exhausted, or its worker lost at the last attempt: dead-lettered."""


STATES: tuple[TaskState, ...] = tuple(TaskState)
"""Every state, in the order of a task's life (also the order of ``counts()``)."""
TERMINAL: frozenset[TaskState] = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.DEAD}
)
"""The final states: a task in one of them runs no more unless it is retried."""

_INT_FIELDS = ("attempt", "max_attempts", "fence")
_TIME_FIELDS = ("created", "started", "finished", "updated", "heartbeat", "retry_at", "cancel")
"""Stored as ms on the Redis clock, returned as seconds since the epoch."""
_JSON_FIELDS = ("args", "progress", "error", "last_error", "result", "checkpoint")


@dataclass(frozen=True, slots=True)
class Claim:
    """A task this worker now holds, with the token that fences its writes."""

    id: str
    token: str
    attempt: int
    max_attempts: int
    type: str
    args: dict[str, Any]
    checkpoint: Any
    fence: int
    """Grows by one at every claim of the task (hand-backs included), never repeats."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a task's log stream: ``kind`` is log, progress or state."""

    id: str
    kind: str
    data: dict[str, Any]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_status(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A status hash as a plain dict: numbers as numbers, JSON fields parsed, ms -> seconds."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key, text = _s(k), _s(v)
        if key in _JSON_FIELDS:
            out[key] = loads(text)
        elif key in _INT_FIELDS:
            out[key] = int(text)
        elif key in _TIME_FIELDS:
            out[key] = int(text) / 1000.0
        else:
            out[key] = text
    out.pop("token", None)  # the fencing token never leaves the state layer
    out.pop("msg", None)  # the stream entry of the current delivery: internal
    progress = out.get("progress") or {}
    out["progress"] = {"step": 0, "total": None, "percent": None, "unit": "step", **progress}
    return out


class TaskStore:
    """Atomic operations on tasks of one namespace::

    store = TaskStore(client, Keys(), ttl=7200)
    store.enqueue("t1", "selftest", {"steps": 3}, queue="default", max_attempts=3)
    """

    def __init__(
        self,
        client: SyncRedis,
        keys: Keys,
        *,
        ttl: int,
        jitter: float = 0.1,
        log_max: int = 5000,
        durability: str = "none",
        replicas: int = 1,
        durability_timeout: float = 1.0,
    ) -> None:
        self.client: Any = client  # redis-py's stubs type replies too loosely to help here
        self.keys = keys
        self.ttl = ttl
        self.jitter = jitter
        self.log_max = log_max
        self.durability = Durability(durability, replicas=replicas, timeout=durability_timeout)
        """What :meth:`enqueue` waits for (``task_durability``)."""
        self._scripts = {
            name: client.register_script(getattr(task_lua, name))
            for name in (
                "ENQUEUE",
                "CLAIM",
                "REPORT",
                "FINISH",
                "RELEASE",
                "EXPIRE_LEASE",
                "PROMOTE",
                "ORPHAN",
                "CANCEL",
                "RETRY",
                "DUE",
                "HEARTBEAT",
                "BACKLOG",
            )
        }
        self._index_keys = [keys.task_index(s) for s in STATES]

    # -- helpers --------------------------------------------------------------------------------
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000 * (1.0 + random.uniform(-self.jitter, self.jitter)))

    def _keep_ms(self) -> int:
        return int(self.ttl * 1000 * (1.0 + self.jitter))

    def _run(self, script: str, task_id: str, queue: str, *args: Any, client: Any = None) -> Any:
        k = self.keys
        keys = [
            k.task_status(task_id),
            k.task_log(task_id),
            k.task_queue(queue),
            k.task_running(),
            k.task_delayed(queue),
            *self._index_keys,
        ]
        argv = [task_id, k.task_events(), self.log_max, GROUP, *args]
        return self._scripts[script](keys=keys, args=argv, client=client)

    def queue_of(self, task_id: str) -> str | None:
        q = self.client.hget(self.keys.task_status(task_id), "queue")
        return None if q is None else _s(q)

    # -- producers ------------------------------------------------------------------------------
    @state_errors
    def enqueue(
        self,
        task_id: str,
        type_: str,
        args: Mapping[str, Any],
        *,
        queue: str,
        max_attempts: int,
        delay: float = 0.0,
        tenant: str = "local",
    ) -> tuple[bool, str, dict[str, Any]]:
        """Queue a task unless ``task_id`` exists: -> (created, type, args) of the stored task.
        ``tenant`` is recorded as the task's owner (``status["tenant"]``)."""
        payload = dumps(dict(args)).decode()
        argv = (type_, payload, queue, max_attempts, int(delay * 1000), tenant)
        if self.durability.mode == "none":
            res = self._run("ENQUEUE", task_id, queue, *argv)
        else:  # every task key is in the queue's slot
            res = self.durability.write(
                self.client,
                self.keys.task_queue(queue),
                lambda pipe: self._run("ENQUEUE", task_id, queue, *argv, client=pipe),
                what=f"task {task_id} queued",
            )
        if int(res[0]) == 1:
            return True, type_, dict(args)
        return False, _s(res[1]), loads(res[2]) if res[2] else {}

    @state_errors
    def cancel(self, task_id: str, reason: str = "cancelled by user") -> tuple[str, str]:
        """-> (outcome, state): cancelled | requested | unchanged | missing."""
        queue = self.queue_of(task_id) or "default"
        out = self._run("CANCEL", task_id, queue, self._ttl_ms(), self._keep_ms(), reason)
        return _s(out[0]), _s(out[1])

    @state_errors
    def retry(self, task_id: str, max_attempts: int | None = None) -> tuple[bool, str]:
        """Requeue a failed, dead or cancelled task -> (requeued, state it was in, or
        ``missing``)."""
        queue = self.queue_of(task_id) or "default"
        arg = "" if max_attempts is None else str(max_attempts)
        out = self._run("RETRY", task_id, queue, arg)
        return (True, TaskState.QUEUED) if int(out[0]) == 1 else (False, _s(out[1]))

    # -- workers --------------------------------------------------------------------------------
    def ensure_group(self, queue: str) -> None:
        """Create the queue stream and its consumer group (idempotent; from the start, so
        entries queued before any worker existed are delivered)."""
        try:
            self.client.xgroup_create(self.keys.task_queue(queue), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, queue: str, consumer: str, *, block_ms: int) -> list[tuple[str, str]]:
        """Block up to ``block_ms`` for one new delivery -> [(entry id, task id)]."""
        stream = self.keys.task_queue(queue)
        try:
            resp = self.client.xreadgroup(GROUP, consumer, {stream: ">"}, count=1, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group(queue)  # the stream was deleted under us: start over
            return []
        out: list[tuple[str, str]] = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                task_id = fields.get(b"id") if fields else None
                if task_id is None:  # not ours: drop it so it is never seen again
                    self.client.xack(stream, GROUP, entry_id)
                    self.client.xdel(stream, entry_id)
                    continue
                out.append((_s(entry_id), _s(task_id)))
        return out

    def claim(
        self, task_id: str, entry_id: str, *, queue: str, worker: str, token: str, lease_ms: int
    ) -> Claim | None:
        """Take a delivered task: state running, a fresh token, a lease. None if the delivery
        is stale (the task was cancelled, finished or requeued meanwhile)."""
        res = self._run("CLAIM", task_id, queue, entry_id, worker, token, lease_ms)
        if int(res[0]) != 1:
            return None
        checkpoint = loads(res[4]) if res[4] else None
        return Claim(
            id=task_id,
            token=token,
            attempt=int(res[1]),
            max_attempts=int(res[5]),
            type=_s(res[2]),
            args=loads(res[3]),
            checkpoint=checkpoint,
            fence=int(res[6]),
        )

    def report(
        self,
        task_id: str,
        queue: str,
        token: str,
        *,
        progress: Mapping[str, Any] | None = None,
        checkpoint: Any = None,
        logs: Sequence[Mapping[str, Any]] = (),
    ) -> int:
        """Write progress, checkpoint and log lines under the token -> 0 lost, 1 ok, 2 cancel."""
        p = dumps(dict(progress)).decode() if progress is not None else ""
        c = dumps(checkpoint).decode() if checkpoint is not None else ""
        lines = [dumps(dict(e)).decode() for e in logs]
        return int(self._run("REPORT", task_id, queue, token, p, c, *lines))

    def finish(
        self,
        task_id: str,
        queue: str,
        token: str,
        outcome: str,
        payload: Any,
        *,
        retry_delay: float = 0.0,
        progress: Mapping[str, Any] | None = None,
    ) -> bool:
        """Terminal state (or a retry) + XACK in one script; False if the lease was lost."""
        p = dumps(dict(progress)).decode() if progress is not None else ""
        return bool(
            self._run(
                "FINISH",
                task_id,
                queue,
                token,
                outcome,
                dumps(payload).decode(),
                self._ttl_ms(),
                self._keep_ms(),
                int(retry_delay * 1000),
                p,
            )
        )

    def redeliver(self, task_id: str, queue: str, entry_id: str) -> int:
        """Put a read-but-unclaimed delivery back on the stream -> 1 redelivered, 0 its task
        runs, 2 it was stale and is dropped."""
        return int(self._run("ORPHAN", task_id, queue, entry_id))

    def release(self, task_id: str, queue: str, token: str) -> int:
        """Hand a running task back (worker shutting down) -> 0 lost, 1 requeued, 2 cancelled."""
        return int(self._run("RELEASE", task_id, queue, token, self._ttl_ms(), self._keep_ms()))

    def heartbeat(
        self,
        queue: str,
        worker: str,
        lease_ms: int,
        info: Mapping[str, Any],
        held: Sequence[tuple[str, str]],
    ) -> list[int]:
        """Renew the leases of ``held`` [(id, token)] and the worker's entry -> per task 0 lost,
        1 ok, 2 cancel requested."""
        k = self.keys
        keys = [k.task_running(), k.task_queue(queue), k.task_workers()]
        keys += [k.task_status(task_id) for task_id, _ in held]
        argv: list[Any] = [GROUP, worker, lease_ms, dumps(dict(info)).decode()]
        for task_id, token in held:
            argv += [task_id, token]
        return [int(x) for x in self._scripts["HEARTBEAT"](keys=keys, args=argv)]

    def backlog(self, queue: str) -> int:
        """Tasks of ``queue`` waiting for a worker (undelivered, or retries in backoff)."""
        k = self.keys
        return int(
            self._scripts["BACKLOG"](
                keys=[k.task_queue(queue), k.task_delayed(queue)], args=[GROUP]
            )
        )

    def pending(self, queue: str) -> int:
        """Entries of ``queue`` delivered to a worker and not acknowledged yet."""
        try:
            summary = self.client.xpending(self.keys.task_queue(queue), GROUP)
        except redis.ResponseError:  # no group yet: no worker ever read this queue
            return 0
        return int(summary.get("pending", 0) or 0)

    def holds_pending(self, queue: str, consumer: str) -> bool:
        """Whether ``consumer`` holds an entry of ``queue`` it has read and not acknowledged."""
        try:
            rows = self.client.xpending_range(
                self.keys.task_queue(queue), GROUP, min="-", max="+", count=1, consumername=consumer
            )
        except redis.ResponseError:  # no group yet
            return False
        return bool(rows)

    def now(self) -> float:
        """The Redis clock, in seconds (heartbeats are written on it)."""
        seconds, micros = self.client.time()
        return int(seconds) + int(micros) / 1e6

    def remove_worker(self, worker: str, queue: str) -> None:
        self.client.hdel(self.keys.task_workers(), worker)
        with contextlib.suppress(redis.ResponseError):
            self.client.xgroup_delconsumer(self.keys.task_queue(queue), GROUP, worker)

    def housekeep(self, queue: str, consumer: str, *, orphan_idle_ms: int) -> dict[str, int]:
        """Requeue tasks whose lease lapsed, promote due retries and redeliver entries read by
        a consumer that died before claiming them. Safe to run from every worker at once."""
        counts = {"expired": 0, "promoted": 0, "orphans": 0}
        k = self.keys
        lapsed, due = self._scripts["DUE"](
            keys=[k.task_running(), k.task_delayed(queue)], args=[100]
        )
        for raw in lapsed:
            task_id = _s(raw)
            q = self.queue_of(task_id) or queue
            if int(self._run("EXPIRE_LEASE", task_id, q, self._ttl_ms(), self._keep_ms())):
                counts["expired"] += 1
        for raw in due:
            counts["promoted"] += int(self._run("PROMOTE", _s(raw), queue))
        stream = k.task_queue(queue)
        resp = self.client.xautoclaim(stream, GROUP, consumer, orphan_idle_ms, "0-0", count=100)
        for entry_id, fields in resp[1] if len(resp) > 1 else []:
            orphan = fields.get(b"id") if fields else None
            if orphan is None:
                self.client.xack(stream, GROUP, entry_id)
                self.client.xdel(stream, entry_id)
                continue
            if self.redeliver(_s(orphan), queue, _s(entry_id)) == 1:
                counts["orphans"] += 1
        return counts

    # -- readers --------------------------------------------------------------------------------
    @state_errors
    def get(self, task_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self.keys.task_status(task_id))
        return decode_status(raw) if raw else None

    @state_errors
    def listing(
        self, states: Sequence[TaskState] = STATES, *, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` tasks in ``states`` (by time they entered it), newest first."""
        ids: list[tuple[float, str, TaskState]] = []
        pipe = self.client.pipeline(transaction=False)  # one round trip for every index
        for state in states:
            pipe.zrevrange(self.keys.task_index(state), 0, limit - 1, withscores=True)
        for state, rows in zip(states, pipe.execute(), strict=True):
            ids.extend((float(score), _s(raw), state) for raw, score in rows)
        ids.sort(reverse=True)
        ids = ids[:limit]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for _, task_id, _state in ids:
            pipe.hgetall(self.keys.task_status(task_id))
        out: list[dict[str, Any]] = []
        stale: list[tuple[TaskState, str]] = []
        for (_, task_id, state), raw in zip(ids, pipe.execute(), strict=True):
            if raw:
                out.append(decode_status(raw))
            else:
                stale.append((state, task_id))
        for state, task_id in stale:  # its status expired: forget it in the index too
            self.client.zrem(self.keys.task_index(state), task_id)
        return out

    @state_errors
    def counts(self) -> dict[str, int]:
        """How many tasks each state's index holds, keyed by state name, in ``STATES`` order."""
        pipe = self.client.pipeline(transaction=False)
        for key in self._index_keys:
            pipe.zcard(key)
        # Plain strings as keys: orjson (the CLI's and the API's JSON) refuses str subclasses there.
        names = (state.value for state in STATES)
        return dict(zip(names, (int(n) for n in pipe.execute()), strict=True))

    @state_errors
    def workers(self) -> list[dict[str, Any]]:
        raw = self.client.hgetall(self.keys.task_workers())
        out = sorted((loads(v) for v in raw.values()), key=lambda w: str(w.get("id")))
        for w in out:
            w["running"] = list(w.get("running") or [])  # Lua's cjson writes [] as {}
        return out

    def forget_workers(self, queue: str, *, stale_ms: int) -> list[str]:
        """Drop workers silent for ``stale_ms`` (killed ones never say goodbye): their entry
        and their consumer, once it holds no pending delivery. -> ids dropped."""
        now_ms = int(self.client.time()[0]) * 1000
        stream = self.keys.task_queue(queue)
        dropped: list[str] = []
        for w in self.workers():
            if w.get("queue") != queue or now_ms - int(w.get("heartbeat", 0)) < stale_ms:
                continue
            self.client.hdel(self.keys.task_workers(), w["id"])
            dropped.append(str(w["id"]))
        try:
            consumers = self.client.xinfo_consumers(stream, GROUP)
        except redis.ResponseError:
            return dropped
        for c in consumers:
            name = _s(c["name"])
            if int(c["pending"]) == 0 and int(c["idle"]) >= stale_ms:
                self.client.xgroup_delconsumer(stream, GROUP, name)
        return dropped

    def log_entries(
        self, task_id: str, *, after: str = "0-0", block_ms: int | None = None, count: int = 500
    ) -> list[LogEntry]:
        """Entries after ``after`` (exclusive), blocking up to ``block_ms`` for new ones."""
        key = self.keys.task_log(task_id)
        resp = self.client.xread({key: after}, count=count, block=block_ms)
        out: list[LogEntry] = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                out.append(LogEntry(_s(entry_id), _s(fields[b"k"]), loads(fields[b"d"])))
        return out

    def _after(self, task_id: str, entry_id: str) -> bool:
        """Whether the log holds anything after ``entry_id`` (True when Redis cannot say)."""
        try:
            return bool(self.log_entries(task_id, after=entry_id, count=1))
        except REDIS_ERRORS:
            return True

    def _state(self, task_id: str) -> str | None:
        """The task's state; None when it is gone, "" when Redis cannot say right now."""
        try:
            status = self.get(task_id)
        except StateError:
            return ""
        return None if status is None else str(status.get("state"))

    def log_tail(self, task_id: str, n: int) -> list[LogEntry]:
        """The last ``n`` entries, oldest first."""
        key = self.keys.task_log(task_id)
        entries = self.client.xrevrange(key, count=n)
        return [LogEntry(_s(eid), _s(f[b"k"]), loads(f[b"d"])) for eid, f in reversed(entries)]

    def follow(
        self, task_id: str, *, after: str = "0-0", block_ms: int = 1000
    ) -> Iterator[LogEntry]:
        """Every entry after ``after`` until the task ends, surviving connection drops: it
        resumes from the last entry it yielded, so a reader never misses or repeats one."""
        last = after
        delay = 0.05
        while True:
            try:
                entries = self.log_entries(task_id, after=last, block_ms=block_ms)
                delay = 0.05
            except REDIS_ERRORS:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for n, entry in enumerate(entries, 1):
                last = entry.id
                yield entry
                if (
                    entry.kind == "state"
                    and entry.data.get("state") in TERMINAL
                    and n == len(entries)  # an earlier run's end, of a retried task, is not
                ):
                    state = self._state(task_id)
                    if state is None or (state in TERMINAL and not self._after(task_id, last)):
                        return
            if not entries:
                state = self._state(task_id)
                if state is None or state in TERMINAL:
                    # ended before we caught up: drain what is left, then stop
                    rest = self.log_entries(task_id, after=last)
                    yield from rest
                    return
