"""The bridge from the transformers Trainer to the task: progress, log lines, cancel.

Every logged step (``logging_steps=1``) becomes a ``ctx.report`` with loss, learning rate, grad
norm, tokens/s and epoch (coalesced by the context into one Redis write per
``task_progress_interval``) and a line in the run's ``logging.jsonl``. A cancel or a shutdown
(SIGTERM hand-back) noticed at a step makes the Trainer save a checkpoint at that step and stop;
the handler then raises the interrupt, so the task ends ``cancelled`` (or goes back to the
queue) with its newest checkpoint on disk. A lost lease stops at once and writes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

from yichui.tasks.context import HandedBack, LeaseLost, TaskCancelled, TaskContext, TaskInterrupt

LINE_EVERY = 5.0
"""Least seconds between two ``step …`` lines in the task log (progress goes every step)."""


class TaskProgress(TrainerCallback):
    def __init__(self, ctx: TaskContext | None, run_dir: Path | None = None) -> None:
        self.ctx = ctx
        self.stopped: type[TaskInterrupt] | None = None
        self._path = run_dir / "logging.jsonl" if run_dir is not None else None
        self._log: TextIO | None = None  # opened at the first logged step
        self._mark: tuple[float, int] | None = None
        self._last_line = 0.0
        self.last: dict[str, Any] = {}
        """The newest logged metrics (what the result reports)."""

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._mark = (time.monotonic(), int(state.num_input_tokens_seen or 0))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.ctx is None:
            return
        reason = self.ctx.stopping
        if reason is LeaseLost:
            raise LeaseLost(LeaseLost.__doc__)
        if reason is not None:
            self._halt(control, reason)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:  # the end-of-training summary
            return
        now = time.monotonic()
        tokens = int(state.num_input_tokens_seen or 0)
        tps = None
        if self._mark is not None and now > self._mark[0] and tokens > self._mark[1]:
            tps = (tokens - self._mark[1]) / (now - self._mark[0])
        self._mark = (now, tokens)
        metrics = {
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "epoch": float(logs.get("epoch", state.epoch or 0.0)),
        }
        if logs.get("grad_norm") is not None:
            metrics["grad_norm"] = float(logs["grad_norm"])
        if tps is not None:
            metrics["tokens_per_s"] = round(tps, 1)
        self.last = {"step": state.global_step, **metrics}
        if self._path is not None:
            if self._log is None:
                self._log = open(self._path, "a", encoding="utf-8")  # noqa: SIM115
            row = {"step": state.global_step, "total": state.max_steps, "ts": time.time()}
            self._log.write(json.dumps({**row, **metrics}) + "\n")
            self._log.flush()
        if self.ctx is None:
            return
        step, total = int(state.global_step), int(state.max_steps)
        if self.stopped is not None:  # the step the checkpoint is saved at, stored at the end
            self.ctx.report_final(step, total, unit="step", **metrics)
            return
        try:
            self.ctx.report(step, total, unit="step", **metrics)
            if step in (1, total) or now - self._last_line >= LINE_EVERY:
                self._last_line = now
                self.ctx.log(f"step {step}/{total} " + _fmt(metrics))
        except (TaskCancelled, HandedBack) as exc:
            self._halt(control, type(exc))

    def _halt(self, control: Any, reason: type[TaskInterrupt]) -> None:
        if self.stopped is None:
            self.stopped = reason
        control.should_save = True
        control.should_training_stop = True


def _fmt(metrics: dict[str, float]) -> str:
    parts = [f"loss {metrics['loss']:.4f}", f"lr {metrics['learning_rate']:.3g}"]
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3g}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return " ".join(parts)
