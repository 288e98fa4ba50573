"""``yichui worker``: run tasks from a queue, N at a time, on any number of hosts.

Threads of one worker::

    slot 1..N     XREADGROUP (blocking) -> claim (Lua) -> run the handler -> finish (Lua + XACK)
    housekeeper   every ``heartbeat`` s: renew the leases of running tasks (and learn of
                  cancels and lost leases), requeue tasks whose lease lapsed on a dead worker,
                  promote retries whose backoff is over, redeliver orphaned stream entries
    main          waits; on SIGTERM/SIGINT (or SIGHUP: the parent that started it died, see
                  :mod:`yichui.supervise`) hands running tasks back to the queue at once

Shutdown is bounded whatever Redis does: running tasks get ``grace`` seconds to finish or wind
down (a training run its type's ``stop_grace`` to save a checkpoint), an idle slot one blocking
read, and the hand-back and goodbye writes :data:`GOODBYE` seconds each; a write Redis did not
take in time is left to the lease, which lapses.

Delivery is at least once. The fencing token taken at claim guards every later write, so a
worker that stalled past its lease cannot report, finish or acknowledge a task that another
worker now runs. Redis outages are waited out with backoff; nothing is dropped meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, Protocol, TypeVar

from yichui.backoff import Backoff
from yichui.backoff import delay as jittered_delay
from yichui.errors import StateError, TaskFailedError, YichuiError
from yichui.metrics import Metrics
from yichui.state.codec import dumps
from yichui.state.connection import REDIS_ERRORS, mask_password
from yichui.state.task_store import Claim, TaskStore
from yichui.supervise import PARENT_GONE
from yichui.tasks.context import HandedBack, LeaseLost, TaskCancelled, TaskContext
from yichui.tasks.types import TaskTypes

log = logging.getLogger("yichui.worker")

_SECRETS = re.compile(
    r"(?i)((?:token|password|passwd|secret|api[_-]?key|authorization)[\"']?\s*[=:]\s*[\"']?)"
    r"[^\s\"',;&]+"
)
_HUB_TOKEN = re.compile(r"\b(hf|ms)_[A-Za-z0-9]{8,}\b")
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"']+", re.IGNORECASE)


def redact(text: str, limit: int = 2000) -> str:
    """An error message fit to store: passwords in URLs, tokens and keys masked, bounded."""
    text = _URL.sub(lambda m: mask_password(m.group(0)), text)
    text = _SECRETS.sub(r"\1***", text)
    text = _HUB_TOKEN.sub(r"\1_***", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_payload(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": redact(str(exc))}
    if isinstance(exc, YichuiError) and exc.hint:
        out["hint"] = redact(exc.hint)
    return out


_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, StateError)


class FailoverWatch(Protocol):
    """Follows the Redis master (``state/sentinel.py``'s :class:`SentinelWatch`, or
    ``state/cluster.py``'s :class:`ClusterWatch`) and calls back :meth:`Worker.redis_changed`
    when it changes."""

    def start(self) -> object: ...
    def stop(self) -> None: ...


STALE_WORKER_MIN = 60.0
"""Seconds of silence (at least) before a worker's entry and consumer are dropped."""
STALE_WORKER_SWEEP = 30.0
"""Seconds between two sweeps for dead workers, per worker."""
GOODBYE = 3.0
"""Seconds the hand-back, and then the housekeeper's last beat with the deregistration, may take
at shutdown: past that Redis is taken to be unreachable and the leases are left to lapse."""

T = TypeVar("T")


class _Stopped(Exception):
    """Redis failed while the worker was stopping: the work is left to the lease or the
    redelivery of orphaned entries."""


class Worker:
    """A worker of one queue::

    Worker(store, builtin_types(), queue="default", concurrency=2).run()           # forever
    Worker(store, builtin_types(), queue="default", burst=True).run()   # until the queue is empty
    """

    def __init__(
        self,
        store: TaskStore,
        types: TaskTypes,
        *,
        queue: str = "default",
        concurrency: int = 1,
        lease: float = 30.0,
        heartbeat: float = 3.0,
        backoff: float = 2.0,
        backoff_max: float = 300.0,
        progress_interval: float = 0.5,
        burst: bool = False,
        name: str | None = None,
        services: Any = None,
        block: float = 1.0,
        grace: float = 10.0,
        metrics: Metrics | None = None,
        failovers: FailoverWatch | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics(role="worker")
        self.types = types
        self.queue = queue
        self.concurrency = concurrency
        self.lease_ms = int(lease * 1000)
        self.heartbeat = heartbeat
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.progress_interval = progress_interval
        self.burst = burst
        self.services = services
        self.block_ms = max(1, int(block * 1000))
        self.grace = grace
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.started = time.time()
        self.stats: Counter[str] = Counter()
        self._stop = threading.Event()  # take no new work
        self._halt = threading.Event()  # housekeeper off (after the slots are done)
        self._lock = threading.Lock()
        self._active: dict[str, TaskContext] = {}
        self._inflight = 0
        self._handing_back = False
        self._hand_back_on_stop = False
        self._signals = 0
        self._redis_down = False
        self.failovers = failovers
        """Calls :meth:`redis_changed` on a new master (a Sentinel's ``+switch-master``)."""
        self._master_changes = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> Counter[str]:
        """Work until stopped (or, in burst mode, until the queue is empty); -> outcome counts."""
        if self.burst:  # notice an empty queue quickly
            self.block_ms = min(self.block_ms, 100)
        if install_signals and threading.current_thread() is threading.main_thread():
            # before the first Redis call: a SIGTERM while Redis is still down stops us too
            for sig in (signal.SIGTERM, signal.SIGINT, PARENT_GONE):
                signal.signal(sig, self._on_signal)
        if self.failovers is not None:
            self.failovers.start()
        try:
            self._until_redis(lambda: self.store.ensure_group(self.queue))
        except _Stopped:
            log.info("worker %s: stopped before Redis was reachable", self.id)
            return self.stats
        log.info("worker %s: queue %r, %d slot(s)", self.id, self.queue, self.concurrency)
        slots = [
            threading.Thread(target=self._slot, name=f"slot-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        keeper = threading.Thread(target=self._housekeeper, name="housekeeper", daemon=True)
        keeper.start()
        for t in slots:
            t.start()
        try:
            while not self._stop.wait(0.05 if self.burst else 0.5):
                if self.burst and self._burst_done():
                    self._stop.set()
        finally:
            self._stop.set()
            self._shut_down(slots, keeper)
            if self.failovers is not None:
                self.failovers.stop()
        log.info("worker %s stopped: %s", self.id, dict(self.stats) or "no tasks")
        return self.stats

    def _shut_down(self, slots: list[threading.Thread], keeper: threading.Thread) -> None:
        grace = self.grace
        if self._hand_back_on_stop:
            grace = max(grace, self.hand_back())
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:  # running tasks finish or wind down
            with self._lock:
                if not self._inflight:
                    break
            time.sleep(0.05)
        # an idle slot sees the stop once its blocking read returns; one stuck on a hung Redis
        # (socket timeouts times retries) is a daemon thread, left behind
        reads = min(deadline, time.monotonic() + self.block_ms / 1000 + 1.0)
        for t in slots:
            t.join(max(0.0, reads - time.monotonic()))
        self._halt.set()
        goodbye = time.monotonic() + GOODBYE
        keeper.join(GOODBYE)
        if not keeper.is_alive():  # its last beat went through: so may the goodbye
            self._bounded(self._deregister, goodbye - time.monotonic())

    def _deregister(self) -> None:
        with contextlib.suppress(*_ERRORS):
            self.store.remove_worker(self.id, self.queue)

    @staticmethod
    def _bounded(fn: Callable[[], None], timeout: float) -> None:
        """``fn()`` (Redis writes that catch their own errors) for at most ``timeout`` s, in a
        daemon thread: a hung Redis cannot hold up the shutdown."""
        if timeout > 0:
            t = threading.Thread(target=fn, name="goodbye", daemon=True)
            t.start()
            t.join(timeout)

    def stop(self, *, hand_back: bool = True) -> None:
        """Take no new work; with ``hand_back`` return running tasks to the queue at once."""
        self._hand_back_on_stop = hand_back
        self._stop.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == PARENT_GONE and signum not in (signal.SIGTERM, signal.SIGINT):
            # the process that started us died; this may come several times: stop once
            if not self._stop.is_set():
                log.info("worker %s: parent gone, handing running tasks back", self.id)
                self.stop(hand_back=True)
            return
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            os._exit(128 + signum)
        log.info("worker %s: %s, handing running tasks back", self.id, signal.Signals(signum).name)
        self.stop(hand_back=True)

    def hand_back(self) -> float:
        """Return every running task to the queue now (shutdown), and stop their runs.

        A run of a type with a ``stop_grace`` (training: it saves a checkpoint first) keeps its
        lease until it has wound down, so that no other worker starts it meanwhile; it is
        handed back when its handler returns. -> the longest such grace, to wait for."""
        with self._lock:
            self._handing_back = True
            active = list(self._active.values())
        longest = 0.0
        now: list[TaskContext] = []
        for ctx in active:
            ctx.stop(HandedBack)
            if self._graceful(ctx):
                longest = max(longest, self.types.get(ctx.type).stop_grace)
            else:
                now.append(ctx)

        def release_now() -> None:
            for ctx in now:
                self._release(ctx, "handed back")

        if now:
            self._bounded(release_now, GOODBYE)
        return longest

    def _graceful(self, ctx: TaskContext) -> bool:
        known = self.types.types.get(ctx.type)
        return known is not None and known.stop_grace > 0

    def _release_wound_down(self, ctx: TaskContext) -> None:
        """Hand back a run that stopped on its own after a shutdown (see :meth:`hand_back`)."""
        if self._graceful(ctx):
            self._release(ctx, "wound down, handed back")

    def _release(self, ctx: TaskContext, done: str) -> None:
        try:
            outcome = self.store.release(ctx.id, self.queue, ctx.token)
        except _ERRORS as exc:
            log.warning("task %s: could not hand back (%s); its lease will lapse", ctx.id, exc)
            return
        log.info("task %s: %s", ctx.id, {0: "lease already lost", 1: done, 2: "cancelled"}[outcome])
        if outcome == 1:
            self._count(ctx, "handed_back")

    def _burst_done(self) -> bool:
        with self._lock:
            if self._inflight:
                return False
        try:
            # an entry a slot has just read is pending for us before the slot counts it in
            # flight: not done while we hold one
            idle = self.store.backlog(self.queue) == 0
            return idle and not self.store.holds_pending(self.queue, self.id)
        except _ERRORS:
            return False

    # -- Redis outages --------------------------------------------------------------------------
    def _until_redis(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while Redis is down; :class:`_Stopped` once the worker
        is stopping (nothing waits for a Redis that may not come back)."""
        backoff = Backoff(first=0.1, cap=5.0)
        while True:
            try:
                out = fn()
            except _ERRORS as exc:
                self._down(exc)
                if self._pause(self._stop, backoff.next()):
                    raise _Stopped from exc
                continue
            self._up()
            return out

    @property
    def redis_down(self) -> bool:
        """Whether the last Redis call failed (the worker waits and tries again)."""
        return self._redis_down

    def redis_changed(self) -> None:
        """A new Redis master (a failover): every wait between retries ends now."""
        self._master_changes += 1

    def _pause(self, event: threading.Event, delay: float) -> bool:
        """Wait ``delay`` s, or less when the master changes meanwhile; True once ``event``
        (stop or halt) is set. Polls the change every 50 ms: no wake-up to miss."""
        seen = self._master_changes
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if event.wait(min(left, 0.05)):
                return True
            if self._master_changes != seen:
                break
        return event.is_set()

    def _down(self, exc: BaseException) -> None:
        if not self._redis_down:
            self._redis_down = True
            log.warning("worker %s: Redis unreachable (%s); retrying with backoff", self.id, exc)

    def _up(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("worker %s: Redis is back", self.id)

    # -- slots ----------------------------------------------------------------------------------
    def _slot(self) -> None:
        backoff = Backoff(first=0.1, cap=5.0)
        while not self._stop.is_set():
            try:
                deliveries = self.store.read(self.queue, self.id, block_ms=self.block_ms)
                self._up()
                backoff.reset()
            except _ERRORS as exc:
                self._down(exc)
                self._pause(self._stop, backoff.next())
                continue
            for entry_id, task_id in deliveries:
                with self._lock:
                    self._inflight += 1
                try:
                    self._deliver(entry_id, task_id)
                except _Stopped:  # the entry stays pending: redelivered as an orphan later
                    return
                finally:
                    with self._lock:
                        self._inflight -= 1

    def _deliver(self, entry_id: str, task_id: str) -> None:
        if self._stop.is_set():  # read just as we stopped: give it straight back
            self._until_redis(lambda: self.store.redeliver(task_id, self.queue, entry_id))
            return
        token = secrets.token_hex(16)
        claim: Claim | None = self._until_redis(
            lambda: self.store.claim(
                task_id,
                entry_id,
                queue=self.queue,
                worker=self.id,
                token=token,
                lease_ms=self.lease_ms,
            )
        )
        if claim is None:
            return
        ctx = TaskContext(
            self.store,
            claim,
            queue=self.queue,
            worker=self.id,
            progress_interval=self.progress_interval,
            services=self.services,
        )
        with self._lock:
            handing_back = self._handing_back
            if not handing_back:
                self._active[claim.id] = ctx
        if handing_back:
            self._until_redis(lambda: self.store.release(claim.id, self.queue, claim.token))
            return
        self.metrics.worker_running.inc()
        started = time.monotonic()
        try:
            log.info("task %s (%s): attempt %d started", claim.id, claim.type, claim.attempt)
            outcome, payload, delay = self._execute(ctx, claim)
            if outcome is not None:
                self._finish(ctx, outcome, payload, delay)
            elif ctx.stopping is HandedBack:
                self._release_wound_down(ctx)
            else:
                self._count(ctx, "abandoned")
                if ctx.stopping is LeaseLost:
                    log.warning(
                        "task %s: lease lost (another worker owns it now); run abandoned", ctx.id
                    )
        finally:
            with self._lock:
                self._active.pop(claim.id, None)
            self.metrics.worker_running.dec()
            self.metrics.worker_task_seconds.labels(claim.type).observe(time.monotonic() - started)

    def _execute(
        self, ctx: TaskContext, claim: Claim
    ) -> tuple[str | None, Mapping[str, Any], float]:
        try:
            task_type = self.types.get(claim.type)
            args = task_type.parse(claim.args)
            handler = task_type.load()
            ctx.check()
            result = handler(ctx, args)
            if not (ctx.stopping is HandedBack and self._graceful(ctx)):
                ctx.check()  # a run that wound down and still finished: its result stands
            try:
                payload = dict(result or {})
                dumps(payload)
            except (TypeError, ValueError) as exc:  # running it again would not help
                raise TaskFailedError(
                    f"the result of {claim.type!r} cannot be stored as JSON: {exc}",
                    retryable=False,
                ) from exc
            return "succeeded", payload, 0.0
        except TaskCancelled:
            if ctx.stopping in (LeaseLost, HandedBack):
                return None, {}, 0.0
            return "cancelled", {"type": "Cancelled", "message": "cancelled by user"}, 0.0
        except (LeaseLost, HandedBack):
            return None, {}, 0.0
        except Exception as exc:
            if ctx.stopping in (LeaseLost, HandedBack):
                return None, {}, 0.0
            if ctx.stopping is TaskCancelled:  # it failed on its way out: still a cancel
                return "cancelled", {"type": "Cancelled", "message": "cancelled by user"}, 0.0
            err = error_payload(exc)
            log.warning(
                "task %s: attempt %d failed: %s: %s",
                ctx.id,
                ctx.attempt,
                err["type"],
                err["message"],
            )
            if not getattr(exc, "retryable", True):
                return "failed", err, 0.0
            if ctx.attempt >= ctx.max_attempts:
                err["message"] = f"gave up after {ctx.attempt} attempts; last: {err['message']}"
                return "dead", err, 0.0
            return "retry", err, self.retry_delay(ctx.attempt)

    def _count(self, ctx: TaskContext, outcome: str) -> None:
        self.stats[outcome] += 1
        self.metrics.worker_tasks.labels(ctx.type, outcome).inc()

    def retry_delay(self, attempt: int) -> float:
        """Exponential backoff with ±50 % jitter, capped at ``backoff_max``."""
        return jittered_delay(attempt, first=self.backoff, cap=self.backoff_max, jitter=0.5)

    def _finish(
        self, ctx: TaskContext, outcome: str, payload: Mapping[str, Any], delay: float
    ) -> None:
        progress = ctx.final_progress()
        backoff = Backoff(first=0.1, cap=5.0)
        while True:
            if ctx.stopping is LeaseLost or (
                ctx.stopping is HandedBack and not self._graceful(ctx)
            ):
                self._count(ctx, "abandoned")
                return
            try:
                ok = self.store.finish(
                    ctx.id,
                    self.queue,
                    ctx.token,
                    outcome,
                    payload,
                    retry_delay=delay,
                    progress=progress,
                )
                self._up()
                break
            except _ERRORS as exc:  # keep the result until Redis takes it (or the lease goes)
                self._down(exc)
                if self._pause(self._halt, backoff.next()):  # shut down before Redis came back
                    self._count(ctx, "abandoned")
                    return
        if ok:
            self._count(ctx, outcome)
            log.info(
                "task %s: %s", ctx.id, outcome if outcome != "retry" else f"retry in {delay:.1f}s"
            )
        else:
            self._count(ctx, "abandoned")
            log.warning("task %s: lease lost before finishing; another worker owns it", ctx.id)

    # -- housekeeping ---------------------------------------------------------------------------
    def _housekeeper(self) -> None:
        last_sweep = time.monotonic()
        with contextlib.suppress(*_ERRORS):
            self.beat()  # show up in `tasks workers` at once
        while not self._halt.wait(self.heartbeat):
            try:
                self.beat()
                self.store.housekeep(self.queue, self.id, orphan_idle_ms=self.lease_ms)
                if time.monotonic() - last_sweep > STALE_WORKER_SWEEP:
                    last_sweep = time.monotonic()
                    gone = self.store.forget_workers(self.queue, stale_ms=self._stale_ms())
                    for worker_id in gone:
                        log.info("forgot worker %s (silent for long)", worker_id)
                self._up()
            except _ERRORS as exc:
                self._down(exc)

    def _stale_ms(self) -> int:
        """A worker silent this long is dead (killed workers never say goodbye)."""
        return int(max(STALE_WORKER_MIN, 20 * self.heartbeat, 2 * self.lease_ms / 1000) * 1000)

    def beat(self) -> None:
        """Renew our leases; pass cancels and lost leases on to the runs."""
        with self._lock:
            active = list(self._active.values())
        info = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queue": self.queue,
            "concurrency": self.concurrency,
            "started": self.started,
            "running": [c.id for c in active],
        }
        held = [(c.id, c.token) for c in active]
        for ctx, res in zip(
            active,
            self.store.heartbeat(self.queue, self.id, self.lease_ms, info, held),
            strict=True,
        ):
            if res == 0:
                ctx.stop(LeaseLost)
            elif res == 2:
                ctx.stop(TaskCancelled)
