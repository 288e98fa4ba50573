"""What task code sees: arguments, attempt, checkpoint, and a cheap progress/log API.

::

    def handler(ctx: TaskContext, args: MyArgs) -> dict:
        start = ctx.checkpoint or 0            # resume where an earlier attempt stopped
        for step in range(start, args.steps):
            ...
            ctx.report(step + 1, args.steps, loss=0.42)   # cheap: call it every step
            ctx.save_checkpoint(step + 1)
        return {"answer": 42}                  # stored as the task's result

``report`` and ``log`` buffer in memory and write at most every ``progress_interval`` seconds
(one Lua call carrying the latest progress and every buffered line). They are also where a
cancel, a lost lease or a shutdown reaches task code: they raise a :class:`TaskInterrupt`,
which derives from ``BaseException`` so that ``except Exception`` in task code cannot swallow it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic

from typing_extensions import TypeVar

from yichui.state.codec import dumps, loads
from yichui.state.connection import REDIS_ERRORS
from yichui.state.task_store import Claim, TaskStore


class TaskInterrupt(BaseException):
    """The run must stop now; the worker decides the task's state."""


class TaskCancelled(TaskInterrupt):
    """A user cancelled the task: it ends ``cancelled``."""


class LeaseLost(TaskInterrupt):
    """The lease lapsed and the task was handed to another worker: write nothing more."""


class HandedBack(TaskInterrupt):
    """This worker is shutting down and gave the task back to the queue."""


S = TypeVar("S", default=Any)
"""The services a worker hands its task handlers (the composition root's Runtime); each
capability says what its handlers need as a Protocol: ``TaskContext[TrainingServices]``."""


class TaskContext(Generic[S]):
    """One run (attempt) of one task, inside a worker."""

    def __init__(
        self,
        store: TaskStore,
        claim: Claim,
        *,
        queue: str,
        worker: str,
        progress_interval: float = 0.5,
        services: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.id = claim.id
        self.type = claim.type
        self.attempt = claim.attempt
        """1 on the first run; higher when the task is retried or reclaimed from a dead worker."""
        self.max_attempts = claim.max_attempts
        self.fence = claim.fence
        """A number that grows with every claim of this task: tag external writes with it
        (checkpoint folders, uploads) so a newer run can tell a stale run's output apart."""
        self.checkpoint: Any = claim.checkpoint
        """What the last attempt saved with :meth:`save_checkpoint` (None on a first run)."""
        self.queue = queue
        self.worker = worker
        self.services: S = services
        """What the worker was given for its handlers: the composition root's services."""
        self.token = claim.token
        self.interval = progress_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._progress: dict[str, Any] | None = None
        self._logs: list[dict[str, Any]] = []
        self._checkpoint_dirty = False
        self._last_flush = -1e18
        self._eta_origin: tuple[float, int] | None = None
        self.interrupt = threading.Event()
        """Set when the run must stop; :meth:`sleep` wakes on it."""
        self._reason: type[TaskInterrupt] | None = None
        self.write_errors = 0
        """Progress writes that failed on a Redis error (they are retried with the next one)."""

    # -- signals from the worker ----------------------------------------------------------------
    def stop(self, reason: type[TaskInterrupt]) -> None:
        """Ask the run to stop with ``reason`` (from the heartbeat or shutdown threads)."""
        with self._lock:
            # a lost lease outranks a cancel: nothing may be written any more
            if self._reason is None or reason is LeaseLost:
                self._reason = reason
        self.interrupt.set()

    @property
    def stopping(self) -> type[TaskInterrupt] | None:
        return self._reason

    def check(self) -> None:
        """Raise the pending interrupt, if any. Long loops without reports should call it."""
        reason = self._reason
        if reason is not None:
            raise reason(reason.__doc__ or reason.__name__)

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` that wakes at once on cancel, lost lease or shutdown."""
        self.check()
        if self.interrupt.wait(seconds):
            self.check()

    # -- progress API ---------------------------------------------------------------------------
    def report(
        self, step: int, total: int | None = None, *, unit: str = "step", **metrics: float
    ) -> None:
        """Record progress; written at most every ``progress_interval`` (and at the last step)."""
        self.check()
        now = self._record(step, total, unit, metrics)
        if (total is not None and step >= total) or now - self._last_flush >= self.interval:
            self.flush()

    def report_final(
        self, step: int, total: int | None = None, *, unit: str = "step", **metrics: float
    ) -> None:
        """Record the progress of a run winding down after an interrupt (the step a checkpoint
        was saved at when cancelled): it neither raises nor writes; the finishing script stores
        it with the final state."""
        self._record(step, total, unit, metrics)

    def _record(self, step: int, total: int | None, unit: str, metrics: dict[str, float]) -> float:
        now = self._clock()
        if self._eta_origin is None or step < self._eta_origin[1]:
            self._eta_origin = (now, step)
        t0, s0 = self._eta_origin
        eta: float | None = None
        rate: float | None = None
        if step > s0 and now > t0:
            rate = (step - s0) / (now - t0)
            if total is not None:
                eta = max(0.0, (total - step) / rate)
        percent = None if not total else round(100.0 * min(step, total) / total, 2)
        progress: dict[str, Any] = {
            "step": step,
            "total": total,
            "percent": percent,
            "unit": unit,
            "eta": None if eta is None else round(eta, 3),
            "rate": None if rate is None else round(rate, 4),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        with self._lock:
            self._progress = progress
        return now

    def log(self, line: str, *, level: str = "info") -> None:
        """Append a line to the task's log (buffered like progress)."""
        self.check()
        with self._lock:
            self._logs.append({"ts": time.time(), "level": level, "line": str(line)})
            many = len(self._logs) >= 200
        if many or self._clock() - self._last_flush >= self.interval:
            self.flush()

    def save_checkpoint(self, value: Any, *, now: bool = True) -> None:
        """Save a small JSON value a later attempt receives as ``ctx.checkpoint``. Written at
        once by default (it must survive the crash that follows it); ``now=False`` sends it
        with the next progress write instead."""
        with self._lock:
            self.checkpoint = loads(dumps(value))
            self._checkpoint_dirty = True
        if now:
            self.flush()

    def flush(self) -> None:
        """Write buffered progress, checkpoint and log lines now (one round trip)."""
        if self._reason is LeaseLost:
            raise LeaseLost(LeaseLost.__doc__)
        with self._lock:
            progress, logs = self._progress, self._logs
            checkpoint = self.checkpoint if self._checkpoint_dirty else None
            self._progress, self._logs, self._checkpoint_dirty = None, [], False
            self._last_flush = self._clock()
        if progress is None and not logs and checkpoint is None:
            return
        try:
            outcome = self.store.report(
                self.id, self.queue, self.token, progress=progress, checkpoint=checkpoint, logs=logs
            )
        except REDIS_ERRORS:
            self.write_errors += 1
            with self._lock:  # keep them for the next write; newer progress wins
                self._logs = logs + self._logs
                self._progress = self._progress or progress
                if checkpoint is not None:
                    self._checkpoint_dirty = True
            return
        if outcome == 0:
            self.stop(LeaseLost)
        elif outcome == 2:
            self.stop(TaskCancelled)
        self.check()

    def final_progress(self) -> dict[str, Any] | None:
        """Unwritten progress, handed to the finishing script; buffered log lines and a
        pending checkpoint are written first."""
        with self._lock:
            logs, self._logs = self._logs, []
            progress, self._progress = self._progress, None
            checkpoint = self.checkpoint if self._checkpoint_dirty else None
            self._checkpoint_dirty = False
        if logs or checkpoint is not None:
            try:
                self.store.report(self.id, self.queue, self.token, checkpoint=checkpoint, logs=logs)
            except REDIS_ERRORS:
                self.write_errors += 1
        return progress
